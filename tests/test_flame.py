"""FLAME (plugins/flame.py, Nguyen et al. USENIX Security 2022): HDBSCAN majority cluster on cosine
distances, clipping to the median norm of all updates, Gaussian noise of std lam * median norm."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fedbench
from fedbench.components import ServerContext
from fedbench.vectors import cosine_similarities
from fedbench_plugins.flame import Flame, majority_cluster, statistical_median


def ctx(seed: int = 0) -> ServerContext:
    return ServerContext(generator=torch.Generator().manual_seed(seed))


def test_flame_admits_the_cosine_majority_and_clips_to_the_median_norm_of_all_updates():
    # rows 0-2 point along e1 (cosine distance 0 between them), rows 3 and 4 along e2 and -e3
    # (cosine distance 1 to everything): HDBSCAN with min_cluster_size 5 // 2 + 1 = 3 admits rows 0-2.
    # norms 1, 2, 8, 5, 10 -> median of ALL five = 5 (a rejected update's norm)
    # clipped admitted rows: [1,0,0], [2,0,0], [8,0,0] * 5/8 = [5,0,0]; mean = [8/3, 0, 0]
    updates = torch.tensor([[1.0, 0, 0], [2, 0, 0], [8, 0, 0], [0, 5, 0], [0, 0, -10]])
    out = Flame(lam=0.0).aggregate(updates, torch.ones(5), ctx())
    assert out.tolist() == pytest.approx([8 / 3, 0.0, 0.0])


def test_flame_clip_bound_is_the_statistical_median_for_an_even_count():
    assert float(statistical_median(torch.tensor([10.0, 1.0, 3.0, 2.0]))) == 2.5
    assert float(statistical_median(torch.tensor([4.0]))) == 4.0


def test_flame_adds_gaussian_noise_of_std_lam_times_the_clip_bound_from_the_server_stream():
    p = 100_000
    g = torch.Generator().manual_seed(3)
    updates = torch.randn(1, p, generator=g).abs().expand(4, p) * torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    clean = Flame(lam=0.0).aggregate(updates, torch.ones(4), ctx(7))
    noisy = Flame(lam=0.01).aggregate(updates, torch.ones(4), ctx(7))
    bound = float(statistical_median(torch.linalg.vector_norm(updates, dim=1, dtype=torch.float64)))
    expected = 0.01 * bound * torch.randn(p, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(noisy - clean, expected, rtol=1e-4, atol=1e-5)
    assert (noisy - clean).std().item() == pytest.approx(0.01 * bound, rel=0.02)


def test_flame_ignores_client_weights_and_keeps_dtype():
    g = torch.Generator().manual_seed(0)
    updates = torch.randn(6, 20, generator=g, dtype=torch.float64) + 3
    a = Flame().aggregate(updates, torch.ones(6), ctx())
    b = Flame().aggregate(updates, torch.arange(1.0, 7.0), ctx())
    assert a.dtype == torch.float64 and a.shape == (20,) and torch.equal(a, b)


def test_flame_with_one_or_two_updates_admits_them_all():
    one = torch.tensor([[3.0, 4.0]])
    assert Flame(lam=0.0).aggregate(one, torch.ones(1), ctx()).tolist() == [3.0, 4.0]
    two = torch.tensor([[3.0, 4.0], [0.0, 1.0]])  # median norm 3 clips the first to [1.8, 2.4]
    assert Flame(lam=0.0).aggregate(two, torch.ones(2), ctx()).tolist() == pytest.approx([0.9, 1.7])


@settings(derandomize=True, deadline=None, max_examples=15)
@given(seed=st.integers(0, 2**16), n=st.integers(3, 12))
def test_flame_is_invariant_to_the_order_of_the_updates(seed, n):
    g = torch.Generator().manual_seed(seed)
    updates = torch.randn(n, 40, generator=g, dtype=torch.float64)
    updates[: n // 2 + 1] += 3 * torch.randn(40, generator=g, dtype=torch.float64)  # a majority direction
    perm = torch.randperm(n, generator=g)
    out = Flame().aggregate(updates, torch.ones(n), ctx(seed))
    permuted = Flame().aggregate(updates[perm], torch.ones(n), ctx(seed))
    assert torch.allclose(out, permuted, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("attack", ["far", "sign-flipped"])
def test_flame_rejects_huge_attackers_and_stays_within_the_clip_bound_plus_noise(attack):
    g = torch.Generator().manual_seed(1)
    direction = torch.randn(500, generator=g)
    benign = direction + 0.3 * torch.randn(7, 500, generator=g)
    malicious = 1e6 * torch.randn(3, 500, generator=g) if attack == "far" else -1e6 * benign[:3]
    updates = torch.cat([malicious, benign])
    bound = float(statistical_median(torch.linalg.vector_norm(updates, dim=1, dtype=torch.float64)))
    assert bound < 2 * float(torch.linalg.vector_norm(benign, dim=1).max())  # the median is a benign norm

    distances = (1 - cosine_similarities(updates)).clamp_min(0).fill_diagonal_(0)
    admitted = majority_cluster(distances)
    assert not admitted[:3].any() and int(admitted.sum()) >= 10 // 2 + 1  # no attacker; a majority of benign ones
    clean = Flame(lam=0.0).aggregate(updates, torch.ones(10), ctx())
    kept = updates[admitted]
    clipped = kept * torch.clamp(bound / torch.linalg.vector_norm(kept, dim=1), max=1.0).unsqueeze(1)
    assert torch.allclose(clean, clipped.mean(dim=0), rtol=1e-5, atol=1e-6)
    assert torch.linalg.vector_norm(clean) <= bound * (1 + 1e-6)

    noisy = Flame().aggregate(updates, torch.ones(10), ctx())
    noise_norm = 0.001 * bound * 500**0.5
    assert torch.linalg.vector_norm(noisy) <= bound * (1 + 1e-6) + 1.5 * noise_norm


def test_flame_digits_run_under_poisoning_finishes_above_chance():
    cell = fedbench.make_cell(dataset="digits", attack="poison", defense="flame", rounds=3, attack_rounds=(2,), local_epochs=5)
    result = fedbench.run_cell(cell)
    assert result.status == "ok"
    assert result.final_accuracy > 0.3  # 10 classes: chance is 0.1
