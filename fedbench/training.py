"""Local training: clients run SGD from the global model and return their updates.

A model is handled as a function of one flat parameter vector (:class:`FlatModel`), so client
updates are rows of a ``[n_clients, P]`` tensor from the start.

Two trainers produce the same updates (up to float rounding):

* :class:`LoopTrainer` trains one client after another; it is the readable reference.
* :class:`StackedTrainer` trains the clients of a round together with ``torch.func.vmap`` over
  stacked parameters, padding clients with fewer samples and masking the padding out of the loss.

Randomness: each client has its own batch-order generator and its own defense-noise generator
(:mod:`fedbench.rng`), so results do not depend on the order or grouping of clients.

SGD matches ``torch.optim.SGD``: ``buf = momentum * buf + g`` (``buf = g`` at the first step),
``W <- W - lr * buf``. Client defenses run after the optimizer step (``ClientDefense.after_step``)
and on the finished update (``ClientDefense.on_update``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from fedbench.components import ClientDefense, StepState

#: ``objective(forward, x, y, w) -> scalar loss``: ``forward(x) -> logits`` under the current
#: parameters, ``w`` per-sample weights (1/k on the k real samples of the minibatch, 0 on padding).
Objective = Callable[..., torch.Tensor]


def cross_entropy(forward, x, y, w):
    """The benign objective: the minibatch mean of the cross-entropy, written as a weighted sum."""
    return (F.cross_entropy(forward(x), y, reduction="none") * w).sum()


class FlatModel:
    """A ``nn.Module`` used as a pure function of a flat parameter vector ``[P]``."""

    def __init__(self, module: nn.Module):
        self.module = module
        named = list(module.named_parameters())
        self.names = [n for n, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        #: conv and linear weight tensors (FL-WBC perturbs these, never biases)
        self.is_weight = [n.endswith("weight") and p.dim() >= 2 for n, p in named]
        self.num_params = sum(self.sizes)

    def flatten(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.module.parameters()])

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of ``flat [..., P]`` as the parameter tensors ``[..., *shape]``."""
        lead = flat.shape[:-1]
        return [t.view(*lead, *s) for t, s in zip(torch.split(flat, self.sizes, dim=-1), self.shapes)]

    def join(self, tensors: Sequence[torch.Tensor], lead: int = 0) -> torch.Tensor:
        return torch.cat([t.reshape(*t.shape[:lead], -1) for t in tensors], dim=-1)

    def call(self, params: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.module, dict(zip(self.names, params)), (x,))

    def forward(self, flat: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        params = self.split(flat)
        return lambda x: self.call(params, x)


@dataclass(frozen=True)
class LocalSetup:
    """Hyper-parameters of one client's local training."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.0


@dataclass
class ClientJob:
    """One client's local training task."""

    x: torch.Tensor
    y: torch.Tensor
    batch_gen: torch.Generator
    defense_gen: torch.Generator | None = None


def _batch_plan(job: ClientJob, setup: LocalSetup) -> list[list[torch.Tensor]]:
    """Per epoch, the index slices of each minibatch (a fresh permutation every epoch)."""
    n = len(job.y)
    plan = []
    for _ in range(setup.epochs):
        perm = torch.randperm(n, generator=job.batch_gen)
        plan.append(list(torch.split(perm, setup.batch_size)))
    return plan


class Trainer:
    """Base of the trainers: ``train(global, jobs, ...) -> updates [len(jobs), P]``."""

    name = "?"

    def __init__(self, model: FlatModel, device: torch.device | str = "cpu"):
        self.model = model
        self.device = torch.device(device)

    def train(
        self,
        global_flat: torch.Tensor,
        jobs: list[ClientJob],
        setup: LocalSetup,
        *,
        defenses: Sequence[ClientDefense] = (),
        objective: Objective = cross_entropy,
    ) -> torch.Tensor:
        if not jobs:
            return global_flat.new_zeros((0, global_flat.numel()))
        updates = self._train(global_flat, jobs, setup, [d for d in defenses if d.per_step], objective)
        gens = [job.defense_gen for job in jobs]
        for defense in defenses:
            updates = defense.on_update(updates, gens)
        return updates

    def _train(self, global_flat, jobs, setup, step_defenses, objective) -> torch.Tensor:
        raise NotImplementedError


def _sgd_step(params, grads, bufs, setup: LocalSetup, active: torch.Tensor | None = None):
    """One SGD(+momentum) step on stacked tensors ``[C, ...]``: new params, buffers, and the step.

    A client with ``active`` false (a padded step) keeps its parameters and momentum buffer."""
    new_params, new_bufs, updates = [], [], []
    for p, g, b in zip(params, grads, bufs):
        buf = setup.momentum * b + g if (setup.momentum and b is not None) else g
        step = -setup.lr * buf
        if active is not None:
            mask = active.view(-1, *([1] * (p.dim() - 1)))
            step = torch.where(mask, step, torch.zeros_like(step))
            if b is not None:
                buf = torch.where(mask, buf, b)
        new_params.append(p + step)
        new_bufs.append(buf)
        updates.append(step)
    return new_params, new_bufs, updates


class LoopTrainer(Trainer):
    """One client after another, one minibatch after another: the reference implementation."""

    name = "loop"

    def _train(self, global_flat, jobs, setup, step_defenses, objective):
        rows = [self._train_one(global_flat, job, setup, step_defenses, objective) for job in jobs]
        return torch.stack(rows) - global_flat

    def _train_one(self, global_flat, job, setup, step_defenses, objective):
        params = [p.unsqueeze(0).clone() for p in self.model.split(global_flat)]  # [1, *shape]
        bufs: list = [None] * len(params)
        active = torch.ones(1, dtype=torch.bool, device=global_flat.device)
        for epoch, batches in enumerate(_batch_plan(job, setup)):
            prev_grads = prev_updates = None  # WBC's memory is reset every epoch (reference section 3)
            for step, idx in enumerate(batches):
                leaves = [p[0].detach().requires_grad_(True) for p in params]
                w = torch.full((len(idx),), 1.0 / len(idx), device=job.x.device)
                loss = objective(lambda x: self.model.call(leaves, x), job.x[idx], job.y[idx], w)
                grads = [g.unsqueeze(0) for g in torch.autograd.grad(loss, leaves)]
                params, bufs, updates = _sgd_step(params, grads, bufs, setup)
                if step_defenses:
                    state = StepState(
                        step=step, epoch=epoch, lr=setup.lr, params=params, grads=grads, updates=updates,
                        prev_grads=prev_grads, prev_updates=prev_updates, is_weight=self.model.is_weight,
                        generators=[job.defense_gen], active=active,
                    )
                    with torch.no_grad():
                        for defense in step_defenses:
                            defense.after_step(state)
                    prev_grads, prev_updates = grads, updates
        return self.model.join([p[0] for p in params])


class StackedTrainer(Trainer):
    """The clients of a round trained together: ``vmap`` over stacked parameters and padded batches.

    Clients with fewer samples get padded index slots whose loss weight is zero, so each client's
    gradient equals its own minibatch mean exactly; clients with fewer minibatches in an epoch sit
    out the extra steps (``active`` is false for them: no parameter, momentum or defense change).
    """

    name = "stacked"

    def __init__(self, model: FlatModel, device="cpu", chunk: int = 10):
        super().__init__(model, device)
        self.chunk = chunk

    def _train(self, global_flat, jobs, setup, step_defenses, objective):
        out = []
        for start in range(0, len(jobs), self.chunk):
            out.append(self._train_chunk(global_flat, jobs[start : start + self.chunk], setup, step_defenses, objective))
        return torch.cat(out) - global_flat

    def _train_chunk(self, global_flat, jobs, setup, step_defenses, objective):
        c = len(jobs)
        dev = global_flat.device
        plans = [_batch_plan(job, setup) for job in jobs]
        params = [p.unsqueeze(0).repeat(c, *([1] * p.dim())) for p in self.model.split(global_flat)]
        bufs: list = [None] * len(params)
        grad_fn = vmap(grad(lambda ps, x, y, w: objective(lambda inp: self.model.call(ps, inp), x, y, w)))
        n_max = max(len(job.y) for job in jobs)
        xs = torch.stack([_pad_rows(job.x, n_max) for job in jobs])  # [C, n_max, ...]
        ys = torch.stack([_pad_rows(job.y, n_max) for job in jobs])
        for epoch in range(setup.epochs):
            batches = [plan[epoch] for plan in plans]
            n_steps = max(len(b) for b in batches)
            prev_grads = prev_updates = None
            for step in range(n_steps):
                idx, w, active = _stack_batch(batches, step, setup.batch_size, dev)
                xb = torch.gather(xs, 1, idx.view(c, -1, *([1] * (xs.dim() - 2))).expand(c, idx.shape[1], *xs.shape[2:]))
                yb = torch.gather(ys, 1, idx)
                grads = list(grad_fn(params, xb, yb, w))
                params, bufs, updates = _sgd_step(params, grads, bufs, setup, active)
                if step_defenses:
                    state = StepState(
                        step=step, epoch=epoch, lr=setup.lr, params=params, grads=grads, updates=updates,
                        prev_grads=prev_grads, prev_updates=prev_updates, is_weight=self.model.is_weight,
                        generators=[job.defense_gen for job in jobs], active=active,
                    )
                    with torch.no_grad():
                        for defense in step_defenses:
                            defense.after_step(state)
                    prev_grads, prev_updates = grads, updates
        return self.model.join(params, lead=1)


def _pad_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    if len(t) == n:
        return t
    return torch.cat([t, t.new_zeros((n - len(t), *t.shape[1:]))])


def _stack_batch(batches, step, batch_size, device):
    """Index slots [C, b], loss weights [C, b] (1/len for real samples, 0 for padding), active [C]."""
    c = len(batches)
    width = max(len(b[step]) for b in batches if step < len(b))
    idx = torch.zeros((c, width), dtype=torch.int64)
    w = torch.zeros((c, width))
    active = torch.zeros(c, dtype=torch.bool)
    for i, b in enumerate(batches):
        if step < len(b):
            k = len(b[step])
            idx[i, :k] = b[step]
            w[i, :k] = 1.0 / k
            active[i] = True
    return idx.to(device), w.to(device), active.to(device)


TRAINERS = {"loop": LoopTrainer, "stacked": StackedTrainer}
