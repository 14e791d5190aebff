"""Centered clipping (Karimireddy, He & Jaggi, ICML 2021, "Learning from History for Byzantine Robust
Optimization").

The rule remembers the previous round's aggregate and clips every update's DIFFERENCE from it, so
each client can move the aggregate by at most tau / n per iteration, whatever it uploads. The
centre is per-cell state on the component object (a server stage lives exactly as long as its
cell, see :class:`fedbench.components.ServerStage`), so two cells never share it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

import fedbench
from fedbench.components import AT_LEAST_ONE, POSITIVE
from fedbench.vectors import clip_to_norm, finite_rows


@dataclass(kw_only=True)
class CenteredClipping(fedbench.Aggregator):
    """Centered clipping around the previous round's aggregate (Karimireddy, He & Jaggi, ICML 2021).

    Definition (the paper's CC rule): starting from v = the previous round's aggregate (zero in the
    first round), repeat ``iters`` times

        v <- v + (1/n) sum_i clip_tau(x_i − v),   clip_tau(y) = y · min(1, tau / ||y||),

    and return v, which becomes the next round's starting point. The mean is unweighted (1/n, client
    weights ignored), as in the paper. In the paper the clients send worker momenta and v starts at
    the previous aggregated momentum; here clients send model updates and v starts at the previous
    aggregated update, the same construction one level up.

    Defaults tau = 100, iters = 1: the values of the authors' experiments
    (epfml/byzantine-robust-optimizer, ``Clipping(tau=100, n_iter=1)``), where starting v at the
    previous aggregate is what lets a single iteration do; ByzFL has the same defaults. tau is in
    update units: on fedbench's digits and Fashion-MNIST (paper protocol) honest update norms are
    about 0.1-0.35, so the default clips only gross outliers, and one far-away client can still move
    the aggregate by tau / n = 10 (n = 10); set tau near the honest norms for a tight bound.

    Conventions elsewhere: ByzFL is stateful across calls and starts at 0, like this rule; Blades
    uses tau 5 and 5 iterations.

    NaN/inf: a row with a NaN or inf entry cannot be clipped to a meaningful vector; it contributes
    nothing (as if it sat at the centre) and still counts in the 1/n, so its influence stays within
    the tau / n bound and the aggregate stays finite. A finite but huge row (1e38 per coordinate) is
    clipped like any far row (norms in float64), so it too moves the aggregate by at most tau / n.
    """

    name: ClassVar[str] = "cc"
    tau: float = fedbench.param(100.0, "clipping radius around the centre (update units)", check=POSITIVE)
    iters: int = fedbench.param(1, "clipping iterations per round (L in the paper)", check=AT_LEAST_ONE)
    #: v after the last round: the next round's starting point (per-cell state, not a parameter)
    centre: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def aggregate(self, updates, weights, ctx):
        v = self.centre
        if v is None:
            v = torch.zeros_like(updates[0])
        elif v.shape != updates.shape[1:]:
            raise fedbench.FedbenchError(
                f"cc: the centre from the previous round has {v.numel()} entries, this round's updates "
                f"{updates.shape[1]}; a cc object serves one cell (one model)"
            )
        finite = finite_rows(updates)
        all_finite = bool(finite.all())
        for _ in range(self.iters):
            diff = updates - v
            if not all_finite:
                diff = torch.where(finite.unsqueeze(1), diff, torch.zeros((), dtype=diff.dtype, device=diff.device))
            v = v + clip_to_norm(diff, self.tau).mean(dim=0)
        self.centre = v.detach().clone()
        return v


@fedbench.hookimpl
def register_aggregators(register):
    register(CenteredClipping)
