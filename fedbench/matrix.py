"""The matrix: a grid of cells (attacks x defense stacks x seeds), run in parallel into the result store.

Grid expansion (:func:`expand`) always adds the reference cells a reader needs: the clean run (attack
``none``) of every defense stack, which measures its accuracy cost, and the undefended run
(``fedavg``) of every attack -- so the grid is (attacks + ``none``) x (defenses + ``fedavg``) for each
seed, dataset and partition. Every cell is validated before the first one runs.

Execution (:func:`run_matrix`): the driver process owns the store (:mod:`fedbench.store`) and is its
only writer. It hands at most ``jobs`` cells at a time to workers -- the driver itself for
``jobs=1``, spawned processes, or Ray tasks -- and records each outcome as it arrives, so a crash or
Ctrl-C loses only the cells in flight. Workers catch every exception of a cell and return it as a
``failed`` outcome; the matrix goes on -- except that data a worker cannot find is recorded
``interrupted``, as a Ctrl-C is, and retried by the next run. Before any cell runs the driver loads
every dataset of the grid once, so missing data stops the matrix with one message, nothing stored.
The engine is deterministic per cell, so where a cell runs does not change its numbers.

Cell timeout (``cell_timeout``, ``--cell-timeout``, opt-in): a cell (or warm-up) still running after
that many seconds is stopped and recorded ``failed`` -- a plugin that hangs costs its own cells, not
the grid. The worker stops it (:class:`fedbench.executors.Alarm`); on the process pool the driver
also kills a worker whose task does not stop (:func:`_drive`).

Shared warm start (``warmup_rounds=W``, opt-in): every group of cells with the same dataset,
partition, model, scenario and seed first needs W rounds of clean FedAvg. That checkpoint is a cell
of its own (attack ``none``, defense ``fedavg``, W rounds), computed once, stored by its hash and
loaded with ``torch.load(weights_only=True)``; the cells then run rounds W+1.. from it. It is not
the paper's protocol (the paper attacks from round 1), so it is off by default and folded into the
cells' keys.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Sequence

from fedbench.errors import DataError, FedbenchError, SpecError, one_line
from fedbench.executors import Inline, Processes, RayTasks, WorkerDied, timeout_message
from fedbench.spec import CellSpec, make_cell, parse_component, parse_defense
from fedbench.store import FINISHED, Store

EXECUTORS = ("process", "ray")


# --------------------------------------------------------------------------------------------------
# Grid expansion
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MatrixCell:
    """A cell of the matrix: a :class:`CellSpec` and the warm-up rounds it starts after.

    ``key`` is the cell's hash, folded with ``warmup_rounds`` when that is not 0 (a warm-started cell
    is a different experiment from the same spec run from round 1)."""

    cell: CellSpec
    warmup_rounds: int = 0

    @property
    def key(self) -> str:
        if not self.warmup_rounds:
            return self.cell.hash()
        return hashlib.sha256(f"{self.cell.hash()}+warmup={self.warmup_rounds}".encode()).hexdigest()[:16]

    def label(self) -> str:
        return self.cell.label() + (f" warm-up={self.warmup_rounds}" if self.warmup_rounds else "")

    def warmup_cell(self) -> CellSpec | None:
        """The clean FedAvg cell whose final model this cell starts from (``None`` without warm-up)."""
        if not self.warmup_rounds:
            return None
        none = parse_component("attack", "none")
        return replace(self.cell, attack=none, defense=parse_defense("fedavg"), rounds=self.warmup_rounds)

    def rounds_to_run(self) -> int:
        return self.cell.rounds - self.warmup_rounds

    def setting(self) -> str:
        """The key of the leaderboard this cell belongs to: a hash of everything but attack, defense
        and seed (cells that differ only in those are comparable)."""
        data = {k: v for k, v in self.cell.to_dict().items() if k not in ("attack", "defense", "seed")}
        data["warmup_rounds"] = self.warmup_rounds
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]

    def setting_label(self) -> str:
        """The setting in words, protocol first: what a leaderboard states about how it was produced."""
        c, sc = self.cell, self.cell.scenario
        if self.warmup_rounds:
            protocol = (f"warm start: {self.warmup_rounds} rounds of clean FedAvg, then attacks and defenses from "
                        f"round {self.warmup_rounds + 1} (not the paper's protocol)")
        else:
            protocol = "attacks and defenses from round 1"
        schedule = (f"attack rounds {','.join(map(str, sc.attack_rounds))}" if sc.attack_rounds is not None
                    else f"attack probability {sc.attack_prob:g}")
        parts = [
            f"protocol {c.protocol} ({protocol})",
            f"{c.dataset}, partition {c.partition}, model {c.model}, {c.rounds} rounds",
            f"{sc.num_clients} clients ({sc.num_malicious} malicious, {sc.clients_per_round} per round), {schedule}",
            f"{sc.local_epochs} local epoch{'s' if sc.local_epochs != 1 else ''}, batch {sc.batch_size}, "
            f"lr {sc.lr:g}, momentum {sc.momentum:g}"
            + (f", {sc.client_data_frac:g} of client data" if sc.client_data_frac != 1 else "")
            + (f", eval {sc.eval}" if sc.eval != "auto" else ""),
        ]
        return "; ".join(parts)

    def info(self) -> dict[str, Any]:
        """The labels the store keeps beside the spec (so reading a store needs no plugin)."""
        return {"cell_hash": self.cell.hash(), "label": self.label(), "dataset": str(self.cell.dataset),
                "partition": str(self.cell.partition), "model": str(self.cell.model), "attack": str(self.cell.attack),
                "defense": str(self.cell.defense), "seed": self.cell.seed, "setting": self.setting(),
                "setting_label": self.setting_label()}


def split_list(text: str | Sequence[str] | None) -> list[str]:
    """Split a comma-separated list of specs; a ``k=v`` item continues the previous spec's parameters.

    ``"poison:images=10,lam=0.5,backdoor"`` -> ``["poison:images=10,lam=0.5", "backdoor"]``.
    A sequence (a repeated option, a TOML list) is split item by item."""
    if text is None:
        return []
    if not isinstance(text, str):
        return [item for part in text for item in split_list(part)]
    items: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        if "=" in piece and ":" not in piece.split("=", 1)[0] and items and ":" in items[-1].split("+")[-1]:
            items[-1] += "," + piece
        else:
            items.append(piece)
    return items


#: More seeds than this in one grid is a typo (``0-10000000``), refused before any list is built.
MAX_SEEDS = 10_000


def parse_seeds(text: str | int | Sequence[int]) -> list[int]:
    """``"0,1,2"``, ``"0-4"`` (inclusive) or a list of ints -> seeds in order, without repeats.

    A range that runs backwards (``5-2``) or holds more than :data:`MAX_SEEDS` seeds is an error
    naming it, never an empty or enormous list."""
    if isinstance(text, int):
        return [text]
    parts = [p.strip() for p in (text.split(",") if isinstance(text, str) else map(str, text)) if p.strip()]
    seeds: list[int] = []
    for part in parts:
        span = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        if span:
            lo, hi = int(span[1]), int(span[2])
            if hi < lo:
                raise SpecError(f"seeds: range {part!r} runs backwards; write it low-high, e.g. {hi}-{lo}")
            if hi - lo + 1 + len(seeds) > MAX_SEEDS:
                raise SpecError(f"seeds: range {part!r} makes more than {MAX_SEEDS:,} seeds; is it a typo?")
            seeds.extend(range(lo, hi + 1))
            continue
        try:
            seeds.append(int(part))
        except ValueError:
            raise SpecError(f"seeds: expected integers like 0,1,2 or a range like 0-4, got {part!r}") from None
    if not seeds:
        raise SpecError("seeds: need at least one seed")
    return list(dict.fromkeys(seeds))


def expand(
    *,
    attacks: Sequence[str],
    defenses: Sequence[str],
    seeds: Sequence[int] = (0,),
    datasets: Sequence[str] = ("digits",),
    partitions: Sequence[str] = ("iid",),
    warmup_rounds: int = 0,
    **cell_kwargs: Any,
) -> list[MatrixCell]:
    """Every cell of the grid, reference cells included, each validated (:func:`make_cell`).

    For each dataset, partition and seed: (``attacks`` + ``none``) x (``defenses`` + ``fedavg``).
    Cells that resolve to the same spec (``wbc`` and ``wbc:s=0.4``) appear once. Unknown names raise
    a :class:`SpecError` listing the known ones before any cell is built."""
    attacks, defenses, datasets, partitions = list(attacks), list(defenses), list(datasets), list(partitions)
    if not datasets:
        raise SpecError("matrix: name at least one dataset (--dataset), e.g. digits")
    if not partitions:
        raise SpecError("matrix: name at least one partition (--partition), e.g. iid")
    if not attacks:
        raise SpecError("matrix: name at least one attack (--attacks), e.g. poison")
    if not defenses:
        raise SpecError("matrix: name at least one defense stack (--defenses), e.g. wbc,cma")
    for text in attacks:
        parse_component("attack", text)
    for text in defenses:
        parse_defense(text)
    if not isinstance(warmup_rounds, int) or warmup_rounds < 0:
        raise SpecError(f"warmup_rounds={warmup_rounds!r} is not allowed; need an integer >= 0")

    attack_axis = list(dict.fromkeys(["none", *attacks]))
    defense_axis = list(dict.fromkeys(["fedavg", *defenses]))
    cells: dict[str, MatrixCell] = {}
    for dataset, partition, seed in itertools.product(datasets, partitions, seeds):
        for attack, defense in itertools.product(attack_axis, defense_axis):
            cell = make_cell(dataset=dataset, partition=partition, attack=attack, defense=defense, seed=seed, **cell_kwargs)
            mc = MatrixCell(cell, warmup_rounds)
            cells.setdefault(mc.key, mc)
    out = list(cells.values())
    if warmup_rounds:
        _check_warmup(out)
    return out


def _check_warmup(cells: Iterable[MatrixCell]) -> None:
    for mc in cells:
        w, cell = mc.warmup_rounds, mc.cell
        if w >= cell.rounds:
            raise SpecError(f"--warmup-rounds {w} leaves no round to attack in a {cell.rounds}-round run; need W < rounds")
        early = [r for r in (cell.scenario.attack_rounds or ()) if r <= w]
        if early:
            raise SpecError(
                f"attack round {early[0]} falls in the warm-up (rounds 1..{w}); with --warmup-rounds {w} "
                f"attacks start at round {w + 1}"
            )


def check_data(cells: Iterable[MatrixCell], data_dir: str | None = None) -> None:
    """Load every dataset of ``cells`` once, before any cell runs, so that missing files are one
    :class:`DataError` up front (the CLI exits 2, nothing is stored) rather than the same failure
    recorded in every cell. A dataset plugin that fails with another exception gets a
    :class:`DataError` too (the cause stays chained)."""
    from fedbench.data import load_dataset

    seen = set()
    for mc in cells:
        spec = mc.cell.dataset
        if spec in seen:
            continue
        seen.add(spec)
        try:
            load_dataset(spec, data_dir)
        except FedbenchError:
            raise
        except Exception as error:  # noqa: BLE001 - a broken dataset is one clear message, not a traceback
            raise DataError(f"dataset {spec} cannot be loaded: {one_line(error)}") from error


def check_environment(cells: Sequence[MatrixCell], data_dir: str | None, device: str, *, on_cluster: bool = False) -> None:
    """What every cell to run needs from this machine, checked once before any runs: each dataset
    loads (:func:`check_data`) and the device exists. Skipped ``on_cluster`` (``--ray-address``): there
    the data and devices are the nodes'."""
    if on_cluster or not cells:
        return
    check_data(cells, data_dir)
    from fedbench.engine import resolve_device

    resolve_device(device)


