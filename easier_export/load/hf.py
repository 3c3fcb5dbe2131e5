"""Hugging Face model directories (GPT-2 and BERT families) as plain PyTorch modules that torch.fx traces whole.

A directory with ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``) is loaded with
``transformers`` (local files only, never remote code), then its weights move into :class:`TextModel`: embeddings,
blocks of ``attention`` and an MLP ``fc1 → act → fc2`` whose activation is an ``nn`` module (a visible call site),
and a head. Hugging Face's own forward hides the MLP behind cache and mask logic that torch.fx cannot trace; this
form keeps every linear op in the graph, so once a GELU is removed ``fc1·fc2`` fold into one d×d matrix, and
torch.export gives an ONNX file with dynamic batch and sequence axes. GPT-2's ``Conv1D`` (``y = x W + b``, W
stored (in, out)) becomes an ``nn.Linear`` holding Wᵀ. The rewrite is checked against transformers' own output
when loaded: a configuration it does not reproduce is refused in one line instead of exported wrong.

Supported: ``GPT2LMHeadModel``, ``GPT2ForSequenceClassification`` (pre-norm, causal), ``BertLMHeadModel``
(``is_decoder``, causal) and ``BertForSequenceClassification`` (post-norm, bidirectional, padding masked).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from easier_export.core.errors import UserError, first_line

from .safe import PickledObjects, torch_load
from .task import FLOAT32
from .text import TextSpec, tokenizer_dir

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
ACTIVATIONS = {"gelu": lambda: nn.GELU(), "gelu_new": lambda: nn.GELU("tanh"),
               "gelu_pytorch_tanh": lambda: nn.GELU("tanh"), "relu": nn.ReLU, "silu": nn.SiLU, "swish": nn.SiLU}
CAUSAL_LM = ("GPT2LMHeadModel", "BertLMHeadModel")
CLASSIFIERS = ("GPT2ForSequenceClassification", "BertForSequenceClassification")
CHECK_TOL = FLOAT32.scale_tol  # max |rewrite - transformers| relative to the logits' scale


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


class Attention(nn.Module):
    """Multi-head self-attention with one fused q/k/v projection; ``mask`` (B, 1, T, T) or None."""

    def __init__(self, qkv: nn.Linear, out: nn.Linear, heads: int, causal: bool, scale: float) -> None:
        super().__init__()
        self.qkv, self.out, self.heads, self.causal, self.scale = qkv, out, heads, causal, scale

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal and mask is None,
                                           scale=self.scale)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm (GPT-2: ``h + attn(ln1(h))``, ``h + mlp(ln2(h))``) or post-norm (BERT: ``ln1(h + attn(h))``,
    ``ln2(h + mlp(h))``) transformer block; the MLP is ``fc2(act(fc1(·)))``, each a module of its own."""

    def __init__(self, attn: Attention, ln1: nn.LayerNorm, ln2: nn.LayerNorm, fc1: nn.Linear, act: nn.Module,
                 fc2: nn.Linear, pre_norm: bool) -> None:
        super().__init__()
        self.attn, self.ln1, self.ln2, self.fc1, self.act, self.fc2 = attn, ln1, ln2, fc1, act, fc2
        self.pre_norm = pre_norm

    def forward(self, h: Tensor, mask: Tensor | None) -> Tensor:
        if self.pre_norm:
            h = h + self.attn(self.ln1(h), mask)
            return h + self.fc2(self.act(self.fc1(self.ln2(h))))
        h = self.ln1(h + self.attn(h, mask))
        return self.ln2(h + self.fc2(self.act(self.fc1(h))))


class TextModel(nn.Module):
    """``forward(input_ids) → logits``: (B, T, vocab) for a causal LM, (B, classes) for a classifier.

    ``pool``: ``None`` (every position), ``"last"`` (GPT-2: the last non-padding token) or ``"first"`` (BERT: the
    [CLS] token through ``pooler`` and tanh). ``pad_id`` given: padding keys are masked in attention.
    """

    def __init__(self, tok: nn.Embedding, pos: nn.Embedding, blocks: list[Block], head: nn.Module,
                 final_norm: nn.Module | None = None, embed_norm: nn.Module | None = None,
                 type_row: Tensor | None = None, pool: str | None = None, pooler: nn.Linear | None = None,
                 pad_id: int | None = None, causal: bool = True) -> None:
        super().__init__()
        self.tok, self.pos, self.blocks, self.head = tok, pos, nn.ModuleList(blocks), head
        self.final_norm, self.embed_norm, self.pooler = final_norm or nn.Identity(), embed_norm, pooler
        self.type_row = None if type_row is None else nn.Parameter(type_row)
        self.pool, self.pad_id, self.causal = pool, pad_id, causal

    def forward(self, input_ids: Tensor) -> Tensor:
        t = input_ids.shape[1]
        positions = torch.arange(t, device=input_ids.device)
        h = self.tok(input_ids) + self.pos(positions)
        if self.type_row is not None:
            h = h + self.type_row
        if self.embed_norm is not None:
            h = self.embed_norm(h)
        mask = None
        if self.pad_id is not None:
            mask = (input_ids != self.pad_id)[:, None, None, :]
            if self.causal:
                mask = mask & (positions[None, :] <= positions[:, None])
        for block in self.blocks:
            h = block(h, mask)
        h = self.final_norm(h)
        if self.pool == "last":
            last = (positions * (input_ids != self.pad_id)).argmax(-1) if self.pad_id is not None else t - 1
            h = h[torch.arange(h.shape[0], device=h.device), last]
        elif self.pool == "first":
            h = torch.tanh(self.pooler(h[:, 0]))
        return self.head(h)


