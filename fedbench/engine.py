"""One federated run (a "cell"): FedAvg as in the FL-WBC paper's protocol.

The loop reads as the algorithm::

    schedule -> for each round: select clients -> local training (benign, then malicious)
             -> aggregate -> apply -> evaluate

* N clients (``num_clients``), the first M of them malicious (``num_malicious``); an adversarial
  round has the M malicious clients plus K-M random benign ones, a benign round K benign clients.
* Rounds are adversarial with probability p, or exactly those in ``attack_rounds``; the schedule
  and client selection come from the cell's own ``schedule`` stream (:mod:`fedbench.rng`), so every
  defense in a comparison faces the same schedule and the same malicious data.
* Updates are aggregated with the clients' sample counts as weights (a malicious client claims the
  size of its own partition share) by the defense stack's server stage (:mod:`fedbench.server`),
  and the server adds the aggregate to the global model.
* A server stage that asks for trusted root data (FLTrust) gets that many training samples, drawn
  from the cell's ``root`` stream and removed from every client's partition, so they never reach a
  client; partitions are otherwise the same as without it.
* With the ``none`` attack there are no malicious clients and no adversarial rounds.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from fedbench import rng
from fedbench.aep import AEPTracker, check_metrics, probe_indices
from fedbench.components import AttackEnv, MaliciousRound, ServerContext
from fedbench.data import load_dataset, take_fraction
from fedbench.errors import FedbenchError
from fedbench.metrics import AUTO_SUBSET, Mitigation, evaluate, mitigation_rounds, stratified_subset
from fedbench.plugins import get_manager, registry
from fedbench.server import Server
from fedbench.spec import CellSpec, Scenario
from fedbench.training import TRAINERS, ClientJob, FlatModel, LocalSetup, LoopTrainer, StackedTrainer


#: ``train(global [P], jobs, setup) -> updates [len(jobs), P]``: plain local training (the
#: cross-entropy, no client defenses), see :meth:`CellRun.finish_round`.
PlainTrain = Callable[[torch.Tensor, list[ClientJob], LocalSetup], torch.Tensor]


@dataclass
class RunResult:
    """What a run produced, as plain data (``to_dict`` is JSON-ready)."""

    cell: CellSpec
    status: str  # "ok" or "diverged"
    rounds: list[dict[str, Any]]
    adversarial_rounds: list[int]
    mitigation: list[Mitigation]
    final_accuracy: float
    seconds: float
    message: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    final_params: torch.Tensor | None = field(default=None, repr=False)  # flat, on the CPU; not in to_dict()

    def to_dict(self) -> dict[str, Any]:
        return {
            "cell": self.cell.to_dict(),
            "hash": self.cell.hash(),
            "status": self.status,
            "message": self.message,
            "final_accuracy": _finite(self.final_accuracy),
            "adversarial_rounds": self.adversarial_rounds,
            "mitigation": [
                {"attack_round": m.attack_round, "rounds": m.rounds, "censored": m.censored, "peak": _finite(m.peak)}
                for m in self.mitigation
            ],
            "rounds": [{k: _finite(v) for k, v in row.items()} for row in self.rounds],
            "seconds": self.seconds,
            "timings": self.timings,
        }


def _finite(value: Any) -> Any:
    """Strict JSON has no NaN or infinity: such floats become ``None``."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def attack_schedule(scenario: Scenario, rounds: int, seed: int, active: bool) -> list[int]:
    """The adversarial rounds (1-based) of a run."""
    if not active or scenario.num_malicious == 0:
        return []
    if scenario.attack_rounds is not None:
        return [r for r in scenario.attack_rounds if r <= rounds]
    draws = torch.rand(rounds, generator=rng.generator(seed, "schedule"))
    return [r + 1 for r in range(rounds) if float(draws[r]) < scenario.attack_prob]


def select_clients(scenario: Scenario, n_malicious: int, rnd: int, adversarial: bool, seed: int) -> tuple[list[int], list[int]]:
    """(benign ids, malicious ids) of round ``rnd``; malicious clients are ids 0..M-1."""
    g = rng.generator(seed, "schedule", rnd)
    benign_pool = torch.arange(n_malicious, scenario.num_clients)
    k_benign = scenario.clients_per_round - (n_malicious if adversarial else 0)
    benign = benign_pool[torch.randperm(len(benign_pool), generator=g)[:k_benign]]
    return sorted(benign.tolist()), list(range(n_malicious)) if adversarial else []