# --------------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------------
class Progress:
    """What the driver reports while it runs; this base reports nothing (``--quiet``)."""

    def start(self, total: int, skipped: int, todo: Sequence["Task"], where: str) -> None:
        """``total`` cells in the grid, ``skipped`` of them already finished; ``todo`` will run ``where``."""

    def task_started(self, task: "Task") -> None: ...

    def task_restarted(self, task: "Task") -> None:
        """``task`` runs again from its first round: its worker was killed to stop another task."""

    def round_done(self, key: str, rnd: int) -> None: ...

    def task_finished(self, task: "Task", outcome: dict[str, Any]) -> None: ...

    def stop(self) -> None: ...


@dataclass
class Task:
    """A unit of work for a worker: a cell, or a warm-up shared by a group of cells."""

    key: str
    label: str
    rounds: int
    payload: dict[str, Any]
    cell: MatrixCell | None = None  # None for a warm-up
    children: list["Task"] | None = None  # a lockstep group: its cells' own tasks

    def units(self) -> list["Task"]:
        """What the store and the progress display see: the cells of a lockstep group, else the task."""
        return self.children or [self]


@dataclass
class MatrixReport:
    """What one :func:`run_matrix` call did; ``statuses`` covers every cell of the grid."""

    keys: list[str]
    statuses: dict[str, str] = field(default_factory=dict)
    ran: int = 0
    skipped: int = 0
    seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(1 for s in self.statuses.values() if s == status)


