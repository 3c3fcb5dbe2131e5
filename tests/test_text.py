"""Text DATA (train.txt / val.txt → token batches), the perplexity budget, padding left out of entropy, and
`compress` end to end on a tiny byte-level GPT-2 directory."""

import json
import math
import re

import pytest
import torch
from conftest import run_cli as run
from transformers import GPT2Config, GPT2LMHeadModel

from easier_export.core.errors import UserError
from easier_export.load.text import TextSpec, lm_blocks, text_loaders
from easier_export.loop.config import LoopConfig, Task
from easier_export.loop.entropy import OnCounter
from easier_export.loop.train import evaluate_metrics
from easier_export.ship.schema import validate_report

BYTES_LM = TextSpec("causal_lm", 256, 64, None, None)
CLASSIFIER = TextSpec("classification", 256, 64, 0, None, labels=2)


def _data(root, train: str, val: str):
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.txt").write_text(train, encoding="utf-8")
    (root / "val.txt").write_text(val, encoding="utf-8")
    return root


def test_lm_blocks_are_next_token_pairs():
    ds = lm_blocks(list(range(10)), 3, "x")
    x, y = ds.tensors
    assert x.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]] and y.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_bytes_are_utf8_and_classification_lines_are_padded(tmp_path):
    lm = text_loaders(_data(tmp_path / "lm", "héllo wörld " * 10, "abcdefghij" * 3), BYTES_LM, 8, batch_size=2)
    x, y = next(iter(lm.val))
    assert x[0].tolist() == list(b"abcdefgh") and y[0].tolist() == list(b"bcdefghi")
    cls = text_loaders(_data(tmp_path / "cls", "1\tyes\n0\tno\n", "0\tnope\n"), CLASSIFIER, 6)
    x, y = next(iter(cls.val))
    assert x.tolist() == [[*b"nope", 0, 0]] and y.tolist() == [0] and cls.classes == ["0", "1"]


def test_text_data_errors_are_one_line(tmp_path):
    _data(tmp_path / "a", "some text", "more")
    (tmp_path / "a" / "val.txt").unlink()
    with pytest.raises(UserError, match="no val.txt"):
        text_loaders(tmp_path / "a", BYTES_LM, 4)
    with pytest.raises(UserError, match="vocab_size 100 < 256"):
        text_loaders(_data(tmp_path / "b", "abc" * 9, "abc" * 9), TextSpec("causal_lm", 100, 64, None, None), 4)
    with pytest.raises(UserError, match="fewer than one block"):
        text_loaders(_data(tmp_path / "c", "abc" * 9, "ab"), BYTES_LM, 4)
    with pytest.raises(UserError, match="label<TAB>text"):
        text_loaders(_data(tmp_path / "d", "no label here\n", "0\tx\n"), CLASSIFIER, 4)


def test_perplexity_budget_is_a_percent_increase():
    """At confidence 0 the observed change decides: +4.9 % perplexity is within 5 %, +5.1 % is not."""
    cfg, task, rows = LoopConfig(max_ppl_increase=5.0, confidence=0.0), Task("ppl"), torch.ones(10, dtype=torch.bool)
    base = {"nll": torch.full((10,), 2.0), "correct": torch.zeros(10)}
    for increase, within in ((0.049, True), (0.051, False)):
        cand = {"nll": base["nll"] + math.log1p(increase), "correct": torch.zeros(10)}
        assert task.within(cfg, task.change(cfg, base, cand, rows)) is within


def test_perplexity_is_exp_of_the_mean_token_loss():
    logits = torch.log_softmax(torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0)), -1)
    y = torch.randint(0, 7, (2, 5), generator=torch.Generator().manual_seed(1))

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return logits

    metrics = evaluate_metrics(Fixed(), [(torch.zeros(2, 5), y)], torch.device("cpu"))
    nll = -logits.gather(-1, y[..., None]).mean()
    assert math.isclose(metrics["ppl"], float(nll.exp()), rel_tol=1e-6)
    assert math.isclose(metrics["top1"], 100 * float((logits.argmax(-1) == y).float().mean()), rel_tol=1e-6)


def test_padding_positions_are_not_counted():
    counter = OnCounter(-1)
    x = torch.tensor([[[1.0, -1.0], [1.0, 1.0], [-1.0, -1.0]]])  # position 2 is padding
    counter.keep = torch.tensor([[True, True, False]])
    counter(x)
    assert counter.p_on().tolist() == [1.0, 0.5] and counter.seen == 2


