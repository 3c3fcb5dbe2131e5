"""Hugging Face model directories (tiny GPT-2 / BERT built from configs, nothing downloaded): the traceable
rewrite reproduces transformers, the folds across removed MLP activations are exact, the ONNX export has dynamic
batch and sequence axes and is verified at two lengths, and bad directories are refused in one line."""

import json

import onnx
import pytest
import torch
from conftest import run_cli as run
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertLMHeadModel,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
)
from transformers.pytorch_utils import Conv1D

from easier_export.core.errors import UserError
from easier_export.fold import fold_model
from easier_export.load.hf import linear_from_conv1d
from easier_export.load.models import load_model
from easier_export.load.text import random_token_batches
from easier_export.ship.export import export_onnx, verify_onnx
from easier_export.trace.edits import remove_sites
from easier_export.trace.sites import find_call_sites
from easier_export.trace.tracing import trace

GPT2 = {"vocab_size": 256, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 4}
BERT = {"vocab_size": 300, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "max_position_embeddings": 64}
MODELS = {
    "gpt2_lm": lambda: GPT2LMHeadModel(GPT2Config(**GPT2)),
    "gpt2_cls": lambda: GPT2ForSequenceClassification(GPT2Config(**GPT2, num_labels=3, pad_token_id=0)),
    "bert_cls": lambda: BertForSequenceClassification(BertConfig(**BERT, num_labels=2, hidden_act="gelu")),
    "bert_lm": lambda: BertLMHeadModel(BertConfig(**BERT, is_decoder=True)),
}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    for name, make in MODELS.items():
        make().save_pretrained(root / name)
    return root


def _hf(path):
    """transformers' own model, for reference outputs."""
    config = json.loads((path / "config.json").read_text())
    import transformers

    return getattr(transformers, config["architectures"][0]).from_pretrained(path).eval()


@pytest.mark.parametrize("name", list(MODELS))
def test_rewrite_reproduces_transformers_at_two_lengths(hf_dirs, name):
    loaded = load_model(str(hf_dirs / name))
    hf = _hf(hf_dirs / name)
    for ids in random_token_batches(loaded.task.spec, 16):
        mask = None
        if loaded.task.spec.task == "classification":
            ids[ids == loaded.task.spec.pad_id] = 1
            ids[0, -4:] = loaded.task.spec.pad_id  # right padding: masked in attention, skipped by pooling
            mask = (ids != loaded.task.spec.pad_id).long()
        with torch.no_grad():
            want = hf(input_ids=ids, attention_mask=mask).logits
            got = loaded.model(ids)
        assert got.shape == want.shape
        assert (got - want).abs().max() <= 1e-5 * want.abs().max().clamp_min(1)


def test_conv1d_becomes_the_same_linear():
    conv = Conv1D(12, 5)  # nf=12 outputs, nx=5 inputs; weight stored (5, 12)
    torch.nn.init.normal_(conv.bias)
    x = torch.randn(3, 7, 5)
    linear = linear_from_conv1d(conv)
    assert linear.weight.shape == (12, 5)
    assert torch.allclose(linear(x), conv(x), atol=1e-6)


@pytest.mark.parametrize("name", ["gpt2_lm", "bert_cls"])
def test_removing_mlp_activations_folds_fc1_fc2_exactly(hf_dirs, name):
    loaded = load_model(str(hf_dirs / name))
    gm = trace(loaded.model)
    mlp_acts = [s.name for s in find_call_sites(gm) if s.name.startswith("blocks_")]
    assert len(mlp_acts) == 2
    linear = remove_sites(gm, mlp_acts)
    ids = random_token_batches(loaded.task.spec, 16)[0]
    folded, records = fold_model(linear, ids[:1], mode="all")
    merged = [r for r in records if r.kind == "linear_linear" and r.applied]
    assert len(merged) == 2
    with torch.no_grad():
        want, got = linear(ids), folded(ids)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max().clamp_min(1)
    # each MLP's d·h + h·d weights (and h + d biases) became one d×d matrix (and d biases)
    d, h = loaded.model.blocks[0].fc1.in_features, loaded.model.blocks[0].fc1.out_features
    unmerged, _ = fold_model(linear, ids[:1], mode="none")
    saved = sum(p.numel() for p in unmerged.parameters()) - sum(p.numel() for p in folded.parameters())
    assert saved == 2 * (2 * d * h + h - d * d)