def default_jobs() -> int:
    """The cores this process may use (its CPU affinity where the OS tells it)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def plan(cells: Sequence[MatrixCell], store: Store, *, retry_failed: bool = False, force: bool = False) -> list[MatrixCell]:
    """The cells a run has to (re-)run: every cell with ``force``; otherwise those without a final
    result (``ok`` or ``diverged``), leaving out ``failed`` ones unless ``retry_failed``.

    ``interrupted`` cells always run again: Ctrl-C, a dead worker or driver, and data a worker could
    not find are accidents of one run, not results of the cell. ``failed`` (the cell itself raised)
    sticks, since running it again would only repeat the failure."""
    if force:
        return list(cells)
    done = store.statuses(mc.key for mc in cells)
    skip = set(FINISHED) | (set() if retry_failed else {"failed"})
    return [mc for mc in cells if done.get(mc.key) not in skip]


def check_cell_timeout(seconds: float | None, what: str = "cell_timeout") -> float | None:
    """``seconds`` as a cell timeout: ``None`` (no timeout) or a finite number > 0, else a
    :class:`FedbenchError` naming ``what`` (the option or argument it came from)."""
    if seconds is None:
        return None
    number = isinstance(seconds, (int, float)) and not isinstance(seconds, bool)
    if not number or not math.isfinite(seconds) or seconds <= 0:
        shown = f"{seconds:g}" if number else repr(seconds)
        raise FedbenchError(f"{what} {shown} is not allowed; need a finite number of seconds > 0 (e.g. 3600), "
                            "or no timeout at all")
    return float(seconds)


def run_matrix(
    cells: Sequence[MatrixCell],
    store: Store,
    *,
    jobs: int | None = None,
    executor: str = "process",
    ray_address: str | None = None,
    data_dir: str | None = None,
    device: str = "cpu",
    trainer: str = "stacked",
    retry_failed: bool = False,
    force: bool = False,
    cell_timeout: float | None = None,
    lockstep: bool | None = None,
    progress: Progress | None = None,
) -> MatrixReport:
    """Run the cells :func:`plan` selects and record every outcome in ``store``.

    ``lockstep`` (default: :func:`default_lockstep` for the device) runs cells that can share a
    batch in groups (:func:`lockstep_tasks`, :mod:`fedbench.lockstep`); each cell is still recorded
    on its own, as it finishes its group, and the store's ``worker`` says ``lockstep xN``.

    ``jobs`` (default: the number of cores) caps the cells in flight; with one, cells run in this
    process. ``cell_timeout`` (seconds, default none) stops a cell or warm-up that runs longer and
    records it ``failed`` (a re-run skips it unless ``retry_failed``); the matrix goes on. It is
    timed from when the task's data is loaded. With ``jobs=1`` only the alarm inside the cell
    stops it (:class:`fedbench.executors.Alarm`): a plugin stuck in C code that never returns to
    Python holds this process until it does. On worker processes the driver also kills a worker
    whose task is still running :func:`stuck_grace` seconds past its timeout (see :func:`_drive`).
    The caller holds the store's lock (:func:`fedbench.store.lock`). On
    ``KeyboardInterrupt`` the cells in flight are marked ``interrupted`` and the interrupt
    propagates (the CLI exits 130); finished cells stay recorded and the next run resumes. SIGTERM
    does the same while the cells run: it raises :class:`Terminated`, a ``KeyboardInterrupt``.

    The datasets of the cells to run are loaded here first (:func:`check_data`): a missing one
    raises a :class:`DataError` before any cell is recorded. Not with ``ray_address``: on an
    existing cluster the data lives where the tasks run, and a task that finds no data there is
    recorded ``interrupted`` (see :func:`fedbench.executors.execute`), so the next run retries it."""
    if executor not in EXECUTORS:
        raise FedbenchError(f"unknown executor '{executor}'; use one of: {', '.join(EXECUTORS)}")
    if jobs is not None and jobs < 1:
        raise FedbenchError(f"jobs={jobs} is not allowed; need at least 1")
    cell_timeout = check_cell_timeout(cell_timeout)
    started = time.perf_counter()
    progress = progress or Progress()
    store.mark_stale_running()
    todo = plan(cells, store, retry_failed=retry_failed, force=force)
    report = MatrixReport(keys=[mc.key for mc in cells], skipped=len(cells) - len(todo))
    common = {"data_dir": data_dir, "device": device, "trainer": trainer, "timeout": cell_timeout}
    if any(mc.warmup_rounds for mc in todo):
        require_warm_start()
    check_environment(todo, data_dir, device, on_cluster=executor == "ray" and bool(ray_address))

    warmups: dict[str, Task] = {}
    for mc in todo:
        warm = mc.warmup_cell()
        if warm is not None and warm.hash() not in warmups and verified_checkpoint(store, warm.hash()) is None:
            warmups[warm.hash()] = Task(warm.hash(), f"warm-up {warm.dataset} seed={warm.seed}", warm.rounds,
                                        {**common, "kind": "warmup", "key": warm.hash(), "cell": warm.to_dict(),
                                         "warmup_rounds": 0})
    n_tasks = len(warmups) + len(todo)
    backend = None
    stop_on_sigterm = _sigterm_interrupts()
    try:
        if n_tasks:
            slots = max(1, min(jobs or default_jobs(), n_tasks))
            if executor == "ray":
                backend = RayTasks(jobs, ray_address)
            elif slots == 1:
                backend = Inline(progress.round_done)
            else:
                backend = Processes(slots)
            if not isinstance(backend, Inline):
                from fedbench.data import load_dataset

                load_dataset.cache_clear()  # the workers load their own copy; the driver needs none
        progress.start(len(cells), report.skipped, [*warmups.values(), *(_cell_task(mc, common, None) for mc in todo)],
                       backend.where if backend else "")
        failed_warmups: dict[str, dict[str, Any]] = {}
        for task, outcome in _drive(list(warmups.values()), backend, store, progress):
            if outcome["status"] == "ok" and "checkpoint" in outcome:
                store.put_checkpoint(task.key, task.payload["cell"], outcome["checkpoint"])
            else:
                failed_warmups[task.key] = outcome
        tasks = []
        for mc in todo:
            warm = mc.warmup_cell()
            if warm is not None and warm.hash() in failed_warmups:
                bad = failed_warmups[warm.hash()]
                status = "interrupted" if bad["status"] == "interrupted" else "failed"  # environment: retried
                store.start(mc.key, mc.cell.to_dict(), mc.warmup_rounds, mc.info())
                store.finish(mc.key, {**bad, "status": status, "result": None,
                                      "message": f"its clean warm-up failed: {bad.get('message', '')}"})
                continue
            checkpoint = verified_checkpoint(store, warm.hash()) if warm is not None else None
            if warm is not None and checkpoint is None:  # cannot happen unless the store changes under us
                raise FedbenchError(f"the warm-up checkpoint {warm.hash()} in {store.path} cannot be read back; "
                                    "run the same command again to recompute it")
            tasks.append(_cell_task(mc, common, checkpoint))
        if tasks and (default_lockstep(device) if lockstep is None else lockstep):
            tasks = lockstep_tasks(tasks, backend.slots, LOCKSTEP_CELLS["cuda" if device.startswith("cuda") else "cpu"])
        for _task, _outcome in _drive(tasks, backend, store, progress):
            report.ran += 1
    except KeyboardInterrupt as error:
        if backend is not None:
            backend.close(abort=True)
            backend = None
        why = "SIGTERM" if isinstance(error, Terminated) else "Ctrl-C"
        store.interrupt([mc.key for mc in todo], f"interrupted ({why}) while running; re-run to resume")
        raise
    finally:
        stop_on_sigterm()
        if backend is not None:
            backend.close()
        progress.stop()
    report.statuses = store.statuses(report.keys)
    report.seconds = time.perf_counter() - started
    return report


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived while :func:`run_matrix` ran (a scheduler, ``kill``, ``timeout``). It stops the
    matrix exactly as Ctrl-C does -- the cells in flight are recorded ``interrupted`` -- and, being
    a ``KeyboardInterrupt``, reaches every caller that handles Ctrl-C."""


