"""Byzantine-robust aggregators: coordinate-wise median and trimmed mean (Yin et al. 2018).

These are the CMA and CTMA baselines of the FL-WBC paper (section 7.1), which the authors' code does
not contain; fedbench defines them in reference section 4. Both work on the whole ``[n_clients, P]``
stack with one ``torch.sort`` along the client axis, so a coordinate's order statistics come from a
single tensor op rather than loops over clients or coordinates.

Both rules ignore the client weights (sample counts): an order statistic is robust precisely because
one client counts once, however much data it claims to have. ``torch.sort`` places NaN after every
number, +inf after every finite number and -inf before, so a minority of clients uploading NaN
or inf (or huge finite values) is outvoted by the median, and trimmed by CTMA when it trims at least
as many values per side (floor(beta * n) >= the faulty values at that end), rather than poisoning
the result; with more of them CTMA's mean, and the median of a non-minority, is non-finite or huge
and the run diverges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

import fedbench


@dataclass(kw_only=True)
class CoordinateMedian(fedbench.Aggregator):
    """Coordinate-wise median of the client updates (Yin et al. 2018); client weights are ignored.

    With an even number of updates each coordinate takes the statistical median, the mean of the two
    middle values (reference section 4), not ``torch.median``'s lower middle value: the lower value
    would bias every coordinate downwards and make the rule depend on the sign convention.

    NaN/inf: NaN and +inf sort last, -inf first, so fewer than n/2 faulty rows (at most n/2 - 1
    for even n, where both middle values count) never reach the middle: the output stays finite.
    """

    name: ClassVar[str] = "cma"

    def aggregate(self, updates, weights, ctx):
        n = len(updates)
        if n == 0:
            raise fedbench.FedbenchError("cma: the median of no client updates is undefined; need n >= 1")
        ordered = torch.sort(updates, dim=0).values
        lower, upper = ordered[(n - 1) // 2], ordered[n // 2]
        return (lower + upper) / 2


def trimmed_count(beta: float, n: int) -> int:
    """How many values CTMA drops from EACH side of a coordinate: floor(beta * n).

    ``beta * n`` is rounded to 9 decimals first so that decimal betas trim what they say
    (0.29 * 100 is 28.999999999999996 in binary floating point; it means 29)."""
    return math.floor(round(beta * n, 9))


@dataclass(kw_only=True)
class TrimmedMean(fedbench.Aggregator):
    """Coordinate-wise trimmed mean: drop the beta fraction largest and smallest values per coordinate (Yin et al. 2018).

    Per coordinate, the floor(beta * n) largest and floor(beta * n) smallest of the n client values are
    removed and the rest averaged without weights (reference section 4: beta = 0.4 with 10 clients
    keeps the 2 middle values). ``beta = 0`` is the plain unweighted mean.

    NaN/inf: NaN and +inf sort last, -inf first; at most floor(beta * n) of them per side are
    trimmed and the output stays finite. One more, or a huge finite value (1e38) that is not
    trimmed, reaches the mean and the run diverges (default beta = 0.1 with 10 or 11 clients
    trims one value per side).
    """

    name: ClassVar[str] = "ctma"
    beta: float = fedbench.param(
        0.1, "fraction trimmed from EACH side (0.4 keeps 2 of 10)", check=fedbench.Range(lo=0, hi=0.5, hi_open=True)
    )

    def aggregate(self, updates, weights, ctx):
        n = len(updates)
        k = trimmed_count(self.beta, n)
        if n - 2 * k < 1:
            raise fedbench.FedbenchError(
                f"ctma: beta={self.beta:g} trims {k} of n={n} updates from each side, leaving none; "
                "use a smaller beta or more clients per round"
            )
        if k == 0:
            return updates.mean(dim=0)
        return torch.sort(updates, dim=0).values[k : n - k].mean(dim=0)


@fedbench.hookimpl
def register_aggregators(register):
    register(CoordinateMedian)
    register(TrimmedMean)
