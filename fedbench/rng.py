"""The random streams of a cell.

Every source of randomness has its own stream, derived from the cell's seed and a purpose (and, for
per-client work, the round and the client id), so that

* every defense in a comparison faces the same attack schedule, client selection and malicious data
  (the authors' code shares one stream between sampling and WBC noise, reference section 1);
* a client's batches and noise do not depend on which other clients trained before it, so the loop
  and stacked trainers see the same numbers.

Client defenses draw their noise from a counter-based generator instead (:func:`random_bits`,
:func:`uniform`, :func:`laplace_keyed`): a stateless hash of (the client's key, a counter, the
element index), computed for all clients of a batch at once with integer tensor operations. A
client's noise then depends only on its key and the counter, never on which clients share its
batch (alone, a chunk of 10 or a lockstep batch of 300), on the CPU and the GPU alike, and drawing
it for C clients is one vectorised computation instead of C small ones.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import warnings

import torch

STREAMS = ("partition", "schedule", "attack", "init", "train", "defense", "aggregate", "eval", "root", "aep")


def derive_seed(seed: int, purpose: str, *keys: int) -> int:
    """A 63-bit seed from the cell seed, a purpose name and integer keys (stable everywhere)."""
    if purpose not in STREAMS:
        raise ValueError(f"unknown random stream {purpose!r}; known: {STREAMS}")
    text = ":".join([str(int(seed)), purpose, *(str(int(k)) for k in keys)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def generator(seed: int, purpose: str, *keys: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` for one stream."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, purpose, *keys))
    return g


def laplace(shape, scale: float | torch.Tensor, generator: torch.Generator, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """I.i.d. Laplace(0, scale) draws (``scale`` is numpy's scale b: std = sqrt(2) b).

    Inverse CDF of one uniform draw per element, ``-b sign(u) log(1 - 2|u|)`` with u uniform on
    [-1/2, 1/2): one random number per element, which on a CPU is about 6x faster than the difference
    of two ``exponential_`` draws (CDP draws one per parameter; client defenses draw from
    :func:`laplace_keyed` instead). The single grid point
    u = -1/2 (probability 2^-24 in float32) would map to infinity; it is clamped to the largest
    magnitude the uniform grid of ``dtype`` can otherwise produce (about 16.6 b in float32)."""
    device = device if device is not None else generator.device
    u = torch.rand(shape, device=device, dtype=dtype, generator=generator) - 0.5
    # The uniform grid's step is eps/2 (2^-24 in float32): the largest finite magnitude it gives.
    magnitude = torch.log1p(-2 * u.abs()).clamp_min_(math.log(torch.finfo(dtype).eps / 2))
    return magnitude.mul_(-torch.sign(u)).mul_(scale)


# --------------------------------------------------------------------------------------------------
# The counter-based generator of client-defense noise
# --------------------------------------------------------------------------------------------------
#: murmur3's 32-bit finalizer ("fmix32", Appleby, public domain): xorshift-multiply rounds with full
#: avalanche (every input bit flips every output bit with probability ~1/2). Chosen over
#: Philox-4x32-10 because it is a fraction of the tensor operations per output word (torch has no
#: fused kernel for either, so each operation is a pass over memory and, on a GPU, a launch) and
#: needs no high half of a 32x32-bit product; chosen over splitmix64 because 64-bit products would
#: overflow torch's signed int64. Values are 32-bit words held in int64 tensors; the multipliers are
#: used as their signed residues (|k| < 2^31), so every product stays below 2^63 in magnitude, and
#: the mask after it keeps the low 32 bits (the same residue as the unsigned product). Shifts only
#: ever see non-negative values, so torch's arithmetic ``>>`` is a logical one.
_M32 = 0xFFFFFFFF
_FMIX_K1 = 0x85EBCA6B - (1 << 32)
_FMIX_K2 = 0xC2B2AE35 - (1 << 32)


def _fmix32_(h: torch.Tensor) -> torch.Tensor:
    """murmur3 fmix32 in place on 32-bit words held in int64."""
    h.bitwise_xor_(h >> 16)
    h.mul_(_FMIX_K1).bitwise_and_(_M32)
    h.bitwise_xor_(h >> 13)
    h.mul_(_FMIX_K2).bitwise_and_(_M32)
    return h.bitwise_xor_(h >> 16)


@functools.lru_cache(maxsize=16)
def _scrambled_index(n: int, device: torch.device) -> torch.Tensor:
    """fmix32(0 .. n-1): the element index, pre-mixed once per size and device."""
    return _fmix32_(torch.arange(n, dtype=torch.int64, device=device))


def counter_word(counter: tuple) -> int:
    """The 63-bit word of a counter: a tuple of ints and strings, e.g. ``("wbc", epoch, step)``."""
    words = tuple(w if isinstance(w, str) else int(w) for w in counter)
    return int.from_bytes(hashlib.sha256(("counter:" + repr(words)).encode()).digest()[:8], "little") >> 1


def _row_words(keys: torch.Tensor, counter: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, two 32-bit words ``[C, 1]``: a two-round Feistel network (round function fmix32) on
    the halves of ``key XOR counter_word(counter)``. It is a bijection, and any change of the 64-bit
    word changes both halves pseudo-randomly, so that keys with structure (0, 1, 2, ... or two keys
    one bit apart) still give unrelated rows."""
    stream = keys.to(torch.int64).reshape(-1, 1) ^ counter_word(counter)
    a, b = stream & _M32, (stream >> 32) & _M32
    b = b ^ _fmix32_(a.clone())
    a = a ^ _fmix32_(b.clone())
    return a, b


#: Set (to anything but "" or "0") to fuse the integer hash into one kernel with ``torch.compile``
#: (``--compile`` on the command line sets it; worker processes inherit it).
COMPILE_ENV = "FEDBENCH_COMPILE"


def enable_compile() -> None:
    """Fuse the hash of client-defense noise with ``torch.compile`` in this process and the workers it
    starts from now on (see :func:`_fused`)."""
    os.environ[COMPILE_ENV] = "1"


def compile_enabled() -> bool:
    return os.environ.get(COMPILE_ENV, "") not in ("", "0")


def _words(index: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fmix32(((index XOR a) + b) mod 2^32): the words of :func:`random_bits`."""
    return _fmix32_((index ^ a).add_(b).bitwise_and_(_M32))


def _laplace_parts(index: torch.Tensor, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype):
    """``(v, z)`` of :func:`laplace_keyed`: z = the word's top 25 bits - 2^24, v = k 2^-24. Both exact."""
    z = _words(index, a, b).bitwise_right_shift_(7).sub_(1 << 24).to(dtype)
    return torch.maximum(z + 1, z.neg()).mul_(2.0**-24), z


_COMPILED: dict = {}


def _fused(fn):
    """``fn`` itself, or with :data:`COMPILE_ENV` set its ``torch.compile`` d version.

    Why: each torch operation of the hash is a pass over memory (and on a GPU a kernel launch); the
    hash is 13 of them, and for WBC they run at every local step. Fused, the integer part is one
    pass, 3-4x faster on a CPU thread (benchmarks/README.md). Only integer operations and exact
    float conversions are fused, so the compiled kernel gives the same numbers bit for bit as the
    plain one (tests/test_counter_noise.py) and results do not depend on the flag; the logarithm of
    the Laplace transform stays a plain torch op, whose rounding a fused one need not share. The
    price is compilation, seconds per worker process (cached on disk by torch across runs); if
    compiling fails (no C++ compiler on a CPU), one warning and the plain kernels."""
    if not compile_enabled():
        return fn
    compiled = _COMPILED.get(fn)
    if compiled is None:
        compiled = _COMPILED[fn] = _fallback(fn, torch.compile(fn, dynamic=None))
    return compiled


def _fallback(fn, compiled):
    def call(*args):
        try:
            return compiled(*args)
        except Exception as error:  # noqa: BLE001 - a compiler problem, not a wrong input: the plain kernel is exact
            warnings.warn(f"fedbench: torch.compile of the defense-noise hash failed ({type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else ''}); using the plain kernels",
                          RuntimeWarning, stacklevel=3)
            _COMPILED[fn] = fn
            return fn(*args)

    return call


def _check_row_size(n: int, who: str) -> None:
    """The element index is a 32-bit word: a row holds 1 to 2^32 - 1 draws."""
    if not 0 < n <= _M32:
        raise ValueError(f"{who} draws 1 to 2^32 - 1 elements per row, not {n}")


def random_bits(keys: torch.Tensor, counter: tuple, n: int) -> torch.Tensor:
    """Random 32-bit words ``[C, n]`` (int64, in [0, 2^32)): row c is a function of ``keys[c]``,
    ``counter`` and the element index only.

    ``keys`` ``[C]`` int64 (any values; a client's key is ``derive_seed(seed, "defense", round,
    client)``), on the device the words are made on. Word i of a row is
    ``fmix32(((fmix32(i) XOR a) + b) mod 2^32)`` with (a, b) the row's words (:func:`_row_words`):
    the index passes through two full-avalanche rounds, the row's 64 bits through a keyed
    permutation before the last. All operations are elementwise on the client axis (one pass per
    operation for all clients) and integer-exact, so the CPU and a GPU give bit-identical words."""
    _check_row_size(n, "random_bits")
    a, b = _row_words(keys, counter)
    return _fused(_words)(_scrambled_index(n, a.device), a, b)  # [C, n]


def uniform(keys: torch.Tensor, counter: tuple, shape, *, dtype=torch.float32) -> torch.Tensor:
    """Uniform draws on the open interval (0, 1), ``[C, *shape]``, from :func:`random_bits`.

    The values are k / 2^24 for k = 1 .. 2^24 - 1, the float32 grid at full resolution (its
    spacing just below 1), never 0 or 1. k - 1 = floor(w (2^24 - 1) / 2^32) of a 32-bit word w, so
    each k is equally likely to within 2^-8 of its probability and the distribution function is
    exact to within 2^-32 (the product stays below 2^56: no overflow)."""
    shape = tuple(shape)
    k = random_bits(keys, counter, math.prod(shape)).mul_((1 << 24) - 1).bitwise_right_shift_(32).add_(1)
    return k.to(dtype).mul_(2.0**-24).view(-1, *shape)


def laplace_keyed(keys: torch.Tensor, counter: tuple, shape, scale: float, *, dtype=torch.float32) -> torch.Tensor:
    """Laplace(0, ``scale``) draws ``[C, *shape]`` from :func:`random_bits` (std = sqrt(2) scale).

    A fair sign times an exponential magnitude by the inverse CDF, ``-scale * log(v)``, v = k 2^-24
    with k uniform on 1 .. 2^24, independently of the sign: from the top 25 bits of a word, z = w
    div 2^7 - 2^24 is uniform on [-2^24, 2^24) (exact in float32), the sign is z's, and k = z + 1
    for z >= 0, -z for z < 0. v is exact and ``log`` is accurate relative to its result, so the
    small magnitudes keep their resolution; v never reaches 0, so the largest magnitude is
    24 ln 2 scale (about 16.6 scale), the same cap as :func:`laplace`'s clamp, and the distribution
    is exactly symmetric. The logarithm is the one floating-point step: CPU and GPU agree on it to an
    ulp or so, not always bit for bit."""
    shape = tuple(shape)
    n = math.prod(shape)
    _check_row_size(n, "laplace_keyed")
    a, b = _row_words(keys, counter)
    v, z = _fused(_laplace_parts)(_scrambled_index(n, a.device), a, b, dtype)
    return torch.copysign(v.log_(), z, out=v).mul_(scale).view(-1, *shape)
