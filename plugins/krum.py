"""Krum, Multi-Krum (Blanchard et al., NeurIPS 2017) and Bulyan (El Mhamdi et al., ICML 2018).

All three rank client updates by the Krum score, the sum of squared distances to the n − f − 2
nearest other updates, so they share one squared-distance matrix ``[n, n]`` computed from a Gram
matrix (:func:`fedbench.vectors.pairwise_sq_distances`); nothing loops over coordinates, and only Bulyan's iterated
selection loops (over at most n picks, on that same matrix).

The distances come from :func:`fedbench.vectors.pairwise_sq_distances`, which stays accurate for
close honest updates when attackers are far away (and puts non-finite rows at infinity).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

import fedbench
from fedbench.components import AT_LEAST_ONE, NON_NEGATIVE
from fedbench.vectors import finite_rows, pairwise_sq_distances

INF = float("inf")


def krum_scores(d: torch.Tensor, f: int, alive: torch.Tensor | None = None) -> torch.Tensor:
    """The Krum score of every row (Blanchard et al. 2017, section 4): the SUM of its squared
    distances to the k = |alive| − f − 2 nearest OTHER alive rows (``[n]`` float64).

    ``d`` is a squared-distance matrix; ``alive`` (default: all rows) is the set the score is taken
    in (Bulyan scores the rows not yet selected). k is clamped to [1, |alive| − 1] so that the set
    Bulyan shrinks down to 2f+1 rows still ranks (flwr does the same, max(1, ·)). Rows outside
    ``alive`` score +inf; a row with infinite distances (a non-finite update) scores +inf."""
    dd = d.clone()
    dd.fill_diagonal_(INF)
    m = len(d)
    if alive is not None:
        dd[:, ~alive] = INF
        m = int(alive.sum())
    k = min(max(m - f - 2, 1), m - 1)
    if k <= 0:  # a single alive row: nothing to compare with
        scores = torch.zeros(len(d), dtype=d.dtype, device=d.device)
    else:
        scores = torch.sort(dd, dim=1).values[:, :k].sum(dim=1)
    if alive is not None:
        scores = scores.masked_fill(~alive, INF)
    return scores


def krum_order(d: torch.Tensor, f: int, finite: torch.Tensor, alive: torch.Tensor | None = None) -> torch.Tensor:
    """Row indices best first by Krum score (restricted to ``alive`` when given), finite rows before
    non-finite ones.

    Equal scores are common when a score counts one neighbour (two mutually nearest rows share it:
    Bulyan's last picks, Krum with n = 3) and would otherwise be broken by row order. They are
    broken by the sum of squared distances to ALL other alive finite rows (the score's natural
    extension: closer to the rest wins), then by the lower row, so the result does not depend on
    the order of the clients."""
    scores = krum_scores(d, f, alive)
    pool = torch.ones_like(finite) if alive is None else alive
    others = pool & finite
    total = d[:, others].sum(dim=1)  # the diagonal adds 0 for a finite row
    idx = torch.nonzero(others).flatten()
    idx = idx[torch.sort(total[idx], stable=True).indices]
    idx = idx[torch.sort(scores[idx], stable=True).indices]
    return torch.cat([idx, torch.nonzero(pool & ~finite).flatten()])


def mean_nearest_median(x: torch.Tensor, beta: int) -> torch.Tensor:
    """Per coordinate, the unweighted mean of the ``beta`` values of ``x`` (``[θ, P]``) closest to
    the coordinate's median (the mean of the two middle values when θ is even, as ``cma``);
    between values equally far below and above the median the lower one is kept (Bulyan's
    second step, El Mhamdi et al. 2018).

    One sort along the client axis: the beta values closest to the median are a contiguous window
    a .. a+beta-1 of the sorted values, and a counts the left candidates values[i] (i < θ − beta)
    that lie farther from the median than their right counterparts values[beta + i]."""
    theta = len(x)
    cut = theta - beta
    if cut == 0:
        return x.mean(dim=0)
    values = torch.sort(x, dim=0).values
    median = (values[(theta - 1) // 2] + values[theta // 2]) / 2
    excluded_left = ((median - values[:cut]) > (values[beta:] - median)).sum(dim=0)
    position = torch.arange(theta, device=values.device).unsqueeze(1)
    window = (position >= excluded_left) & (position < excluded_left + beta)
    return values.masked_fill(~window, 0).sum(dim=0) / beta


# --------------------------------------------------------------------------------------------------
# The rules
# --------------------------------------------------------------------------------------------------
_F_DOC = "Byzantine updates per round tolerated (auto: the scenario's malicious clients per round)"


@dataclass(kw_only=True)
class Krum(fedbench.Aggregator):
    """Krum (Blanchard et al., NeurIPS 2017): the update with the smallest sum of squared distances to its n-f-2 nearest others.

    Definition (the paper's section 4): score(i) = sum of ||x_i − x_j||^2 over the n − f − 2 updates
    x_j (j ≠ i) closest to x_i; the aggregate is the update with the lowest score (equal scores:
    see :func:`krum_order`; the pick does not depend on the order of the rows). Needs n >= 2f + 3.
    Client weights are ignored: the output is one client's update.

    Conventions elsewhere: flwr's ``aggregate_krum`` matches (sum over max(1, n−f−2)); ByzFL
    averages the squared distances over n − f − 1 neighbours (a different neighbour count, so a
    different pick in general); FLPoison sums non-squared distances; BackFed matches the paper.

    NaN/inf: a row with a NaN or inf entry is at infinite distance from everything, scores +inf
    and is never picked while a finite row exists (with at most f such rows the finite rows keep
    finite scores). If every row is non-finite the output is NaN-bearing and the run diverges.
    """

    name: ClassVar[str] = "krum"
    f: int | None = fedbench.param(None, _F_DOC, check=NON_NEGATIVE)

    def check(self, n: int, f: int) -> None:
        f = self.f if self.f is not None else f
        self.require(n, f, 2 * f + 3, "n >= 2f+3")

    def aggregate(self, updates, weights, ctx):
        f = ctx.byzantine(self.f)
        self.check(len(updates), f)
        finite = finite_rows(updates)
        order = krum_order(pairwise_sq_distances(updates, finite), f, finite)
        return updates[int(order[0])].clone()


@dataclass(kw_only=True)
class MultiKrum(fedbench.Aggregator):
    """Multi-Krum (Blanchard et al., NeurIPS 2017): the unweighted mean of the m updates with the best Krum scores.

    Definition (the paper's section 5): compute every update's Krum score once (sum of squared
    distances to its n − f − 2 nearest others, as ``krum``), take the m lowest (ties as ``krum``)
    and average them WITHOUT weights, as the paper does; m defaults to n − f (``auto``). m = 1 is
    Krum; m = n is the plain unweighted mean. Needs n >= 2f + 3 and m <= n.

    Conventions elsewhere: flwr's ``aggregate_krum(to_keep=m)`` weights the mean by num_examples;
    ByzFL averages n − f without weights but scores with n − f − 1 neighbours; FLPoison keeps 20% of
    n by default and uses non-squared distances; Blades squares the distances twice.

    NaN/inf: non-finite rows score +inf and come last, so with at most min(f, n − m) of them the
    mean is over finite rows only; if m exceeds the finite rows the output is NaN.
    """

    name: ClassVar[str] = "multikrum"
    f: int | None = fedbench.param(None, _F_DOC, check=NON_NEGATIVE)
    m: int | None = fedbench.param(None, "updates averaged (auto: n - f)", check=AT_LEAST_ONE)

    def selected(self, n: int, f: int) -> int:
        return self.m if self.m is not None else n - f

    def check(self, n: int, f: int) -> None:
        f = self.f if self.f is not None else f
        self.require(n, f, 2 * f + 3, "n >= 2f+3")
        if self.selected(n, f) > n:
            raise fedbench.SpecError(
                f"multikrum: m={self.m} averages more updates than the n={n} a round has; use m <= n "
                "(or auto: n - f), or more clients per round (--per-round)"
            )

    def aggregate(self, updates, weights, ctx):
        f = ctx.byzantine(self.f)
        n = len(updates)
        self.check(n, f)
        finite = finite_rows(updates)
        m = self.selected(n, f)
        chosen = krum_order(pairwise_sq_distances(updates, finite), f, finite)[:m]
        if not bool(finite.all()):  # a zero weight times NaN is NaN: average the chosen rows only
            return updates.index_select(0, chosen.to(updates.device)).mean(dim=0)
        average = torch.zeros(n, dtype=updates.dtype, device=updates.device)
        average[chosen.to(updates.device)] = 1.0 / m
        return average @ updates


@dataclass(kw_only=True)
class Bulyan(fedbench.Aggregator):
    """Bulyan (El Mhamdi et al., ICML 2018): n-2f iterated Krum picks, then per coordinate the mean of the n-4f values nearest the median.

    Definition (the paper's section 4, with Krum as the inner rule): starting from all n updates,
    θ = n − 2f times pick the update with the best Krum score among those not yet picked (scores
    recomputed on the remaining set R with |R| − f − 2 neighbours, clamped to at least 1 as R
    shrinks to 2f + 1; equal scores, which the clamped count makes common, are broken as in
    :func:`krum_order`) and remove it from R. Then, per coordinate, take the median m of the θ
    picked values (the mean of the two middle values when θ is even, as ``cma``) and average,
    without weights, the β = θ − 2f values closest to m (between values equally far below and above
    m the lower one is kept). Needs n >= 4f + 3; f = 0 is the plain unweighted mean. Client weights
    are ignored.

    Cost: the distance matrix once (the θ Krum rounds only mask it), then one coordinate sort of
    the θ picked updates: the β values closest to the median are a contiguous window of the sorted
    values, located by comparing the 2f candidates on each side, so no second sort is needed.

    Conventions elsewhere: flwr's ``aggregate_bulyan`` matches (and mutates the caller's list);
    FLPoison uses β = θ, i.e. skips the coordinate-wise trimming.

    NaN/inf: non-finite rows score +inf and are never picked while finite rows remain (so with at
    most 2f of them none reaches the coordinate-wise step).
    """

    name: ClassVar[str] = "bulyan"
    f: int | None = fedbench.param(None, _F_DOC, check=NON_NEGATIVE)

    def check(self, n: int, f: int) -> None:
        f = self.f if self.f is not None else f
        self.require(n, f, 4 * f + 3, "n >= 4f+3")

    def aggregate(self, updates, weights, ctx):
        f = ctx.byzantine(self.f)
        n = len(updates)
        self.check(n, f)
        finite = finite_rows(updates)
        if f == 0:  # θ = β = n: every update is picked and none trimmed
            return updates.mean(dim=0)
        d = pairwise_sq_distances(updates, finite)
        theta, beta = n - 2 * f, n - 4 * f
        remaining = torch.ones(n, dtype=torch.bool, device=d.device)
        picks = []
        for _ in range(theta):
            pick = krum_order(d, f, finite, remaining)[0]
            remaining[pick] = False
            picks.append(pick)
        chosen = torch.stack(picks).to(updates.device)
        return mean_nearest_median(updates.index_select(0, chosen), beta)


@fedbench.hookimpl
def register_aggregators(register):
    register(Krum)
    register(MultiKrum)
    register(Bulyan)
