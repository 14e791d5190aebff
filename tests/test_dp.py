"""Laplace differential privacy (plugins/dp.py): LDP as a client defense and CDP as an aggregator,
with the clipping and noise scale of reference section 4 (b = sigma * C / sqrt(2 d))."""

from __future__ import annotations

import math

import pytest
import torch

import fedbench
from fedbench.components import ServerContext
from fedbench.rng import laplace_keyed
from fedbench_plugins.dp import CentralDP, LocalDP, clip_to_norm, laplace_scale

D = 200_000  # parameters in the noise-scale tests: the empirical scales are then within ~0.5%


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def keys(*values: int) -> torch.Tensor:
    """Clients' defense keys ``[C]`` int64."""
    return torch.tensor(values, dtype=torch.int64)


def assert_laplace_scale(noise: torch.Tensor, b: float) -> None:
    """Laplace(0, b) has E|X| = b and std = sqrt(2) b; both within 5%."""
    assert noise.abs().mean().item() == pytest.approx(b, rel=0.05)
    assert noise.std().item() == pytest.approx(math.sqrt(2) * b, rel=0.05)
    assert abs(noise.mean().item()) < 0.05 * b


# --------------------------------------------------------------------------------------------------
# Clipping
# --------------------------------------------------------------------------------------------------
def test_clipping_scales_long_updates_to_norm_c_and_keeps_their_direction():
    updates = torch.tensor([[6.0, 8.0, 0.0], [0.0, 30.0, 40.0]])
    clipped = clip_to_norm(updates, 5.0)
    assert clipped.tolist() == [pytest.approx([3.0, 4.0, 0.0]), pytest.approx([0.0, 3.0, 4.0])]
    assert (torch.linalg.vector_norm(clipped, dim=1) <= 5.0 * (1 + 1e-6)).all()


def test_clipping_leaves_short_and_zero_updates_unchanged():
    updates = torch.tensor([[0.3, -0.4, 1.0], [0.0, 0.0, 0.0]])
    assert torch.equal(clip_to_norm(updates, 5.0), updates)


def test_clipped_norm_never_exceeds_c_on_random_updates():
    updates = torch.randn(50, 1000, generator=gen(0)) * torch.logspace(-3, 3, 50).unsqueeze(1)
    norms = torch.linalg.vector_norm(clip_to_norm(updates, 2.5), dim=1)
    assert norms.max().item() <= 2.5 * (1 + 1e-6)


def test_ldp_with_sigma_zero_only_clips():
    updates = torch.tensor([[6.0, 8.0], [0.5, -0.5]])
    out = LocalDP(clip=5.0, sigma=0.0).on_update(updates, keys(0, 1))
    assert out[0].tolist() == pytest.approx([3.0, 4.0])
    assert torch.equal(out[1], updates[1])


def test_cdp_with_sigma_zero_is_the_weighted_mean_of_clipped_updates():
    updates = torch.tensor([[6.0, 8.0], [0.0, 1.0]])  # row 0 clips to [3, 4]; row 1 stays
    out = CentralDP(clip=5.0, sigma=0.0).aggregate(updates, torch.tensor([1.0, 3.0]), ServerContext(generator=gen(0)))
    assert out.tolist() == pytest.approx([0.25 * 3.0, 0.25 * 4.0 + 0.75 * 1.0])


# --------------------------------------------------------------------------------------------------
# Noise scale
# --------------------------------------------------------------------------------------------------
def test_laplace_scale_makes_the_expected_noise_norm_sigma_times_sensitivity():
    b = laplace_scale(sigma=2.0, sensitivity=5.0, num_params=D)
    assert b == pytest.approx(2.0 * 5.0 / math.sqrt(2 * D))
    assert math.sqrt(D * 2 * b**2) == pytest.approx(10.0)  # E||n||^2 = d * Var = d * 2 b^2


def test_ldp_noise_is_laplace_with_scale_sigma_c_over_sqrt_2d():
    out = LocalDP(clip=5.0, sigma=2.0).on_update(torch.zeros(1, D), keys(7))
    assert_laplace_scale(out[0], 2.0 * 5.0 / math.sqrt(2 * D))
    assert torch.linalg.vector_norm(out[0]).item() == pytest.approx(10.0, rel=0.05)


def test_cdp_noise_is_laplace_with_scale_b_for_a_single_client():
    out = CentralDP(clip=5.0, sigma=1.0).aggregate(torch.zeros(1, D), torch.tensor([42.0]), ServerContext(generator=gen(7)))
    assert_laplace_scale(out, 5.0 / math.sqrt(2 * D))


@pytest.mark.parametrize("m", [2, 10])
def test_cdp_noise_scale_shrinks_with_the_number_of_equally_weighted_clients(m):
    out = CentralDP(clip=5.0, sigma=1.0).aggregate(torch.zeros(m, D), torch.full((m,), 600.0), ServerContext(generator=gen(7)))
    assert_laplace_scale(out, 5.0 / math.sqrt(2 * D) / m)


