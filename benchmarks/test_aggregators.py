"""Aggregators on a [100, 1e6] float32 stack, against one torch.sort of the same stack.

Target (issue 6): cma and ctma within 2x of the sort (they are one sort plus a reduction)."""

from __future__ import annotations

import pytest
import torch

import fedbench
from benchmarks.conftest import best_times, report

RULES = ["fedavg", "cma", "ctma:beta=0.4", "cdp:sigma=1"]


@pytest.fixture(scope="module")
def stack():
    torch.manual_seed(0)
    return torch.randn(100, 1_000_000), torch.full((100,), 600.0)


def test_aggregators_vs_sort(benchmark, stack):
    updates, weights = stack
    variants = {"torch.sort": lambda: torch.sort(updates, dim=0)}
    for spec in RULES:
        rule = fedbench.parse_defense(spec).aggregator.build()
        variants[spec] = lambda rule=rule: rule.aggregate(updates, weights, fedbench.ServerContext())
    times = best_times(variants, repeats=2)
    report(benchmark, "aggregators on [100, 1e6] float32", times, {f"{r}/sort": (r, "torch.sort") for r in RULES})
    benchmark.pedantic(variants["cma"], rounds=1, iterations=1)
