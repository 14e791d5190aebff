"""Trigger backdoors: the malicious clients train on minibatches part-stamped with a pixel pattern.

One family, one module. Every member shares the trigger (a bright ``size x size`` square in the
bottom-right corner, :func:`patch_mask` and :func:`stamp`), the poisoned objective (in each
minibatch, ``ceil(poison_frac * k)`` of its k real samples are stamped and relabelled to ``target``,
:func:`poison_batch`) and the success metric (the fraction of triggered test images, true label !=
target, that the global model classifies as ``target``). They differ in what the malicious clients
do around that training:

* ``backdoor`` -- Bagdasaryan, Veit, Hua, Estrin and Shmatikov, "How To Backdoor Federated
  Learning", AISTATS 2020 (arXiv:1807.00459): the pixel-pattern backdoor, the trained update
  multiplied by an explicit factor ``boost``.
* ``scaling`` -- the same paper's model replacement (its eq. 3): the update scaled by gamma, by
  default exactly the factor that makes FedAvg's new global model the attacker's backdoored model.
* ``dba`` -- Xie, Huang, Chen and Li, "DBA: Distributed Backdoor Attacks against Federated
  Learning", ICLR 2020: the trigger split into local triggers, one per malicious client.
* ``neurotoxin`` -- Zhang, Panda, Song, Yang, Mahoney, Gonzalez, Ramchandran and Mittal,
  "Neurotoxin: Durable Backdoors in Federated Learning", ICML 2022: the backdoor kept off the
  coordinates benign training changes most, so that later benign rounds do not overwrite it.

The poisoning happens inside the training objective rather than in a modified data set, so a fresh
part of every minibatch is triggered each epoch, exactly ``ceil(poison_frac * k)`` of its k real
samples, as in the papers' "poisoned samples per batch" (20 of 64 in Bagdasaryan et al.'s and
Xie et al.'s image experiments; the family's default is one half, the same for every member so that
they differ only in their mechanism).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

import fedbench
from fedbench.components import AT_LEAST_ONE, POSITIVE
from fedbench.training import cross_entropy

#: Test images (true label != target) the success rate is measured on, at most.
EVAL_IMAGES = 1000


# --------------------------------------------------------------------------------------------------
# The trigger and the poisoned minibatch
# --------------------------------------------------------------------------------------------------
def patch_mask(shape: tuple[int, ...], size: int, device=None) -> torch.Tensor:
    """A bool ``[H, W]`` mask, true on the ``size x size`` square in the bottom-right corner."""
    h, w = shape[-2], shape[-1]
    rows = torch.arange(h, device=device) >= h - size
    cols = torch.arange(w, device=device) >= w - size
    return rows[:, None] & cols[None, :]


def stamp(x: torch.Tensor, mask: torch.Tensor, value: float) -> torch.Tensor:
    """``x [..., H, W]`` with the pixels under ``mask`` (all channels) set to ``value``."""
    return torch.where(mask, torch.as_tensor(value, dtype=x.dtype, device=x.device), x)


def stripes(mask: torch.Tensor, parts: int) -> torch.Tensor:
    """The rows of a patch mask ``[H, W]`` split into ``parts`` horizontal stripes ``[parts, H, W]``
    (consecutive rows; the first stripes get one row more when the rows do not divide evenly).
    Together the stripes are exactly ``mask``."""
    rows = torch.nonzero(mask.any(1)).flatten().cpu()
    out = torch.zeros((parts, *mask.shape), dtype=torch.bool, device=mask.device)
    for i, chunk in enumerate(torch.tensor_split(rows, parts)):
        out[i, chunk] = mask[chunk]
    return out


def poisoned_count(frac: float, k: torch.Tensor) -> torch.Tensor:
    """``ceil(frac * k)`` as a tensor; the 1e-9 keeps float noise (0.1 * 30 = 3.0000000000000004)
    from adding a sample."""
    return torch.ceil(frac * k.to(torch.float64) - 1e-9)


def poison_batch(x, y, w, *, frac: float, mask: torch.Tensor, value: float, target: int):
    """The minibatch with its first ``ceil(frac * k)`` real samples stamped under ``mask`` and
    relabelled ``target``. ``mask`` is ``[H, W]`` or per sample (``[b, 1.., H, W]``).

    Only tensor ops, so it runs under ``torch.func.vmap``: the real samples occupy the first k slots
    (``w > 0``), padding never gets poisoned."""
    k = (w > 0).sum()
    slots = torch.arange(y.shape[0], device=y.device)
    poison = slots < poisoned_count(frac, k)
    rows = poison.view(-1, *([1] * (x.dim() - 1)))
    x = torch.where(rows, stamp(x, mask.to(x.device), value), x)
    y = torch.where(poison, torch.full_like(y, target), y)
    return x, y


# --------------------------------------------------------------------------------------------------
# What every member shares
# --------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class TriggerBackdoor(fedbench.Attack):
    """Base of the trigger backdoors (not an attack by itself): trigger, poisoned objective, success.

    ``setup`` fixes the trigger's value (the brightest training pixel, so the patch stands out in any
    channel) and the evaluation images: up to ``EVAL_IMAGES`` test images whose label is not the
    target, drawn from the cell's attack stream. They stay in the benign test set too."""

    target: int = fedbench.param(0, "the backdoor's target label", check=fedbench.Range(lo=0))
    poison_frac: float = fedbench.param(
        0.5, "fraction of each minibatch that is triggered and relabelled", check=fedbench.Range(lo=0, lo_open=True, hi=1)
    )
    size: int = fedbench.param(3, "side of the square trigger patch in the bottom-right corner (pixels)", check=fedbench.Range(lo=1))
    epochs: int = fedbench.param(0, "local epochs of the malicious clients; 0 = the scenario's", check=fedbench.Range(lo=0))

    def setup(self, env: fedbench.AttackEnv) -> None:
        if self.target >= env.num_classes:
            raise fedbench.FedbenchError(
                f"{self.name}: target={self.target} is not a label of this dataset (labels 0..{env.num_classes - 1})"
            )
        h, w = env.train_x.shape[-2:]
        if self.size > min(h, w):
            raise fedbench.FedbenchError(f"{self.name}: size={self.size} is larger than the {h}x{w} images")
        self.value = float(env.train_x.max())
        self.mask = patch_mask(env.train_x.shape, self.size, env.device)
        candidates = torch.nonzero(env.test_y != self.target).flatten()
        if len(candidates) == 0:
            raise fedbench.FedbenchError(f"{self.name}: every test image has the target label {self.target}")
        chosen = candidates[torch.randperm(len(candidates), generator=env.generator)[:EVAL_IMAGES]]
        self.eval_index = torch.sort(chosen).values
        self.eval_x = env.test_x[self.eval_index].to(env.device)
        self.eval_y = env.test_y[self.eval_index].to(env.device)
        self.eval_triggered = stamp(self.eval_x, self.mask, self.value)
        return None

    def objective(self, forward, x, y, w):
        """Cross-entropy on the minibatch with its first ``ceil(poison_frac * k)`` real samples
        triggered and relabelled (:func:`poison_batch`)."""
        x, y = poison_batch(x, y, w, frac=self.poison_frac, mask=self.mask, value=self.value, target=self.target)
        return cross_entropy(forward, x, y, w)

    def train_poisoned(self, rnd: fedbench.MaliciousRound, data=None, hooks=()) -> torch.Tensor:
        """The malicious clients' updates after local training on poisoned minibatches of ``data``
        (their own data by default), ``[len(rnd.client_ids), P]``; ``hooks`` run after every step."""
        extra = {"hooks": list(hooks)} if hooks else {}
        return rnd.train(rnd.client_data if data is None else data, objective=self.objective, epochs=self.epochs or None, **extra)

    def success(self, forward, triggered: torch.Tensor) -> float:
        """Fraction of the triggered evaluation images classified as the target."""
        return float((forward(triggered).argmax(1) == self.target).float().mean())

    def metrics(self, forward) -> dict[str, float]:
        success = self.success(forward, self.eval_triggered)
        clean = forward(self.eval_x).argmax(1)
        return {"success": success, "clean_accuracy": float((clean == self.eval_y).float().mean())}


