"""Centered clipping (Karimireddy, He & Jaggi 2021), plugins/centered_clipping.py: v <- v + mean of
clip_tau(x_i - v), started at the previous round's aggregate, state kept per cell."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fedbench
from fedbench_plugins.centered_clipping import CenteredClipping


def step(rule: CenteredClipping, rows, weights=None) -> torch.Tensor:
    x = torch.as_tensor(rows, dtype=torch.float64)
    w = torch.ones(len(x)) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    return rule.aggregate(x, w, fedbench.ServerContext())


def test_cc_clips_differences_from_the_previous_aggregate_and_averages_them():
    rule = CenteredClipping(tau=1.0)
    # round 1, centre 0: [3, 4] (norm 5) clips to [0.6, 0.8]; [0.3, 0.4] (norm 0.5) stays
    assert step(rule, [[3.0, 4.0], [0.3, 0.4]]).tolist() == pytest.approx([0.45, 0.6])
    # round 2, centre [0.45, 0.6]: differences [0, 2] -> [0, 1] and [0, 0]; v = centre + [0, 0.5]
    assert step(rule, [[0.45, 2.6], [0.45, 0.6]]).tolist() == pytest.approx([0.45, 1.1])


def test_cc_repeats_the_clipping_step_iters_times():
    # centre 0, tau 1: step 1: [4, 0] -> [1, 0], [0, 0] stays -> v = [0.5, 0]
    #                  step 2: [3.5, 0] -> [1, 0], [-0.5, 0] stays -> v = 0.5 + (1 - 0.5) / 2 = 0.75
    assert step(CenteredClipping(tau=1.0, iters=2), [[4.0, 0.0], [0.0, 0.0]]).tolist() == [0.75, 0.0]
    assert step(CenteredClipping(tau=1.0, iters=1), [[4.0, 0.0], [0.0, 0.0]]).tolist() == [0.5, 0.0]


def test_cc_with_a_radius_above_every_difference_is_the_unweighted_mean():
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = CenteredClipping(tau=1e6).aggregate(x, torch.arange(1.0, 7.0), fedbench.ServerContext())
    assert torch.allclose(out, x.mean(dim=0), rtol=0, atol=1e-12)


def test_cc_moves_each_clients_influence_at_most_tau_over_n():
    rule = CenteredClipping(tau=0.5)
    honest = torch.zeros(4, 3, dtype=torch.float64)
    x = torch.cat([torch.full((1, 3), 1e9, dtype=torch.float64), honest])
    assert torch.linalg.vector_norm(rule.aggregate(x, torch.ones(5), fedbench.ServerContext())).item() == pytest.approx(0.5 / 5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_far_attackers_leave_the_aggregate_inside_the_benign_ball(seed):
    n, f, p, r = 10, 3, 20, 0.5
    g = torch.Generator().manual_seed(seed)
    centre = torch.randn(p, generator=g, dtype=torch.float64)
    directions = torch.randn(n - f, p, generator=g, dtype=torch.float64)
    benign = centre + r * torch.rand(n - f, 1, generator=g, dtype=torch.float64) * directions / directions.norm(dim=1, keepdim=True)
    rule = CenteredClipping(tau=r)
    rule.centre = centre.clone()  # the previous round's aggregate: the benign centre c
    attackers = 1e6 * torch.randn(f, p, generator=g, dtype=torch.float64)
    out = step(rule, torch.cat([attackers, benign]))
    # honest differences are within r = tau (unclipped); each attacker adds at most tau / n:
    # ||v - c|| <= (n - f) / n * r + f / n * tau = r
    assert torch.linalg.vector_norm(out - centre) <= r * (1 + 1e-12)


@settings(derandomize=True, deadline=None, max_examples=30)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 9), p=st.integers(1, 5), tau=st.sampled_from([0.1, 1.0, 10.0]), data=st.data())
def test_cc_does_not_depend_on_the_order_of_the_clients(seed, n, p, tau, data):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g, dtype=torch.float64)
    previous = torch.randn(p, generator=g, dtype=torch.float64)
    order = torch.tensor(data.draw(st.permutations(range(n))))
    results = []
    for rows in (x, x[order]):
        rule = CenteredClipping(tau=tau, iters=2)
        rule.centre = previous.clone()
        results.append(rule.aggregate(rows, torch.ones(n), fedbench.ServerContext()))
    assert torch.allclose(results[0], results[1], rtol=0, atol=1e-12)


def test_cc_nan_or_inf_update_contributes_nothing_but_still_counts_in_one_over_n():
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    previous = torch.randn(4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    poisoned, at_centre = x.clone(), x.clone()
    poisoned[1, 2] = float("nan")
    poisoned[4] = float("inf")
    at_centre[1] = at_centre[4] = previous
    results = []
    for rows in (poisoned, at_centre):
        rule = CenteredClipping(tau=0.7)
        rule.centre = previous.clone()
        results.append(rule.aggregate(rows, torch.ones(6), fedbench.ServerContext()))
    assert torch.isfinite(results[0]).all()
    assert torch.allclose(results[0], results[1], rtol=0, atol=1e-12)


def test_cc_starts_from_zero_and_remembers_its_last_output():
    rule = CenteredClipping(tau=1.0)
    assert rule.centre is None
    out = step(rule, [[2.0, 0.0], [0.0, 2.0]])
    assert torch.equal(rule.centre, out) and rule.centre is not out
    assert CenteredClipping(tau=1.0).centre is None  # a new object (a new cell) starts afresh


def test_cc_keeps_dtype_and_device():
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    out = CenteredClipping(tau=0.3).aggregate(x, torch.ones(5), fedbench.ServerContext())
    assert out.dtype == torch.float32 and out.shape == (7,)


def test_cc_is_registered_with_the_papers_defaults():
    spec = fedbench.parse_defense("cc").aggregator
    assert dict(spec.params) == {"tau": 100.0, "iters": 1}
    assert "Karimireddy" in CenteredClipping.description()


def test_two_cc_cells_in_one_process_give_the_numbers_each_gives_alone():
    # tau small enough that the centre matters (with a large tau cc is the plain mean)
    def cell(seed):
        return fedbench.make_cell(dataset="digits", attack="poison", defense="cc:tau=0.05", rounds=3,
                                  num_malicious=2, attack_rounds=(2,), seed=seed)

    def accuracies(seed):
        result = fedbench.run_cell(cell(seed))
        return [row["accuracy"] for row in result.rounds], result.final_params

    a1, b1, a2, b2 = accuracies(0), accuracies(1), accuracies(0), accuracies(1)
    for (acc_x, params_x), (acc_y, params_y) in ((a1, a2), (b1, b2)):
        assert acc_x == acc_y and torch.equal(params_x, params_y)
    assert not torch.equal(a1[1], b1[1])


@pytest.mark.parametrize("defense", ["cc", "cc:tau=0.1,iters=3"])
def test_short_digits_run_under_poisoning_finishes_above_chance(defense):
    cell = fedbench.make_cell(dataset="digits", attack="poison", defense=defense, rounds=3, num_malicious=2, attack_rounds=(2,))
    result = fedbench.run_cell(cell)
    assert result.status == "ok"
    assert result.final_accuracy > 0.2  # 10 classes: chance is 0.1
