"""FL-WBC (Sun et al., NeurIPS 2021): white blood cells for federated learning.

Why it works (paper section 5): a poisoning attack's effect on the parameters (AEP) persists in the
directions where the benign clients' Hessian is (near) null, because benign training never moves
them back. Each benign client therefore perturbs exactly that space during local training, so the
AEP is wiped out over the following rounds while the benign task, whose curvature lives elsewhere,
barely notices.

Algorithm (paper algorithm 1; reference section 3), per benign client and local SGD iteration i >= 1
(the first iteration of each local epoch has no predecessor; the memory resets every epoch):

1. Hessian-diagonal proxy ``P``: the authors' code uses the difference of consecutive minibatch
   gradients ``g_i - g_{i-1}`` (``proxy=grad``, default); the paper's text uses the difference of
   consecutive parameter updates ``dW_i - dW_{i-1}`` (``proxy=update``; dW is the optimizer step,
   perturbations excluded). With plain SGD these agree up to the factor -lr.
2. ``Y ~ Laplace(0, s)`` i.i.d. per element (s is numpy's scale: std = sqrt(2) s).
3. Mask ``M = 1`` where ``|P| <= |Y|`` (``proxy=update`` compares ``|P|`` with ``lr |Y|``).
4. ``W <- W + lr * (Y * M)`` after the optimizer step; it never enters the momentum buffer.

Only conv and linear weight tensors are perturbed (never biases), only by benign clients (the engine
never gives client defenses to malicious clients), in every round. Noise comes from each client's own
``defense`` stream, drawn only for clients that really stepped, so the loop and stacked trainers
draw the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

import fedbench
from fedbench.rng import laplace


@dataclass(kw_only=True)
class WBC(fedbench.ClientDefense):
    """FL-WBC: benign clients perturb the near-null space of their Hessian with Laplace noise (Sun et al. 2021)."""

    name: ClassVar[str] = "wbc"
    per_step: ClassVar[bool] = True
    s: float = fedbench.param(0.4, "Laplace scale of the perturbation (std = sqrt(2) s; the paper's headline 0.4)",
                              check=fedbench.Range(lo=0, lo_open=True))
    proxy: str = fedbench.param("grad", "Hessian proxy: grad = g_i - g_(i-1) (authors' code), update = dW_i - dW_(i-1) (paper)",
                                choices=("grad", "update"))

    def after_step(self, state: fedbench.StepState) -> None:
        if state.prev_grads is None:  # first iteration of a local epoch
            return
        current, previous = (state.grads, state.prev_grads) if self.proxy == "grad" else (state.updates, state.prev_updates)
        threshold_scale = 1.0 if self.proxy == "grad" else state.lr
        active = state.active.tolist()
        for k, is_weight in enumerate(state.is_weight):
            if not is_weight:
                continue
            param = state.params[k]
            noise = self._draw(param, state.generators, active)
            proxy = current[k] - previous[k]
            mask = proxy.abs() <= threshold_scale * noise.abs()
            param.add_(state.lr * noise * mask)

    def _draw(self, param: torch.Tensor, generators, active) -> torch.Tensor:
        """One Laplace draw per client from its own stream; zeros (and no draw) for idle clients."""
        shape = param.shape[1:]
        rows = [laplace(shape, self.s, g, device=param.device, dtype=param.dtype) if on else param.new_zeros(shape)
                for g, on in zip(generators, active)]
        return torch.stack(rows)


@fedbench.hookimpl
def register_defenses(register):
    register(WBC)
