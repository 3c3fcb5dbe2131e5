import pytest
import torch
from conftest import scripted_evaluate

from easier_export.core.errors import UserError
from easier_export.load.arch import DemoNet
from easier_export.load.data import digits
from easier_export.loop import linearize as loop_mod
from easier_export.loop.config import LoopConfig
from easier_export.loop.linearize import run_loop
from easier_export.loop.selection import pick
from easier_export.loop.state import STATE_FILE, STATE_FORMAT, load_state
from easier_export.trace.sites import find_call_sites
from easier_export.trace.tracing import trace

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def loaders():
    return digits(batch_size=128)


def _run(loaders, out, **overrides):
    torch.manual_seed(0)
    cfg = LoopConfig(**{"max_drop": 100.0, "finetune_epochs": 0.3, "max_removed": 3, "entropy_batches": 2,
                        **overrides})
    return run_loop(trace(DemoNet()), "demo_cnn", loaders.train, loaders.val, cfg, CPU, out)


def test_pick_lowest_or_all_zeros_and_one_shot():
    cfg = LoopConfig()
    assert pick({"a": 0.5, "b": 0.2, "c": 0.9}, cfg, 0) == ["b"]
    assert pick({"a": 0.0, "b": 0.2, "c": 0.0}, cfg, 0) == ["a", "c"]
    assert pick({"a": 0.5, "b": 0.2, "c": 0.9}, LoopConfig(one_shot=2), 0) == ["b", "a"]
    assert pick({"a": 0.0, "b": 0.0}, LoopConfig(max_removed=3), 2) == ["a"]


def test_loop_stops_at_budget_and_keeps_last_good_model(loaders, tmp_path, monkeypatch):
    # the original, then a first round 10 points down: over a 1-point budget
    monkeypatch.setattr(loop_mod, "evaluate_metrics", scripted_evaluate([90.0, 80.0]))
    result = _run(loaders, tmp_path, max_drop=1.0, patience=0)
    assert result.removed == [] and "--patience 0" in result.stopped
    assert [r.within_budget for r in result.history] == [False]
    assert len(find_call_sites(result.model)) == 6