def _sigterm_interrupts() -> Callable[[], None]:
    """Until the returned function is called, SIGTERM raises :class:`Terminated` in the main thread
    (a second SIGTERM while the first is handled terminates at once). Elsewhere -- another thread,
    a platform without SIGTERM -- nothing changes."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)
    if previous not in (signal.SIG_DFL, None):  # someone else handles SIGTERM here: leave it to them
        return lambda: None

    def on_sigterm(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated()

    signal.signal(signal.SIGTERM, on_sigterm)
    return lambda: signal.signal(signal.SIGTERM, previous)


def verified_checkpoint(store: Store, key: str) -> bytes | None:
    """The warm-start checkpoint ``key`` if it is one this fedbench wrote: its bytes match the
    SHA-256 stored with them (:meth:`Store.checkpoint`) and they load with
    ``torch.load(weights_only=True)`` as ``{"params": <flat, finite floating-point tensor>}``.
    Otherwise ``None``: the driver recomputes the warm-up (it is deterministic, so the cells get the
    numbers they would have got) and replaces the checkpoint."""
    import io

    import torch

    data = store.checkpoint(key)
    if data is None:
        return None
    try:
        state = torch.load(io.BytesIO(data), weights_only=True)
    except Exception:  # noqa: BLE001 - whatever is wrong with it, the warm-up is recomputed
        return None
    params = state.get("params") if isinstance(state, dict) else None
    if (not isinstance(params, torch.Tensor) or params.dim() != 1 or not params.is_floating_point()
            or not bool(torch.isfinite(params).all())):
        return None
    return data


#: The most cells one lockstep group holds, per device kind. The GPU figure follows the filed
#: measurements (a round of 100 clients costs 4x one of 10 on an H200, so 10 cells of 10 clients
#: are a long way from saturating it; 60 cells keep ~600 clients a step); on a CPU the stacked trainer
#: works in chunks of 10 clients whatever the group, and memory grows with every cell's test copies.
LOCKSTEP_CELLS = {"cpu": 20, "cuda": 60}


def default_lockstep(device: str) -> bool:
    """Whether a grid runs in lockstep unless told: on a GPU yes (its rounds are launch-bound, and
    lockstep turns many small batches into few large ones; not yet measured on one); on a CPU no.
    There benchmarks/test_lockstep.py measured 0.87-1.0x the cells per hour of one cell at a time
    (interleaved repeats: 0.94-0.99), once 2.0x on a loaded host: the stacked trainer already works
    in chunks of 10 clients on a CPU, so there is nothing to win (benchmarks/README.md)."""
    return device.startswith("cuda")


def lockstep_tasks(tasks: list[Task], slots: int, most: int) -> list[Task]:
    """``tasks`` with the cells that can share a batch (:func:`fedbench.lockstep.group_key`, no warm
    start) put into groups of at most ``most`` cells, and into at least ``slots`` groups where there
    are enough cells, so every worker has a group. A group of one stays a plain cell task."""
    import math

    from fedbench.lockstep import group_key

    by_key: dict[Any, list[Task]] = {}
    out: list[Task] = []
    for task in tasks:
        if task.cell is None or task.payload.get("checkpoint") is not None:
            out.append(task)
        else:
            by_key.setdefault(group_key(task.cell.cell), []).append(task)
    for members in by_key.values():
        pieces = max(math.ceil(len(members) / most), min(slots, len(members)))
        size = math.ceil(len(members) / pieces)
        for lo in range(0, len(members), size):
            part = members[lo: lo + size]
            if len(part) == 1:
                out.append(part[0])
                continue
            key = "lockstep-" + hashlib.sha256("|".join(t.key for t in part).encode()).hexdigest()[:16]
            payload = {k: v for k, v in part[0].payload.items() if k in ("data_dir", "device", "trainer", "timeout")}
            payload.update(kind="group", key=key, tasks=[t.payload for t in part])
            out.append(Task(key, f"lockstep group of {len(part)} cells", max(t.rounds for t in part), payload,
                            None, part))
    return out


def _cell_task(mc: MatrixCell, common: dict[str, Any], checkpoint: bytes | None) -> Task:
    payload = {**common, "kind": "cell", "key": mc.key, "cell": mc.cell.to_dict(),
               "warmup_rounds": mc.warmup_rounds, "checkpoint": checkpoint}
    return Task(mc.key, mc.label(), mc.rounds_to_run(), payload, mc)


#: Seconds past its timeout a task may take to stop by itself (and report so) before the driver
#: kills its worker: at least this, or a tenth of the timeout.
STUCK_GRACE_S = 5.0


def stuck_grace(timeout: float) -> float:
    """How long past ``timeout`` the driver waits for a task's own alarm before it kills the worker:
    enough for the worker to stop the cell and send its outcome, even on a loaded machine."""
    return max(STUCK_GRACE_S, timeout / 10)


def _drive(tasks: Sequence[Task], backend, store: Store, progress: Progress):
    """Hand ``tasks`` to ``backend``, at most ``backend.slots`` at a time, and yield
    ``(task, outcome)`` as outcomes arrive -- after recording cells in the store.

    The backstop of a cell timeout: on a backend that ``stops_stuck`` (the process pool), a task
    still running :func:`stuck_grace` seconds after its ``timeout`` -- timed from the ``(key, 0)``
    its worker sends when the run starts -- is stuck where the worker's alarm cannot reach it (C
    code that never returns to Python). Every worker is then killed: each task in flight that ran
    past its timeout is recorded ``failed`` with the timeout's message, and the others are handed
    out again in this run (from their first round: a cell is deterministic, so their numbers do
    not change). Inline (``jobs=1``) and Ray have no such backstop."""
    pending = deque(tasks)
    inflight: dict[Any, Task] = {}
    handed: set[str] = set()  # keys already started in the store (a restarted task is not started twice)
    began: dict[str, float] = {}  # key -> when its worker said the run started (time.monotonic)
    last_round: dict[str, int] = {}
    kills = getattr(backend, "stops_stuck", False)
    while pending or inflight:
        while pending and len(inflight) < backend.slots:
            task = pending.popleft()
            for unit in task.units():
                if unit.key in handed:
                    progress.task_restarted(unit)
                else:
                    handed.add(unit.key)
                    if unit.cell is not None:
                        store.start(unit.key, unit.payload["cell"], unit.cell.warmup_rounds, unit.cell.info())
                    progress.task_started(unit)
            inflight[backend.submit(task.payload)] = task
        done = backend.wait(list(inflight), timeout=0.2)
        for key, rnd in backend.progress():
            if rnd == 0:  # the run starts: what a timeout is measured from
                began[key] = time.monotonic()
                continue
            last_round[key] = rnd
            progress.round_done(key, rnd)
        died = False
        for handle in done:
            task = inflight.pop(handle)
            try:
                outcome = backend.result(handle)
            except WorkerDied:
                inflight[handle] = task
                died = True
                continue
            began.pop(task.key, None)
            last_round.pop(task.key, None)
            for unit, part in zip(task.units(), outcome["outcomes"] if task.children else [outcome]):
                if unit.cell is not None:
                    store.finish(unit.key, part)
                progress.task_finished(unit, part)
                yield unit, part
        if died:
            # A dead worker takes the whole process pool with it: every task in flight is lost. They
            # are marked interrupted (the next run re-runs them); this run goes on with a fresh pool.
            message = "a worker process died while it ran (killed, out of memory or crashed); re-run to resume"
            lost = list(inflight.values())
            inflight.clear()
            store.interrupt([u.key for t in lost for u in t.units() if u.cell is not None], message)
            backend.restart()
            for unit in (u for t in lost for u in t.units()):
                outcome = {"key": unit.key, "status": "interrupted", "message": message}
                progress.task_finished(unit, outcome)
                yield unit, outcome
            continue
        if not kills or not inflight:
            continue
        now = time.monotonic()
        ran = {task.key: now - began[task.key] for task in inflight.values() if task.key in began}
        if not any(task.payload.get("timeout") and ran.get(task.key, 0.0) > task.payload["timeout"]
                   + stuck_grace(task.payload["timeout"]) for task in inflight.values()):
            continue
        lost = list(inflight.values())
        inflight.clear()
        backend.restart(kill=True)
        stopped = []
        for task in reversed(lost):
            timeout, seconds = task.payload.get("timeout"), ran.get(task.key, 0.0)
            began.pop(task.key, None)
            if timeout and seconds > timeout:
                stopped.append((task, {"key": task.key, "status": "failed", "error": "", "result": None,
                                       "message": timeout_message(timeout, seconds, last_round.get(task.key), killed=True)}))
            else:
                last_round.pop(task.key, None)
                pending.appendleft(task)
        for task, outcome in reversed(stopped):
            for unit in task.units():
                part = {**outcome, "key": unit.key}
                if unit.cell is not None:
                    store.finish(unit.key, part)
                progress.task_finished(unit, part)
                yield unit, part


def require_warm_start() -> None:
    """Warm start needs an engine that starts a run from given parameters at a given round and
    returns its final parameters: ``run_cell(initial_params=, start_round=)``, ``RunResult.final_params``."""
    import dataclasses
    import inspect

    from fedbench import engine

    params = inspect.signature(engine.run_cell).parameters
    fields = {f.name for f in dataclasses.fields(engine.RunResult)}
    if not {"initial_params", "start_round"} <= set(params) or "final_params" not in fields:
        raise FedbenchError(
            "--warmup-rounds needs an engine that can start a run from a checkpoint "
            "(run_cell(initial_params=..., start_round=...)), which this fedbench does not have yet; "
            "use --warmup-rounds 0 (the paper's protocol)"
        )


# --------------------------------------------------------------------------------------------------
# Progress displays
# --------------------------------------------------------------------------------------------------
def _start_line(total: int, skipped: int, todo: Sequence[Task], where: str) -> str:
    already = f", {skipped} already in the store" if skipped else ""
    running = f"; running {len(todo)} {where}" if todo else "; nothing to run"
    return f"matrix: {total} cells{already}{running}"


def _detail(outcome: dict[str, Any]) -> str:
    result = outcome.get("result") or {}
    if outcome["status"] == "ok" and result.get("final_accuracy") is not None:
        return f"accuracy {result['final_accuracy']:.4f} ({result.get('seconds', 0):.1f} s)"
    return outcome.get("message", "")


def _escape(text: str) -> str:
    """``text`` as rich prints it literally (a label like ``x[/]`` is not markup)."""
    from rich.markup import escape

    return escape(text)


class PlainProgress(Progress):
    """One line per finished cell, for logs and pipes (no terminal)."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self._echo = echo
        self._done = 0
        self._total = 0

    def start(self, total, skipped, todo, where):
        self._total = len(todo)
        self._echo(_start_line(total, skipped, todo, where))

    def task_restarted(self, task):
        self._echo(f"restarted   {task.label}  (its worker process was killed to stop a stuck cell)")

    def task_finished(self, task, outcome):
        self._done += 1
        width = len(str(self._total))
        self._echo(f"[{self._done:{width}d}/{self._total}] {outcome['status']:<11} {task.label}  {_detail(outcome)}".rstrip())


