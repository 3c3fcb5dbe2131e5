"""Linear -> Linear merge on any leading dims: exact in float64 and float32."""

from __future__ import annotations

import torch
from _fold_util import assert_same, count_modules, traced
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from easier_export.fold import rule

fold_identity, fold_linear_linear = rule("identity").apply, rule("linear_linear").apply


@settings(max_examples=30, deadline=None)
@given(
    dims=st.lists(st.integers(1, 24), min_size=3, max_size=3),
    lead=st.sampled_from([(4,), (2, 5), (2, 3, 3)]),
    bias=st.tuples(st.booleans(), st.booleans()),
    seed=st.integers(0, 2**16),
)
def test_linear_pair_exact(
    dims: list[int], lead: tuple[int, ...], bias: tuple[bool, bool], seed: int
) -> None:
    torch.manual_seed(seed)
    first = nn.Linear(dims[0], dims[1], bias=bias[0])
    model = nn.Sequential(first, nn.Linear(dims[1], dims[2], bias=bias[1]))
    for dtype, rtol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        gm = traced(model, dtype)
        x = torch.randn(*lead, dims[0], dtype=dtype)
        folded, [record] = fold_linear_linear(gm, x)
        assert record.applied and count_modules(folded, nn.Linear) == 1
        assert_same(gm, folded, x, rtol)


def test_vgg_classifier_collapses_to_one_linear() -> None:
    head = nn.Sequential(nn.Linear(32, 24), nn.Dropout(), nn.Linear(24, 24), nn.Dropout(), nn.Linear(24, 10))
    gm = traced(head)
    x = torch.randn(3, 32, dtype=torch.float64)
    folded, _ = fold_identity(gm)
    folded, records = fold_linear_linear(folded, x)
    assert [r.applied for r in records] == [True, True]
    assert count_modules(folded, nn.Linear) == 1
    assert_same(gm, folded, x, 1e-10)


def test_linear_feeding_two_users_is_not_merged() -> None:
    class Fork(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            return self.b(y) + y

    folded, records = fold_linear_linear(traced(Fork()), torch.randn(2, 4, dtype=torch.float64))
    assert [(r.nodes, r.applied, r.reason) for r in records] == [(["a", "b"], False, "fan-out: a output has 2 users")]
    assert count_modules(folded, nn.Linear) == 2
