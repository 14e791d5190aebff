"""The robust aggregators (plugins/robust.py): coordinate-wise median (CMA) and trimmed mean (CTMA),
as reference section 4 defines them, on hand-built update stacks."""

from __future__ import annotations

import pytest
import torch

import fedbench
from fedbench_plugins.robust import CoordinateMedian, TrimmedMean, trimmed_count


def aggregate(rule: fedbench.Aggregator, rows, weights=None) -> torch.Tensor:
    updates = torch.tensor(rows, dtype=torch.float32)
    if weights is None:
        weights = torch.ones(len(rows))
    return rule.aggregate(updates, torch.as_tensor(weights, dtype=torch.float32), fedbench.ServerContext())


def build(spec: str) -> fedbench.Aggregator:
    stack = fedbench.parse_defense(spec)
    assert stack.client == ()
    return stack.aggregator.build()


# --------------------------------------------------------------------------------------------------
# CMA
# --------------------------------------------------------------------------------------------------
def test_cma_takes_the_middle_value_per_coordinate_for_odd_counts():
    rows = [
        [1.0, 10.0, -3.0],
        [5.0, -2.0, 0.0],
        [3.0, 4.0, 100.0],
    ]
    assert aggregate(CoordinateMedian(), rows).tolist() == [3.0, 4.0, 0.0]


def test_cma_uses_mean_of_two_middle_values_for_even_counts():
    rows = [
        [1.0, 7.0],
        [4.0, -1.0],
        [2.0, 3.0],
        [100.0, 0.0],
    ]
    # column 0 sorted: 1, 2, 4, 100 -> (2 + 4) / 2; column 1 sorted: -1, 0, 3, 7 -> (0 + 3) / 2
    assert aggregate(CoordinateMedian(), rows).tolist() == [3.0, 1.5]
    assert torch.median(torch.tensor(rows), dim=0).values.tolist() == [2.0, 0.0]  # what it must not be


def test_cma_of_a_single_update_is_that_update():
    assert aggregate(CoordinateMedian(), [[1.5, -2.0]]).tolist() == [1.5, -2.0]


def test_cma_of_no_updates_is_an_error():
    with pytest.raises(fedbench.FedbenchError, match="n >= 1"):
        CoordinateMedian().aggregate(torch.zeros(0, 3), torch.zeros(0), fedbench.ServerContext())


def test_cma_ignores_client_weights():
    rows = [[0.0], [1.0], [10.0]]
    assert aggregate(CoordinateMedian(), rows, weights=[1000.0, 1.0, 1.0]).tolist() == [1.0]


def test_cma_outvotes_a_minority_of_huge_or_nan_updates():
    rows = [[1.0, 2.0], [1.0, 2.0], [1.0, 2.0], [1e30, float("nan")], [-1e30, float("nan")]]
    assert aggregate(CoordinateMedian(), rows).tolist() == [1.0, 2.0]


# --------------------------------------------------------------------------------------------------
# CTMA
# --------------------------------------------------------------------------------------------------
def test_ctma_drops_beta_fraction_from_each_side():
    rows = [[float(v), float(-v)] for v in (9, 1, 7, 3, 5, 100, -50, 2, 8, 4)]
    # beta = 0.2 of n = 10 drops 2 per side; column 0 sorted: -50 1 | 2 3 4 5 7 8 | 9 100
    out = aggregate(TrimmedMean(beta=0.2), rows)
    assert out.tolist() == pytest.approx([29 / 6, -29 / 6])


def test_ctma_with_beta_04_and_ten_clients_keeps_the_two_middle_values():
    rows = [[float(v)] for v in (9, 1, 7, 3, 5, 6, 0, 2, 8, 4)]
    assert trimmed_count(0.4, 10) == 4
    assert aggregate(TrimmedMean(beta=0.4), rows).tolist() == [4.5]  # sorted 0..9: keeps 4 and 5


def test_ctma_with_beta_zero_is_the_plain_unweighted_mean():
    g = torch.Generator().manual_seed(3)
    updates = torch.randn(7, 50, generator=g)
    weights = torch.arange(1.0, 8.0)  # ignored
    out = TrimmedMean(beta=0.0).aggregate(updates, weights, g)
    assert torch.allclose(out, updates.mean(dim=0), rtol=0, atol=1e-6)


def test_ctma_trims_floor_of_beta_n_per_side():
    rows = [[float(v)] for v in (0, 1, 2, 3, 40)]
    # beta = 0.3 of n = 5 -> floor(1.5) = 1 per side: mean of 1, 2, 3
    assert aggregate(TrimmedMean(beta=0.3), rows).tolist() == [2.0]
    # beta = 0.1 of n = 5 -> floor(0.5) = 0: nothing trimmed
    assert aggregate(TrimmedMean(beta=0.1), rows).tolist() == [pytest.approx(46 / 5)]


def test_ctma_trims_what_a_decimal_beta_says_despite_binary_rounding():
    assert 0.29 * 100 < 29  # floating point
    assert trimmed_count(0.29, 100) == 29


def test_ctma_trims_nan_updates_like_extreme_values():
    rows = [[1.0], [2.0], [3.0], [float("nan")], [-1e30]]
    assert aggregate(TrimmedMean(beta=0.2), rows).tolist() == [2.0]


def test_ctma_ignores_client_weights():
    rows = [[0.0], [1.0], [2.0], [3.0], [100.0]]
    out = aggregate(TrimmedMean(beta=0.2), rows, weights=[1.0, 1.0, 1.0, 1000.0, 1.0])
    assert out.tolist() == [2.0]


def test_ctma_invalid_beta_is_rejected_by_the_spec_parser():
    for bad in ("0.5", "-0.1", "0.7"):
        with pytest.raises(fedbench.SpecError) as info:
            fedbench.parse_defense(f"ctma:beta={bad}")
        message = str(info.value)
        assert "'beta'" in message and ">= 0" in message and "< 0.5" in message


def test_ctma_keeps_at_least_one_value_and_rejects_an_empty_stack_naming_beta_and_n():
    # beta < 0.5 always leaves a value: n = 2 trims floor(0.8) = 0, n = 5 trims 2 per side leaving 1
    assert aggregate(TrimmedMean(beta=0.4), [[1.0], [3.0]]).tolist() == [2.0]
    assert aggregate(TrimmedMean(beta=0.4), [[float(v)] for v in (5, 1, 3, 2, 4)]).tolist() == [3.0]
    with pytest.raises(fedbench.FedbenchError, match=r"beta=0\.4.*n=0"):
        TrimmedMean(beta=0.4).aggregate(torch.zeros(0, 3), torch.zeros(0), fedbench.ServerContext())


# --------------------------------------------------------------------------------------------------
# Both rules, through the registry
# --------------------------------------------------------------------------------------------------
def test_robust_rules_are_registered_aggregators_with_their_defaults():
    stack = fedbench.parse_defense("ctma")
    assert stack.aggregator.name == "ctma" and dict(stack.aggregator.params) == {"beta": 0.1}
    assert fedbench.parse_defense("cma").aggregator.name == "cma"


@pytest.mark.parametrize("spec", ["cma", "ctma:beta=0.4"])
def test_robust_rules_keep_shape_dtype_and_a_unanimous_vote(spec):
    rule = build(spec)
    row = torch.linspace(-1, 1, 11, dtype=torch.float64)
    updates = row.expand(10, -1).clone()
    out = rule.aggregate(updates, torch.ones(10), fedbench.ServerContext())
    assert out.shape == (11,) and out.dtype == torch.float64
    assert torch.equal(out, row)
