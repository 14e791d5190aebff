"""Untargeted Byzantine attacks that need no view of the benign clients: sign flipping, Gaussian
noise and label flipping.

All three only want the global model to be worse (``untargeted = True``): the engine records the
benign error as their success every round, and an attack round counts as mitigated once the benign
accuracy is back within two points of the round before it (:class:`fedbench.Attack`).

Updates are model deltas W_i - G of local training from the global model G, one row per malicious
client, with the same dtype and device as the global parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

import fedbench
from fedbench.components import POSITIVE


@dataclass(kw_only=True)
class SignFlip(fedbench.Attack):
    """Sign flipping (Damaskinos et al. 2018): upload the honest update negated and scaled by ``scale``.

    Definition: each malicious client trains honestly on its own data (``rnd.train``, the benign
    local training) and uploads ``-scale * update``; ``scale = 1`` is the plain negation, FLPoison's
    ``SignFlipping``. Elsewhere: Blades negates every local *gradient* during training (gradient
    ascent, which differs from the negated update after more than one local step); ByzFL's
    ``SignFlipping`` uploads the negated mean of the honest vectors (an omniscient variant).
    """

    name: ClassVar[str] = "signflip"
    untargeted: ClassVar[bool] = True
    scale: float = fedbench.param(1.0, "factor on the negated honest update (1 = plain sign flip)", check=POSITIVE)

    def malicious_updates(self, rnd: fedbench.MaliciousRound) -> torch.Tensor:
        return -self.scale * rnd.train(rnd.client_data)


@dataclass(kw_only=True)
class Gaussian(fedbench.Attack):
    """Gaussian Byzantine workers (Blanchard et al. 2017): upload N(0, sigma^2) noise vectors, sigma = 200.

    Definition: every malicious client uploads a vector of i.i.d. N(0, sigma^2) coordinates, drawn
    from the round's attack stream (``rnd.generator``), so the noise is the same whatever the
    defense. ``sigma = 200`` is Blanchard et al.'s experiment (isotropic covariance, standard
    deviation 200), where it was applied to gradients; FLPoison's ``Gaussian`` draws N(0, 1) and
    Blades' ``NoiseAdversary`` N(0.1, 0.1^2). Against an undefended server
    the paper's sigma destroys the model in one round: that is the attack's point.
    """

    name: ClassVar[str] = "gaussian"
    untargeted: ClassVar[bool] = True
    sigma: float = fedbench.param(200.0, "standard deviation of every coordinate (Blanchard et al.: 200)", check=POSITIVE)

    def malicious_updates(self, rnd: fedbench.MaliciousRound) -> torch.Tensor:
        g, flat = rnd.generator, rnd.global_params
        noise = torch.randn((len(rnd.client_ids), flat.numel()), generator=g, device=g.device, dtype=flat.dtype)
        return (self.sigma * noise).to(flat.device)


@dataclass(kw_only=True)
class LabelFlip(fedbench.Attack):
    """Label flipping (as in Fang et al. 2020): malicious clients train on their own data with label l -> C-1-l.

    Definition: data poisoning only. Each malicious client runs the benign local training
    (``rnd.train``) on its own images with every label l replaced by C - 1 - l, C the dataset's
    number of classes (Fang et al.'s label-flipping baseline; Blades' ``LabelFlipAdversary`` does the
    same). FLPoison's ``LabelFlipping`` defaults instead to a targeted flip of one source
    label to one target label (2 -> 7).
    """

    name: ClassVar[str] = "labelflip"
    untargeted: ClassVar[bool] = True

    def setup(self, env: fedbench.AttackEnv) -> None:
        self.num_classes = env.num_classes
        return None

    def malicious_updates(self, rnd: fedbench.MaliciousRound) -> torch.Tensor:
        flipped = [(x, self.num_classes - 1 - y) for x, y in rnd.client_data]
        return rnd.train(flipped)


@fedbench.hookimpl
def register_attacks(register):
    register(SignFlip)
    register(Gaussian)
    register(LabelFlip)