def run_cell(
    cell: CellSpec,
    *,
    data_dir: str | None = None,
    device: str = "cpu",
    trainer: str = "stacked",
    on_round: Callable[[int, dict[str, Any]], None] | None = None,
    initial_params: torch.Tensor | None = None,
    start_round: int = 1,
    metrics: tuple[str, ...] = (),
) -> RunResult:
    """Run one cell and return its metrics. Deterministic on CPU for a given cell and trainer.

    ``metrics`` adds optional per-round measurements that do not change the run: ``aep`` (the
    attack's effect on the parameters, :mod:`fedbench.aep`)."""
    run = CellRun(cell, data_dir=data_dir, device=device, trainer=trainer, initial_params=initial_params,
                  start_round=start_round, metrics=metrics)
    while not run.done:
        row = run.step()
        if on_round is not None:
            on_round(row["round"], row)
    return run.result()


class CellRun:
    """One cell, advanced a round at a time (:meth:`step`); :func:`run_cell` is the loop over it.

    A round has two halves, so that a driver can train the benign clients of many cells together
    (:mod:`fedbench.lockstep`): :meth:`benign_jobs` says what the round's benign clients train --
    each from :attr:`global_params`, with :attr:`setup` and the cell's :attr:`client_defenses` --
    and :meth:`finish_round` takes their updates and does the rest of the round (malicious clients,
    aggregation, evaluation), returning its metrics. :meth:`step` does both with the cell's own
    trainer. Everything a round needs is set up once here; the data is shared read-only."""

    def __init__(
        self,
        cell: CellSpec,
        *,
        data_dir: str | None = None,
        device: str = "cpu",
        trainer: str = "stacked",
        initial_params: torch.Tensor | None = None,
        start_round: int = 1,
        metrics: tuple[str, ...] = (),
    ) -> None:
        self.started = time.perf_counter()
        self.cell = cell
        metrics = check_metrics(metrics)
        reg = registry()
        self.hook = get_manager().hook
        self.device = dev = resolve_device(device)
        sc, seed = cell.scenario, cell.seed

        data = load_dataset(cell.dataset, data_dir)
        self.attack = attack = cell.attack.build(reg)
        self.n_mal = n_mal = sc.num_malicious if attack.active else 0

        parts = cell.partition.build(reg).split(data.train_y, sc.num_clients, rng.generator(seed, "partition"))
        self.server = Server.build(cell.defense, reg)
        self.root = root = root_indices(self.server.root_samples(), len(data.train_y), seed)
        if root is not None:
            parts = [p[~torch.isin(p, root)] for p in parts]
        self.parts = parts = take_fraction(parts, sc.client_data_frac)

        taken = attack.setup(
            AttackEnv(data.train_x, data.train_y, data.test_x, data.test_y, data.num_classes, rng.generator(seed, "attack"), dev)
        )
        keep = torch.ones(len(data.test_y), dtype=torch.bool)
        if taken is not None and len(taken):
            keep[taken] = False
        test_x, test_y = data.test_x[keep].to(dev), data.test_y[keep].to(dev)
        eval_x, eval_y = test_x, test_y  # what every round but the last is evaluated on (metrics.py)
        if sc.eval == "auto" and len(test_y) > AUTO_SUBSET:
            subset = stratified_subset(test_y.cpu(), AUTO_SUBSET, rng.generator(seed, "eval")).to(dev)
            eval_x, eval_y = test_x[subset], test_y[subset]
        if test_x.dim() == 4:  # image batches: channels-last convolutions are ~1.6x faster on a CPU (measured)
            test_x, eval_x = (t.contiguous(memory_format=torch.channels_last) for t in (test_x, eval_x))
        self.test, self.eval = (test_x, test_y), (eval_x, eval_y)

        self.client_defenses = [spec.build(reg) for spec in cell.defense.client]

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rng.derive_seed(seed, "init"))
            module = cell.model.build(reg).build(tuple(data.train_x.shape[1:]), data.num_classes)
        self.module = module.to(dev)
        self.model = FlatModel(self.module)
        self.trainer = _trainer(trainer, self.model, dev)
        with self.threads():
            self.global_params = self.model.flatten().to(dev)
            if initial_params is not None:  # a warm start (fedbench.matrix): continue from a checkpoint
                if tuple(initial_params.shape) != tuple(self.global_params.shape):
                    raise FedbenchError(f"initial parameters have shape {tuple(initial_params.shape)}, "
                                        f"the model needs {tuple(self.global_params.shape)}")
                self.global_params = initial_params.to(device=dev, dtype=self.global_params.dtype).clone()
        self.setup = LocalSetup(sc.local_epochs, sc.batch_size, sc.lr, sc.momentum)
        self.train_x, self.train_y = data.train_x.to(dev), data.train_y.to(dev)
        self.sizes = torch.tensor([len(p) for p in parts], dtype=torch.float32, device=dev)

        self.start_round = start_round
        self.schedule = [r for r in attack_schedule(sc, cell.rounds, seed, attack.active) if r >= start_round]
        self._adversarial = set(self.schedule)
        self.series: list[dict[str, Any]] = []
        self.timings = {"train": 0.0, "aggregate": 0.0, "evaluate": 0.0}
        self.tracker = None
        if "aep" in metrics and attack.active:
            benign_pool = torch.cat([parts[c] for c in range(n_mal, sc.num_clients)])
            probe = probe_indices(benign_pool, rng.generator(seed, "aep")).to(dev)
            self.tracker = AEPTracker(self.model.forward, self.train_x[probe], self.train_y[probe])
        self.status, self.message = "ok", ""
        self.round = start_round  # the next round to run
        self._pending: tuple[list[int], list[int], float] | None = None

    @property
    def done(self) -> bool:
        return self.status != "ok" or self.round > self.cell.rounds

    def threads(self):
        """The thread setting this cell's model trains best with (:func:`_cpu_threads`)."""
        return _cpu_threads(self.module, self.device)

    def step(self) -> dict[str, Any]:
        """Run the next round with the cell's own trainer; returns its metrics."""
        jobs = self.benign_jobs()
        with self.threads():
            updates = self.trainer.train(self.global_params, jobs, self.setup, defenses=self.client_defenses)
        return self.finish_round(updates)

    def benign_jobs(self) -> list[ClientJob]:
        """The benign clients of the next round: what each trains on, with which random streams."""
        if self.done:
            raise FedbenchError(f"cell {self.cell.hash()} has no round left to run")
        rnd, seed = self.round, self.cell.seed
        benign_ids, malicious_ids = select_clients(self.cell.scenario, self.n_mal, rnd, rnd in self._adversarial, seed)
        self._pending = (benign_ids, malicious_ids, time.perf_counter())
        return [
            ClientJob(
                self.train_x[self.parts[c]], self.train_y[self.parts[c]],
                batch_gen=rng.generator(seed, "train", rnd, c),
                defense_key=rng.derive_seed(seed, "defense", rnd, c),
            )
            for c in benign_ids
        ]

    def finish_round(self, benign_updates: torch.Tensor, *, train: PlainTrain | None = None) -> dict[str, Any]:
        """The rest of the round given its benign updates ``[len(benign_jobs()), P]``: the malicious
        clients, aggregation, evaluation. Returns the round's metrics.

        ``train(global, jobs, setup) -> updates`` replaces the cell's trainer for the round's plain
        local training -- no client defenses, the cross-entropy objective: a malicious client's when
        its attack asks for nothing else, FLTrust's root update. The lockstep driver passes one that
        trains such requests of many cells together (:mod:`fedbench.lockstep`)."""
        if self._pending is None:
            raise FedbenchError("finish_round() needs the updates of the jobs benign_jobs() gave first")
        benign_ids, malicious_ids, t0 = self._pending
        self._pending = None
        if train is None:
            def train(start, jobs, setup):
                return self.trainer.train(start, jobs, setup)
        with self.threads():
            row = self._finish(self.round, benign_ids, malicious_ids, benign_updates, t0, train)
        self.round += 1
        return row

    def _finish(self, rnd: int, benign_ids: list[int], malicious_ids: list[int], benign_updates: torch.Tensor,
                t0: float, plain: PlainTrain) -> dict[str, Any]:
        sc, seed, dev, model, attack = self.cell.scenario, self.cell.seed, self.device, self.model, self.attack
        global_flat, server, train_x, train_y = self.global_params, self.server, self.train_x, self.train_y
        updates = benign_updates
        weights = self.sizes[torch.tensor(malicious_ids + benign_ids, device=dev)]
        ctx = ServerContext(
            round=rnd,
            client_ids=tuple(malicious_ids + benign_ids),
            global_params=global_flat,
            num_byzantine=sc.num_malicious,
            generator=rng.generator(seed, "aggregate", rnd, device=dev),
            root_update=None if self.root is None else _root_trainer(
                plain, global_flat, self.setup, train_x[self.root], train_y[self.root], seed, rnd),
        )
        if malicious_ids:
            train_malicious = _malicious_trainer(self.trainer, plain, global_flat, self.setup, seed, rnd, malicious_ids)
            malicious = attack.malicious_updates(
                MaliciousRound(
                    round=rnd,
                    global_params=global_flat,
                    client_ids=tuple(malicious_ids),
                    client_data=self._data_of(malicious_ids),
                    train=train_malicious,
                    forward=lambda flat, x: model.forward(flat)(x),
                    generator=rng.generator(seed, "attack", rnd),
                    benign_updates=benign_updates if attack.omniscient else None,
                    aggregate=_server_oracle(server, weights, ctx, seed, rnd),
                    weights=weights,
                )
            )
            if tuple(malicious.shape) != (len(malicious_ids), model.num_params):
                raise FedbenchError(
                    f"attack '{attack.name}' returned updates of shape {tuple(malicious.shape)}, "
                    f"expected {(len(malicious_ids), model.num_params)}"
                )
            updates = torch.cat([malicious, benign_updates])
        clean_step, aep_train, aep_eval = None, 0.0, 0.0
        if self.tracker is not None and malicious_ids:  # before the real call: the oracle copies the server's state
            t_aep = time.perf_counter()
            # fresh copies of the clients' data: the attack may have changed the ones it was given
            honest = train_malicious(self._data_of(malicious_ids))
            clean_step = _server_oracle(server, weights, ctx, seed, rnd)(torch.cat([honest, benign_updates]))
            aep_train = time.perf_counter() - t_aep
        t1 = time.perf_counter()
        step = server(updates, weights, ctx)
        global_flat = self.global_params = global_flat + step
        t2 = time.perf_counter()

        forward = model.forward(global_flat)
        x, y = self.test if rnd == self.cell.rounds else self.eval
        acc, loss = evaluate(forward, x, y)
        row: dict[str, Any] = {"round": rnd, "adversarial": bool(malicious_ids), "accuracy": acc, "loss": loss,
                               "eval_n": len(y)}
        with torch.no_grad():
            row.update({k: float(v) for k, v in attack.metrics(forward).items()})
        if attack.untargeted and "success" not in row:
            row["success"] = 1.0 - acc  # an untargeted attack's success is the benign error
        if self.tracker is not None:
            t_aep = time.perf_counter()
            row.update(self.tracker.row(rnd, step, global_flat, clean_step))
            aep_eval = time.perf_counter() - t_aep
        t3 = time.perf_counter()
        self.timings["train"] += t1 - t0 - aep_train
        self.timings["aggregate"] += t2 - t1
        self.timings["evaluate"] += t3 - t2 - aep_eval
        if self.tracker is not None:
            self.timings["aep"] = self.timings.get("aep", 0.0) + aep_train + aep_eval
        self.series.append(row)
        self.hook.round_finished(cell=self.cell, round=rnd, metrics=dict(row))
        if not math.isfinite(loss) or not bool(torch.isfinite(global_flat).all()):
            self.status, self.message = "diverged", f"non-finite loss or parameters in round {rnd}"
        return row

    def _data_of(self, ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each client's training data ``(x, y)`` (copies: indexing gathers)."""
        return [(self.train_x[self.parts[c]], self.train_y[self.parts[c]]) for c in ids]

    def result(self) -> RunResult:
        """What the run produced so far (all of it once :attr:`done`)."""
        ok = self.status == "ok"
        mitigation = (mitigation_rounds(self.series, self.schedule, self.attack.mitigated, first_round=self.start_round)
                      if ok else [])
        return RunResult(
            cell=self.cell,
            status=self.status,
            rounds=self.series,
            adversarial_rounds=self.schedule,
            mitigation=mitigation,
            final_accuracy=self.series[-1]["accuracy"] if self.series else float("nan"),
            seconds=time.perf_counter() - self.started,
            message=self.message,
            timings=self.timings,
            final_params=self.global_params.detach().cpu(),
        )


def _malicious_trainer(trainer, plain: PlainTrain, global_flat, setup: LocalSetup, seed: int, rnd: int, ids: list[int]):
    """``MaliciousRound.train``: ordinary local training without client defenses.

    ``data`` is one ``(x, y)`` per malicious client; ``epochs``/``batch_size`` override the
    scenario's; ``objective`` replaces the cross-entropy (see ``fedbench.training.Objective``);
    ``hooks`` are objects with the client-defense interface (``per_step``, ``after_step``,
    ``on_update``) through which an attack constrains its own training, e.g. a projection after
    every step. Training with neither goes through ``plain`` (which the lockstep driver batches
    across cells); an objective or hooks are the attack's own, so that training stays with the cell."""

    def train(data, *, epochs=None, batch_size=None, objective=None, hooks=()):
        local = LocalSetup(epochs or setup.epochs, batch_size or setup.batch_size, setup.lr, setup.momentum)
        jobs = [ClientJob(x, y, batch_gen=rng.generator(seed, "attack", rnd, c)) for (x, y), c in zip(data, ids)]
        if objective is None and not hooks:
            return plain(global_flat, jobs, local)
        kwargs = {"objective": objective} if objective is not None else {}
        return trainer.train(global_flat, jobs, local, defenses=hooks, **kwargs)

    return train


def _server_oracle(server: Server, weights: torch.Tensor, ctx: ServerContext, seed: int, rnd: int):
    """``MaliciousRound.aggregate``: the cell's server stage as a black box on candidate updates.

    Each query runs a copy of the stage (stateful rules keep their real state untouched) with this
    round's weights, client ids and a fresh copy of this round's server stream, so it returns what
    the real aggregation would return for those updates -- the strongest, omniscient attacker."""

    def aggregate(candidate: torch.Tensor) -> torch.Tensor:
        if tuple(candidate.shape[:1]) != tuple(weights.shape):
            raise FedbenchError(f"the server oracle takes all {len(weights)} updates of the round (malicious first), "
                                f"got {tuple(candidate.shape)}")
        fresh = dataclasses.replace(ctx, generator=rng.generator(seed, "aggregate", rnd, device=weights.device))
        return copy.deepcopy(server)(candidate, weights, fresh)

    return aggregate


def root_indices(count: int, n_train: int, seed: int) -> torch.Tensor | None:
    """The server's trusted root data: ``count`` training indices from the cell's ``root`` stream
    (sorted), or ``None`` when no server stage asks for any."""
    if count <= 0:
        return None
    if count >= n_train:
        raise FedbenchError(f"the server asks for {count} root samples, but the training set has only {n_train}")
    return torch.sort(torch.randperm(n_train, generator=rng.generator(seed, "root"))[:count]).values


def _root_trainer(plain: PlainTrain, global_flat, setup: LocalSetup, x, y, seed: int, rnd: int):
    """``ServerContext.root_update``: the current global model trained on the root data with the
    clients' local setup, no client defenses (FLTrust's server update); computed at most once a round."""
    cache: list[torch.Tensor] = []

    def root_update() -> torch.Tensor:
        if not cache:
            job = ClientJob(x.to(global_flat.device), y.to(global_flat.device), batch_gen=rng.generator(seed, "root", rnd))
            cache.append(plain(global_flat, [job], setup)[0])
        return cache[0]

    return root_update


@contextlib.contextmanager
def _cpu_threads(module: torch.nn.Module, dev: torch.device):
    """One intra-op thread for models without convolutions.

    Their operations are too small to split: on the 2-core machine a 30-round digits cell took
    0.43 s with one thread and 6.5 s with two (thread hand-offs dominate, and worse when the host
    steals CPU time). Convolutional models keep torch's default."""
    if dev.type != "cpu" or any(isinstance(m, torch.nn.Conv2d) for m in module.modules()):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _trainer(name: str, model: FlatModel, dev: torch.device):
    """The trainer asked for; ``stacked`` falls back to ``loop`` (with a notice) for models it cannot batch.

    On a GPU the stacked trainer takes all clients of a round at once; on a CPU chunks of 10 clients
    stay in cache (measured: larger stacks are slower there)."""
    if name not in TRAINERS:
        raise FedbenchError(f"unknown trainer '{name}'; known trainers: {', '.join(TRAINERS)}")
    if name == "stacked":
        if not StackedTrainer.supports(model):
            warnings.warn("the stacked trainer cannot batch this model; using the loop trainer", stacklevel=3)
            return LoopTrainer(model, dev)
        return StackedTrainer(model, dev, chunk=10 if dev.type == "cpu" else 1000)
    return TRAINERS[name](model, dev)


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` as a torch device; a clear error where it does not exist (the
    matrix checks this before any cell runs, so a missing GPU is not recorded in every cell)."""
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise FedbenchError(f"unknown device '{name}'; use cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FedbenchError("device 'cuda' asked for, but torch sees no CUDA GPU here; use --device cpu")
    return torch.device(name)
