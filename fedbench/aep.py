"""The attack's effect on the parameters (AEP), measured inside a run (``--metrics aep``).

The FL-WBC paper (section 4; reference section 3) explains why a poisoning attack persists: its
effect on the global model, the AEP ``delta``, is contracted by benign training roughly as
``delta <- (I - eta H) delta`` with ``H`` the benign clients' Hessian, so whatever part of ``delta``
lies in H's (near-)null space is never undone. Appendix B checks this on Fashion-MNIST with an
"AEP estimator": large (> 3) in the first adversarial round, after which the attack fades fast, and
about 0 in later ones, where it persists.

Our reference (``shared/reference/fl-wbc.md``) states that result but not the paper's equations 13
and 14, so fedbench measures the same mechanism with quantities it can define exactly; their values
are *not* the paper's estimator and are not comparable with its numbers:

* ``aep_norm`` (adversarial rounds) -- the norm of ``delta_r = A(attacked) - A(clean)``: the
  server stage's aggregate ``A`` of the round's real updates minus its aggregate when the malicious
  clients instead train honestly on their own data, with the same batch order (their ``attack``
  streams), the same benign updates, the same server randomness and a copy of the server's state. It
  is exactly the change of the global model the attack caused in its round, through whatever defense
  the cell runs, and exactly 0 when the "attack" is honest training (tested).
* ``aep_curvature`` (every round from the first adversarial one) -- the Rayleigh quotient
  ``delta' H delta / delta' delta`` of the benign loss's Hessian at the current global model along
  the latest AEP: the rate at which benign SGD contracts that direction (per unit learning rate).
  Large: benign training erases the attack; about 0: the AEP sits in the near-null space and
  persists. ``H`` is the Hessian of the mean cross-entropy on a fixed probe set of the benign
  clients' training data (:data:`PROBE_SIZE` samples drawn once per cell), computed exactly with one
  Hessian-vector product (double backward), not through FL-WBC's diagonal proxy.
* ``aep_undone`` (rounds after an adversarial one) -- ``-<step_t, delta> / <delta, delta>``: the
  fraction of the latest AEP that round t's global update moved back (1: erased in one round; 0:
  untouched; negative: pushed further). It also contains the benign task's own progress along
  ``delta``, so read it next to the clean cell's.

Cost: per adversarial round one more training of the malicious clients and one more aggregation; per
round one Hessian-vector product on the probe set (a few forward/backward passes of 256 samples).
The extra training uses its own fresh generators, so the run's other numbers do not change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from fedbench.errors import FedbenchError

METRICS = ("aep",)
PROBE_SIZE = 256


def check_metrics(names) -> tuple[str, ...]:
    """The optional metrics asked for, validated (a :class:`FedbenchError` names the known ones)."""
    out = []
    for name in names or ():
        if name not in METRICS:
            raise FedbenchError(f"unknown metric '{name}'; optional metrics: {', '.join(METRICS)}")
        if name not in out:
            out.append(name)
    return tuple(out)


def curvature(forward: Callable[[torch.Tensor], Callable[[torch.Tensor], torch.Tensor]], params: torch.Tensor,
              direction: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    """``v' H v / v' v`` for the Hessian ``H`` of the mean cross-entropy of ``forward(params)`` on
    ``(x, y)``, by one exact Hessian-vector product (``forward(flat)`` returns the model function)."""
    v = direction.detach()
    norm_sq = float(v.double().pow(2).sum())
    if norm_sq == 0.0:
        return 0.0
    with torch.enable_grad():
        w = params.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(forward(w)(x), y)
        (g,) = torch.autograd.grad(loss, w, create_graph=True)
        (hv,) = torch.autograd.grad(g @ v, w)
    return float(torch.dot(hv.double(), v.double())) / norm_sq


def fraction_undone(step: torch.Tensor, delta: torch.Tensor) -> float:
    """``-<step, delta> / <delta, delta>``: how much of ``delta`` the global update ``step`` moved back."""
    norm_sq = float(delta.double().pow(2).sum())
    if norm_sq == 0.0:
        return 0.0
    return -float(torch.dot(step.double(), delta.double())) / norm_sq


def probe_indices(pool: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """:data:`PROBE_SIZE` indices (sorted) drawn from ``pool``, the benign clients' training samples."""
    chosen = pool[torch.randperm(len(pool), generator=generator)[:PROBE_SIZE]]
    return torch.sort(chosen).values


@dataclass
class AEPTracker:
    """The AEP bookkeeping of one run: the latest AEP and the probe set its curvature is measured on."""

    forward: Callable[[torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]
    probe_x: torch.Tensor
    probe_y: torch.Tensor
    delta: torch.Tensor | None = field(default=None, repr=False)
    since: int | None = None  # the adversarial round ``delta`` comes from

    def row(self, rnd: int, step: torch.Tensor, new_global: torch.Tensor, clean_step: torch.Tensor | None) -> dict[str, float]:
        """This round's AEP metrics. ``step`` is the global update the server applied; ``clean_step``
        (adversarial rounds only) what it would have applied had the malicious clients been honest."""
        out: dict[str, float] = {}
        if self.delta is not None and clean_step is None:
            out["aep_undone"] = fraction_undone(step, self.delta)
        if clean_step is not None:
            self.delta, self.since = (step - clean_step).detach(), rnd
            out["aep_norm"] = float(self.delta.double().norm())
        if self.delta is not None:
            out["aep_curvature"] = curvature(self.forward, new_global, self.delta, self.probe_x, self.probe_y)
        return out