def test_cdp_noise_scale_follows_the_largest_normalised_weight():
    out = CentralDP(clip=5.0, sigma=1.0).aggregate(torch.zeros(2, D), torch.tensor([300.0, 100.0]), ServerContext(generator=gen(7)))
    assert_laplace_scale(out, 5.0 / math.sqrt(2 * D) * 0.75)


# --------------------------------------------------------------------------------------------------
# Random streams and determinism
# --------------------------------------------------------------------------------------------------
def test_ldp_draws_each_clients_noise_from_its_own_key():
    b = laplace_scale(1.0, 5.0, 100)
    out = LocalDP(clip=5.0, sigma=1.0).on_update(torch.zeros(3, 100), keys(11, 11, 12))
    assert torch.equal(out[0], laplace_keyed(keys(11), ("ldp",), (100,), b)[0])  # row i is exactly key i's draw
    assert torch.equal(out[0], out[1])  # same key, same noise
    assert not torch.equal(out[0], out[2])  # different clients differ


def test_ldp_noise_of_a_client_does_not_depend_on_the_other_clients():
    alone = LocalDP(sigma=1.0).on_update(torch.zeros(1, 100), keys(5))
    together = LocalDP(sigma=1.0).on_update(torch.zeros(3, 100), keys(9, 8, 5))
    assert torch.equal(together[2], alone[0])


def test_ldp_noise_differs_from_the_wbc_noise_of_the_same_client():
    """LDP's counter ("ldp",) is not WBC's ("wbc", epoch, step): a stack of both draws unrelated noise."""
    ldp = LocalDP(sigma=1.0).on_update(torch.zeros(1, 1000), keys(5))[0]
    wbc = laplace_keyed(keys(5), ("wbc", 0, 0), (1000,), laplace_scale(1.0, 5.0, 1000))[0]
    assert abs(torch.corrcoef(torch.stack([ldp, wbc]))[0, 1].item()) < 0.1


def test_ldp_is_deterministic_for_fixed_keys():
    updates = torch.randn(4, 300, generator=gen(0)) * 3
    ldp = LocalDP(clip=2.0, sigma=0.5)
    first = ldp.on_update(updates, keys(*range(4)))
    second = ldp.on_update(updates, keys(*range(4)))
    assert torch.equal(first, second)
    assert torch.equal(updates, torch.randn(4, 300, generator=gen(0)) * 3)  # input left untouched


def test_ldp_needs_one_key_per_update():
    with pytest.raises(ValueError, match="2 defense keys for 3 updates"):
        LocalDP(sigma=1.0).on_update(torch.zeros(3, 10), keys(1, 2))


def test_cdp_is_deterministic_for_a_fixed_generator_seed():
    updates = torch.randn(5, 300, generator=gen(0)) * 3
    cdp = CentralDP(clip=2.0, sigma=0.5)
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert torch.equal(cdp.aggregate(updates, weights, ServerContext(generator=gen(3))), cdp.aggregate(updates, weights, ServerContext(generator=gen(3))))
    assert not torch.equal(cdp.aggregate(updates, weights, ServerContext(generator=gen(3))), cdp.aggregate(updates, weights, ServerContext(generator=gen(4))))


# --------------------------------------------------------------------------------------------------
# Registry and parameters
# --------------------------------------------------------------------------------------------------
def test_ldp_stacks_with_an_aggregator_in_a_defense_spec():
    stack = fedbench.parse_defense("cma+ldp:sigma=0.5")
    assert stack.aggregator.name == "cma"
    assert [(c.kind, c.name, dict(c.params)) for c in stack.client] == [
        ("defense", "ldp", {"clip": 5.0, "sigma": 0.5})
    ]
    defense = stack.client[0].build()
    assert isinstance(defense, LocalDP) and not defense.per_step


def test_cdp_is_an_aggregator_with_the_reference_defaults():
    stack = fedbench.parse_defense("cdp")
    assert stack.client == ()
    assert (stack.aggregator.kind, stack.aggregator.name) == ("aggregator", "cdp")
    assert dict(stack.aggregator.params) == {"clip": 5.0, "sigma": 1.0}


@pytest.mark.parametrize(
    "spec, name, allowed",
    [("ldp:clip=0", "clip", "> 0"), ("cdp:clip=-1", "clip", "> 0"), ("ldp:sigma=-0.1", "sigma", ">= 0")],
)
def test_dp_rejects_non_positive_clip_and_negative_sigma(spec, name, allowed):
    with pytest.raises(fedbench.SpecError) as info:
        fedbench.parse_defense(spec)
    assert f"'{name}'" in str(info.value) and allowed in str(info.value)
