"""Krum, Multi-Krum (Blanchard et al. 2017) and Bulyan (El Mhamdi et al. 2018), plugins/krum.py:
the papers' definitions on hand-computed stacks, order independence, far and non-finite attackers,
the breakdown-point errors, and short digits runs."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import fedbench
from fedbench.cli import main
from fedbench.vectors import pairwise_sq_distances
from fedbench_plugins.krum import Bulyan, Krum, MultiKrum, krum_scores, mean_nearest_median

CTX = fedbench.ServerContext()


def column(*values: float) -> torch.Tensor:
    """A stack of 1-D updates (one value per client), float64."""
    return torch.tensor(values, dtype=torch.float64).unsqueeze(1)


def run(rule: fedbench.Aggregator, updates: torch.Tensor, weights=None, f: int = 0) -> torch.Tensor:
    if weights is None:
        weights = torch.ones(len(updates))
    return rule.aggregate(updates, torch.as_tensor(weights, dtype=torch.float32), fedbench.ServerContext(num_byzantine=f))


def naive_krum_scores(x: torch.Tensor, f: int) -> list[float]:
    """The paper's score, literally: per client, the sum of the n-f-2 smallest ||x_i - x_j||^2, j != i."""
    n = len(x)
    scores = []
    for i in range(n):
        others = sorted(float(((x[i].double() - x[j].double()) ** 2).sum()) for j in range(n) if j != i)
        scores.append(sum(others[: n - f - 2]))
    return scores