# --------------------------------------------------------------------------------------------------
# backdoor
# --------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class Backdoor(TriggerBackdoor):
    """Trigger-patch backdoor (Bagdasaryan et al. 2020): poisoned minibatches relabelled to a target class.

    Malicious clients train on their own data where, in each minibatch, ``ceil(poison_frac * k)``
    of the k samples carry a bright ``size x size`` patch in the bottom-right corner and the label
    ``target``; the update is then multiplied by ``boost``. Success is the fraction of triggered
    test images (true label != target) the global model classifies as ``target``.
    """

    name: ClassVar[str] = "backdoor"

    boost: float = fedbench.param(1.0, "factor the malicious updates are multiplied by (model replacement)", check=POSITIVE)

    def malicious_updates(self, rnd: fedbench.MaliciousRound) -> torch.Tensor:
        return self.train_poisoned(rnd) * self.boost


# --------------------------------------------------------------------------------------------------
# scaling: model replacement
# --------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class Scaling(TriggerBackdoor):
    """Model replacement (Bagdasaryan et al. 2020): the backdoored update scaled so FedAvg's new global model is the attacker's.

    Each malicious client trains a backdoored model X on poisoned minibatches (as ``backdoor``) and
    submits, in model terms, L = gamma (X - G) + G (paper eq. 3), i.e. the update gamma (X - G).
    The paper's server adds (eta / n) sum_i (L_i - G), so gamma = n / eta replaces G by X when the
    benign updates are about zero. fedbench's server adds the weighted mean sum_i (w_i / W) u_i
    (eta = 1, weights = sample counts, W their sum over the round), so the replacement factor is

        gamma = W / W_mal,   W_mal = the malicious clients' total weight in the round,

    the same for every malicious client. Under FedAvg, with benign updates 0, the new global model
    is then G + sum_j (w_j / W_mal) (X_j - G): the sample-weighted mean of the malicious models, X
    itself for one attacker (equal weights: gamma = n / m, n clients of which m malicious -- the
    paper's n / eta for m = 1). Several malicious clients thus split the replacement in proportion
    to their weights rather than each replacing the whole model. The attacker is assumed to know the
    round's weights, as the paper assumes it knows n and eta; ``gamma`` set explicitly is what
    BackFed (``scale_factor``) and FLPoison (``scaling_factor``, 50 = their n / eta) do, since an
    attacker may not know n. FLPoison also adds an anomaly-evasion term to the loss (the paper's
    "constrain-and-scale"), which is not part of this attack.
    """

    name: ClassVar[str] = "scaling"

    gamma: float | None = fedbench.param(
        None, "scaling of the trained update; auto = the replacement factor W / W_mal (paper: n / eta)", check=POSITIVE
    )

    def replacement_factor(self, rnd: fedbench.MaliciousRound) -> float:
        """``W / W_mal`` from the round's aggregation weights (malicious rows first)."""
        weights = getattr(rnd, "weights", None)
        if weights is None:
            raise fedbench.FedbenchError(
                "scaling: gamma=auto needs the round's aggregation weights (MaliciousRound.weights); "
                "set gamma explicitly (e.g. scaling:gamma=2)"
            )
        weights = weights.to(torch.float64)
        return float(weights.sum() / weights[: len(rnd.client_ids)].sum())

    def malicious_updates(self, rnd: fedbench.MaliciousRound) -> torch.Tensor:
        gamma = self.gamma if self.gamma is not None else self.replacement_factor(rnd)
        return self.train_poisoned(rnd) * gamma


