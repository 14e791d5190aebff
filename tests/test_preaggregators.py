"""Pre-aggregators (plugins/preaggregators.py): norm bounding (Sun et al. 2019), nearest-neighbour
mixing (Allouah et al. 2023) and bucketing (Karimireddy, He & Jaggi 2022), alone and in stacks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fedbench
from fedbench.server import Server
from fedbench_plugins.krum import Krum
from fedbench_plugins.preaggregators import Bucketing, NearestNeighbourMixing, NormClip


def ctx(f: int = 0, seed: int = 0) -> fedbench.ServerContext:
    return fedbench.ServerContext(num_byzantine=f, generator=torch.Generator().manual_seed(seed))


def stack(seed: int, n: int, p: int) -> torch.Tensor:
    return torch.randn(n, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def with_far_attackers(seed: int, n: int, f: int, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    benign = torch.randn(n - f, p, generator=g, dtype=torch.float64)
    return torch.cat([1e6 * torch.randn(f, p, generator=g, dtype=torch.float64), benign]), benign


# --------------------------------------------------------------------------------------------------
# clip
# --------------------------------------------------------------------------------------------------
def test_clip_scales_long_updates_to_the_bound_and_leaves_short_ones():
    x = torch.tensor([[6.0, 8.0], [0.3, 0.4], [0.0, 0.0]])
    w = torch.tensor([1.0, 2.0, 3.0])
    out, weights = NormClip(norm=5.0).preaggregate(x, w, ctx())
    assert out.tolist() == [pytest.approx([3.0, 4.0]), pytest.approx([0.3, 0.4]), [0.0, 0.0]]  # norm 10 -> 5
    assert torch.equal(weights, w) and x[0].tolist() == [6.0, 8.0]  # weights kept, input untouched


def test_clip_then_fedavg_is_cdp_without_noise():
    x = stack(0, 6, 10) * torch.tensor([[0.1], [1.0], [3.0], [10.0], [0.5], [7.0]], dtype=torch.float64)
    w = torch.arange(1.0, 7.0)
    clipped = Server.build(fedbench.parse_defense("clip"))(x, w, ctx())
    cdp = Server.build(fedbench.parse_defense("cdp:sigma=0"))(x, w, ctx())
    assert torch.allclose(clipped, cdp, rtol=0, atol=1e-12)


@settings(derandomize=True, deadline=None, max_examples=30)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 8), norm=st.sampled_from([0.5, 1.0, 3.0]), data=st.data())
def test_clip_treats_every_client_alike_whatever_the_order(seed, n, norm, data):
    x = stack(seed, n, 4) * 2
    order = torch.tensor(data.draw(st.permutations(range(n))))
    out, _ = NormClip(norm=norm).preaggregate(x, torch.ones(n), ctx())
    permuted, _ = NormClip(norm=norm).preaggregate(x[order], torch.ones(n), ctx())
    assert torch.equal(permuted, out[order])
    assert (torch.linalg.vector_norm(out, dim=1) <= norm * (1 + 1e-12)).all()


def test_far_attackers_are_clipped_into_the_ball():
    x, benign = with_far_attackers(0, 10, 3, 20)
    out, _ = NormClip(norm=2.0).preaggregate(x, torch.ones(10), ctx())
    assert (torch.linalg.vector_norm(out, dim=1) <= 2.0 * (1 + 1e-12)).all()
    short = torch.linalg.vector_norm(benign, dim=1) <= 2.0
    assert torch.equal(out[3:][short], benign[short])


def test_clip_passes_a_nan_row_on_as_nan_and_an_inf_row_becomes_nan():
    x = torch.tensor([[float("nan"), 1.0], [float("inf"), 1.0], [6.0, 8.0]])
    out, _ = NormClip(norm=5.0).preaggregate(x, torch.ones(3), ctx())
    assert out[0].isnan().any() and out[1].isnan().any()
    assert out[2].tolist() == pytest.approx([3.0, 4.0])


# --------------------------------------------------------------------------------------------------
# nnm
# --------------------------------------------------------------------------------------------------
def test_nnm_replaces_each_update_by_the_mean_of_its_n_minus_f_nearest_itself_included():
    x = torch.tensor([[0.0], [1.0], [3.0], [10.0]], dtype=torch.float64)
    w = torch.tensor([5.0, 6.0, 7.0, 8.0])
    out, weights = NearestNeighbourMixing(f=1).preaggregate(x, w, ctx())
    # n - f = 3 nearest: 0 -> {0, 1, 3}; 1 -> {1, 0, 3}; 3 -> {3, 1, 0}; 10 -> {10, 3, 1}
    assert out.flatten().tolist() == pytest.approx([4 / 3, 4 / 3, 4 / 3, 14 / 3])
    assert torch.equal(weights, w)  # row i is still client i


def test_nnm_with_f_0_gives_every_client_the_plain_mean():
    x = stack(1, 5, 3)
    out, _ = NearestNeighbourMixing(f=0).preaggregate(x, torch.arange(1.0, 6.0), ctx())
    assert torch.allclose(out, x.mean(dim=0).expand(5, 3), rtol=0, atol=1e-12)


@settings(derandomize=True, deadline=None, max_examples=30)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 9), p=st.integers(1, 4), data=st.data())
def test_nnm_mixes_the_same_neighbours_whatever_the_order_of_the_clients(seed, n, p, data):
    f = data.draw(st.integers(0, n - 1))
    x = stack(seed, n, p)
    order = torch.tensor(data.draw(st.permutations(range(n))))
    out, _ = NearestNeighbourMixing(f=f).preaggregate(x, torch.ones(n), ctx())
    permuted, _ = NearestNeighbourMixing(f=f).preaggregate(x[order], torch.ones(n), ctx())
    assert torch.allclose(permuted, out[order], rtol=0, atol=1e-12)


def test_nnm_turns_every_benign_update_into_the_benign_mean_when_attackers_are_far():
    x, benign = with_far_attackers(2, 10, 3, 20)
    out, _ = NearestNeighbourMixing(f=3).preaggregate(x, torch.ones(10), ctx())
    assert torch.allclose(out[3:], benign.mean(dim=0).expand(7, 20), rtol=0, atol=1e-9)
    assert (out[3:] >= benign.min(dim=0).values).all() and (out[3:] <= benign.max(dim=0).values).all()


def test_nnm_keeps_nan_and_inf_rows_out_of_the_finite_ones():
    x = stack(3, 8, 5)
    poisoned, far = x.clone(), x.clone()
    poisoned[0, 1], poisoned[6, 0] = float("nan"), float("-inf")
    far[0], far[6] = 1e9, -1e9
    out, _ = NearestNeighbourMixing(f=2).preaggregate(poisoned, torch.ones(8), ctx())
    expected, _ = NearestNeighbourMixing(f=2).preaggregate(far, torch.ones(8), ctx())
    finite = torch.tensor([1, 2, 3, 4, 5, 7])
    assert torch.allclose(out[finite], expected[finite], rtol=0, atol=1e-12)
    assert out[0].isnan().all() and out[6].isnan().all()


def test_nnm_needs_more_updates_than_f():
    with pytest.raises(fedbench.SpecError, match=r"nnm: needs n >= f\+1 .* got n=10, f=10"):
        fedbench.make_cell(dataset="digits", defense="nnm:f=10+cma", num_malicious=2)


# --------------------------------------------------------------------------------------------------
# bucketing
# --------------------------------------------------------------------------------------------------
def test_bucketing_averages_consecutive_buckets_of_the_servers_permutation():
    x = torch.tensor([[1.0], [2.0], [4.0], [8.0], [16.0]])
    w = torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0])
    out, weights = Bucketing(s=2).preaggregate(x, w, ctx(seed=7))
    p = torch.randperm(5, generator=torch.Generator().manual_seed(7)).tolist()  # the same stream
    # ceil(5 / 2) = 3 buckets: pi(0), pi(1) | pi(2), pi(3) | pi(4); unweighted means, summed weights
    expected = [(x[p[0]] + x[p[1]]) / 2, (x[p[2]] + x[p[3]]) / 2, x[p[4]]]
    assert out.tolist() == [e.tolist() for e in expected]
    assert weights.tolist() == [w[p[0]] + w[p[1]], w[p[2]] + w[p[3]], w[p[4]]]
    assert Bucketing(s=2).output_count(5) == 3 == math.ceil(5 / 2)


@settings(derandomize=True, deadline=None, max_examples=30)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 9), data=st.data())
def test_bucketing_with_s_1_only_shuffles(seed, n, data):
    x = stack(seed, n, 3)
    w = torch.arange(1.0, n + 1.0)
    out, weights = Bucketing(s=1).preaggregate(x, w, ctx(seed=data.draw(st.integers(0, 100))))
    order = [int(torch.nonzero((x == row).all(dim=1))[0]) for row in out]  # where each output row came from
    assert sorted(order) == list(range(n)) and weights.tolist() == [w[i].item() for i in order]


@settings(derandomize=True, deadline=None, max_examples=30)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 9), data=st.data())
def test_bucketing_with_one_bucket_is_the_mean_whatever_the_order(seed, n, data):
    x = stack(seed, n, 3)
    order = torch.tensor(data.draw(st.permutations(range(n))))
    out, weights = Bucketing(s=n).preaggregate(x[order], torch.ones(n), ctx(seed=seed))
    assert torch.allclose(out, x.mean(dim=0, keepdim=True), rtol=0, atol=1e-12) and weights.tolist() == [n]


def test_bucketing_is_deterministic_for_a_seed_and_depends_on_it():
    x = stack(4, 10, 6)
    first, _ = Bucketing(s=3).preaggregate(x, torch.ones(10), ctx(seed=5))
    again, _ = Bucketing(s=3).preaggregate(x, torch.ones(10), ctx(seed=5))
    other, _ = Bucketing(s=3).preaggregate(x, torch.ones(10), ctx(seed=6))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.shape == (4, 6)


def test_bucketing_spoils_at_most_f_buckets_with_far_or_nan_attackers():
    x, benign = with_far_attackers(5, 10, 2, 8)
    x[1, 0] = float("nan")
    for seed in range(5):
        out, _ = Bucketing(s=2).preaggregate(x, torch.ones(10), ctx(seed=seed))
        inside = (out >= benign.min(dim=0).values).all(dim=1) & (out <= benign.max(dim=0).values).all(dim=1)
        assert int((~inside).sum()) <= 2


def test_bucketing_hides_client_ids_from_the_next_stage_and_shrinks_its_n():
    seen = []

    @dataclass(kw_only=True)
    class Probe(fedbench.Aggregator):
        """Records what the aggregator sees."""

        name: ClassVar[str] = "probe"

        def aggregate(self, updates, weights, ctx):
            seen.append((len(updates), ctx.client_ids))
            return updates.mean(dim=0)

    server = Server([Bucketing(s=3)], Probe())
    server(stack(0, 10, 2), torch.ones(10), fedbench.ServerContext(client_ids=tuple(range(10))))
    assert seen == [(4, None)]
    nnm = Server([NearestNeighbourMixing(f=1)], Probe())
    nnm(stack(0, 10, 2), torch.ones(10), fedbench.ServerContext(client_ids=tuple(range(10))))
    assert seen[-1] == (10, tuple(range(10)))
    Server([Bucketing(s=2)], Krum(f=1)).check(n=10, f=1)  # krum sees 5 >= 2f+3
    with pytest.raises(fedbench.SpecError, match=r"krum: needs n >= 2f\+3 .* got n=5, f=2"):
        fedbench.make_cell(dataset="digits", defense="bucketing:s=2+krum", num_malicious=2)


# --------------------------------------------------------------------------------------------------
# registry and end-to-end
# --------------------------------------------------------------------------------------------------
def test_preaggregators_are_registered_with_their_defaults():
    stack_ = fedbench.parse_defense("nnm+bucketing+clip+krum")
    assert [(p.name, dict(p.params)) for p in stack_.preaggregators] == [
        ("nnm", {"f": None}), ("bucketing", {"s": 2}), ("clip", {"norm": 5.0})
    ]
    assert stack_.aggregator.name == "krum"
    assert NearestNeighbourMixing.keeps_clients and NormClip.keeps_clients and not Bucketing.keeps_clients


@pytest.mark.parametrize(
    "defense", ["nnm+krum", "bucketing:s=2+geomed", "clip:norm=0.5+cma", "nnm+bucketing:s=2+cma"]
)
def test_short_digits_run_under_poisoning_finishes_above_chance(defense):
    cell = fedbench.make_cell(dataset="digits", attack="poison", defense=defense, rounds=3, num_malicious=2, attack_rounds=(2,))
    result = fedbench.run_cell(cell)
    assert result.status == "ok"
    assert result.final_accuracy > 0.2  # 10 classes: chance is 0.1
