"""The counter-based generator of client-defense noise (fedbench/rng.py): ``random_bits``,
``uniform`` and ``laplace_keyed``.

What it promises: word i of row c is ``fmix32(((fmix32(i) ^ a) + b) mod 2^32)`` with (a, b) a
two-round Feistel network of fmix32 on the halves of ``keys[c] XOR counter_word(counter)`` (checked
against a pure-Python murmur3 finalizer); the uniform and Laplace marginals are right
(Kolmogorov-Smirnov at a fixed key, with enough samples that a few percent of error in the
distribution fails); different keys (also keys one bit apart), counters and neighbouring elements
are uncorrelated; and a client's draws are bit for bit the same alone, in a batch of 10 or in a
batch of 300 -- which is what lets the loop, stacked and lockstep trainers agree with WBC.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from scipy import stats

import fedbench
from fedbench import rng
from fedbench.rng import counter_word, laplace_keyed, random_bits, uniform
from fedbench_plugins.wbc import WBC

M32 = 0xFFFFFFFF
KEY = rng.derive_seed(0, "defense", 1, 0)
N = 1_000_000  # samples in the KS tests: the KS statistic's noise is ~0.001; p < 1e-3 needs ~0.002


def fmix32(h: int) -> int:
    """murmur3's 32-bit finalizer, written from its definition."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & M32
    return h ^ (h >> 16)


def reference_bits(key: int, counter: tuple, n: int) -> list[int]:
    stream = (key ^ counter_word(counter)) & (2**64 - 1)  # a negative key as its two's complement
    a, b = stream & M32, stream >> 32
    b ^= fmix32(a)
    a ^= fmix32(b)
    return [fmix32(((fmix32(i) ^ a) + b) & M32) for i in range(n)]