def _act(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise UserError(f"activation '{name}' is not supported in Hugging Face models here "
                        f"(supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]()


def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    lin.weight.data.copy_(weight.detach())
    if bias is not None:
        lin.bias.data.copy_(bias.detach())
    return lin


def _gpt2(hf: nn.Module, arch: str, pad_id: int | None) -> TextModel:
    cfg, body = hf.config, hf.transformer
    head_dim = cfg.n_embd // cfg.n_head
    blocks = []
    for i, blk in enumerate(body.h):
        scale = (head_dim ** -0.5 if cfg.scale_attn_weights else 1.0) / (i + 1 if cfg.scale_attn_by_inverse_layer_idx
                                                                           else 1)
        attn = Attention(linear_from_conv1d(blk.attn.c_attn), linear_from_conv1d(blk.attn.c_proj), cfg.n_head,
                         True, scale)
        blocks.append(Block(attn, blk.ln_1, blk.ln_2, linear_from_conv1d(blk.mlp.c_fc),
                            _act(cfg.activation_function), linear_from_conv1d(blk.mlp.c_proj), pre_norm=True))
    if arch == "GPT2LMHeadModel":
        return TextModel(body.wte, body.wpe, blocks, _linear(hf.lm_head.weight, None), body.ln_f)
    return TextModel(body.wte, body.wpe, blocks, hf.score, body.ln_f, pool="last", pad_id=pad_id)


def _bert(hf: nn.Module, arch: str, pad_id: int | None) -> TextModel:
    cfg, body = hf.config, hf.bert
    if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        raise UserError(f"BERT position_embedding_type '{cfg.position_embedding_type}' is not supported "
                        "(only 'absolute')")
    causal = arch == "BertLMHeadModel"
    blocks = []
    for layer in body.encoder.layer:
        s, o = layer.attention.self, layer.attention.output
        qkv = _linear(torch.cat([s.query.weight, s.key.weight, s.value.weight]),
                      torch.cat([s.query.bias, s.key.bias, s.value.bias]))
        attn = Attention(qkv, o.dense, cfg.num_attention_heads, causal,
                         (cfg.hidden_size // cfg.num_attention_heads) ** -0.5)
        blocks.append(Block(attn, o.LayerNorm, layer.output.LayerNorm, layer.intermediate.dense,
                            _act(cfg.hidden_act), layer.output.dense, pre_norm=False))
    emb = body.embeddings
    common = {"embed_norm": emb.LayerNorm, "type_row": emb.token_type_embeddings.weight[0].detach().clone()}
    if causal:
        pred = hf.cls.predictions
        bias = pred.decoder.bias if pred.decoder.bias is not None else getattr(pred, "bias", None)
        head = nn.Sequential(pred.transform.dense, _act(cfg.hidden_act), pred.transform.LayerNorm,
                             _linear(pred.decoder.weight, bias))
        return TextModel(emb.word_embeddings, emb.position_embeddings, blocks, head, **common)
    return TextModel(emb.word_embeddings, emb.position_embeddings, blocks, hf.classifier, pool="first",
                     pooler=body.pooler.dense, pad_id=pad_id, causal=False, **common)


def _check_weights(path: Path) -> None:
    """``pytorch_model.bin`` is a pickle: prove it holds tensors only (weights_only) before transformers opens it.
    transformers itself loads it with weights_only=True, so pickled objects are refused even when trusted: running
    them would end in transformers' own refusal."""

    if (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file():
        return
    weights = path / "pytorch_model.bin"
    if not weights.is_file():
        raise UserError(f"{path} has a config.json but no weights ({' or '.join(WEIGHT_FILES)})")
    try:
        torch_load(weights, trust_pickle=False)
    except PickledObjects as e:
        raise UserError(f"{weights} contains pickled Python objects besides tensors: transformers loads only "
                        "tensors (weights_only=True), so it cannot load here even with --trust-pickle; save the "
                        "weights again as tensors (save_pretrained writes model.safetensors)") from e


def _architecture(config: object) -> str:
    """The head class config.json names; a config without ``architectures`` gets its family's causal LM."""
    named = getattr(config, "architectures", None)
    if named:
        return named[0]
    default = {"gpt2": "GPT2LMHeadModel", "bert": "BertLMHeadModel" if getattr(config, "is_decoder", False) else ""}
    return default.get(config.model_type) or "?"


def load_hf(path: Path) -> tuple[TextModel, TextSpec, list[str]]:
    """The directory's model as a :class:`TextModel`, what its text input is, and notes for the user."""
    import transformers

    transformers.utils.logging.set_verbosity_error()  # its progress bars and advice are not this tool's output
    transformers.utils.logging.disable_progress_bar()
    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}/config.json is not readable JSON ({type(e).__name__}: {first_line(e)})") from e
    if isinstance(raw, dict) and raw.get("auto_map"):
        raise UserError(f"{path}/config.json names custom code (auto_map), which is never run here "
                        "(trust_remote_code=False); only the built-in architectures load")
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # unknown model_type, fields of the wrong type...
        raise UserError(f"{path}/config.json cannot be read by transformers without remote code "
                        f"({type(e).__name__}: {first_line(e)})") from e
    arch = _architecture(config)
    if arch not in CAUSAL_LM + CLASSIFIERS:
        raise UserError(f"{path}: architecture {arch} (model_type {config.model_type}) is not supported; "
                        f"supported: {', '.join(CAUSAL_LM + CLASSIFIERS)}")
    _check_weights(path)
    try:
        hf = getattr(transformers, arch).from_pretrained(path, local_files_only=True,
                                                         trust_remote_code=False).float().eval()
    except Exception as e:  # missing or mismatched tensors, damaged safetensors...
        raise UserError(f"transformers cannot load {path} ({type(e).__name__}: {first_line(e)})") from e
    task = "causal_lm" if arch in CAUSAL_LM else "classification"
    pad_id = config.pad_token_id
    if task == "classification" and pad_id is None:
        raise UserError(f"{path}: a sequence classifier needs pad_token_id in config.json (padded batches)")
    build = _gpt2 if config.model_type == "gpt2" else _bert
    model = build(hf, arch, pad_id).eval()
    max_positions = config.n_positions if config.model_type == "gpt2" else config.max_position_embeddings
    spec = TextSpec(task, config.vocab_size, max_positions, pad_id, tokenizer_dir(path),
                    getattr(config, "num_labels", None) if task == "classification" else None)
    _check_rewrite(hf, model, spec, path)
    notes = [] if spec.tokenizer else [f"{path} has no tokenizer files: text is read as UTF-8 bytes (ids 0-255)"]
    return model, spec, notes


@torch.no_grad()
def _check_rewrite(hf: nn.Module, model: TextModel, spec: TextSpec, path: Path) -> None:
    """The rewrite must reproduce transformers' logits (two sequences, the second right-padded when padding
    matters), or the directory is refused: a silent difference would ship a different model."""
    gen = torch.Generator().manual_seed(0)
    low = 1 if spec.pad_id == 0 else 0
    ids = torch.randint(low, spec.vocab_size, (2, min(12, spec.max_positions)), generator=gen)
    if spec.pad_id is not None and spec.pad_id != low:
        ids[ids == spec.pad_id] = low
    mask = None
    if spec.task == "classification":
        ids[1, -3:] = spec.pad_id
        mask = (ids != spec.pad_id).long()
    want = hf(input_ids=ids, attention_mask=mask).logits
    got = model(ids)
    err = float((got - want).abs().max() / want.abs().max().clamp_min(1.0))
    if got.shape != want.shape or err > CHECK_TOL:
        raise UserError(f"{path}: the traceable rewrite does not reproduce transformers' output (relative max "
                        f"diff {err:.1e}); this configuration is not supported")


def linear_from_conv1d(conv: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` equal to a GPT-2 ``Conv1D`` (weight (in, out), ``y = x W + b``): weight Wᵀ, same bias."""
    weight = conv.weight.detach()
    linear = nn.Linear(weight.shape[0], weight.shape[1], dtype=weight.dtype)
    linear.weight.data.copy_(weight.t())
    linear.bias.data.copy_(conv.bias.detach())
    return linear