@pytest.mark.slow  # a second end-to-end compress: the fast tier runs one, on an image folder
def test_compress_on_a_gpt2_directory_keeps_perplexity_in_budget(capsys, tmp_path, merges_ship):
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=32, n_embd=16, n_layer=2, n_head=2)).save_pretrained(
        tmp_path / "gpt2")
    text = "the quick brown fox jumps over the lazy dog. " * 40
    data = _data(tmp_path / "data", text, text[:400])
    out = tmp_path / "out"
    code, log = run(capsys, "compress", str(tmp_path / "gpt2"), "--data", str(data), "--out", str(out),
                    "--input-size", "16", "--batch-size", "16", "--finetune-epochs", "0.5", "--lr", "0.05",
                    "--select", "entropy", "--fold", "all", "--max-ppl-increase", "1000",
                    "--entropy-batches", "1", "--bench-batches", "1", "--bench-seconds", "0.05", "--no-simplify")
    assert code == 0, log
    report = json.loads((out / "report.json").read_text())
    assert validate_report(report) == []
    assert report["text"]["verified_lengths"] == [16, 8] and report["text"]["tokenizer"] == "utf-8 bytes"
    assert all(r["val_ppl"] is not None for r in report["rounds"])
    assert report["compressed"]["removed"] == ["blocks_0_act", "blocks_1_act"]
    assert report["compressed"]["ppl"] <= report["original"]["ppl"] * 11
    assert sum(f["kind"] == "linear_linear" and f["applied"] for f in report["folds"]) == 2
    assert report["verify"]["passed"] and report["verify"]["top1_agree"] == 1.0
    assert all(row["tokens_per_s"] > 0 for row in report["bench"])


def test_linearize_a_bert_classifier_on_labelled_lines(capsys, tmp_path):
    """Classification: top-1 budget (--max-drop), padded batches, entropy over real tokens only."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=256, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=32, max_position_embeddings=32, num_labels=2)
                                  ).save_pretrained(tmp_path / "bert")
    lines = "".join(f"{i % 2}\t{'yes' if i % 2 else 'no'} {i}\n" for i in range(24))
    data = _data(tmp_path / "data", lines, lines)
    out = tmp_path / "lin"
    code, log = run(capsys, "linearize", str(tmp_path / "bert"), "--data", str(data), "--out", str(out),
                    "--input-size", "12", "--batch-size", "8", "--finetune-epochs", "1", "--max-drop", "100",
                    "--select", "entropy", "--entropy-batches", "1", "--optimizer", "adamw", "--lr", "1e-3")
    assert code == 0, log
    assert "original top-1" in log and "perplexity" not in log
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["base_ppl"] is None and state["removed"] == ["blocks_0_act"]


def test_a_directory_tokenizer_is_used_when_present(tmp_path):
    """A WordPiece vocab written here (nothing downloaded): classification lines get [CLS] … [SEP], then padding."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    from easier_export.load.models import load_model

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "movie"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "bert")
    BertForSequenceClassification(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=32, num_labels=2)
                                  ).save_pretrained(tmp_path / "bert")
    loaded = load_model(str(tmp_path / "bert"), img_size=(6,))
    assert loaded.task.spec.tokenizer == str(tmp_path / "bert") and loaded.notes == []
    data = _data(tmp_path / "data", "1\tgood movie\n0\tbad movie\n", "0\tbad\n")
    x, y = next(iter(text_loaders(data, loaded.task.spec, 6).val))
    assert x.tolist() == [[2, 6, 3, 0, 0, 0]] and y.tolist() == [0]


def test_class_labels_are_taken_by_value_not_rank(tmp_path):
    three = TextSpec("classification", 256, 64, 0, None, labels=3)
    data = text_loaders(_data(tmp_path / "ok", "2\ta\n0\tb\n", "2\tc\n"), three, 4)
    assert data.train.dataset.tensors[1].tolist() == [2, 0] and data.val.dataset.tensors[1].tolist() == [2]
    for name, train, says in [("seven", "0\ta\n1\tb\n7\tc\n", "line 3: label '7' is not one of the model's 3 classes"),
                              ("negative", "-1\ta\n0\tb\n1\tc\n", "line 1: label '-1' is not one of the model's 3"),
                              ("named", "pos\ta\n", "label 'pos' is not one of the model's 3 classes")]:
        with pytest.raises(UserError, match=re.escape(says)):
            text_loaders(_data(tmp_path / name, train, "0\tx\n"), three, 4)
    with pytest.raises(UserError, match="a classifier needs 2 or more"):
        text_loaders(_data(tmp_path / "one", "0\ta\n", "0\tb\n"), TextSpec("classification", 256, 64, 0, None,
                                                                          labels=1), 4)
