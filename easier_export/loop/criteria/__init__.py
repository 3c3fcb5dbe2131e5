"""How a round scores its call sites, lower = removed first: EASIER's entropy, its simple baselines, and the
study's criteria from the literature (benchmarks/compare.py), each registered under its ``--criterion`` name.

Importing the package registers them all, in the order of ``--criterion``'s choices.
"""

from . import counts, gradient, tlc, layerfold, egp  # isort: skip  # noqa: F401
from .registry import CRITERIA, Criterion, Evidence, register_criterion

__all__ = ["CRITERIA", "Criterion", "Evidence", "register_criterion"]
