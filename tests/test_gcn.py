"""The GCN on a generated stochastic block model: call sites are visible, and merging the convolutions around a
removed ReLU (W1·W2, two propagation hops, a per-node bias) is exact."""

import torch
from torch import nn

from easier_export.fold.gcn import fold_gcn, merge_reason
from easier_export.load.arch.gcn import GCN, sbm_graph
from easier_export.trace.sites import find_call_sites
from easier_export.trace.tracing import trace


def _model(layers: int = 3) -> tuple[GCN, torch.Tensor]:
    graph = sbm_graph(nodes=60, classes=3, features=8, p_in=0.2, p_out=0.02)
    torch.manual_seed(0)
    model = GCN(graph.adj, 8, 16, 3, layers=layers).eval()
    for conv in model.convs:
        nn.init.normal_(conv.lin.bias)  # a nonzero b1 becomes the per-node bias Â·1·b1ᵀW2
    return model, graph.x


def test_sbm_graph_is_seeded_and_split():
    a, b = sbm_graph(nodes=50, seed=3), sbm_graph(nodes=50, seed=3)
    assert torch.equal(a.adj, b.adj) and torch.equal(a.x, b.x)
    assert int(a.train.sum() + a.val.sum() + a.test.sum()) == 50 and not (a.train & a.val).any()
    assert torch.allclose(a.adj, a.adj.t()) and (a.adj.diagonal() > 0).all()


def test_relus_are_call_sites():
    model, _ = _model()
    gm = trace(model)
    assert "leaf_modules" not in gm.meta  # traced whole: the convolutions are in the graph too
    assert [s.name for s in find_call_sites(gm)] == ["acts_0", "acts_1"]


def test_merging_around_removed_relus_is_exact():
    model, x = _model()
    model.acts[0] = nn.Identity()
    folded, refused = fold_gcn(model)
    assert len(folded.convs) == 2 and folded.convs[0].hops == 2
    assert refused == ["gap 0: acts.0 is still a ReLU: only a removed activation is linear"]
    model.acts[1] = nn.Identity()
    folded, refused = fold_gcn(model)
    assert len(folded.convs) == 1 and folded.convs[0].hops == 3 and refused == []
    assert folded.convs[0].lin.weight.shape == (3, 8)  # W1·W2·W3: 8 features straight to 3 classes
    with torch.no_grad():
        want, got = model(x), folded(x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_a_live_relu_is_refused_with_the_reason():
    model, _ = _model(layers=2)
    assert "still a ReLU" in merge_reason(model, 0) and "no activation gap 1" in merge_reason(model, 1)