def random_stack(seed: int, n: int, p: int) -> torch.Tensor:
    return torch.randn(n, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def with_far_attackers(seed: int, n: int, f: int, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n - f benign N(0, 1) updates and f attackers at +-1e6 per coordinate, attackers first (as the
    engine orders them)."""
    g = torch.Generator().manual_seed(seed)
    benign = torch.randn(n - f, p, generator=g, dtype=torch.float64)
    signs = torch.where(torch.rand(f, p, generator=g) < 0.5, -1.0, 1.0).double()
    return torch.cat([1e6 * signs, benign]), benign


# --------------------------------------------------------------------------------------------------
# Krum
# --------------------------------------------------------------------------------------------------
def test_krum_score_is_the_sum_of_squared_distances_to_the_n_minus_f_minus_2_nearest():
    x = column(0, 1, 3, 7, 100)
    # n = 5, f = 1: each score sums the 2 smallest squared distances to the others
    #   0: 1 (to 1) + 9 (to 3) = 10      1: 1 + 4 = 5       3: 4 + 9 = 13
    #   7: 16 + 36 = 52                  100: 93^2 + 97^2 = 8649 + 9409 = 18058
    assert krum_scores(pairwise_sq_distances(x), f=1).tolist() == [10.0, 5.0, 13.0, 52.0, 18058.0]
    assert run(Krum(f=1), x).tolist() == [1.0]
    # ByzFL's convention (the MEAN over the n-f-1 = 3 nearest) would pick 3 instead:
    #   0: (1 + 9 + 49) / 3 = 19.7    1: (1 + 4 + 36) / 3 = 13.7    3: (4 + 9 + 16) / 3 = 9.7


def test_krum_picks_the_honest_vector_closest_to_the_others():
    honest = [[1.0, 1.0], [1.1, 1.0], [0.9, 1.0], [1.0, 1.1], [1.0, 0.9]]
    attackers = [[10.0, -10.0], [10.5, -10.0]]  # colluding, close to each other
    x = torch.tensor(attackers + honest, dtype=torch.float64)
    # n = 7, f = 2, 3 neighbours: the centre (1, 1) has its 4 honest neighbours at squared distance
    # 0.01, so it scores 0.03; every other honest vector 0.01 + 0.02 + 0.02 = 0.05; the attackers
    # 0.25 + two squared distances of about 200 to the honest ones.
    assert run(Krum(f=2), x).tolist() == [1.0, 1.0]


def test_krum_scores_match_the_papers_formula_on_random_stacks():
    for seed in range(5):
        x = random_stack(seed, 9, 4)
        assert krum_scores(pairwise_sq_distances(x), f=2).tolist() == pytest.approx(naive_krum_scores(x, 2), rel=1e-12)


@settings(derandomize=True, deadline=None, max_examples=40)
@given(seed=st.integers(0, 2**16), n=st.integers(3, 9), p=st.integers(1, 5), data=st.data())
def test_krum_output_does_not_depend_on_the_order_of_the_clients(seed, n, p, data):
    f = data.draw(st.integers(0, (n - 3) // 2))
    x = random_stack(seed, n, p)
    order = torch.tensor(data.draw(st.permutations(range(n))))
    picked = run(Krum(f=f), x)
    assert torch.equal(run(Krum(f=f), x[order]), picked)
    scores = naive_krum_scores(x, f)
    index = next(i for i in range(n) if torch.equal(x[i], picked))
    assert scores[index] == pytest.approx(min(scores), rel=1e-12)  # a best-scoring update (ties: krum_order)


def test_krum_ignores_client_weights():
    x = column(0, 1, 3, 7, 100)
    assert run(Krum(f=1), x, weights=[1, 1, 1, 1, 1000]).tolist() == [1.0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_krum_never_picks_a_nan_or_inf_update_and_treats_it_as_infinitely_far(bad):
    x = random_stack(0, 9, 6)
    poisoned = x.clone()
    poisoned[0, 3] = bad
    poisoned[4] = bad
    far = x.clone()
    far[0], far[4] = 1e9, -1e9
    out = run(Krum(f=2), poisoned)
    assert torch.isfinite(out).all()
    assert torch.equal(out, run(Krum(f=2), far))


# --------------------------------------------------------------------------------------------------
# Multi-Krum
# --------------------------------------------------------------------------------------------------
def test_multikrum_averages_the_m_best_scoring_updates_without_weights():
    x = column(0, 1, 3, 7, 100)
    # scores (see the Krum test): 1 -> 5, 0 -> 10, 3 -> 13, 7 -> 52, 100 -> 18058
    assert run(MultiKrum(f=1, m=3), x).tolist() == [pytest.approx(4 / 3)]  # (1 + 0 + 3) / 3
    # the paper's mean is unweighted; flwr's would be (0 + 1 + 300) / 102 with these weights
    assert run(MultiKrum(f=1, m=3), x, weights=[1, 1, 100, 1, 1]).tolist() == [pytest.approx(4 / 3)]
    # m = auto = n - f = 4: (1 + 0 + 3 + 7) / 4
    assert run(MultiKrum(f=1), x).tolist() == [pytest.approx(11 / 4)]


def test_multikrum_with_m_1_is_krum_and_with_m_n_the_plain_mean():
    x = random_stack(1, 8, 5)
    assert torch.equal(run(MultiKrum(f=2, m=1), x), run(Krum(f=2), x))
    assert torch.allclose(run(MultiKrum(f=2, m=8), x), x.mean(dim=0), rtol=0, atol=1e-12)


@settings(derandomize=True, deadline=None, max_examples=30)
@given(seed=st.integers(0, 2**16), n=st.integers(3, 9), p=st.integers(1, 5), data=st.data())
def test_multikrum_output_does_not_depend_on_the_order_of_the_clients(seed, n, p, data):
    f = data.draw(st.integers(0, (n - 3) // 2))
    m = data.draw(st.integers(1, n))
    x = random_stack(seed, n, p)
    order = torch.tensor(data.draw(st.permutations(range(n))))
    assert torch.allclose(run(MultiKrum(f=f, m=m), x[order]), run(MultiKrum(f=f, m=m), x), rtol=0, atol=1e-12)


def test_multikrum_averages_finite_updates_only_when_a_minority_is_nan():
    x = random_stack(2, 9, 4)
    poisoned = x.clone()
    poisoned[1, 0] = float("nan")
    poisoned[6, 2] = float("inf")
    far = x.clone()
    far[1], far[6] = 1e9, -1e9
    out = run(MultiKrum(f=2), poisoned)  # m = 7 of the 7 finite rows
    assert torch.isfinite(out).all()
    assert torch.allclose(out, run(MultiKrum(f=2), far), rtol=0, atol=1e-12)


def test_multikrum_with_m_above_n_is_a_spec_error_naming_m_and_n():
    with pytest.raises(fedbench.SpecError, match=r"multikrum: m=11 .* n=10"):
        fedbench.make_cell(dataset="digits", defense="multikrum:m=11", num_malicious=2)


# --------------------------------------------------------------------------------------------------
# Bulyan
# --------------------------------------------------------------------------------------------------
def test_bulyan_iterates_krum_then_averages_the_values_nearest_the_median():
    x = column(0, 1, 3, 4, 8, 10, 100)
    # n = 7, f = 1: theta = 5 Krum picks, beta = 3 values kept per coordinate.
    # pick 1, R = all (4 neighbours): 3 scores 1 + 4 + 9 + 25 = 39 (4: 42, 1: 63, 0: 90, 8: 94) -> 3
    # pick 2, R = {0, 1, 4, 8, 10, 100} (3 neighbours): 4 scores 9 + 16 + 16 = 41 (1: 59) -> 4
    # pick 3, R = {0, 1, 8, 10, 100} (2 neighbours): 1 scores 1 + 49 = 50 (8: 4 + 49 = 53) -> 1
    # pick 4, R = {0, 8, 10, 100} (1 neighbour): 8 and 10 tie at 4; summed squared distances to the
    #   rest break it: 8 -> 64 + 4 + 8464 = 8532, 10 -> 100 + 4 + 8100 = 8204 -> 10
    # pick 5, R = {0, 8, 100}: 0 and 8 tie at 64; 0 -> 64 + 10000, 8 -> 64 + 8464 -> 8
    # picked {1, 3, 4, 8, 10}: median 4; the 3 values nearest it are 4, 3, 1 -> 8 / 3
    assert run(Bulyan(f=1), x).tolist() == [pytest.approx(8 / 3)]


def test_bulyan_coordinate_step_keeps_the_beta_values_nearest_each_median():
    picked = torch.tensor([[1.0, -50.0], [2.0, 0.0], [4.0, 1.0], [5.0, 9.0], [100.0, 10.0]])
    # column 0: median 4, nearest three 4, 5, 2 -> 11/3; column 1: median 1, nearest 1, 0, 9 -> 10/3
    assert mean_nearest_median(picked, 3).tolist() == pytest.approx([11 / 3, 10 / 3])
    # values equally far below and above the median: the lower one is kept
    assert mean_nearest_median(torch.tensor([[0.0], [2.0], [3.0], [4.0], [6.0]]), 3).tolist() == [3.0]  # 2, 3, 4
    assert mean_nearest_median(torch.tensor([[0.0], [1.0], [3.0], [5.0], [6.0]]), 2).tolist() == [2.0]  # 3, then 1 before 5
    # even counts: the median is the mean of the two middle values (2.5), nearest two are 2 and 3
    assert mean_nearest_median(torch.tensor([[0.0], [2.0], [3.0], [10.0]]), 2).tolist() == [2.5]


@settings(derandomize=True, deadline=None, max_examples=40)
@given(seed=st.integers(0, 2**16), theta=st.integers(1, 9), p=st.integers(1, 4), data=st.data())
def test_bulyan_coordinate_step_matches_a_per_coordinate_sort_by_distance(seed, theta, p, data):
    beta = data.draw(st.integers(1, theta))
    x = torch.randn(theta, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    expected = []
    for j in range(p):
        col = sorted(x[:, j].tolist())
        median = (col[(theta - 1) // 2] + col[theta // 2]) / 2
        nearest = sorted(col, key=lambda v: (abs(v - median), v))[:beta]
        expected.append(sum(nearest) / beta)
    assert mean_nearest_median(x, beta).tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_bulyan_with_f_0_is_the_plain_unweighted_mean():
    x = random_stack(3, 5, 4)
    assert torch.allclose(run(Bulyan(f=0), x, weights=[1, 2, 3, 4, 5]), x.mean(dim=0), rtol=0, atol=1e-12)


@settings(derandomize=True, deadline=None, max_examples=30)
@given(seed=st.integers(0, 2**16), f=st.integers(0, 2), extra=st.integers(0, 3), p=st.integers(1, 4), data=st.data())
def test_bulyan_output_does_not_depend_on_the_order_of_the_clients(seed, f, extra, p, data):
    n = 4 * f + 3 + extra
    x = random_stack(seed, n, p)
    order = torch.tensor(data.draw(st.permutations(range(n))))
    assert torch.allclose(run(Bulyan(f=f), x[order]), run(Bulyan(f=f), x), rtol=0, atol=1e-12)


def test_bulyan_never_picks_nan_or_inf_updates():
    x = random_stack(4, 11, 5)
    poisoned = x.clone()
    poisoned[0, 1] = float("nan")
    poisoned[5] = float("inf")
    far = x.clone()
    far[0], far[5] = 1e9, -1e9
    out = run(Bulyan(f=2), poisoned)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, run(Bulyan(f=2), far), rtol=0, atol=1e-12)


def test_bulyan_below_4f_plus_3_is_a_spec_error_naming_the_rule_n_and_f():
    with pytest.raises(fedbench.SpecError) as info:
        fedbench.make_cell(dataset="digits", defense="bulyan", rounds=2)  # 10 per round, 5 malicious
    message = str(info.value)
    assert message.startswith("bulyan:") and "n >= 4f+3" in message and "n=10, f=5" in message
    with pytest.raises(fedbench.SpecError, match=r"n=10, f=3"):
        fedbench.make_cell(dataset="digits", defense="bulyan:f=3", num_malicious=1)
    fedbench.make_cell(dataset="digits", defense="bulyan", num_malicious=1)  # 10 >= 7


def test_bulyan_below_4f_plus_3_is_one_clean_error_line_on_the_command_line():
    result = CliRunner().invoke(main, ["run", "--defense", "bulyan", "--rounds", "2"])
    assert result.exit_code == 2
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "bulyan" in errors[0] and "n=10, f=5" in errors[0]


def test_krum_and_multikrum_below_2f_plus_3_are_spec_errors():
    for rule in ("krum", "multikrum"):
        with pytest.raises(fedbench.SpecError, match=rf"{rule}: needs n >= 2f\+3 .* got n=10, f=4"):
            fedbench.make_cell(dataset="digits", defense=rule, num_malicious=4)
    with pytest.raises(fedbench.SpecError, match=r"n >= 2f\+3"):
        Krum(f=2).aggregate(torch.zeros(6, 3), torch.ones(6), CTX)


# --------------------------------------------------------------------------------------------------
# All three
# --------------------------------------------------------------------------------------------------
RULES = [("krum", Krum, 2), ("multikrum", MultiKrum, 2), ("bulyan", Bulyan, 2)]


@pytest.mark.parametrize("name, rule, f", RULES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_far_attackers_leave_the_output_inside_the_benign_coordinate_range(name, rule, f, seed):
    n = 11  # bulyan needs 4f + 3
    x, benign = with_far_attackers(seed, n, f, 20)
    out = run(rule(f=f), x)
    assert (out >= benign.min(dim=0).values).all() and (out <= benign.max(dim=0).values).all()


def test_distances_between_honest_updates_survive_a_far_away_attacker():
    x, benign = with_far_attackers(0, 10, 2, 100_000)
    x = x.float()
    d = pairwise_sq_distances(x)
    exact = torch.cdist(x[2:].double(), x[2:].double(), compute_mode="donot_use_mm_for_euclid_dist") ** 2
    assert torch.allclose(d[2:, 2:], exact, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name, rule, f", RULES)
def test_rules_keep_dtype_and_shape_and_ignore_weights(name, rule, f):
    x = random_stack(5, 11, 7)
    out = run(rule(f=f), x)
    assert out.dtype == torch.float64 and out.shape == (7,)
    assert torch.equal(run(rule(f=f), x, weights=torch.arange(1.0, 12.0)), out)
    assert run(rule(f=f), x.float()).dtype == torch.float32


def test_rules_are_registered_with_f_auto_and_described_by_their_papers():
    for name, cls in (("krum", Krum), ("multikrum", MultiKrum), ("bulyan", Bulyan)):
        spec = fedbench.parse_defense(name).aggregator
        assert spec.name == name and dict(spec.params)["f"] is None
        assert "Blanchard" in cls.description() or "El Mhamdi" in cls.description()
    assert dict(fedbench.parse_defense("multikrum").aggregator.params) == {"f": None, "m": None}


@pytest.mark.parametrize(
    "defense, scenario",
    [("krum", {"num_malicious": 2}), ("multikrum", {"num_malicious": 2}), ("bulyan", {"num_malicious": 1})],
)
def test_short_digits_run_under_poisoning_finishes_above_chance(defense, scenario):
    cell = fedbench.make_cell(dataset="digits", attack="poison", defense=defense, rounds=3, attack_rounds=(2,), **scenario)
    result = fedbench.run_cell(cell)
    assert result.status == "ok"
    assert result.final_accuracy > 0.2  # 10 classes: chance is 0.1