# --------------------------------------------------------------------------------------------------
# dba: distributed backdoor attack
# --------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class DBA(Backdoor):
    """Distributed backdoor attack (Xie et al. 2020): each malicious client trains one stripe of the trigger; success uses the whole trigger.

    The global trigger (the ``size x size`` square) is split into ``parts`` local triggers,
    horizontal stripes of consecutive rows (:func:`stripes`); malicious client i (client ids
    0..M-1) stamps only stripe ``i mod parts`` on its poisoned samples. The update is multiplied by
    ``boost`` as in ``backdoor``. Success is measured with the full trigger (the union of the
    stripes); ``success_part<j>`` is the success with stripe j alone, which the paper reports to
    be lower than the global trigger's.

    Defaults from the paper's MNIST setting: 4 local triggers of 1 x 4 pixels (``size=4``,
    ``parts=4``). There the four bars sit in the top-left corner with gaps between them (gap 2,
    shift 0 for MNIST); here they are adjacent rows of the family's bottom-right patch, so ``dba``
    and ``backdoor`` stamp the same global trigger. BackFed uses 4 one-row bars of 4 pixels from
    (1, 1) for MNIST; FLPoison uses 1 x 4 bars with gap 2 and a scale factor of 100.

    On digits the full trigger beats every stripe once the model has learnt the task (attacks from
    about round 10 on); against the barely trained model of the first rounds a single stripe can
    do better.

    One objective serves all clients of a round (the stacked trainer trains them together), so a
    client's stripe travels with its labels: it trains on ``y + num_classes * stripe`` and the
    objective decodes both.
    """

    name: ClassVar[str] = "dba"

    size: int = fedbench.param(4, "side of the square global trigger in the bottom-right corner (pixels)", check=fedbench.Range(lo=1))
    parts: int = fedbench.param(4, "local triggers the global trigger is split into (horizontal stripes)", check=AT_LEAST_ONE)

    def setup(self, env: fedbench.AttackEnv) -> None:
        if self.parts > self.size:
            raise fedbench.FedbenchError(
                f"dba: parts={self.parts} stripes need a trigger of at least {self.parts} rows, size={self.size}"
            )
        super().setup(env)
        self.num_classes = env.num_classes
        self.part_masks = stripes(self.mask, self.parts)
        self.eval_parts = [stamp(self.eval_x, m, self.value) for m in self.part_masks]
        return None

    def objective(self, forward, x, y, w):
        """The poisoned objective with each sample's own stripe: labels arrive as ``y + K * stripe``."""
        part = torch.div(y, self.num_classes, rounding_mode="floor")
        y = y - part * self.num_classes
        masks = self.part_masks.to(x.device)[part]  # [b, H, W]
        masks = masks.view(masks.shape[0], *([1] * (x.dim() - 3)), *masks.shape[1:])
        x, y = poison_batch(x, y, w, frac=self.poison_frac, mask=masks, value=self.value, target=self.target)
        return cross_entropy(forward, x, y, w)

    def malicious_updates(self, rnd: fedbench.MaliciousRound) -> torch.Tensor:
        data = [(x, y + self.num_classes * (c % self.parts)) for (x, y), c in zip(rnd.client_data, rnd.client_ids)]
        return self.train_poisoned(rnd, data) * self.boost

    def metrics(self, forward) -> dict[str, float]:
        out = super().metrics(forward)
        for j, triggered in enumerate(self.eval_parts):
            out[f"success_part{j}"] = self.success(forward, triggered)
        return out


