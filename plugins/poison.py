"""Targeted model poisoning (Bhagoji et al., ICML 2019), the attack of the FL-WBC paper.

The malicious clients share a small malicious set D_m of ``images`` images with adversarial labels
(reference section 2). As in the authors' code, D_m is drawn from the test split -- distinct images
here, and then withheld from benign evaluation, so no client trains on them and benign accuracy does
not count them -- and each target label is uniform over the wrong classes (the cell's ``attack``
stream, so every defense faces the same D_m).

Objective (paper eq. 3): ``lam * L(D_m) + (1 - lam) * L(own data)``. With ``lam = 1`` (the authors'
code, default) a malicious client trains ``epochs`` epochs over D_m only (one image, batch 32 or 10:
10 SGD steps); with ``lam < 1`` it trains ``epochs`` epochs over its own data with the malicious term
added to every minibatch's loss. ``boost`` scales the finished update explicitly (Bhagoji et al.'s
boosting); the authors' code boosts only implicitly, by counting the attacker 5 times.

All malicious clients start from the same global model with the same D_m, so with ``lam = 1`` they
submit (near-)identical updates: 5 identical copies out of 10 inputs, which is what defeats CMA/CTMA.

Adaptive attack (``adaptive=true``; paper appendix B, eq. 14, against FL-WBC): the attacker pushes
its effect on the parameters (AEP) into the near-null space of the benign clients' Hessian, where
benign training -- and FL-WBC's perturbation -- do not reach it... or so the paper argues FL-WBC
still does. Our reference does not give eq. 14, so fedbench states its own form of that
regulariser: with ``d = W - W_global`` the malicious client's displacement (with ``lam = 1`` its
update is all attack, so ``d`` stands in for the AEP) and ``L_b`` the mean cross-entropy on a probe
of the adversary's benign data (``PROBE`` samples of its clients' partitions together, drawn from the
round's attack stream; one probe for all its clients, which collude),

    R(W) = L_b(W) - L_b(W_global) - grad L_b(W_global) . d  ~=  d' H_b d / 2,

the second-order part of the benign loss along ``d``. After every optimizer step the client also
descends ``rho * R``: ``W <- W - lr * rho * (grad L_b(W) - grad L_b(W_global))``, i.e. about
``- lr * rho * H_b d``, which shrinks ``d`` along the benign Hessian's large-curvature directions
and leaves its near-null space alone. It costs one forward/backward pass on the probe per local step.
``rho = 0`` is the plain attack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F

import fedbench
from fedbench.components import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, UNIT

PROBE = 128  # benign samples of its own data an adaptive attacker measures its Hessian on


@dataclass(kw_only=True)
class Poison(fedbench.Attack):
    """Targeted model poisoning (Bhagoji et al. 2019): make the global model misclassify a few chosen images."""

    name: ClassVar[str] = "poison"
    images: int = fedbench.param(1, "size of the shared malicious set D_m (1 or 10 in the paper)", check=AT_LEAST_ONE)
    lam: float = fedbench.param(1.0, "weight of the malicious objective, paper eq. 3 (1 = malicious data only)", check=UNIT)
    epochs: int = fedbench.param(10, "local epochs of malicious training", check=AT_LEAST_ONE)
    boost: float = fedbench.param(1.0, "explicit scaling of the malicious update", check=POSITIVE)
    adaptive: bool = fedbench.param(False, "adaptive attack against FL-WBC (paper eq. 14): keep the AEP in the benign Hessian's near-null space")
    rho: float = fedbench.param(1.0, "weight of the adaptive attack's null-space regulariser", check=NON_NEGATIVE)

    def setup(self, env: fedbench.AttackEnv) -> torch.Tensor:
        n_test = len(env.test_y)
        if self.images > n_test:
            raise fedbench.FedbenchError(f"poison: images={self.images} but the test split has only {n_test} images")
        taken = torch.randperm(n_test, generator=env.generator)[: self.images]
        shift = torch.randint(1, env.num_classes, (self.images,), generator=env.generator)
        self.true_labels = env.test_y[taken].clone()
        self.targets = ((self.true_labels + shift) % env.num_classes).to(env.device)
        self.images_x = env.test_x[taken].to(env.device)
        return taken

    def malicious_updates(self, rnd: fedbench.MaliciousRound) -> torch.Tensor:
        n = len(rnd.client_ids)
        extra = {"hooks": (NullSpaceRegulariser.for_round(rnd, self.rho),)} if self.adaptive and self.rho > 0 else {}
        if self.lam == 1.0:
            updates = rnd.train([(self.images_x, self.targets)] * n, epochs=self.epochs, **extra)
        else:
            updates = rnd.train(rnd.client_data, epochs=self.epochs, objective=self._objective, **extra)
        return updates * self.boost

    def _objective(self, forward, x, y, w):
        """Paper eq. 3: the malicious loss on D_m mixed with the client's benign minibatch loss."""
        malicious = F.cross_entropy(forward(self.images_x), self.targets)
        benign = (F.cross_entropy(forward(x), y, reduction="none") * w).sum()
        return self.lam * malicious + (1.0 - self.lam) * benign

    def metrics(self, forward) -> dict[str, float]:
        probs = torch.softmax(forward(self.images_x), dim=1)
        confidence = probs.gather(1, self.targets.view(-1, 1)).mean()
        accuracy = (probs.argmax(1) == self.targets).float().mean()
        return {"success": float(confidence), "confidence": float(confidence), "misclassification": float(accuracy)}

    def mitigated(self, metrics, benign_error: float) -> bool:
        """Reference section 5: confidence below 50%, or misclassification accuracy below the benign error rate."""
        return metrics["confidence"] < 0.5 or metrics["misclassification"] < benign_error


class NullSpaceRegulariser:
    """The adaptive attack's extra step after each optimizer step (see the module docstring): descend
    ``rho * R`` with ``grad R(W) = grad L_b(W) - grad L_b(W_global)``, on one probe of benign data.

    One probe for every client: a trainer may hand the clients over in chunks, or one at a time, so a
    row of ``StepState`` does not say which client it is."""

    per_step = True

    def __init__(self, forward: Callable, global_params: torch.Tensor, probe_x, probe_y, rho: float) -> None:
        self.forward, self.rho, self.x, self.y = forward, rho, probe_x, probe_y
        self.anchor = self._grad(global_params)  # grad L_b(W_global)

    @classmethod
    def for_round(cls, rnd: fedbench.MaliciousRound, rho: float) -> "NullSpaceRegulariser":
        x = torch.cat([x for x, _ in rnd.client_data])
        y = torch.cat([y for _, y in rnd.client_data])
        take = torch.randperm(len(y), generator=rnd.generator)[:PROBE].to(y.device)
        return cls(rnd.forward, rnd.global_params, x[take], y[take], rho)

    def _grad(self, flat: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            w = flat.detach().clone().requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(self.forward(w, self.x), self.y), w)
        return g

    def after_step(self, state: fedbench.StepState) -> None:
        sizes = [p[0].numel() for p in state.params]
        for c, on in enumerate(state.active.tolist()):
            if not on:
                continue
            flat = torch.cat([p[c].reshape(-1) for p in state.params])
            step = (self._grad(flat) - self.anchor) * (-state.lr * self.rho)
            for p, part in zip(state.params, torch.split(step, sizes)):
                p[c].add_(part.view_as(p[c]))

    def on_update(self, updates: torch.Tensor, keys) -> torch.Tensor:
        return updates


@fedbench.hookimpl
def register_attacks(register):
    register(Poison)