def keys(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


# --------------------------------------------------------------------------------------------------
# The words
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", [0, 1, KEY, 2**63 - 1, -1, -(2**63)])
def test_words_are_the_murmur3_finalizer_of_index_key_and_counter(key):
    got = random_bits(keys(key), ("wbc", 3, 7), 2000)
    assert got.dtype == torch.int64 and got.shape == (1, 2000)
    assert got[0].tolist() == reference_bits(key, ("wbc", 3, 7), 2000)


def test_counter_words_tell_apart_tuples_that_print_alike():
    words = {counter_word(c) for c in [("wbc", 1, 2), ("wbc", 12), ("wbc:1", 2), ("wbc", 2, 1), ("ldp",), (1, 2), ("1", 2)]}
    assert len(words) == 7
    assert all(0 <= w < 2**63 for w in words)
    assert counter_word(("wbc", 1, 2)) == counter_word(("wbc", torch.tensor(1), 2))  # ints by value


def test_row_count_must_be_one_to_two_to_the_32_minus_one():
    with pytest.raises(ValueError, match="1 to 2"):
        random_bits(keys(1), (0,), 0)
    with pytest.raises(ValueError, match="1 to 2"):
        random_bits(keys(1), (0,), 2**32)


def test_every_bit_of_the_words_is_fair():
    words = random_bits(keys(KEY), ("bits",), N)[0]
    for bit in range(32):
        ones = ((words >> bit) & 1).sum().item()
        assert abs(ones / N - 0.5) < 5 * 0.5 / math.sqrt(N), bit  # 5 sigma


# --------------------------------------------------------------------------------------------------
# Marginals
# --------------------------------------------------------------------------------------------------
def test_uniforms_are_uniform_on_the_open_unit_interval_at_full_float32_resolution():
    u = uniform(keys(KEY), ("ks", 0), (N,))[0]
    assert u.dtype == torch.float32 and 0 < u.min().item() and u.max().item() < 1
    grid = u.double() * 2**24
    assert torch.equal(grid, grid.round())  # multiples of 2^-24
    # N draws from 2^24 - 1 values: about 4,770 birthday collisions (sd ~70); a 23-bit grid would give ~9,500
    grid_size = 2**24 - 1
    expected_distinct = grid_size * (1 - (1 - 1 / grid_size) ** N)
    assert abs(len(torch.unique(u)) - expected_distinct) < 400
    assert stats.kstest(u.numpy(), "uniform").pvalue > 1e-3
    # the test has the power to see a small error: the same draws, bent by u -> u^1.01, fail it
    assert stats.kstest((u.double() ** 1.01).numpy(), "uniform").pvalue < 1e-3


def test_uniforms_in_float64_are_the_float32_values():
    u32 = uniform(keys(KEY, 5), ("dtype",), (3, 7))
    u64 = uniform(keys(KEY, 5), ("dtype",), (3, 7), dtype=torch.float64)
    assert u32.shape == u64.shape == (2, 3, 7) and u64.dtype == torch.float64
    assert torch.equal(u32.double(), u64)


@pytest.mark.parametrize("scale", [0.4, 2.5])
def test_laplace_draws_follow_the_laplace_distribution(scale):
    y = laplace_keyed(keys(KEY), ("ks", 1), (N,), scale)[0]
    assert stats.kstest(y.numpy(), "laplace", args=(0, scale)).pvalue > 1e-3
    assert stats.kstest(y.numpy(), "laplace", args=(0, 1.03 * scale)).pvalue < 1e-3  # power: 3% in the scale
    assert y.abs().mean().item() == pytest.approx(scale, rel=0.01)
    assert y.std().item() == pytest.approx(math.sqrt(2) * scale, rel=0.01)
    assert abs((y > 0).float().mean().item() - 0.5) < 0.005
    assert y.abs().max().item() <= 24 * math.log(2) * scale * (1 + 1e-6)  # the grid's cap: finite


def test_laplace_in_float64_agrees_with_float32():
    y32 = laplace_keyed(keys(KEY, 5), ("dtype",), (1000,), 0.4)
    y64 = laplace_keyed(keys(KEY, 5), ("dtype",), (1000,), 0.4, dtype=torch.float64)
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y32.double(), y64, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# Independence
# --------------------------------------------------------------------------------------------------
def max_offdiagonal_correlation(rows: torch.Tensor) -> float:
    c = torch.corrcoef(rows.double())
    return (c - torch.diag(torch.diag(c))).abs().max().item()


def test_different_keys_give_uncorrelated_draws():
    n = 50_000
    bound = 6 / math.sqrt(n)  # 6 sigma of a correlation of n independent pairs
    clients = keys(*[rng.derive_seed(0, "defense", 1, c) for c in range(40)])
    assert max_offdiagonal_correlation(uniform(clients, ("wbc", 0, 1), (n,))) < bound
    related = keys(KEY, KEY ^ 1, KEY ^ (1 << 31), KEY ^ (1 << 32), KEY ^ (1 << 62), KEY + 1, 0, 1, 2)
    assert max_offdiagonal_correlation(uniform(related, ("wbc", 0, 1), (n,))) < bound
    assert max_offdiagonal_correlation(laplace_keyed(related, ("wbc", 0, 1), (n,), 0.4)) < bound


def test_different_counters_give_uncorrelated_draws():
    n = 50_000
    rows = [uniform(keys(KEY), ("wbc", epoch, step), (n,))[0] for epoch in range(3) for step in range(10)]
    rows += [uniform(keys(KEY), ("ldp",), (n,))[0], uniform(keys(KEY), ("wbc", 0, 1), (n + 7,))[0, 7:]]
    assert max_offdiagonal_correlation(torch.stack(rows)) < 6 / math.sqrt(n)


def test_neighbouring_elements_are_uncorrelated():
    u = uniform(keys(KEY), ("lag",), (N,))[0].double()
    for lag in (1, 2, 3, 8, 16, 256, 65536):
        r = torch.corrcoef(torch.stack([u[:-lag], u[lag:]]))[0, 1].item()
        assert abs(r) < 6 / math.sqrt(N - lag), lag
    # nor do consecutive pairs cluster: a chi-square test of the pairs' joint histogram (16 x 16 cells)
    pairs = (u[: N // 2 * 2].view(-1, 2) * 16).long()
    counts = torch.bincount(pairs[:, 0] * 16 + pairs[:, 1], minlength=256).numpy()
    assert stats.chisquare(counts).pvalue > 1e-3


def test_one_bit_of_key_changes_about_half_the_bits_of_every_word():
    """Avalanche over keys: flipping any one key bit flips each output bit with probability ~1/2."""
    base = random_bits(keys(KEY), ("wbc", 0, 1), 20_000)[0]
    for bit in (0, 5, 31, 32, 45, 62):
        other = random_bits(keys(KEY ^ (1 << bit)), ("wbc", 0, 1), 20_000)[0]
        flips = torch.stack([((base ^ other) >> b) & 1 for b in range(32)]).double().mean(dim=1)
        assert (flips - 0.5).abs().max().item() < 0.02, bit


# --------------------------------------------------------------------------------------------------
# A client's noise does not depend on its batch
# --------------------------------------------------------------------------------------------------
def batch_with(key: int, size: int, position: int) -> torch.Tensor:
    others = [rng.derive_seed(9, "defense", 2, c) for c in range(size - 1)]
    return keys(*others[:position], key, *others[position:])


@pytest.mark.parametrize("draw", ["bits", "uniform", "laplace"])
def test_a_clients_draws_are_the_same_alone_in_10_and_in_300(draw):
    def rows(batch):
        if draw == "bits":
            return random_bits(batch, ("wbc", 1, 4), 3000)
        if draw == "uniform":
            return uniform(batch, ("wbc", 1, 4), (30, 100))
        return laplace_keyed(batch, ("wbc", 1, 4), (30, 100), 0.4)

    alone = rows(keys(KEY))[0]
    assert torch.equal(rows(batch_with(KEY, 10, 6))[6], alone)
    assert torch.equal(rows(batch_with(KEY, 300, 217))[217], alone)


def wbc_state(batch: torch.Tensor, active: torch.Tensor, shapes=((8, 3, 3, 3), (5,), (10, 72))) -> fedbench.StepState:
    c = len(batch)
    g = torch.Generator().manual_seed(0)

    def same_for_all(shape):  # every client sees the same tensors, so only the noise can tell them apart
        return torch.randn(shape, generator=g).expand(c, *shape).clone()

    params = [same_for_all(s) for s in shapes]
    prev = [same_for_all(s) for s in shapes]
    grads = [p + 0.3 * same_for_all(s) for p, s in zip(prev, shapes)]
    return fedbench.StepState(step=4, epoch=1, lr=0.1, params=params, grads=grads, updates=[-0.1 * x for x in grads],
                              prev_grads=prev, prev_updates=[-0.1 * x for x in prev],
                              is_weight=[len(s) > 1 for s in shapes], keys=batch, active=active)


def test_wbc_moves_a_client_the_same_alone_in_10_and_in_300_whatever_the_others_do():
    alone = wbc_state(keys(KEY), torch.tensor([True]))
    WBC(s=0.4).after_step(alone)
    for size, position in ((10, 3), (300, 151)):
        active = torch.rand(size, generator=torch.Generator().manual_seed(size)) < 0.5  # others idle at random
        active[position] = True
        state = wbc_state(batch_with(KEY, size, position), active)
        before = [p.clone() for p in state.params]
        WBC(s=0.4).after_step(state)
        for k in range(3):
            assert torch.equal(state.params[k][position], alone.params[k][0])
            assert torch.equal(state.params[k][~active], before[k][~active])  # idle clients untouched
        assert not torch.equal(state.params[0][position], before[0][position])  # WBC did act


# --------------------------------------------------------------------------------------------------
# Fused with torch.compile (--compile)
# --------------------------------------------------------------------------------------------------
def draws(batch):
    return (random_bits(batch, ("wbc", 1, 4), 3000), uniform(batch, ("wbc", 1, 4), (30, 100)),
            laplace_keyed(batch, ("wbc", 1, 4), (30, 100), 0.4))


@pytest.fixture
def compiled(monkeypatch):
    monkeypatch.setenv(rng.COMPILE_ENV, "1")
    monkeypatch.setattr(rng, "_COMPILED", {})


def test_the_compiled_hash_gives_the_plain_numbers_bit_for_bit(monkeypatch):
    batch = batch_with(KEY, 10, 6)
    plain = draws(batch), draws(keys(KEY))
    monkeypatch.setenv(rng.COMPILE_ENV, "1")
    monkeypatch.setattr(rng, "_COMPILED", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to the plain kernels would pass unseen
        fused = draws(batch), draws(keys(KEY))  # two client counts: the second call recompiles for it
    assert set(rng._COMPILED) == {rng._words, rng._laplace_parts}
    for p, f in zip(plain, fused):
        for a, b in zip(p, f):
            assert torch.equal(a, b)


def test_a_compiler_that_fails_warns_once_and_the_plain_kernels_take_over(compiled, monkeypatch):
    def broken(fn, **_):
        def call(*args):
            raise RuntimeError("no C++ compiler\ndetails")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(RuntimeWarning, match=r"torch.compile of the defense-noise hash failed \(RuntimeError: no C\+\+ "
                                            r"compiler\); using the plain kernels"):
        bits = random_bits(keys(KEY), ("wbc", 1, 4), 100)
    monkeypatch.setenv(rng.COMPILE_ENV, "0")
    plain_bits = random_bits(keys(KEY), ("wbc", 1, 4), 100)
    assert torch.equal(bits, plain_bits)
    monkeypatch.setenv(rng.COMPILE_ENV, "1")
    assert rng._COMPILED[rng._words] is rng._words  # no second try, no second warning


# --------------------------------------------------------------------------------------------------
# CPU and GPU
# --------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_draws_are_the_cpu_draws():
    batch = batch_with(KEY, 300, 17)
    shape = (2000,)
    assert torch.equal(random_bits(batch.cuda(), ("wbc", 0, 1), 2000).cpu(), random_bits(batch, ("wbc", 0, 1), 2000))
    assert torch.equal(uniform(batch.cuda(), ("wbc", 0, 1), shape).cpu(), uniform(batch, ("wbc", 0, 1), shape))
    # the logarithm is the one floating-point step; CPU and GPU libraries agree on it to an ulp or so
    torch.testing.assert_close(laplace_keyed(batch.cuda(), ("wbc", 0, 1), shape, 0.4).cpu(),
                               laplace_keyed(batch, ("wbc", 0, 1), shape, 0.4), rtol=5e-7, atol=1e-12)


def test_run_with_compile_gives_the_same_rounds_as_without(monkeypatch):
    """``fedbench run --compile``: a digits run of wbc (2 rounds, an attack in round 1) records the
    same per-round numbers, bit for bit, as without the flag."""
    import json

    from click.testing import CliRunner

    from fedbench.cli import main

    monkeypatch.setenv(rng.COMPILE_ENV, "0")  # --compile sets it to 1; monkeypatch puts it back
    monkeypatch.setattr(rng, "_COMPILED", {})
    args = ["run", "--attack", "poison", "--defense", "wbc:s=0.4", "--rounds", "2", "--attack-rounds", "1", "--json"]
    plain = CliRunner().invoke(main, args)
    fused = CliRunner().invoke(main, args + ["--compile"])
    assert plain.exit_code == 0 and fused.exit_code == 0, plain.output + fused.output
    assert rng.compile_enabled() and set(rng._COMPILED) == {rng._laplace_parts}
    rounds = [json.loads(r.output)["rounds"] for r in (plain, fused)]
    assert rounds[0] == rounds[1] and len(rounds[0]) == 2