def test_resume_after_kill_gives_same_history(loaders, tmp_path, monkeypatch):
    reference = _run(loaders, tmp_path / "a")
    assert len(reference.removed) == 3

    real_finetune, calls = loop_mod.finetune, []

    def dying_finetune(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # killed during round 3
            raise KeyboardInterrupt
        return real_finetune(*args, **kwargs)

    monkeypatch.setattr(loop_mod, "finetune", dying_finetune)
    with pytest.raises(KeyboardInterrupt):
        _run(loaders, tmp_path / "b")
    monkeypatch.setattr(loop_mod, "finetune", real_finetune)
    resumed = _run(loaders, tmp_path / "b")

    assert resumed.resumed_rounds == 2
    assert [r.removed for r in resumed.history] == [r.removed for r in reference.history]
    assert [r.val_top1 for r in resumed.history] == pytest.approx([r.val_top1 for r in reference.history])
    x = next(iter(loaders.val))[0]
    torch.testing.assert_close(resumed.model(x), reference.model(x))


def test_changed_settings_refuse_to_resume(loaders, tmp_path):
    _run(loaders, tmp_path, max_removed=1)
    with pytest.raises(UserError, match="different settings .*lr"):
        _run(loaders, tmp_path, max_removed=1, lr=0.5)


def test_a_stopped_run_continues_when_a_stop_rule_is_raised(loaders, tmp_path):
    """Stop rules decide when to end, not what a round computes: raising one on the same --out goes on from the
    stored rounds (a fixed --max-rounds budget first, then more) instead of refusing or starting over."""
    first = _run(loaders, tmp_path, max_rounds=1)
    assert len(first.history) == 1 and "--max-rounds 1" in first.stopped
    more = _run(loaders, tmp_path, max_rounds=2)
    assert more.resumed_rounds == 1 and len(more.history) == 2
    assert more.history[0] == first.history[0]
    assert "--max-rounds 2" in more.stopped
    assert "--max-removed 2" in _run(loaders, tmp_path, max_rounds=5, max_removed=2).stopped


def test_a_state_missing_a_setting_is_refused(loaders, tmp_path):
    """A state.pt whose fingerprint lacks a setting was not made with this one: refused, never guessed."""
    _run(loaders, tmp_path, max_removed=1)
    path = tmp_path / STATE_FILE
    state = torch.load(path, weights_only=True)
    del state["fingerprint"]["entropy_tau"]
    torch.save(state, path)
    with pytest.raises(UserError, match="different settings .*entropy_tau"):
        _run(loaders, tmp_path, max_removed=1)


@pytest.mark.parametrize("stored", [STATE_FORMAT - 1, None])
def test_a_state_of_another_format_is_refused_in_one_line(loaders, tmp_path, stored):
    _run(loaders, tmp_path, max_removed=1)
    path = tmp_path / STATE_FILE
    state = torch.load(path, weights_only=True)
    if stored is None:
        del state["format"]
    else:
        state["format"] = stored
    torch.save(state, path)
    with pytest.raises(UserError) as refused:
        _run(loaders, tmp_path, max_removed=1)
    assert "\n" not in str(refused.value)
    assert f"state format {stored}, this one reads {STATE_FORMAT}" in str(refused.value)


def test_one_shot_removes_k_in_one_round(loaders, tmp_path):
    result = _run(loaders, tmp_path, one_shot=4, max_removed=None)
    assert len(result.history) == 1 and len(result.removed) == 4


def test_random_criterion_is_seeded(loaders, tmp_path):
    a = _run(loaders, tmp_path / "a", criterion="random", max_removed=2)
    b = _run(loaders, tmp_path / "b", criterion="random", max_removed=2)
    assert a.removed == b.removed


def test_baseline_finetuning_sets_budget_and_survives_resume(loaders, tmp_path):
    first = _run(loaders, tmp_path, baseline_epochs=6.0, lr=0.05, max_removed=1)
    untouched = _run(loaders, tmp_path / "plain", lr=0.05, max_removed=1)
    assert first.base_top1 > untouched.base_top1 + 20  # measured after training the (random) original
    resumed = _run(loaders, tmp_path, baseline_epochs=6.0, lr=0.05, max_removed=1)
    assert resumed.base_top1 == first.base_top1 and resumed.resumed_rounds == 1


@pytest.mark.parametrize("bad, says", [({"entropy_batches": 0}, "--entropy-batches must be at least 1"),
                                       ({"one_shot": 0}, "--one-shot must be at least 1"),
                                       ({"criterion": "entorpy"}, "--criterion must be one of"),
                                       ({"max_removed": -1}, "--max-removed must be at least 0"),
                                       ({"max_rounds": 0}, "--max-rounds must be at least 1"),
                                       ({"max_drop": -1.0}, "--max-drop must be at least 0"),
                                       ({"rectifiers": ("relu", "tanh")}, "--rectifiers must be one of"),
                                       ({"entropy_mode": "test"}, "--entropy-mode must be one of"),
                                       ({"anneal": 1.5}, "--anneal must be at most 1.0"),
                                       ({"distill": -0.1}, "--distill must be at least 0.0"),
                                       ({"distill_temperature": 0.0}, "--distill-temperature must be positive"),
                                       ({"substitute": "zero"}, "--substitute must be one of identity, affine")])
def test_bad_settings_are_refused_before_any_work(bad, says):
    """The Python API refuses what the CLI refuses, with the option's name."""
    with pytest.raises(UserError, match=says):
        LoopConfig(**bad)


def test_other_starting_weights_refuse_to_resume(loaders, tmp_path):
    _run(loaders, tmp_path, max_removed=1)
    torch.manual_seed(1)  # different initial weights, same settings
    cfg = LoopConfig(max_drop=100.0, finetune_epochs=0.3, max_removed=1, entropy_batches=2)
    with pytest.raises(UserError, match="weights"):
        run_loop(trace(DemoNet()), "demo_cnn", loaders.train, loaders.val, cfg, CPU, tmp_path)


def test_continuing_a_linearized_checkpoint_keeps_earlier_removals(loaders, tmp_path):
    from easier_export.load.models import LoadedModel, load_model
    from easier_export.load.task import ImageTask
    from easier_export.pipeline import save_linearized

    first = _run(loaders, tmp_path / "a", max_removed=1)
    demo = LoadedModel(DemoNet(), "demo_cnn", (1, 16, 16), ImageTask((0.5,), (0.5,)))
    save_linearized(tmp_path / "a.pt", demo, first, False)
    loaded = load_model(str(tmp_path / "a.pt"))
    assert loaded.removed == first.removed
    cfg = LoopConfig(max_drop=100.0, finetune_epochs=0.3, max_removed=1, entropy_batches=2)
    second = run_loop(trace(loaded.model), loaded.source, loaders.train, loaders.val, cfg, CPU, tmp_path / "b")
    save_linearized(tmp_path / "b.pt", loaded, second, False)
    both = load_model(str(tmp_path / "b.pt"))
    assert both.removed == first.removed + second.removed and len(set(both.removed)) == 2
    assert len(find_call_sites(both.model)) == 4


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated", b"\x80\x02garbage"])
def test_unreadable_state_file_says_delete_it(tmp_path, content):
    (tmp_path / STATE_FILE).write_bytes(content)
    with pytest.raises(UserError, match="delete it to start over"):
        load_state(tmp_path, {})


def test_the_same_command_twice_gives_the_same_run(loaders, tmp_path):
    """Same data, seeds and settings: the same removed set, history and weights (no state shared between)."""
    first, second = _run(loaders, tmp_path / "a"), _run(loaders, tmp_path / "b")
    assert first.removed == second.removed and first.removed
    assert [(r.removed, r.val_top1, r.change) for r in first.history] == \
        [(r.removed, r.val_top1, r.change) for r in second.history]
    for (name, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_changed_input_size_is_named_when_resume_is_refused(loaders, tmp_path):
    """The same data read at another size: the refusal names the input size (not "train, val")."""
    _run(loaders, tmp_path, max_removed=1)
    with pytest.raises(UserError, match=r"different settings \(input size 1x12x12, was 1x16x16\)"):
        _run(digits(size=12, batch_size=128), tmp_path, max_removed=1)
