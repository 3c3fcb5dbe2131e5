"""The embedded default job end to end: train on digits, remove activations, fold, export, verify, bench."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from easier_export.demo import run_demo
from easier_export.load.data import digits
from easier_export.load.models import load_model
from easier_export.ship.schema import validate_report


@pytest.mark.slow  # trains the demo network: a minute of CPU
def test_demo_pipeline_removes_activations_and_onnx_matches_pytorch(tmp_path):
    report = run_demo(tmp_path, epochs=6, finetune_epochs=1.0, max_drop=5.0, fold="all", select="entropy")
    assert any(r["within_budget"] for r in report["rounds"])
    # what ships (a kept round measured faster than the original, or the original) is the clock's call
    assert report["compressed"]["removed"] == report["shipped"]["removed"]
    assert report["original"]["top1"] > 80.0
    assert report["verify"]["passed"] and report["verify"]["max_abs"] <= 1e-4
    written = json.loads((tmp_path / "report.json").read_text())
    assert written["compressed"]["removed"] == report["compressed"]["removed"]
    assert validate_report(written) == []

    # Independently: the shipped ONNX against the linearized checkpoint, on real digit images.
    linearized = load_model(str(tmp_path / "linearized.pt")).model.eval()
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    x, _ = next(iter(digits().val))
    with torch.no_grad():
        expected = linearized(x).numpy()
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - expected).max() <= 1e-4
    assert {"original", "linearized", "folded"} <= {row["label"] for row in report["bench"]}


def test_demo_model_does_not_depend_on_random_numbers_drawn_before(tmp_path):
    """`make demo` must train the same network whatever imported or ran before it."""
    from easier_export.demo import trained_demo_model

    first = trained_demo_model(tmp_path / "a", epochs=0, seed=0).state_dict()
    torch.rand(1000)  # anything else drawing from the global generator
    second = trained_demo_model(tmp_path / "b", epochs=0, seed=0).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
