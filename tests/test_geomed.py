"""The geometric median of RFA (Pillutla, Kakade & Harchaoui 2022), plugins/geomed.py: smoothed
Weiszfeld weighted by sample counts, from the weighted mean, run until the objective settles."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fedbench
from fedbench_plugins.geomed import GeometricMedian, smoothed_weiszfeld
from fedbench.vectors import pairwise_sq_distances


def run(rule: GeometricMedian, rows, weights=None) -> torch.Tensor:
    x = torch.as_tensor(rows, dtype=torch.float64)
    w = torch.ones(len(x)) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    return rule.aggregate(x, w, fedbench.ServerContext())


def objective(z: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> float:
    """sum_i w_i ||z - x_i|| / sum_i w_i, the quantity RFA minimises."""
    w = w.double() / w.double().sum()
    return float(w @ torch.linalg.vector_norm(x.double() - z.double(), dim=1))


def test_geomed_of_points_on_a_line_is_their_weighted_median():
    # on a line the geometric median is the (weighted) median: 1 for 0, 1, 10 ...
    assert run(GeometricMedian(), [[0.0], [1.0], [10.0]]).item() == pytest.approx(1.0, abs=1e-4)
    # ... and 10 once the client at 10 holds 3 of the 5 samples (weights are sample counts)
    assert run(GeometricMedian(), [[0.0], [1.0], [10.0]], weights=[1, 1, 3]).item() == pytest.approx(10.0, abs=1e-4)


def test_geomed_of_a_triangle_is_its_fermat_point():
    # (0, 0), (1, 0), (0, 1): every side is seen at 120 degrees from (t, t), t = (3 - sqrt 3) / 6
    t = (3 - math.sqrt(3)) / 6
    out = run(GeometricMedian(), [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert out.tolist() == pytest.approx([t, t], abs=2e-3)
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    best = objective(torch.tensor([t, t]), x, torch.ones(3))
    assert objective(out, x, torch.ones(3)) == pytest.approx(best, rel=1e-5)


def test_geomed_runs_until_converged_not_a_fixed_few_steps():
    rows = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    rule = GeometricMedian()
    converged = run(rule, rows)
    assert 3 < rule.last_steps < 100  # stopped by the tolerance, not by the cap
    three_steps = run(GeometricMedian(iters=3), rows)  # ByzFL-like step budget (ByzFL also starts at 0)
    t = (3 - math.sqrt(3)) / 6
    assert abs(three_steps[0].item() - t) > 10 * abs(converged[0].item() - t)


def test_geomed_stops_once_the_relative_change_of_the_objective_is_at_most_eps():
    x = torch.randn(9, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    alpha = torch.full((9,), 1 / 9, dtype=torch.float64)
    d = pairwise_sq_distances(x)
    values = []
    for steps in range(1, 60):
        c, taken = smoothed_weiszfeld(d, alpha, nu=1e-5, iters=steps, eps=0.0)
        values.append(float(alpha @ torch.linalg.vector_norm(x - c @ x, dim=1)))
    _, taken = smoothed_weiszfeld(d, alpha, nu=1e-5, iters=100, eps=1e-6)
    change = [abs(a - b) / b for a, b in zip(values, values[1:])]
    assert all(c > 1e-6 for c in change[: taken - 2]) and change[taken - 2] <= 1e-6
    assert all(b <= a + 1e-15 for a, b in zip(values, values[1:]))  # Weiszfeld never increases it


def test_a_client_with_weight_k_counts_like_k_identical_clients():
    rows = [[0.0, 3.0], [2.0, -1.0], [5.0, 5.0], [-4.0, 1.0]]
    weighted = run(GeometricMedian(eps=1e-12), rows, weights=[1, 3, 1, 1])
    copies = run(GeometricMedian(eps=1e-12), rows + [[2.0, -1.0], [2.0, -1.0]])
    assert torch.allclose(weighted, copies, rtol=0, atol=1e-6)


@settings(derandomize=True, deadline=None, max_examples=30)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 9), p=st.integers(1, 5), data=st.data())
def test_geomed_does_not_depend_on_the_order_of_the_clients(seed, n, p, data):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g, dtype=torch.float64)
    w = torch.randint(1, 50, (n,), generator=g).float()
    order = torch.tensor(data.draw(st.permutations(range(n))))
    ctx = fedbench.ServerContext()
    out = GeometricMedian().aggregate(x, w, ctx)
    assert torch.allclose(GeometricMedian().aggregate(x[order], w[order], ctx), out, rtol=0, atol=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_far_attackers_leave_the_geomed_inside_the_benign_ball(seed):
    n, f, p = 10, 4, 30
    g = torch.Generator().manual_seed(seed)
    centre = torch.randn(p, generator=g, dtype=torch.float64)
    benign = centre + 0.1 * torch.randn(n - f, p, generator=g, dtype=torch.float64)
    attackers = 1e6 * torch.randn(f, p, generator=g, dtype=torch.float64)
    rule = GeometricMedian()
    out = run(rule, torch.cat([attackers, benign]))
    assert rule.last_steps < 100
    r = torch.linalg.vector_norm(benign - centre, dim=1).max()
    # Every benign update lies within r of the centre c. Comparing the objective at the median z
    # with its value at c: (n - 2f) ||z - c|| <= 2 (n - f) r, however far the attackers are.
    # (They still pull: each adds a unit vector to the balance of forces, so z moves O(r).)
    assert torch.linalg.vector_norm(out - centre) <= 2 * (n - f) / (n - 2 * f) * r


def test_geomed_drops_nan_and_inf_updates():
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    w = torch.arange(1.0, 8.0)
    poisoned = x.clone()
    poisoned[2, 1] = float("nan")
    poisoned[5, 0] = float("inf")
    keep = torch.tensor([0, 1, 3, 4, 6])
    ctx = fedbench.ServerContext()
    expected = GeometricMedian().aggregate(x[keep], w[keep], ctx)
    assert torch.allclose(GeometricMedian().aggregate(poisoned, w, ctx), expected, rtol=0, atol=1e-12)


def test_geomed_without_any_finite_update_is_an_error():
    with pytest.raises(fedbench.FedbenchError, match="geomed: no finite update"):
        run(GeometricMedian(), [[float("nan")], [float("inf")]])


def test_geomed_keeps_dtype_and_shape():
    x = torch.randn(6, 11, generator=torch.Generator().manual_seed(0))
    out = GeometricMedian().aggregate(x, torch.ones(6), fedbench.ServerContext())
    assert out.dtype == torch.float32 and out.shape == (11,)
    assert run(GeometricMedian(), [[1.5, -2.0]]).tolist() == [1.5, -2.0]  # one update is its own median


def test_geomed_is_registered_with_a_converging_default():
    spec = fedbench.parse_defense("geomed").aggregator
    assert dict(spec.params) == {"iters": 100, "eps": 1e-6, "nu": 1e-5}
    assert "RFA" in GeometricMedian.description()
    with pytest.raises(fedbench.SpecError, match="'nu'"):
        fedbench.parse_defense("geomed:nu=0")


@pytest.mark.parametrize("defense", ["geomed", "bucketing:s=2+geomed"])
def test_short_digits_run_under_poisoning_finishes_above_chance(defense):
    cell = fedbench.make_cell(dataset="digits", attack="poison", defense=defense, rounds=3, num_malicious=2, attack_rounds=(2,))
    result = fedbench.run_cell(cell)
    assert result.status == "ok"
    assert result.final_accuracy > 0.2  # 10 classes: chance is 0.1
