"""Omniscient model-poisoning attacks (plugins/model_poisoning.py).

* ``alie``: every malicious client uploads mu - z sigma (coordinate-wise mean and population std of
  the round's benign updates); z = the paper's z_max(n, f) by default, a number, or ``auto``.
* ``ipm``: -eps x the benign mean; eps = 100 by default, or ``auto``.
* ``minmax`` / ``minsum``: mu + gamma grad_p with the largest gamma (the paper's search) whose
  distances to the benign updates stay within the benign ones' own (max / summed squared).
* ``fang``: per coordinate, uniform values past the benign extreme against the benign direction.
* ``auto``: the strength with the most damage -- distance of the cell's aggregate from the benign
  mean, through ``MaliciousRound.aggregate`` -- never less than the paper's strength.
"""

from __future__ import annotations

import math

import pytest
import torch

import fedbench
from fedbench.components import ServerContext
from fedbench.server import Server
from fedbench.vectors import pairwise_sq_distances
from fedbench_plugins.model_poisoning import (
    ALittleIsEnough,
    Fang,
    InnerProductManipulation,
    MinMax,
    MinSum,
    paper_z,
)

ATTACKS = ["alie", "alie:z=auto", "ipm", "ipm:eps=auto", "minmax", "minsum", "fang"]


