"""Trigger-patch backdoor: the malicious clients train on minibatches part-stamped with a pixel pattern.

Bagdasaryan, Veit, Hua, Estrin and Shmatikov, "How To Backdoor Federated Learning", AISTATS 2020
(arXiv:1807.00459). Their pixel-pattern backdoor mixes, in every minibatch of a malicious client, a
number of images carrying a fixed pattern and relabelled to the attacker's target class with clean
images (so the model keeps its main-task accuracy and the update looks ordinary), then scales the
update up ("model replacement") so it survives averaging. Here the pattern is a bright square in the
bottom-right corner and the scaling is the explicit factor ``boost``.

The poisoning happens inside the training objective rather than in a modified data set, so a fresh
part of every minibatch is triggered each epoch, exactly ``ceil(poison_frac * k)`` of its k real
samples, as in the paper's "poisoned samples per batch".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

import fedbench
from fedbench.training import cross_entropy

#: Test images (true label != target) the success rate is measured on, at most.
EVAL_IMAGES = 1000


def patch_mask(shape: tuple[int, ...], size: int, device=None) -> torch.Tensor:
    """A bool ``[H, W]`` mask, true on the ``size x size`` square in the bottom-right corner."""
    h, w = shape[-2], shape[-1]
    rows = torch.arange(h, device=device) >= h - size
    cols = torch.arange(w, device=device) >= w - size
    return rows[:, None] & cols[None, :]


def stamp(x: torch.Tensor, mask: torch.Tensor, value: float) -> torch.Tensor:
    """``x [..., H, W]`` with the pixels under ``mask`` (all channels) set to ``value``."""
    return torch.where(mask, torch.as_tensor(value, dtype=x.dtype, device=x.device), x)


def poisoned_count(frac: float, k: torch.Tensor) -> torch.Tensor:
    """``ceil(frac * k)`` as a tensor; the 1e-9 keeps float noise (0.1 * 30 = 3.0000000000000004)
    from adding a sample."""
    return torch.ceil(frac * k.to(torch.float64) - 1e-9)


@dataclass(kw_only=True)
class Backdoor(fedbench.Attack):
    """Trigger-patch backdoor (Bagdasaryan et al. 2020): poisoned minibatches relabelled to a target class.

    Malicious clients train on their own data where, in each minibatch, ``ceil(poison_frac * k)``
    of the k samples carry a bright ``size x size`` patch in the bottom-right corner and the label
    ``target``; the update is then multiplied by ``boost``. Success is the fraction of triggered
    test images (true label != target) the global model classifies as ``target``.
    """

    name: ClassVar[str] = "backdoor"

    target: int = fedbench.param(0, "the backdoor's target label", check=fedbench.Range(lo=0))
    poison_frac: float = fedbench.param(
        0.5, "fraction of each minibatch that is triggered and relabelled", check=fedbench.Range(lo=0, lo_open=True, hi=1)
    )
    size: int = fedbench.param(3, "side of the square trigger patch in the bottom-right corner (pixels)", check=fedbench.Range(lo=1))
    boost: float = fedbench.param(1.0, "factor the malicious updates are multiplied by (model replacement)", check=fedbench.Range(lo=0, lo_open=True))
    epochs: int = fedbench.param(0, "local epochs of the malicious clients; 0 = the scenario's", check=fedbench.Range(lo=0))

    # ------------------------------------------------------------------------------------------
    def setup(self, env: fedbench.AttackEnv) -> None:
        if self.target >= env.num_classes:
            raise fedbench.FedbenchError(
                f"backdoor: target={self.target} is not a label of this dataset (labels 0..{env.num_classes - 1})"
            )
        h, w = env.train_x.shape[-2:]
        if self.size > min(h, w):
            raise fedbench.FedbenchError(f"backdoor: size={self.size} is larger than the {h}x{w} images")
        #: The brightest value of the (normalised) training images: the patch stands out in any channel.
        self.value = float(env.train_x.max())
        self.mask = patch_mask(env.train_x.shape, self.size, env.device)
        candidates = torch.nonzero(env.test_y != self.target).flatten()
        if len(candidates) == 0:
            raise fedbench.FedbenchError(f"backdoor: every test image has the target label {self.target}")
        chosen = candidates[torch.randperm(len(candidates), generator=env.generator)[:EVAL_IMAGES]]
        self.eval_index = torch.sort(chosen).values
        self.eval_x = env.test_x[self.eval_index].to(env.device)
        self.eval_y = env.test_y[self.eval_index].to(env.device)
        self.eval_triggered = stamp(self.eval_x, self.mask, self.value)
        return None  # the evaluation images stay in the benign test set too

    def objective(self, forward, x, y, w):
        """Cross-entropy on the minibatch with its first ``ceil(poison_frac * k)`` real samples
        triggered and relabelled. Only tensor ops, so it runs under ``torch.func.vmap``: the real
        samples occupy the first k slots (``w > 0``), padding never gets poisoned."""
        k = (w > 0).sum()
        slots = torch.arange(y.shape[0], device=y.device)
        poison = slots < poisoned_count(self.poison_frac, k)
        rows = poison.view(-1, *([1] * (x.dim() - 1)))
        x = torch.where(rows, stamp(x, self.mask.to(x.device), self.value), x)
        y = torch.where(poison, torch.full_like(y, self.target), y)
        return cross_entropy(forward, x, y, w)

    def malicious_updates(self, rnd: fedbench.MaliciousRound) -> torch.Tensor:
        updates = rnd.train(rnd.client_data, objective=self.objective, epochs=self.epochs or None)
        return updates * self.boost

    def metrics(self, forward) -> dict[str, float]:
        triggered = forward(self.eval_triggered).argmax(1)
        clean = forward(self.eval_x).argmax(1)
        return {
            "success": float((triggered == self.target).float().mean()),
            "clean_accuracy": float((clean == self.eval_y).float().mean()),
        }


@fedbench.hookimpl
def register_attacks(register):
    register(Backdoor)