# --------------------------------------------------------------------------------------------------
# neurotoxin
# --------------------------------------------------------------------------------------------------
class CoordinateProjection:
    """A per-step hook for ``MaliciousRound.train``: after every SGD step, the coordinates outside
    ``keep`` go back to their values in ``start`` (the global model).

    That is projected gradient descent onto the coordinates in ``keep``: SGD (with or without
    momentum) acts coordinate by coordinate, so the kept coordinates follow exactly the path they
    would with every gradient masked, and the others never move -- the update is exactly zero there."""

    per_step = True

    def __init__(self, keep: torch.Tensor, start: torch.Tensor):
        self.keep, self.start = keep, start

    def after_step(self, state) -> None:
        offset = 0
        for p in state.params:  # [C, *shape], in the flat vector's order
            n = p[0].numel()
            keep = self.keep[offset : offset + n].view(p.shape[1:])
            start = self.start[offset : offset + n].view(p.shape[1:])
            p.copy_(torch.where(keep, p, start))
            offset += n

    def on_update(self, updates: torch.Tensor, keys) -> torch.Tensor:
        return updates


@dataclass(kw_only=True)
class Neurotoxin(Backdoor):
    """Neurotoxin (Zhang et al. 2022): the backdoor kept off the coordinates benign training changes most, for durability.

    The malicious clients train as in ``backdoor`` (poisoned minibatches, the update times
    ``boost``), but by projected gradient descent as in the paper: after every local step the
    top-``ratio`` coordinates by |benign change| are put back to the global model's values
    (:class:`CoordinateProjection`), so the update is exactly zero there. All malicious clients of
    a round share the mask. (Masking only the finished update would be cheaper but weaker: the
    other coordinates would be trained for a model whose masked coordinates moved too, and what the
    backdoor put there would be lost: on digits with attacks in rounds 10-13, seed 0, success 0.49
    instead of 0.60 after the second attack, 0.27 instead of 0.30 on average over rounds 14-30.)

    *Benign change* (``estimate``). The paper approximates the benign clients' next update by the
    last global update the attacker downloads (``update``). A fedbench attacker sees the global
    model only in its own adversarial rounds, so the estimate is G_now - G_seen, the change since
    the global model of its previous adversarial round; that change includes the aggregate of that
    round, its own update in it, so consecutive attacks tend to mask what the previous one built.
    In its first adversarial round there is no G_seen, and the estimate is the gradient of the
    cross-entropy on the malicious clients' own clean data at G_now (``gradient``) -- what the
    authors' code, BackFed and FLPoison use in every round.

    The paper's baseline also projects onto an L2 ball around the global model (against
    norm-clipping defenses); that is not part of this attack.

    *ratio* is the masked fraction k (top-k%): 0.05 as in the authors' README commands for the CV
    tasks (``gradmask_ratio 0.95``, the retained fraction; their CIFAR-10 scripts also use 0.99 and
    0.97). BackFed's default retains 0.99 (ratio 0.01); FLPoison's ``topk_ratio 0.1`` retains only
    10% (the smallest signed gradients). One mask over the whole model, not per layer (the authors'
    ``aggregate_all_layer 1``).
    """

    name: ClassVar[str] = "neurotoxin"

    ratio: float = fedbench.param(
        0.05,
        "fraction of coordinates left alone: those benign training changes most (top-k%)",
        check=fedbench.Range(lo=0, hi=1, hi_open=True),
    )
    estimate: str = fedbench.param(
        "update",
        "benign change to mask: update = global model's change since the previous attack (paper), "
        "gradient = clean-data gradient (authors' code)",
        choices=("update", "gradient"),
    )

    def setup(self, env: fedbench.AttackEnv) -> None:
        super().setup(env)
        #: the global model of the previous adversarial round
        self.seen: torch.Tensor | None = None
        return None

    def benign_change(self, rnd: fedbench.MaliciousRound) -> torch.Tensor:
        """The estimate of what benign training changes, ``[P]`` (see the class docstring)."""
        if self.seen is not None and self.estimate == "update":
            return rnd.global_params - self.seen
        flat = rnd.global_params.detach().clone().requires_grad_(True)
        x = torch.cat([x for x, _ in rnd.client_data])
        y = torch.cat([y for _, y in rnd.client_data])
        with torch.enable_grad():
            loss = F.cross_entropy(rnd.forward(flat, x), y)
            (grad,) = torch.autograd.grad(loss, flat)
        return grad

    def keep_mask(self, rnd: fedbench.MaliciousRound) -> torch.Tensor:
        """Bool ``[P]``: false on the ``int(ratio * P)`` coordinates of largest |benign change|."""
        change = self.benign_change(rnd).detach().abs()
        keep = torch.ones_like(change, dtype=torch.bool)
        keep[torch.topk(change, int(self.ratio * change.numel())).indices] = False
        return keep

    def malicious_updates(self, rnd: fedbench.MaliciousRound) -> torch.Tensor:
        keep = self.keep_mask(rnd)
        self.seen = rnd.global_params.detach().clone()
        return self.train_poisoned(rnd, hooks=[CoordinateProjection(keep, rnd.global_params)]) * self.boost


@fedbench.hookimpl
def register_attacks(register):
    for cls in (Backdoor, Scaling, DBA, Neurotoxin):
        register(cls)
