"""Confidence intervals over seeds: how sure a leaderboard's mean, or a difference between two
defenses, is.

Every interval is a two-sided 95% Student t interval over the n seeds (the t quantile of ``scipy.special.stdtrit``)::

    mean ± t_{0.975, n-1} · s / sqrt(n)

with s the sample standard deviation. With one seed there is no interval (``nan``, shown as n/a,
never 0); when every seed gives the same value it is the point itself.

A comparison of two defenses is *paired*: the same seed means the same attack schedule, the same
data partition and the same malicious clients, so the per-seed differences remove that shared
variation and the t interval is taken over the differences (a paired t interval).

Why not a bootstrap: a benchmark runs 3 to 5 seeds. A percentile bootstrap of 3 values can only
resample those 3 values, so its interval never reaches past their range and understates the
uncertainty; the t interval is wide with 3 seeds (t_{0.975,2} = 4.30) and that width is the honest
answer. The t interval assumes roughly normal per-seed values, which averages over many rounds
and images are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

#: The confidence level of every interval fedbench reports.
CONFIDENCE = 0.95


def _finite(values: Iterable[float]) -> list[float]:
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


def t_interval(values: Iterable[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Student t interval of the mean of ``values`` (NaNs dropped): ``(nan, nan)`` with fewer
    than two values, ``(mean, mean)`` when they are all equal."""
    vals = _finite(values)
    n = len(vals)
    if n < 2:
        return math.nan, math.nan
    mean = math.fsum(vals) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1))
    if std == 0:
        return mean, mean
    # The t quantile from scipy.special (0.2 s to import) rather than scipy.stats (0.6 s, a third of a
    # fresh `fedbench leaderboard`); same numbers: stats.t.interval calls the same function.
    from scipy.special import stdtrit

    scale = std / math.sqrt(n)
    low = stdtrit(n - 1, (1 - confidence) / 2) * scale + mean
    high = stdtrit(n - 1, (1 + confidence) / 2) * scale + mean
    return float(low), float(high)


@dataclass(frozen=True)
class Difference:
    """A paired difference ``a - b`` over seeds: its mean, 95% t interval and number of seeds."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def significant(self) -> bool:
        """Whether the interval excludes zero (never, without an interval)."""
        return not math.isnan(self.low) and (self.low > 0 or self.high < 0)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float],
                      confidence: float = CONFIDENCE) -> Difference:
    """``a - b`` paired by seed (the keys), over the seeds where both have a number."""
    diffs = [float(a[s]) - float(b[s]) for s in a if s in b and not _missing(a[s]) and not _missing(b[s])]
    if not diffs:
        return Difference(math.nan, math.nan, math.nan, 0)
    low, high = t_interval(diffs, confidence)
    return Difference(math.fsum(diffs) / len(diffs), low, high, len(diffs))


def _missing(value) -> bool:
    return value is None or math.isnan(float(value))
