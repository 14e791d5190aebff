"""Pre-aggregators: server stages in front of the aggregator (``clip+krum``, ``nnm+cma``,
``bucketing:s=2+geomed``).

* ``clip``: norm bounding (Sun et al. 2019), each update scaled to L2 norm <= a bound;
* ``nnm``: nearest-neighbour mixing (Allouah et al., AISTATS 2023), each update replaced by the mean
  of its n − f nearest;
* ``bucketing`` (Karimireddy, He & Jaggi, ICLR 2022): shuffle, then average buckets of s updates.

Each works on the whole ``[n, P]`` stack: clipping is one norm per row, mixing one ``[n, n]`` x
``[n, P]`` product, bucketing one permutation and a reshape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

import fedbench
from fedbench.components import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE
from fedbench.vectors import clip_to_norm, finite_rows, nearest, pairwise_sq_distances


@dataclass(kw_only=True)
class NormClip(fedbench.PreAggregator):
    """Norm bounding (Sun et al. 2019, "Can You Really Backdoor Federated Learning?"): scale each update to L2 norm <= norm.

    Definition: x_i <- x_i · min(1, norm / ||x_i||) (:func:`fedbench.vectors.clip_to_norm`, norms in
    float64); updates already inside the ball are unchanged, weights are kept, row i is still client
    i. The paper bounds the norm so that a boosted (model-replacement) update cannot dominate the
    average, while honest updates, which are smaller, pass untouched.

    Default norm = 5.0: fedbench's clip norm C of ``ldp`` and ``cdp`` (reference section 4), so that
    ``clip+fedavg`` is exactly ``cdp:sigma=0`` and the clipping defenses compare at one bound. It is
    well above honest update norms on digits and Fashion-MNIST under the paper protocol (about
    0.1-0.35, measured), so by default only boosted or outlying updates are scaled; choose a bound
    near the honest norms to clip tighter.

    Conventions elsewhere: ByzFL's Clipping uses c = 2.0 and overwrites a numpy input; flwr's DP
    clipping works in place and fails on an all-zero update. Here the input is never modified and a
    zero update stays zero.

    NaN/inf: clipping bounds norms, it does not filter. A row with a NaN entry stays NaN, and a row
    with an inf entry becomes NaN (its clip factor is 0, and 0 · inf is NaN); the aggregator after
    it decides (krum, bulyan, cma outvote a minority of NaN rows; fedavg does not). A finite but
    huge row (1e38 per coordinate) is scaled to the bound like any other (its norm is taken in
    float64, where it does not overflow), so ``clip+fedavg`` stays finite under it.
    """

    name: ClassVar[str] = "clip"
    norm: float = fedbench.param(5.0, "L2 bound on each update's norm", check=POSITIVE)

    def preaggregate(self, updates, weights, ctx):
        return clip_to_norm(updates, self.norm), weights


@dataclass(kw_only=True)
class NearestNeighbourMixing(fedbench.PreAggregator):
    """Nearest-neighbour mixing (Allouah et al., AISTATS 2023): each update becomes the mean of its n-f nearest, itself included.

    Definition (the paper's NNM): y_i = (1 / (n − f)) sum of the x_j over the n − f updates nearest
    to x_i in Euclidean distance, x_i itself included (ties: the lower row). The mean is unweighted,
    as in the paper; the client weights pass through unchanged and row i still stands for client i.
    Needs n >= f + 1 (the paper's guarantees assume n > 2f). Distances come from one squared-distance
    matrix and the mixing is one ``[n, n] @ [n, P]`` product.

    Conventions elsewhere: ByzFL's NNM is the same definition.

    NaN/inf: a row with a NaN or inf entry is at infinite distance from every other, so no finite
    row mixes it in while it has n − f finite neighbours (true with at most f non-finite rows); the
    non-finite row itself comes out all-NaN, left to the aggregator (which krum, bulyan and cma
    outvote). A finite but huge row is not filtered: it mixes in honest rows and stays huge, so
    ``nnm+fedavg`` diverges under it while ``nnm+cma`` outvotes it.
    """

    name: ClassVar[str] = "nnm"
    keeps_clients: ClassVar[bool] = True
    f: int | None = fedbench.param(
        None, "Byzantine updates per round (auto: the scenario's malicious clients per round)", check=NON_NEGATIVE
    )

    def check(self, n: int, f: int) -> None:
        f = self.f if self.f is not None else f
        self.require(n, f, f + 1, "n >= f+1")

    def preaggregate(self, updates, weights, ctx):
        n = len(updates)
        f = ctx.byzantine(self.f)
        self.check(n, f)
        finite = finite_rows(updates)
        neighbours = nearest(pairwise_sq_distances(updates, finite), n - f, include_self=True)
        mixing = torch.zeros(n, n, dtype=updates.dtype, device=updates.device)
        mixing.scatter_(1, neighbours.to(updates.device), 1.0 / (n - f))
        if bool(finite.all()):
            return mixing @ updates, weights
        clean = torch.where(finite.unsqueeze(1), updates, torch.zeros((), dtype=updates.dtype, device=updates.device))
        mixed = mixing @ clean
        spoiled = ~finite | (mixing[:, ~finite] > 0).any(dim=1)
        return mixed.masked_fill(spoiled.unsqueeze(1), float("nan")), weights


@dataclass(kw_only=True)
class Bucketing(fedbench.PreAggregator):
    """Bucketing (Karimireddy, He & Jaggi, ICLR 2022): shuffle the updates, then average buckets of s.

    Definition (the paper's Algorithm 1): draw a random permutation pi of the n rows (from the cell's
    server stream ``ctx.generator``), cut pi into ceil(n/s) consecutive buckets of s rows (the last
    one smaller when s does not divide n) and output each bucket's unweighted mean, as in the paper;
    the aggregator then sees ceil(n/s) rows. A bucket's weight is the sum of its members' weights
    (the sample counts it stands for). Rows no longer belong to single clients (``keeps_clients``
    is False, so later stages see ``client_ids = None``).

    The paper writes the last bucket's sum over 1/s; when s does not divide n fedbench divides it by
    its actual size instead (the mean of its members, as ByzFL's implementation does), so a small
    bucket is not shrunk towards zero. Default s = 2, the bucket size of the paper's experiments
    (ByzFL's default s = 1 is the identity).

    NaN/inf: a bucket that contains a non-finite row is non-finite (and one that contains a huge
    row is huge); f such rows spoil at most f buckets, which a robust aggregator after it outvotes
    (``bucketing+cma``) and a plain mean does not (``bucketing+fedavg`` diverges).
    """

    name: ClassVar[str] = "bucketing"
    keeps_clients: ClassVar[bool] = False
    s: int = fedbench.param(2, "bucket size (updates averaged per bucket)", check=AT_LEAST_ONE)

    def output_count(self, n: int) -> int:
        return math.ceil(n / self.s)

    def preaggregate(self, updates, weights, ctx):
        n = len(updates)
        gen = ctx.generator
        order = torch.randperm(n, generator=gen, device=gen.device).to(updates.device)
        shuffled, w = updates[order], weights[order.to(weights.device)]
        full = n // self.s
        means = [shuffled[: full * self.s].reshape(full, self.s, -1).mean(dim=1)]
        sums = [w[: full * self.s].reshape(full, self.s).sum(dim=1)]
        if full * self.s < n:
            means.append(shuffled[full * self.s :].mean(dim=0, keepdim=True))
            sums.append(w[full * self.s :].sum(dim=0, keepdim=True))
        return torch.cat(means), torch.cat(sums)


@fedbench.hookimpl
def register_preaggregators(register):
    register(NormClip)
    register(NearestNeighbourMixing)
    register(Bucketing)
