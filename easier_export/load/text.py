"""Text DATA: a folder with ``train.txt`` and ``val.txt``, as token batches for a Hugging Face model directory.

Causal LMs: the whole file is one token stream cut into blocks of the sequence length; ``y`` is ``x`` shifted by
one token (next-token prediction, no padding). Classifiers: one example a line, ``label<TAB>text``; sequences are
right-padded with the model's ``pad_token_id`` (padding is masked in attention and in the entropy counts).
Tokens come from the directory's tokenizer, or, when it has none, from the text's UTF-8 bytes (ids 0-255).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from easier_export.core.errors import UserError, first_line

from .data import Loaders, make_loader

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "spiece.model")
BYTE_VOCAB = 256
SPLITS = ("train", "val")


@dataclass(frozen=True)
class TextSpec:
    """What a text model reads: ``task`` is ``causal_lm`` (budget: perplexity) or ``classification`` (top-1)."""

    task: str
    vocab_size: int
    max_positions: int
    pad_id: int | None
    tokenizer: str | None  # directory with tokenizer files; None: UTF-8 bytes
    labels: int | None = None

    @property
    def metric(self) -> str:
        return "ppl" if self.task == "causal_lm" else "top1"

    @property
    def entropy_pad_id(self) -> int | None:
        """Padding exists (and is left out of entropy) only in classification batches."""
        return self.pad_id if self.task == "classification" else None


def tokenizer_dir(path: Path) -> str | None:
    return str(path) if any((path / f).is_file() for f in TOKENIZER_FILES) else None


def encoder(spec: TextSpec) -> Callable[[str, bool], list[int]]:
    """``encode(text, special)``: token ids; ``special`` adds the tokenizer's [CLS]/[SEP] (classification)."""
    if spec.tokenizer is None:
        if spec.vocab_size < BYTE_VOCAB:
            raise UserError(f"the model has no tokenizer files and vocab_size {spec.vocab_size} < 256: text is "
                            "read as UTF-8 bytes, which needs ids 0-255")
        return lambda text, special: list(text.encode("utf-8"))
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(spec.tokenizer, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # missing vocab file, custom tokenizer class...
        raise UserError(f"cannot load the tokenizer in {spec.tokenizer} ({type(e).__name__}: {first_line(e)})") from e
    return lambda text, special: tok(text, add_special_tokens=special)["input_ids"]


def _read(root: Path) -> dict[str, str]:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data directory {root} {'is not a directory' if root.exists() else 'does not exist'}")
    texts = {}
    for split in SPLITS:
        path = root / f"{split}.txt"
        if not path.is_file():
            raise UserError(f"text data directory {root} has no {split}.txt (expected train.txt and val.txt)")
        try:
            texts[split] = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    return texts


def lm_blocks(ids: list[int], seq_len: int, what: str) -> TensorDataset:
    """Non-overlapping blocks of ``seq_len`` tokens, each with its next-token targets."""
    n = (len(ids) - 1) // seq_len
    if n < 1:
        raise UserError(f"{what} has {len(ids)} tokens: fewer than one block of {seq_len} + 1")
    stream = torch.tensor(ids[: n * seq_len + 1], dtype=torch.long)
    return TensorDataset(stream[:-1].view(n, seq_len), stream[1:].view(n, seq_len))


def _labelled(text: str, what: str, classes: int) -> list[tuple[int, str]]:
    """(class index, text) per ``label<TAB>text`` line. A label is the head's row it names, an integer in
    0..classes-1, taken by value: mapping labels by rank would silently shift them (``-1,0,1`` → ``0,1,2``)."""
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        label, tab, body = line.partition("\t")
        if not tab:
            raise UserError(f"{what} line {i}: expected 'label<TAB>text' (classification data)")
        try:
            index = int(label.strip())
        except ValueError:
            index = None
        if index is None or not 0 <= index < classes:
            raise UserError(f"{what} line {i}: label '{label.strip()}' is not one of the model's {classes} classes "
                            f"(integers 0..{classes - 1})")
        rows.append((index, body))
    if not rows:
        raise UserError(f"{what} has no examples")
    return rows


def classification_set(rows: list[tuple[int, str]], encode: Callable[[str, bool], list[int]], seq_len: int,
                       pad_id: int, what: str) -> TensorDataset:
    """Right-padded (truncated) token ids and class indices."""
    x = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    for i, (_, body) in enumerate(rows):
        ids = encode(body, True)[:seq_len]
        x[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return TensorDataset(x, torch.tensor([label for label, _ in rows], dtype=torch.long))


def text_loaders(root: str | Path, spec: TextSpec, seq_len: int, batch_size: int = 32,
                 seed: int = 0) -> Loaders:
    """Loaders of (input_ids, targets) from ``root/train.txt`` and ``root/val.txt``, checked with one-line errors."""
    if seq_len > spec.max_positions:
        raise UserError(f"sequence length {seq_len} exceeds the model's {spec.max_positions} positions")
    texts = _read(Path(root))
    encode = encoder(spec)
    if spec.task == "causal_lm":
        sets = {s: lm_blocks(encode(texts[s], False), seq_len, f"{root}/{s}.txt") for s in SPLITS}
        classes = [str(i) for i in range(spec.vocab_size)]
    else:
        if spec.labels is None or spec.labels < 2:
            raise UserError(f"the model predicts {spec.labels or 'no'} class(es): a classifier needs 2 or more "
                            "(num_labels in config.json)")
        rows = {s: _labelled(texts[s], f"{root}/{s}.txt", spec.labels) for s in SPLITS}
        classes = [str(i) for i in range(spec.labels)]
        sets = {s: classification_set(rows[s], encode, seq_len, spec.pad_id, f"{root}/{s}.txt") for s in SPLITS}
    top = max(int(ds.tensors[0].max()) for ds in sets.values())
    if top >= spec.vocab_size:
        raise UserError(f"token id {top} is outside the model's vocabulary ({spec.vocab_size})")
    return Loaders(make_loader(sets["train"], batch_size, True, 0, seed),
                   make_loader(sets["val"], batch_size, False, 0, seed),
                   classes)


def random_token_batches(spec: TextSpec, seq_len: int) -> list[torch.Tensor]:
    """Seeded token batches at two sequence lengths, for verifying without DATA."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, spec.vocab_size, (4, n), generator=gen) for n in two_lengths(seq_len)]


def two_lengths(seq_len: int) -> tuple[int, int]:
    """The sequence lengths an export is verified at: the served one and a shorter one (the axis is dynamic)."""
    return seq_len, max(seq_len // 2, 1)
