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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

import fedbench
from fedbench.components import AT_LEAST_ONE, POSITIVE, UNIT


@dataclass(kw_only=True)
class Poison(fedbench.Attack):
    """Targeted model poisoning (Bhagoji et al. 2019): make the global model misclassify a few chosen images."""

    name: ClassVar[str] = "poison"
    images: int = fedbench.param(1, "size of the shared malicious set D_m (1 or 10 in the paper)", check=AT_LEAST_ONE)
    lam: float = fedbench.param(1.0, "weight of the malicious objective, paper eq. 3 (1 = malicious data only)", check=UNIT)
    epochs: int = fedbench.param(10, "local epochs of malicious training", check=AT_LEAST_ONE)
    boost: float = fedbench.param(1.0, "explicit scaling of the malicious update", check=POSITIVE)

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
        if self.lam == 1.0:
            updates = rnd.train([(self.images_x, self.targets)] * n, epochs=self.epochs)
        else:
            updates = rnd.train(rnd.client_data, epochs=self.epochs, objective=self._objective)
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


@fedbench.hookimpl
def register_attacks(register):
    register(Poison)