def benign_stack(n: int = 7, P: int = 300, *, seed: int = 1, offset: float = 0.05, scale: float = 0.1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return offset + scale * torch.randn(n, P, generator=g)


def omniscient_round(benign: torch.Tensor, f: int, defense: str = "fedavg", *, seed: int = 0):
    """A hand-built adversarial round: f malicious clients, the given benign updates, and the server
    oracle of ``defense`` with equal weights. Returns the round and the list of oracle queries."""
    server = Server.build(fedbench.parse_defense(defense))
    n = f + len(benign)
    queries: list[torch.Tensor] = []

    def aggregate(candidate: torch.Tensor) -> torch.Tensor:
        queries.append(candidate)
        return server(candidate, torch.ones(n), ServerContext(num_byzantine=f))

    rnd = fedbench.MaliciousRound(
        round=1, global_params=torch.zeros(benign.shape[1]), client_ids=tuple(range(f)), client_data=[],
        train=None, forward=None, generator=torch.Generator().manual_seed(seed),
        benign_updates=benign, aggregate=aggregate,
    )
    return rnd, queries


def damage(rnd: fedbench.MaliciousRound, malicious: torch.Tensor) -> float:
    """The auto searches' objective: distance of the cell's aggregate from the benign mean."""
    aggregate = rnd.aggregate(torch.cat([malicious, rnd.benign_updates]))
    return float(torch.linalg.vector_norm(aggregate - rnd.benign_updates.mean(0), dtype=torch.float64))


def all_rows_equal(x: torch.Tensor) -> bool:
    return bool((x == x[0]).all())


# --------------------------------------------------------------------------------------------------
# ALIE
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("z", [0.0, 0.5, 2.0])
def test_alie_uploads_mu_minus_z_sigma_from_every_malicious_client(z):
    benign = benign_stack()
    rnd, _ = omniscient_round(benign, f=3)
    out = ALittleIsEnough(z=z).malicious_updates(rnd)
    mu, sigma = benign.mean(0), benign.std(0, correction=0)
    assert out.shape == (3, 300) and out.dtype == benign.dtype and all_rows_equal(out)
    assert torch.allclose(out[0], mu - z * sigma, atol=1e-7)


@pytest.mark.parametrize("z", [0.25, 1.0])
def test_alie_updates_lie_within_the_benign_std_band_for_z_up_to_one(z):
    benign = benign_stack()
    out = ALittleIsEnough(z=z).malicious_updates(omniscient_round(benign, f=3)[0])
    mu, sigma = benign.mean(0), benign.std(0, correction=0)
    assert ((out - mu).abs() <= z * sigma + 1e-7).all()
    assert ((out - mu).abs() <= sigma + 1e-7).all()


def test_alie_default_z_is_the_papers_z_max_for_the_rounds_n_and_f():
    # n = 10 clients, f = 5 malicious: s = floor(10/2 + 1) - 5 = 1 supporter needed,
    # z = Phi^{-1}((n - s) / n) = Phi^{-1}(0.9) = 1.2816
    assert paper_z(10, 5) == pytest.approx(1.2815516, abs=1e-6)
    # n = 50, f = 12 (the paper's CIFAR-10 setting): s = 26 - 12 = 14, z = Phi^{-1}(36/50) = 0.5828
    assert paper_z(50, 12) == pytest.approx(0.5828415, abs=1e-6)
    assert paper_z(10, 1) == 0.0  # s = 5: z = Phi^{-1}(0.5), the mean itself

    benign = benign_stack(n=5)
    out = ALittleIsEnough().malicious_updates(omniscient_round(benign, f=5)[0])
    mu, sigma = benign.mean(0), benign.std(0, correction=0)
    assert torch.allclose(out[0], mu - 1.2815516 * sigma, atol=1e-6)


def test_alie_with_a_malicious_majority_needs_an_explicit_z():
    with pytest.raises(fedbench.FedbenchError, match=r"f=6 malicious of n=10 .* give z explicitly"):
        ALittleIsEnough().malicious_updates(omniscient_round(benign_stack(n=4), f=6)[0])
    assert ALittleIsEnough(z=1.0).malicious_updates(omniscient_round(benign_stack(n=4), f=6)[0]).shape == (6, 300)


def test_alie_z_is_a_number_paper_or_auto_in_the_spec_grammar():
    assert dict(fedbench.parse_component("attack", "alie").params) == {"z": "paper"}
    assert fedbench.parse_component("attack", "alie:z=1.50") == fedbench.parse_component("attack", "alie:z=1.5")
    assert dict(fedbench.parse_component("attack", "alie:z=2").params) == {"z": "2.0"}
    assert dict(fedbench.parse_component("attack", "alie:z=AUTO").params) == {"z": "auto"}
    assert str(fedbench.parse_component("attack", "alie:z=auto")) == "alie:z=auto"
    for bad in ("-1", "nan", "abc", "true"):
        with pytest.raises(fedbench.SpecError, match=r"'z' got .*; allowed: a number >= 0, paper or auto"):
            fedbench.parse_component("attack", f"alie:z={bad}")


# --------------------------------------------------------------------------------------------------
# IPM
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eps, sign", [(1.5, -1), (100.0, -1), (0.5, 1), (0.1, 1)])
def test_ipm_makes_the_mean_of_all_updates_point_against_the_benign_mean_exactly_when_eps_exceeds_one(eps, sign):
    """n = 10, f = 5: the mean of all updates is (5 - 5 eps) mu / 10, so its inner product with
    mu is negative for eps > (n - f) / f = 1 and positive below."""
    benign = benign_stack(n=5)
    out = InnerProductManipulation(eps=eps).malicious_updates(omniscient_round(benign, f=5)[0])
    mu = benign.mean(0)
    assert torch.allclose(out, (-eps * mu).expand(5, -1)) and all_rows_equal(out)
    inner = float(torch.cat([out, benign]).mean(0) @ mu)
    assert math.copysign(1.0, inner) == sign
    assert inner == pytest.approx((1 - eps) / 2 * float(mu @ mu), rel=1e-4)


def test_ipm_defaults_to_the_papers_large_eps_and_takes_auto():
    assert dict(fedbench.parse_component("attack", "ipm").params) == {"eps": 100.0}
    assert dict(fedbench.parse_component("attack", "ipm:eps=auto").params) == {"eps": None}
    with pytest.raises(fedbench.SpecError, match="'eps'"):
        fedbench.parse_component("attack", "ipm:eps=0")


# --------------------------------------------------------------------------------------------------
# Min-Max and Min-Sum
# --------------------------------------------------------------------------------------------------
def squared_distances_to(benign: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    return ((benign.double() - row.double()) ** 2).sum(1)


@pytest.mark.parametrize("perturbation", ["unit", "std", "sign"])
def test_minmax_distance_to_any_benign_update_stays_within_the_benign_largest_pairwise_distance(perturbation):
    benign = benign_stack()
    out = MinMax(perturbation=perturbation).malicious_updates(omniscient_round(benign, f=3)[0])
    assert out.shape == (3, 300) and all_rows_equal(out)
    bound = float(pairwise_sq_distances(benign).max())
    worst = float(squared_distances_to(benign, out[0]).max())
    assert worst <= bound * (1 + 1e-6)
    assert worst >= bound * (1 - 1e-3)  # gamma is the largest that fits: the bound is (nearly) reached


@pytest.mark.parametrize("perturbation", ["unit", "std", "sign"])
def test_minsum_summed_squared_distance_stays_within_the_largest_benign_sum(perturbation):
    benign = benign_stack()
    out = MinSum(perturbation=perturbation).malicious_updates(omniscient_round(benign, f=3)[0])
    bound = float(pairwise_sq_distances(benign).sum(1).max())
    total = float(squared_distances_to(benign, out[0]).sum())
    assert total <= bound * (1 + 1e-6)
    assert total >= bound * (1 - 1e-3)


@pytest.mark.parametrize("perturbation, direction", [
    ("unit", lambda mu, sigma: -mu / mu.norm()),
    ("std", lambda mu, sigma: -sigma),
    ("sign", lambda mu, sigma: -torch.sign(mu)),
])
def test_minmax_moves_the_benign_mean_along_the_papers_perturbation(perturbation, direction):
    benign = benign_stack()
    mu, sigma = benign.mean(0), benign.std(0, correction=0)
    d = direction(mu, sigma)
    out = MinMax(perturbation=perturbation).malicious_updates(omniscient_round(benign, f=2)[0])[0]
    gamma = float((out - mu) @ d / (d @ d))
    assert 0 < gamma < 2 * 10.0
    assert torch.allclose(out, mu + gamma * d, atol=1e-6)


def test_minmax_gamma_is_the_papers_search_result_within_tau():
    """The condition's boundary solves a quadratic in gamma; the search lands within tau below it."""
    benign = benign_stack()
    mu, sigma = benign.double().mean(0), benign.double().std(0, correction=0)
    d = -sigma
    a = ((benign.double() - mu) ** 2).sum(1)
    b = (benign.double() - mu) @ d
    c = float(d @ d)
    bound = float(pairwise_sq_distances(benign).max())
    # per benign update: a_i - 2 gamma b_i + gamma^2 c = bound; the smallest positive root over i
    roots = (b + torch.sqrt(b * b - c * (a - bound))) / c
    exact = float(roots.min())
    out = MinMax().malicious_updates(omniscient_round(benign, f=2)[0])[0]
    gamma = float((out.double() - mu) @ d / c)
    assert exact - 2e-5 <= gamma <= exact + 1e-6


def test_minmax_and_minsum_default_to_the_authors_search_settings():
    for cls in (MinMax, MinSum):
        assert cls().params() == {"perturbation": "std", "gamma_init": 10.0, "tau": 1e-5}
    with pytest.raises(fedbench.SpecError, match="'perturbation'"):
        fedbench.parse_component("attack", "minmax:perturbation=random")


# --------------------------------------------------------------------------------------------------
# Fang et al.
# --------------------------------------------------------------------------------------------------
def test_fang_draws_each_coordinate_past_the_benign_extreme_against_the_benign_direction():
    benign = torch.tensor([
        [1.0, -1.0, -1.0, 1.0, 0.0, -3.0],
        [2.0, -2.0, 2.0, -2.0, 0.0, 1.0],
        [3.0, -3.0, 3.0, -3.0, 0.0, 1.0],
        [4.0, -4.0, 4.0, -4.0, 0.0, 1.0],
    ])
    # benign direction:   +    -    +    -    0    0 (mean exactly 0: counts as decreasing)
    lo = torch.tensor([0.5, -1.0, -2.0, 1.0, 0.0, 1.0])  # +: [w_min/b, w_min] or [b w_min, w_min]
    hi = torch.tensor([1.0, -0.5, -1.0, 2.0, 0.0, 2.0])  # -: [w_max, b w_max] or [w_max, w_max/b]
    out = Fang().malicious_updates(omniscient_round(benign, f=400)[0])
    assert out.shape == (400, 6)
    assert ((out >= lo) & (out <= hi)).all()
    spread = (out - lo) / torch.where(hi > lo, hi - lo, torch.ones(6))
    assert (spread[:, [0, 1, 2, 3, 5]].mean(0) - 0.5).abs().max() < 0.06  # uniform over the interval
    assert not all_rows_equal(out)  # one draw per malicious client


def test_fang_is_deterministic_given_the_rounds_generator():
    benign = benign_stack()
    first = Fang().malicious_updates(omniscient_round(benign, f=3, seed=4)[0])
    assert torch.equal(first, Fang().malicious_updates(omniscient_round(benign, f=3, seed=4)[0]))
    assert not torch.equal(first, Fang().malicious_updates(omniscient_round(benign, f=3, seed=5)[0]))


@pytest.mark.parametrize("f", [3, 5])
def test_fang_against_cma_moves_the_aggregate_against_the_benign_direction(f):
    benign = benign_stack(n=10 - f, offset=0.05)
    rnd, _ = omniscient_round(benign, f=f, defense="cma")
    out = Fang().malicious_updates(rnd)
    mu = benign.mean(0)
    attacked = rnd.aggregate(torch.cat([out, benign]))
    clean = benign.sort(0).values[(len(benign) - 1) // 2 : len(benign) // 2 + 1].mean(0)  # the benign median
    assert float(attacked @ mu) < float(clean @ mu)
    increasing = mu > 0
    # every coordinate moved against its benign direction, or at least not along it
    assert (attacked[increasing] <= clean[increasing]).all() and (attacked[~increasing] >= clean[~increasing]).all()


# --------------------------------------------------------------------------------------------------
# Strength searched against the cell's defense (auto)
# --------------------------------------------------------------------------------------------------
def defenses_for_auto():
    names = ["fedavg", "cma", "ctma:beta=0.3"]
    return names + (["krum"] if "krum" in fedbench.registry().names("aggregator") else [])


@pytest.mark.parametrize("defense", defenses_for_auto())
@pytest.mark.parametrize("auto, paper", [("alie:z=auto", "alie"), ("ipm:eps=auto", "ipm")])
def test_a_searched_strength_does_at_least_as_much_damage_as_the_papers(auto, paper, defense):
    benign = benign_stack()
    reg = fedbench.registry()
    searched_rnd, queries = omniscient_round(benign, f=3, defense=defense)
    searched = fedbench.parse_component("attack", auto).build(reg).malicious_updates(searched_rnd)
    paper_rnd, _ = omniscient_round(benign, f=3, defense=defense)
    default = fedbench.parse_component("attack", paper).build(reg).malicious_updates(paper_rnd)
    assert damage(searched_rnd, searched) >= damage(paper_rnd, default)
    assert 1 <= len(queries) <= 15  # a handful of server-stage runs, not a grid
    assert all(q.shape == (10, 300) and torch.equal(q[3:], benign) for q in queries)  # malicious rows first


def test_against_the_median_the_search_finds_a_stronger_alie_than_the_papers_z():
    """f = 3 of 10: the paper's z = Phi^{-1}(0.8) = 0.84 stays inside the benign spread; the median
    keeps moving as z grows until the malicious values pass every benign value."""
    benign = benign_stack()
    rnd, _ = omniscient_round(benign, f=3, defense="cma")
    searched = ALittleIsEnough(z="auto").malicious_updates(rnd)
    paper = ALittleIsEnough().malicious_updates(rnd)
    assert damage(rnd, searched) > 1.2 * damage(rnd, paper)


def test_a_searched_strength_needs_the_server_oracle():
    rnd, _ = omniscient_round(benign_stack(), f=3)
    rnd.aggregate = None
    with pytest.raises(fedbench.FedbenchError, match="needs the server oracle"):
        InnerProductManipulation(eps=None).malicious_updates(rnd)


@pytest.mark.parametrize("attack", [ALittleIsEnough(), InnerProductManipulation(), MinMax(), MinSum(), Fang()])
def test_omniscient_attacks_say_so_and_need_benign_updates(attack):
    assert attack.omniscient and attack.untargeted
    rnd, _ = omniscient_round(benign_stack(), f=3)
    rnd.benign_updates = None
    with pytest.raises(fedbench.FedbenchError, match="needs the round's benign updates"):
        attack.malicious_updates(rnd)
    rnd.benign_updates = torch.zeros(0, 300)
    with pytest.raises(fedbench.FedbenchError, match="no benign client"):
        attack.malicious_updates(rnd)


# --------------------------------------------------------------------------------------------------
# Real runs on digits
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("defense", ["fedavg", "cma"])
@pytest.mark.parametrize("attack", ATTACKS)
def test_every_attack_runs_end_to_end_on_digits(attack, defense):
    cell = fedbench.make_cell(dataset="digits", attack=attack, defense=defense, rounds=4, attack_rounds=(2, 3))
    result = fedbench.run_cell(cell)
    assert result.status == "ok"
    assert result.adversarial_rounds == [2, 3]
    assert all(row["success"] == pytest.approx(1 - row["accuracy"]) for row in result.rounds)


def test_alie_in_a_real_round_is_built_from_that_rounds_benign_updates(monkeypatch):
    seen = []
    original = ALittleIsEnough.malicious_updates

    def recorded(self, rnd):
        seen.append((rnd, original(self, rnd)))
        return seen[-1][1]

    monkeypatch.setattr(ALittleIsEnough, "malicious_updates", recorded)
    fedbench.run_cell(fedbench.make_cell(dataset="digits", attack="alie", rounds=2, attack_rounds=(2,)))
    ((rnd, out),) = seen
    benign = rnd.benign_updates
    assert benign.shape == (5, out.shape[1]) and len(rnd.client_ids) == 5
    assert torch.allclose(out[0], benign.mean(0) - paper_z(10, 5) * benign.std(0, correction=0), atol=1e-7)


def test_loop_and_stacked_trainers_agree_under_alie(assert_trainers_agree):
    cell = fedbench.make_cell(dataset="digits", attack="alie", defense="cma", rounds=5, attack_rounds=(2, 4))
    loop, _ = assert_trainers_agree(cell)
    assert loop.adversarial_rounds == [2, 4]
