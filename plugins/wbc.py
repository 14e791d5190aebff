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
never gives client defenses to malicious clients), in every round. Noise comes from the counter-based
generator of :mod:`fedbench.rng`, keyed by the client's defense key and the counter ``("wbc", epoch,
step)``, element j being the j-th entry of the client's weight tensors laid end to end: one draw for
all clients and all weight tensors per step, and a client's noise is the same whichever clients
train beside it (alone in the loop trainer, a chunk of the stacked one, a lockstep batch). Clients
that sat out the step (``active`` false) are not perturbed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

import fedbench
from fedbench.rng import laplace_keyed


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
        weights = [k for k, is_weight in enumerate(state.is_weight) if is_weight]
        if not weights:
            return
        params = state.params
        sizes = [params[k][0].numel() for k in weights]
        noise = laplace_keyed(state.keys, ("wbc", state.epoch, state.step), (sum(sizes),), self.s, dtype=params[weights[0]].dtype)
        noise.mul_(state.active.view(-1, 1))  # clients that sat out the step: zero noise, no change
        offset = 0
        for k, n in zip(weights, sizes):
            y = noise[:, offset : offset + n].view(params[k].shape)
            offset += n
            bound = y.abs() if self.proxy == "grad" else y.abs().mul_(state.lr)
            # |P| laid out like the noise (row-major within a client): the stacked trainer's conv and
            # linear gradients are channels-last / transposed, and mixed layouts make every later
            # operation a strided one (about a tenth of WBC's time on a CPU)
            proxy = torch.sub(current[k], previous[k], out=torch.empty_like(params[k], memory_format=torch.contiguous_format))
            mask = proxy.abs_().le_(bound)  # 1.0 where |P| <= |Y|, else 0.0 (NaN: 0.0)
            params[k].add_(y.mul_(mask), alpha=state.lr)


@fedbench.hookimpl
def register_defenses(register):
    register(WBC)
