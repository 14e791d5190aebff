"""Local training: clients run SGD from the global model and return their updates.

A model is handled as a function of one flat parameter vector (:class:`FlatModel`), so client
updates are rows of a ``[n_clients, P]`` tensor from the start.

Two trainers produce the same updates (up to float rounding):

* :class:`LoopTrainer` trains one client after another; it is the readable reference.
* :class:`StackedTrainer` trains the clients of a round together with ``torch.func.vmap`` over
  stacked parameters, padding clients with fewer samples and masking the padding out of the loss.

Randomness: each client has its own batch-order generator and its own defense key, from which client
defenses draw noise with the counter-based generator of :mod:`fedbench.rng` (all clients of a batch
in one computation), so results do not depend on the order or grouping of clients.

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
#: The real samples always occupy the first k slots; an objective must use only tensor operations
#: (no Python branching on values), since the stacked trainer runs it under ``torch.func.vmap``.
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
    """One client's local training task.

    ``defense_key`` keys the client's defense noise (:func:`fedbench.rng.random_bits`): the engine
    gives ``derive_seed(seed, "defense", round, client)``; training without noise-drawing client
    defenses (an attack's own) can leave it 0."""

    x: torch.Tensor
    y: torch.Tensor
    batch_gen: torch.Generator
    defense_key: int = 0


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
        if defenses:
            keys = _keys(jobs, global_flat.device)
            for defense in defenses:
                updates = defense.on_update(updates, keys)
        return updates

    def _train(self, global_flat, jobs, setup, step_defenses, objective) -> torch.Tensor:
        raise NotImplementedError

    def train_groups(self, groups: Sequence[tuple[torch.Tensor, list[ClientJob], Sequence[ClientDefense]]],
                     setup: LocalSetup) -> list[torch.Tensor]:
        """Several cells' benign clients (:mod:`fedbench.lockstep`): each group is ``(its global
        parameters [P], its jobs, its client defenses)``; returns each group's updates. Here one
        group after another; the stacked trainer trains them all in one batch."""
        return [self.train(start, jobs, setup, defenses=defenses) for start, jobs, defenses in groups]


def _defense_key(defenses: Sequence[ClientDefense]) -> tuple:
    """Equal for equal client-defense stacks (same components, same parameters): such groups share
    one set of instances in a lockstep batch, which is why client defenses keep no state between
    calls (docs/plugins.md)."""
    return tuple((type(d), tuple(sorted(d.params().items()))) for d in defenses)


def _keys(jobs: Sequence[ClientJob], device) -> torch.Tensor:
    """The clients' defense keys ``[C]`` int64, on the device the noise is drawn on."""
    return torch.tensor([job.defense_key for job in jobs], dtype=torch.int64, device=device)


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
        defenses = _StepDefenses(step_defenses, self.model.is_weight, [job], global_flat.device)
        for epoch, batches in enumerate(_batch_plan(job, setup)):
            defenses.new_epoch()  # WBC's memory is reset every epoch (reference section 3)
            for step, idx in enumerate(batches):
                leaves = [p[0].detach().requires_grad_(True) for p in params]
                w = torch.full((len(idx),), 1.0 / len(idx), device=job.x.device)
                loss = objective(lambda x: self.model.call(leaves, x), job.x[idx], job.y[idx], w)
                grads = [g.unsqueeze(0) for g in torch.autograd.grad(loss, leaves)]
                params, bufs, updates = _sgd_step(params, grads, bufs, setup)
                defenses(step, epoch, setup.lr, params, grads, updates, active)
        return self.model.join([p[0] for p in params])


class StackedTrainer(Trainer):
    """The clients of a round trained together on stacked parameters ``[C, *shape]``.

    For the standard objective on models built from conv, linear, pooling, activation and flatten
    layers, the forward pass is batched by hand (:class:`GroupedForward`: grouped convolutions with
    the clients on the channel axis, batched matmuls for linear layers) and one backward pass gives
    every client's gradient -- the cheapest form on a CPU. Other objectives (an attack's) go through
    ``torch.func.vmap``. Clients with fewer samples get padded index slots whose loss weight is zero,
    so each client's gradient equals its own minibatch mean exactly; clients with fewer minibatches in
    an epoch sit out the extra steps (``active`` is false: no parameter, momentum or defense change).
    """

    name = "stacked"

    def __init__(self, model: FlatModel, device="cpu", chunk: int = 10):
        super().__init__(model, device)
        self.chunk = chunk
        self.grouped = GroupedForward(model)

    @staticmethod
    def supports(model: FlatModel) -> bool:
        return GroupedForward.supports(model.module)

    def _train(self, global_flat, jobs, setup, step_defenses, objective):
        starts = global_flat.expand(len(jobs), -1)
        return self._train_rows(starts, jobs, setup, [list(step_defenses)], [0] * len(jobs), objective)

    def train_groups(self, groups, setup):
        """All groups' clients in one stacked batch (in chunks of :attr:`chunk`), each client from its
        own group's global parameters, each group's per-step defenses on its own rows only."""
        groups = list(groups)
        if not groups:
            return []
        starts, jobs, which, stacks, index = [], [], [], [], {}
        for start, group_jobs, defenses in groups:
            key = _defense_key(defenses)
            if key not in index:
                index[key] = len(stacks)
                stacks.append(list(defenses))
            starts.append(start.expand(len(group_jobs), -1))
            jobs += group_jobs
            which += [index[key]] * len(group_jobs)
        if not jobs:
            return [g[0].new_zeros((0, g[0].numel())) for g in groups]
        starts_t = torch.cat(starts)
        per_step = [[d for d in stack if d.per_step] for stack in stacks]
        updates = self._train_rows(starts_t, jobs, setup, per_step, which, cross_entropy)
        if not any(stacks):
            return list(torch.split(updates, [len(g[1]) for g in groups]))
        rows = torch.tensor(which, device=updates.device)
        keys = _keys(jobs, updates.device)
        for g, stack in enumerate(stacks):
            if not stack:
                continue
            mine = torch.nonzero(rows == g).flatten()
            part = updates[mine]
            for defense in stack:
                part = defense.on_update(part, keys[mine])
            updates[mine] = part
        return list(torch.split(updates, [len(g[1]) for g in groups]))

    def _train_rows(self, starts, jobs, setup, stacks, which, objective):
        """Train ``jobs`` from ``starts [C, P]`` in chunks; ``stacks[which[i]]`` are job i's per-step defenses."""
        out = []
        for lo in range(0, len(jobs), self.chunk):
            hi = lo + self.chunk
            out.append(self._train_chunk(starts[lo:hi], jobs[lo:hi], setup, stacks, which[lo:hi], objective))
        return torch.cat(out) - starts

    def _gradients(self, objective):
        if objective is cross_entropy:

            def grads_of(params, x, y, w):
                leaves = [p.detach().requires_grad_(True) for p in params]
                logits = self.grouped(leaves, x)
                loss = (F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none") * w.flatten()).sum()
                return list(torch.autograd.grad(loss, leaves))

            return grads_of
        per_client = vmap(grad(lambda ps, x, y, w: objective(lambda inp: self.model.call(ps, inp), x, y, w)))
        return lambda params, x, y, w: list(per_client(params, x, y, w))

    def _train_chunk(self, starts, jobs, setup, stacks, which, objective):
        c = len(jobs)
        dev = starts.device
        plans = [_batch_plan(job, setup) for job in jobs]
        params = [p.clone() for p in self.model.split(starts)]  # [C, *shape]
        bufs: list = [None] * len(params)
        grads_of = self._gradients(objective)
        n_max = max(len(job.y) for job in jobs)
        xs = torch.stack([_pad_rows(job.x, n_max) for job in jobs])  # [C, n_max, ...]
        ys = torch.stack([_pad_rows(job.y, n_max) for job in jobs])
        defenses = _GroupStepDefenses(stacks, which, self.model.is_weight, jobs, dev)
        for epoch in range(setup.epochs):
            batches = [plan[epoch] for plan in plans]
            defenses.new_epoch()
            for step in range(max(len(b) for b in batches)):
                idx, w, active = _stack_batch(batches, step, dev)
                xb = torch.gather(xs, 1, idx.view(c, -1, *([1] * (xs.dim() - 2))).expand(c, idx.shape[1], *xs.shape[2:]))
                yb = torch.gather(ys, 1, idx)
                grads = grads_of(params, xb, yb, w)
                params, bufs, updates = _sgd_step(params, grads, bufs, setup, active)
                defenses(step, epoch, setup.lr, params, grads, updates, active)
        return self.model.join(params, lead=1)


class _StepDefenses:
    """Calls the per-step client defenses with this and the previous iteration's gradients and
    updates (the memory FL-WBC needs; reset at every local epoch) and the clients' defense keys."""

    def __init__(self, defenses, is_weight, jobs, device):
        self.defenses, self.is_weight = list(defenses), is_weight
        self.keys = _keys(jobs, device) if self.defenses else None
        self.prev_grads = self.prev_updates = None

    def new_epoch(self) -> None:
        self.prev_grads = self.prev_updates = None

    def __call__(self, step, epoch, lr, params, grads, updates, active) -> None:
        if not self.defenses:
            return
        state = StepState(
            step=step, epoch=epoch, lr=lr, params=params, grads=grads, updates=updates,
            prev_grads=self.prev_grads, prev_updates=self.prev_updates, is_weight=self.is_weight,
            keys=self.keys, active=active,
        )
        with torch.no_grad():
            for defense in self.defenses:
                defense.after_step(state)
        self.prev_grads, self.prev_updates = grads, updates


class _GroupStepDefenses:
    """The per-step defenses of a chunk whose rows may belong to different defense stacks (lockstep):
    each stack acts on its own rows only, through ``active`` (a defense leaves inactive rows alone)."""

    def __init__(self, stacks, which, is_weight, jobs, device):
        present = sorted(set(which))
        self.parts = []
        for g in present:
            if not stacks[g]:
                continue
            mask = None if len(present) == 1 else torch.tensor([w == g for w in which], device=device)
            self.parts.append((_StepDefenses(stacks[g], is_weight, jobs, device), mask))

    def new_epoch(self) -> None:
        for part, _ in self.parts:
            part.new_epoch()

    def __call__(self, step, epoch, lr, params, grads, updates, active) -> None:
        for part, mask in self.parts:
            part(step, epoch, lr, params, grads, updates, active if mask is None else active & mask)


class GroupedForward:
    """The forward pass of C copies of a ``nn.Sequential`` model with C parameter sets, batched by hand.

    Inputs ``x [C, b, ...]`` -> logits ``[C, b, K]``. Convolutional stages run in a "grouped" layout
    ``[b, C * channels, H, W]`` (client c owns channels ``c*ch .. (c+1)*ch``), so a convolution of all
    clients is one grouped convolution and pooling/activations need no reshaping; linear stages run
    in a "batched" layout ``[C, b, features]`` with one batched matmul. Grouped convolutions run in
    the channels-last memory format: on a CPU that made them about 30% faster (oneDNN), which is the
    difference between losing to and beating one-client-at-a-time training.
    """

    _ELEMENTWISE = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.GELU, nn.Identity)
    _POOL = (nn.MaxPool2d, nn.AvgPool2d)

    def __init__(self, model: FlatModel):
        self.ok = self.supports(model.module)
        index = {name: i for i, name in enumerate(model.names)}
        self.layers = []
        if self.ok:
            for j, layer in enumerate(model.module):
                self.layers.append((layer, index.get(f"{j}.weight"), index.get(f"{j}.bias")))

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        if not isinstance(module, nn.Sequential) or any(True for _ in module.buffers()):
            return False
        for layer in module:
            if isinstance(layer, nn.Conv2d):
                if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
                    return False
            elif isinstance(layer, nn.Flatten):
                if layer.start_dim != 1 or layer.end_dim != -1:
                    return False
            elif not isinstance(layer, (nn.Linear, *cls._ELEMENTWISE, *cls._POOL)):
                return False
        return True

    def __call__(self, params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        c, b = x.shape[:2]
        h, grouped = x, False
        for layer, wi, bi in self.layers:
            if isinstance(layer, nn.Conv2d):
                if not grouped:
                    h, grouped = h.transpose(0, 1).reshape(b, c * h.shape[2], *h.shape[3:]), True
                    h = h.contiguous(memory_format=torch.channels_last)
                weight = params[wi].reshape(-1, *params[wi].shape[2:]).contiguous(memory_format=torch.channels_last)
                bias = params[bi].reshape(-1) if bi is not None else None
                h = F.conv2d(h, weight, bias, layer.stride, layer.padding, layer.dilation, c * layer.groups)
            elif isinstance(layer, nn.Linear):
                if grouped:
                    h, grouped = h.reshape(b, c, -1).transpose(0, 1), False
                weight_t = params[wi].transpose(1, 2)
                h = torch.baddbmm(params[bi].unsqueeze(1), h, weight_t) if bi is not None else torch.bmm(h, weight_t)
            elif isinstance(layer, nn.Flatten):
                h, grouped = (h.reshape(b, c, -1).transpose(0, 1) if grouped else h.flatten(2)), False
            elif isinstance(layer, self._POOL) and not grouped:
                h = layer(h.flatten(0, 1)).unflatten(0, (c, b))
            else:
                h = layer(h)
        return h.reshape(b, c, -1).transpose(0, 1) if grouped else h


def _pad_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    if len(t) == n:
        return t
    return torch.cat([t, t.new_zeros((n - len(t), *t.shape[1:]))])


def _stack_batch(batches, step, device):
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