def test_onnx_export_has_dynamic_batch_and_sequence(hf_dirs, tmp_path):
    loaded = load_model(str(hf_dirs / "gpt2_lm"), img_size=(32,))
    inputs = random_token_batches(loaded.task.spec, 32)
    assert [x.shape[1] for x in inputs] == [32, 16]
    export_onnx(loaded.model, inputs[0][:1], tmp_path / "m.onnx")
    dims = onnx.load(str(tmp_path / "m.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "sequence"]
    result = verify_onnx(tmp_path / "m.onnx", loaded.model, inputs)
    assert result.passed and result.top1_agree == 1.0 and result.max_abs < 1e-4


def test_export_and_bench_commands_on_a_text_model(capsys, hf_dirs, tmp_path):
    out = tmp_path / "bert.onnx"
    code, text = run(capsys, "export", str(hf_dirs / "bert_cls"), "--out", str(out), "--input-size", "24")
    assert code == 0, text
    code, text = run(capsys, "bench", str(out), "--bench-batches", "1", "--bench-seconds", "0.05")
    assert code == 0, text
    assert "sequence 64" in text and "tokens/s" in text  # 128 would exceed the model's 64 positions


def test_pickled_weights_refused_and_plain_tensors_accepted(tmp_path):
    model = GPT2LMHeadModel(GPT2Config(**GPT2))
    model.save_pretrained(tmp_path / "ok")
    (tmp_path / "ok" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "ok" / "pytorch_model.bin")
    assert load_model(str(tmp_path / "ok")).task.spec.task == "causal_lm"
    model.save_pretrained(tmp_path / "bad")
    (tmp_path / "bad" / "model.safetensors").unlink()
    torch.save({"module": torch.nn.Linear(2, 2)}, tmp_path / "bad" / "pytorch_model.bin")
    with pytest.raises(UserError, match="--trust-pickle"):
        load_model(str(tmp_path / "bad"))


def test_custom_code_and_unsupported_architectures_are_refused(capsys, tmp_path):
    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "config.json").write_text(json.dumps({"model_type": "my_model", "architectures": ["MyModel"],
                                                    "auto_map": {"AutoConfig": "my_code.MyConfig"}}))
    (custom / "my_code.py").write_text("raise SystemExit('remote code ran')\n")
    code, text = run(capsys, "export", str(custom), "--out", str(tmp_path / "x.onnx"))
    assert code == 2 and "custom code (auto_map)" in text and len(text.strip().splitlines()) == 1
    masked = tmp_path / "mlm"
    from transformers import BertForMaskedLM

    BertForMaskedLM(BertConfig(**BERT)).save_pretrained(masked)
    with pytest.raises(UserError, match="BertForMaskedLM .* not supported"):
        load_model(str(masked))


def test_linearized_checkpoint_of_a_text_model_reloads(hf_dirs, tmp_path):
    """The recipe points at the directory: removals replay on the rewrite, the text spec comes back."""
    from easier_export.loop.state import LoopResult
    from easier_export.pipeline import save_linearized

    loaded = load_model(str(hf_dirs / "gpt2_lm"), img_size=(16,))
    gm = remove_sites(trace(loaded.model), ["blocks_1_act"])
    result = LoopResult(gm, ["blocks_1_act"], 0.0, 0.0, [], [])
    save_linearized(tmp_path / "linearized.pt", loaded, result, False)
    again = load_model(str(tmp_path / "linearized.pt"))
    ids = random_token_batches(loaded.task.spec, 16)[0]
    assert again.task == loaded.task and again.input_size == (16,)
    assert torch.equal(again.model(ids), gm(ids))


@pytest.mark.parametrize(("args", "says"), [
    (["--num-classes", "3"], "--num-classes: not for a Hugging Face directory"),
    (["--weights", "w.pt"], "--weights: not for a Hugging Face directory"),
    (["--mean", "0.5", "--std", "0.2"], "--mean, --std: not for a Hugging Face directory"),
    (["--input-size", "3x32"], "--input-size 3x32: a text model's input size is one number")])
def test_image_options_are_refused_for_text_models(capsys, hf_dirs, tmp_path, args, says):
    out = tmp_path / "x.onnx"
    code, text = run(capsys, "export", str(hf_dirs / "gpt2_lm"), "--out", str(out), *args)
    lines = text.strip().splitlines()
    assert code == 2 and len(lines) == 1 and says in lines[0] and "Traceback" not in text, text
    assert list(tmp_path.iterdir()) == []


def test_directories_that_are_not_models_say_why(capsys, hf_dirs, tmp_path):
    gpt2_custom = tmp_path / "gpt2_custom"  # the built-in GPT-2 would load where custom code is asked for
    gpt2_custom.mkdir()
    config = json.loads((hf_dirs / "gpt2_lm" / "config.json").read_text())
    (gpt2_custom / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "mine.Model"}}))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    empty = tmp_path / "empty"
    empty.mkdir()
    for path, says in ((gpt2_custom, "custom code (auto_map)"), (corrupt, "config.json is not readable JSON"),
                       (empty, "is a directory without config.json")):
        code, text = run(capsys, "export", str(path), "--out", str(tmp_path / "x.onnx"))
        lines = text.strip().splitlines()
        assert code == 2 and len(lines) == 1 and says in lines[0], text
