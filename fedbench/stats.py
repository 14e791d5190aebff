"""Confidence intervals over seeds: how sure a leaderboard's mean, or a difference between two
defenses, is.

Every interval is two-sided at 95% (:func:`interval`). With fewer than :data:`BOOTSTRAP_MIN` seeds it
is the Student t interval (the t quantile of ``scipy.special.stdtrit``)::

    mean ± t_{0.975, n-1} · s / sqrt(n)

with s the sample standard deviation; with :data:`BOOTSTRAP_MIN` seeds or more it is the BCa
bootstrap interval of the mean (``scipy.stats.bootstrap``, 9,999 resamples from a fixed seed, so
the same values always give the same interval). Either is cut to the range the quantity can take
when one is given (``bounds``: a success rate's mean cannot leave [0, 1], a mitigation count's
cannot go below 0), so the cut interval covers the true mean whenever the uncut one does. With one
seed there is no interval (``nan``, shown as n/a, never 0); when every seed gives the same value it
is the point itself.

A comparison of two defenses is *paired*: the same seed means the same attack schedule, the same
data partition and the same malicious clients, so the per-seed differences remove that shared
variation and the interval is taken over the differences (a paired interval).

Why t for few seeds and a bootstrap for many: a benchmark usually runs 3 to 5 seeds. A bootstrap of
3 values can only resample those 3 values, so its interval never reaches past their range and
understates the uncertainty; the t interval is wide with 3 seeds (t_{0.975,2} = 4.30) and that
width is the honest answer. But the t interval assumes roughly normal per-seed values, and some of
fedbench's are not: mitigation rounds are small integers, censored, and success rates pile up at 0
and 1. With 10 seeds or more there are enough values for the bootstrap to see that shape, and the
BCa variant corrects the percentile bootstrap's bias and skew; it then replaces the t interval for
every column, so that one rule covers a table. Where BCa cannot be formed (almost all values tied),
the percentile bootstrap is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

#: The confidence level of every interval fedbench reports.
CONFIDENCE = 0.95
#: From this many values on, :func:`interval` is the BCa bootstrap instead of the t interval.
BOOTSTRAP_MIN = 10
BOOTSTRAP_RESAMPLES = 9999


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


def bootstrap_interval(values: Iterable[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The BCa bootstrap interval of the mean of ``values`` (NaNs dropped), deterministic (resamples
    drawn from a fixed seed); the percentile interval where BCa is undefined (nearly all values
    tied); ``(mean, mean)`` when all are equal, ``(nan, nan)`` with fewer than two values."""
    import warnings

    import numpy as np

    vals = _finite(values)
    if len(vals) < 2:
        return math.nan, math.nan
    if min(vals) == max(vals):
        return vals[0], vals[0]
    from scipy import stats

    data = (np.asarray(vals, dtype=float),)
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DegenerateDataWarning: BCa undefined, the percentile one follows
            ci = stats.bootstrap(data, np.mean, confidence_level=confidence, n_resamples=BOOTSTRAP_RESAMPLES,
                                 method=method, random_state=np.random.default_rng(0)).confidence_interval
        if math.isfinite(ci.low) and math.isfinite(ci.high):
            return float(ci.low), float(ci.high)
    return math.nan, math.nan


def interval(values: Iterable[float], confidence: float = CONFIDENCE,
             bounds: tuple[float, float] = (-math.inf, math.inf)) -> tuple[float, float]:
    """The interval fedbench reports for a mean over seeds: :func:`t_interval` below
    :data:`BOOTSTRAP_MIN` values, :func:`bootstrap_interval` from there on (see the module docstring),
    cut to ``bounds``, the range the mean can take."""
    vals = _finite(values)
    low, high = (t_interval if len(vals) < BOOTSTRAP_MIN else bootstrap_interval)(vals, confidence)
    if math.isnan(low):
        return low, high
    return max(low, bounds[0]), min(high, bounds[1])


def method_of(n: int) -> str:
    """How the interval of ``n`` values is made, in words."""
    return "BCa bootstrap" if n >= BOOTSTRAP_MIN else "Student t"


@dataclass(frozen=True)
class Difference:
    """A paired difference ``a - b`` over seeds: its mean, 95% interval (:func:`interval`) and number of seeds."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def significant(self) -> bool:
        """Whether the interval excludes zero (never, without an interval)."""
        return not math.isnan(self.low) and (self.low > 0 or self.high < 0)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], confidence: float = CONFIDENCE,
                      bounds: tuple[float, float] = (-math.inf, math.inf)) -> Difference:
    """``a - b`` paired by seed (the keys), over the seeds where both have a number; ``bounds`` is the
    range of the difference (of two fractions: [-1, 1])."""
    diffs = [float(a[s]) - float(b[s]) for s in a if s in b and not _missing(a[s]) and not _missing(b[s])]
    if not diffs:
        return Difference(math.nan, math.nan, math.nan, 0)
    low, high = interval(diffs, confidence, bounds)
    return Difference(math.fsum(diffs) / len(diffs), low, high, len(diffs))


def _missing(value) -> bool:
    return value is None or math.isnan(float(value))
