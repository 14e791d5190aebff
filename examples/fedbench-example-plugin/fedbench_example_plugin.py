"""An example third-party fedbench plugin: one pre-aggregator and one aggregator.

* ``example-arc`` -- ARC, adaptive robust clipping (Allouah et al., "Boosting Robustness by Clipping
  Gradients in Distributed Learning", 2024): a pre-aggregator that clips only the few largest
  updates, to a threshold taken from the round's own norms, so no clip norm has to be tuned.
* ``example-meamed`` -- MeaMed, mean around median (Xie, Koyejo and Gupta, "Generalized
  Byzantine-tolerant SGD", 2018): per coordinate, the mean of the n - f values closest to the median.

Both follow fedbench's server-stage contract (``docs/plugins.md``): they receive the round's stack of
updates ``[n, P]`` (one row per client) with weights ``[n]`` and a ``fedbench.ServerContext``, work on
the whole stack with tensor ops, and take their ``f`` from the scenario unless ``f`` is set
(``example-meamed:f=2``). fedbench finds them through the ``fedbench`` entry point declared in this
package's ``pyproject.toml``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

import fedbench

F_DOC = "Byzantine updates per round the rule is sized for (auto: the scenario's malicious clients per round)"


def arc_clipped_count(n: int, f: int) -> int:
    """ARC's k = floor(2 (f / n) (n - f)): how many of the n updates it clips (Allouah et al. 2024).

    Integer arithmetic, so that k is exact (``2 * f / n * (n - f)`` can land just below an integer).
    k is 0 for f = 0 and at most n / 2."""
    return 2 * f * (n - f) // n


@dataclass(kw_only=True)
class AdaptiveRobustClipping(fedbench.PreAggregator):
    """ARC: clip the k = floor(2f(n-f)/n) largest updates to the norm of the next largest (Allouah et al. 2024).

    With the updates sorted by L2 norm, the threshold is the (k+1)-th largest norm; every update
    longer than that is scaled down to it, direction kept, and the others pass unchanged. Weights pass
    unchanged and row i still comes from client i (``keeps_clients``). The paper assumes f < n/2;
    the check refuses f > n/2, where the count k would shrink again as f grows. An update with
    non-finite entries is not repaired: clipping cannot fix NaN, that is the aggregator's job.
    """

    name: ClassVar[str] = "example-arc"
    f: int | None = fedbench.param(None, F_DOC, check=fedbench.Range(lo=0))

    def check(self, n: int, f: int) -> None:
        f = f if self.f is None else self.f  # ``check`` gets the scenario's f; our own wins
        self.require(n, f, 2 * f, "n >= 2f")

    def preaggregate(self, updates, weights, ctx):
        n = len(updates)
        k = arc_clipped_count(n, ctx.byzantine(self.f))
        if k == 0:
            return updates, weights
        norms = torch.linalg.vector_norm(updates, dim=1)
        threshold = torch.sort(norms).values[n - k - 1]
        scale = torch.where(norms > threshold, threshold / norms, torch.ones_like(norms))
        return updates * scale[:, None], weights


@dataclass(kw_only=True)
class MeanAroundMedian(fedbench.Aggregator):
    """MeaMed: per coordinate, the mean of the n-f values closest to the median (Xie et al. 2018).

    The median is the statistical one (mean of the two middle values for even n), as fedbench's
    ``cma``. Client weights are ignored: each client counts once, as in every order-statistic rule.
    Distances are ranked on the sorted values with a stable sort, so a tie between a value below and
    one above the median keeps the lower one, whatever order the clients come in. NaN sorts last
    and is never among the nearest values while at most f updates carry it. f = 0 is the plain mean.
    """

    name: ClassVar[str] = "example-meamed"
    f: int | None = fedbench.param(None, F_DOC, check=fedbench.Range(lo=0))

    def check(self, n: int, f: int) -> None:
        f = f if self.f is None else self.f
        self.require(n, f, f + 1, "n >= f+1")

    def aggregate(self, updates, weights, ctx):
        n, f = len(updates), ctx.byzantine(self.f)
        self.require(n, f, f + 1, "n >= f+1")  # a pre-aggregator may have changed n since the check
        ordered = torch.sort(updates, dim=0).values
        median = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
        nearest = torch.argsort((ordered - median).abs(), dim=0, stable=True)[: n - f]
        return torch.gather(ordered, 0, nearest).mean(dim=0)


@fedbench.hookimpl
def register_preaggregators(register):
    register(AdaptiveRobustClipping)


@fedbench.hookimpl
def register_aggregators(register):
    register(MeanAroundMedian)
