"""A plain-torch graph convolutional network (Kipf & Welling) on a fixed graph, and a graph to run it on offline.

``GCNConv`` computes ``Â^hops · X · W + node_bias + b`` with Â = D^-1/2 (A + I) D^-1/2 stored as a buffer
(transductive: the graph is part of the model, the node features are the input). One hop is a GCN layer; more
hops and a per-node bias appear when two layers merge across a removed ReLU (``fold/gcn.py``).

``sbm_graph`` draws a stochastic block model whose communities are the classes, with node features that carry a
noisy copy of the class signal: neither the features nor the edges alone classify every node, together they do
better, so the network has something to learn and the ReLU between layers something to lose.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


def normalized_adjacency(edges: Tensor, nodes: int) -> Tensor:
    """Dense D^-1/2 (A + I) D^-1/2 of an undirected graph given as (2, E) edge indices."""
    adj = torch.zeros(nodes, nodes)
    adj[edges[0], edges[1]] = 1.0
    adj = ((adj + adj.t()) > 0).float() + torch.eye(nodes)
    inv_sqrt = adj.sum(1).rsqrt()
    return inv_sqrt[:, None] * adj * inv_sqrt[None, :]


class GCNConv(nn.Module):
    """``Â^hops (X W) + node_bias + b``: propagation after the (cheaper, narrower) feature transform."""

    def __init__(self, adj: Tensor, lin: nn.Linear, hops: int = 1, node_bias: Tensor | None = None) -> None:
        super().__init__()
        self.lin, self.hops, self.has_node_bias = lin, hops, node_bias is not None  # fx-traceable branches
        self.register_buffer("adj", adj)
        self.register_buffer("node_bias", node_bias if node_bias is not None else torch.zeros(0))

    def forward(self, x: Tensor) -> Tensor:
        h = x @ self.lin.weight.t()
        for _ in range(self.hops):
            h = self.adj @ h
        if self.has_node_bias:
            h = h + self.node_bias
        return h + self.lin.bias if self.lin.bias is not None else h


class GCN(nn.Module):
    """``layers`` GCN convolutions with a ReLU (its own module: one call site each) and dropout between them."""

    def __init__(self, adj: Tensor, in_features: int, hidden: int, num_classes: int, layers: int = 2,
                 dropout: float = 0.5) -> None:
        super().__init__()
        widths = [in_features] + [hidden] * (layers - 1) + [num_classes]
        self.convs = nn.ModuleList(GCNConv(adj, nn.Linear(a, b)) for a, b in zip(widths, widths[1:], strict=False))
        self.acts = nn.ModuleList(nn.ReLU() for _ in range(layers - 1))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        for conv, act in zip(self.convs, self.acts, strict=False):
            x = self.drop(act(conv(x)))
        return self.convs[-1](x)


@dataclass
class Graph:
    """Node features (N, F), labels (N,), train/val/test node masks and the normalized adjacency (N, N)."""

    x: Tensor
    y: Tensor
    train: Tensor
    val: Tensor
    test: Tensor
    adj: Tensor

    def targets(self, mask: Tensor) -> Tensor:
        """Labels on ``mask``'s nodes, -100 (ignored by the loss and the metrics) elsewhere."""
        return torch.where(mask, self.y, torch.full_like(self.y, -100))


def sbm_graph(nodes: int = 2000, classes: int = 5, features: int = 32, p_in: float = 0.004,
              p_out: float = 0.0006, signal: float = 0.6, seed: int = 0) -> Graph:
    """A stochastic block model: same-class node pairs link with ``p_in``, others with ``p_out``; each node's
    features are its class centroid times ``signal`` plus unit Gaussian noise. Split 40 / 30 / 30 % (train / val /
    test), seeded."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (nodes,), generator=gen)
    same = y[:, None] == y[None, :]
    prob = torch.where(same, torch.tensor(p_in), torch.tensor(p_out))
    upper = torch.triu(torch.rand(nodes, nodes, generator=gen) < prob, diagonal=1)
    edges = upper.nonzero().t()
    centroids = torch.randn(classes, features, generator=gen)
    x = signal * centroids[y] + torch.randn(nodes, features, generator=gen)
    order = torch.randperm(nodes, generator=gen)
    split = torch.zeros(nodes, dtype=torch.long)
    split[order[int(0.4 * nodes):int(0.7 * nodes)]] = 1
    split[order[int(0.7 * nodes):]] = 2
    return Graph(x, y, split == 0, split == 1, split == 2, normalized_adjacency(edges, nodes))