class RichProgress(Progress):
    """A live display: cells done / total with an ETA, and each running cell with its current round.

    Labels and messages come from plugins and the user: they are escaped, never read as rich markup."""

    def __init__(self, console) -> None:
        from rich.progress import BarColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as Bar

        self._bar = Bar(
            TextColumn("{task.description}"), BarColumn(bar_width=24), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console, transient=True,
        )
        self._overall = None
        self._rows: dict[str, Any] = {}
        self._seen: dict[str, int] = {}
        self._done = self._total = self._problems = 0

    def start(self, total, skipped, todo, where):
        self._total = len(todo)
        self._bar.console.print(_start_line(total, skipped, todo, where), markup=False, highlight=False)
        if todo:
            self._bar.start()
            self._overall = self._bar.add_task("[bold]cells", total=sum(t.rounds for t in todo), info=self._info())

    def _info(self) -> str:
        return f"{self._done}/{self._total}" + (f" [red]({self._problems} not ok)[/]" if self._problems else "")

    def task_started(self, task):
        self._seen[task.key] = 0
        self._rows[task.key] = self._bar.add_task(f"  {_escape(task.label)}", total=task.rounds,
                                                  info=f"round 0/{task.rounds}")

    def task_restarted(self, task):
        row = self._rows.get(task.key)
        if row is not None:
            self._bar.update(self._overall, advance=-self._seen.get(task.key, 0))
            self._seen[task.key] = 0
            self._bar.update(row, completed=0, info=f"round 0/{task.rounds} (restarted)")

    def round_done(self, key, rnd):
        if key not in self._rows:
            return
        rounds = int(next(t.total for t in self._bar.tasks if t.id == self._rows[key]))
        count = min(self._seen[key] + 1, rounds)
        self._bar.update(self._overall, advance=count - self._seen[key])
        self._seen[key] = count
        self._bar.update(self._rows[key], completed=count, info=f"round {count}/{rounds}")

    def task_finished(self, task, outcome):
        self._done += 1
        if outcome["status"] != "ok":
            self._problems += 1
        colour = "green" if outcome["status"] == "ok" else "red"
        self._bar.console.print(f"[{colour}]{outcome['status']:<11}[/] {_escape(task.label)}  {_escape(_detail(outcome))}",
                                highlight=False)
        row = self._rows.pop(task.key, None)
        if row is not None:
            self._bar.remove_task(row)
        self._bar.update(self._overall, advance=task.rounds - self._seen.pop(task.key, 0), info=self._info())

    def stop(self):
        self._bar.stop()
