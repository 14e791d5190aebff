"""The random streams of a cell.

Every source of randomness has its own stream, derived from the cell's seed and a purpose (and, for
per-client work, the round and the client id), so that

* every defense in a comparison faces the same attack schedule, client selection and malicious data
  (the authors' code shares one stream between sampling and WBC noise, reference section 1);
* a client's batches and noise do not depend on which other clients trained before it, so the loop
  and stacked trainers see the same numbers.
"""

from __future__ import annotations

import hashlib

import torch

STREAMS = ("partition", "schedule", "attack", "init", "train", "defense", "aggregate", "eval")


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

    Drawn as the difference of two Exp(1) variables, which is exactly Laplace(0, 1) and, unlike the
    inverse CDF, never produces an infinity."""
    device = device if device is not None else generator.device
    e1 = torch.empty(shape, device=device, dtype=dtype).exponential_(generator=generator)
    e2 = torch.empty(shape, device=device, dtype=dtype).exponential_(generator=generator)
    return (e1 - e2) * scale
