"""Tracing a model to torch.fx, with the sub-modules whose Python control flow defeats symbolic tracing kept whole.

A sub-module that cannot be traced (timm VGG's ``ConvMlp``) becomes a leaf; the rectifiers inside it are still
call sites (:mod:`easier_export.trace.sites`).
"""

from __future__ import annotations

import copy

from torch import fx, nn

from easier_export.core.errors import UserError, first_line


class _Tracer(fx.Tracer):
    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or super().is_leaf_module(m, qualname)


def _try_trace(module: nn.Module, leaves: set[str]) -> tuple[fx.GraphModule | None, Exception | None]:
    try:
        tracer = _Tracer(leaves)
        graph = tracer.trace(module)
        return fx.GraphModule(tracer.root, graph, module.__class__.__name__), None
    except Exception as e:  # fx raises TraceError, TypeError, AssertionError... for untraceable code
        return None, e


def _untraceable(module: nn.Module, prefix: str = "") -> list[str]:
    """Deepest sub-modules whose own forward cannot be traced (their children trace fine)."""
    if _try_trace(module, set())[0] is not None:
        return []
    deeper = [p for name, child in module.named_children()
              for p in _untraceable(child, f"{prefix}{name}.") if child is not None]
    return deeper or [prefix.rstrip(".")]


_BN_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def split_norm_act(model: nn.Module) -> nn.Module:
    """timm's ``BatchNormAct2d`` runs BatchNorm and its activation in one module; split it into
    ``Sequential(BatchNorm2d, drop, act)`` (same function) so the BN folds and the activation is its own call site.
    Returns a copy when anything was split, ``model`` itself otherwise."""
    fused = [name for name, m in model.named_modules()
             if isinstance(m, nn.BatchNorm2d) and type(m) is not nn.BatchNorm2d and hasattr(m, "act")]
    if not fused:
        return model
    model = copy.deepcopy(model)
    for name in fused:
        m = model.get_submodule(name)
        bn = nn.BatchNorm2d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
        bn.load_state_dict({k: v for k, v in m.state_dict().items() if k in _BN_STATE})
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, nn.Sequential(bn, m.drop, m.act).train(m.training))
    return model


UNTRACEABLE_ADVICE = ("export it with torch.export (data-dependent branches as torch.cond) and pass the .pt2 "
                      "archive instead, or move the Python control flow into a sub-module, which is then kept whole "
                      "as a leaf")


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolic trace, turning untraceable sub-modules into leaves; a GraphModule is returned as is."""
    if isinstance(model, fx.GraphModule):
        return model
    model = split_norm_act(model)
    gm, err = _try_trace(model, set())
    if gm is not None:
        return gm
    leaves = set(_untraceable(model))
    if "" not in leaves:
        gm, err = _try_trace(model, leaves)
    if gm is None:
        raise UserError(f"cannot trace {type(model).__name__} with torch.fx ({first_line(err)}); {UNTRACEABLE_ADVICE}")
    gm.meta["leaf_modules"] = sorted(leaves)
    return gm
