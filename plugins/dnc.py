"""Divide-and-Conquer, DnC (Shejwalkar & Houmansadr, NDSS 2021): spectral outlier filtering on random coordinates.

Malicious updates that shift the mean must stick out along the top principal direction of the
centred updates; computing that direction on a random subset of coordinates keeps it cheap for
large models, and repeating with fresh subsets (keeping only updates that pass every time) makes it
hard to hide in the coordinates that were not drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

import fedbench
from fedbench.components import AT_LEAST_ONE, NON_NEGATIVE
from fedbench.vectors import finite_rows, weighted_sum


def removed_count(c: float, f: int) -> int:
    """How many updates DnC drops per iteration: floor(c * f) (rounded to 9 decimals first, so
    that a decimal c removes what it says, as for ctma's trimming)."""
    return math.floor(round(c * f, 9))


def outlier_scores(sub: torch.Tensor) -> torch.Tensor:
    """s_i = ((x_i − μ) · v)² for the rows of ``sub`` ``[n, b]``, v the top right singular vector of
    the centred rows (float64, ``[n]``).

    With the centred rows C = U Σ Vᵀ, C v_1 = σ_1 u_1, so s = σ_1² u_1²: the top eigenpair of the
    n x n Gram matrix C Cᵀ (``torch.linalg.eigh``, deterministic) gives the scores without forming v
    or a b-dimensional SVD. The sign ambiguity of a singular vector disappears in the square."""
    centred = sub.to(torch.float64)
    centred = centred - centred.mean(dim=0, keepdim=True)
    eigenvalues, eigenvectors = torch.linalg.eigh(centred @ centred.T)  # ascending
    return eigenvalues[-1].clamp_min(0.0) * eigenvectors[:, -1] ** 2


@dataclass(kw_only=True)
class DnC(fedbench.Aggregator):
    """DnC (Shejwalkar & Houmansadr, NDSS 2021): keep updates with low projection on the top singular vector of random coordinate subsets.

    Definition (the paper's Divide-and-Conquer algorithm): for each of ``iters`` iterations, draw a
    random subset r of ``b`` coordinates (without replacement, from the cell's server stream
    ``ctx.generator``; all coordinates when the model has fewer than b), centre the sub-vectors x_i[r]
    on their mean μ, take the top right singular vector v of the centred matrix, score
    s_i = ((x_i[r] − μ) · v)² (see :func:`outlier_scores`) and keep the n − floor(c·f) updates with the
    lowest scores (ties: the lower row first). The good set is the intersection of the kept sets over
    all iterations; the aggregate is the unweighted mean of the good updates (client weights are
    ignored). If the intersection is empty (possible only when iters · floor(c·f) >= n) the aggregate
    is the zero update: the global model stays.

    ``f`` defaults to the scenario's malicious clients per round (``auto``). Defaults iters = 5,
    b = 10000, c = 1 are those of Blades' DnC (which cites the paper; FLPoison: 5 iterations,
    c = 1, but b = 20% of the coordinates; older Blades releases 1 iteration). Given the same
    generator state the coordinate sample does not depend on the order of the rows, so the rule is
    permutation invariant up to ties in the scores and floating-point summation order.

    NaN/inf: a row with a NaN or inf entry (anywhere, not only in the sampled coordinates) scores
    +inf in every iteration and the scores of the other rows are computed without it (a NaN would
    otherwise spoil the mean μ and the decomposition of every row), so up to floor(c·f) such rows
    are always dropped and the aggregate stays finite; with more of them some are kept and the
    aggregate is NaN (the run diverges).
    """

    name: ClassVar[str] = "dnc"
    f: int | None = fedbench.param(None, "Byzantine updates per round to filter (auto: the scenario's malicious clients per round)", check=NON_NEGATIVE)
    iters: int = fedbench.param(5, "filtering iterations, each on a fresh coordinate sample", check=AT_LEAST_ONE)
    b: int = fedbench.param(10000, "coordinates sampled per iteration (all when the model is smaller)", check=AT_LEAST_ONE)
    c: float = fedbench.param(1.0, "filtering fraction: each iteration drops the floor(c·f) highest scores", check=NON_NEGATIVE)

    def check(self, n: int, f: int) -> None:
        f = self.f if self.f is not None else f
        self.require(n, f, removed_count(self.c, f) + 1, f"n - c*f >= 1 (c={self.c:g})")

    def aggregate(self, updates, weights, ctx):
        n, p = updates.shape
        f = ctx.byzantine(self.f)
        self.check(n, f)
        keep = n - removed_count(self.c, f)
        good = torch.ones(n, dtype=torch.bool, device=updates.device)
        gen = ctx.generator
        finite = finite_rows(updates)
        for _ in range(self.iters):
            if self.b >= p:
                sub = updates
            else:
                sub = updates[:, torch.randperm(p, generator=gen, device=gen.device)[: self.b].to(updates.device)]
            if bool(finite.all()):
                scores = outlier_scores(sub)
            else:
                scores = torch.full((n,), math.inf, dtype=torch.float64, device=updates.device)
                if int(finite.sum()) > 0:
                    scores[finite] = outlier_scores(sub[finite])
            kept = torch.zeros(n, dtype=torch.bool, device=updates.device)
            kept[torch.sort(scores, stable=True).indices[:keep]] = True
            good &= kept
        if not bool(good.any()):
            return torch.zeros_like(updates[0])
        return weighted_sum(good.to(torch.float64) / int(good.sum()), updates)


@fedbench.hookimpl
def register_aggregators(register):
    register(DnC)
