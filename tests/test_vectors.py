"""Shared vector helpers (fedbench/vectors.py) added for the attacks: the bisection line search.

``largest_passing(passes, lo, hi, tol=)`` is Shejwalkar & Houmansadr's gamma search (NDSS 2021,
Algorithm 1) written as a bisection: first probe in the middle of [lo, hi], halve the step after
every probe, stop once the next probe would be within tol of the largest passing value.
"""

from __future__ import annotations

import math

import pytest
import torch

from fedbench.vectors import largest_passing


def recording(threshold: float):
    """A monotone condition ``x <= threshold`` that records where it was probed."""
    probes: list[float] = []

    def passes(x: float) -> bool:
        probes.append(x)
        return x <= threshold

    return passes, probes


@pytest.mark.parametrize("threshold", [0.0, 1e-4, 3.14159, 7.5, 12.5, 19.99])
def test_largest_passing_finds_the_threshold_of_a_monotone_condition_within_tolerance(threshold):
    passes, _ = recording(threshold)
    found = largest_passing(passes, 0.0, 20.0, tol=1e-5)
    assert found <= threshold  # what it returns passes
    assert threshold - found <= 2e-5  # and is at most a step of the final size below the threshold


def test_largest_passing_probes_like_the_papers_gamma_search():
    """Algorithm 1 with gamma_init = 10: probe 10; on success add half the last step, on failure
    subtract it (10 -> 15 -> 12.5 -> 11.25 ... for a threshold of 11.3); stop at tolerance tau."""
    gamma_init, tau, threshold = 10.0, 1e-5, 11.3
    passes, probes = recording(threshold)
    found = largest_passing(passes, 0.0, 2 * gamma_init, tol=tau)

    expected, succ, gamma, step = [], 0.0, gamma_init, gamma_init
    while abs(succ - gamma) > tau:  # the paper's loop, written out
        expected.append(gamma)
        if gamma <= threshold:
            succ, gamma = gamma, gamma + step / 2
        else:
            gamma = gamma - step / 2
        step /= 2
    assert probes[:4] == [10.0, 15.0, 12.5, 11.25]
    assert probes == expected and found == succ


def test_largest_passing_returns_lo_when_nothing_passes_and_never_probes_lo():
    passes, probes = recording(-1.0)
    assert largest_passing(passes, 0.0, 8.0, tol=0.01) == 0.0
    assert probes and 0.0 not in probes and min(probes) > 0


def test_largest_passing_calls_the_condition_about_log2_range_over_tol_times():
    passes, probes = recording(5.0)
    largest_passing(passes, 0.0, 20.0, tol=1e-5)
    assert len(probes) == math.ceil(math.log2(20.0 / 1e-5)) - 1  # stops once half the bracket is <= tol


def test_largest_passing_works_on_any_interval_such_as_a_log_scale():
    passes, _ = recording(math.log2(3.0))  # strength <= 3, searched on log2(strength) in [-4, 6]
    found = 2.0 ** largest_passing(passes, -4.0, 6.0, tol=0.01)
    assert 3.0 / 2**0.02 <= found <= 3.0


@pytest.mark.parametrize("lo, hi, tol", [(1.0, 0.0, 0.1), (0.0, 1.0, 0.0), (0.0, 1.0, -1.0), (0.0, math.nan, 0.1)])
def test_largest_passing_rejects_an_empty_interval_or_a_non_positive_tolerance(lo, hi, tol):
    with pytest.raises(ValueError, match="largest_passing"):
        largest_passing(lambda x: True, lo, hi, tol=tol)


def test_weighted_sum_ignores_rows_with_zero_coefficient_even_when_they_are_nan():
    from fedbench.vectors import weighted_sum

    x = torch.tensor([[1.0, 2.0], [float("nan"), float("inf")], [3.0, -1.0]])
    assert weighted_sum(torch.tensor([0.5, 0.0, 2.0]), x).tolist() == [6.5, -1.0]
    assert torch.isnan(weighted_sum(torch.tensor([0.5, 1.0, 2.0]), x)).any()  # a counted NaN row still counts


def test_pairwise_distances_stay_accurate_between_close_rows_when_others_are_far_away():
    from fedbench.vectors import pairwise_sq_distances

    g = torch.Generator().manual_seed(0)
    honest = 0.01 * torch.randn(8, 100_000, generator=g)
    x = torch.cat([torch.full((2, 100_000), 1e6), honest])  # attackers first, as the engine orders rows
    d = pairwise_sq_distances(x)
    exact = torch.cdist(honest.double(), honest.double()) ** 2
    assert torch.allclose(d[2:, 2:], exact, rtol=1e-6, atol=1e-9)
    assert torch.equal(d, d.T) and bool((torch.diagonal(d) == 0).all())


def test_pairwise_distances_put_non_finite_rows_at_infinity():
    from fedbench.vectors import pairwise_sq_distances

    x = torch.tensor([[0.0, 0.0], [float("nan"), 1.0], [3.0, 4.0]])
    d = pairwise_sq_distances(x)
    assert d[0, 2] == 25.0 and bool(torch.isinf(d[1]).all()) and bool(torch.isinf(d[:, 1]).all())
