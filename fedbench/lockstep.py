"""Lockstep: the cells of a grid advanced round by round together, their benign clients trained as
one stacked batch.

Cells that share dataset, model and local-training setup (:func:`group_key`) have clients of the same
shapes, so the benign clients of all of them -- each starting from its own cell's global model and
running its own cell's client defenses -- can be trained in one call of the stacked trainer (client
axis = cells x clients). The malicious clients' training is batched the same way where the attack
asks for ordinary training (the standard objective, no hooks of its own: the paper's poisoning
attack, sign flipping, label flipping), as is FLTrust's root update (:func:`_finish_together`).
Everything else stays per cell (:class:`fedbench.engine.CellRun`): the attacks' own code,
aggregation, evaluation, the metrics and the result. On a GPU that turns many launch-bound rounds of
10 clients into few rounds of hundreds; on a CPU, which is compute-bound already at 10 clients (the
stacked trainer works in chunks of 10 there), it is about parity.

Same numbers: a client's batches come from its own stream and its defense noise from its own key
(:mod:`fedbench.rng`), so neither depends on which clients share its batch. What can change is float
rounding, since a client's minibatch may be padded to a different width when it shares a chunk with
other cells' clients (the padded slots weigh exactly 0, but a wider matrix product may sum in another
order): per-round metrics agree with one-cell-at-a-time runs to within float32 rounding, amplified
over the rounds as any two trainers' are (tests/test_lockstep.py states the tolerance).

Faults stay per cell: a cell whose round raises is recorded failed and leaves the group; if the
shared training itself raises (a client defense's plugin), each cell's clients are trained again on
their own, so the exception lands on the cell whose defense raised. A timeout or an interrupt stops
the whole group, the cells' own threads included (:func:`_run_fibers`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from fedbench.spec import CellSpec


def group_key(cell: CellSpec) -> tuple:
    """Cells with equal keys can be trained together: same data shapes, same model, same local SGD."""
    sc = cell.scenario
    return (cell.dataset, cell.model, sc.local_epochs, sc.batch_size, sc.lr, sc.momentum)


@dataclass
class Outcome:
    """One cell's end in a lockstep group: its result, or the exception that stopped it."""

    cell: CellSpec
    index: int  # its position in the cells given to run_lockstep
    result: Any = None  # fedbench.engine.RunResult
    error: BaseException | None = None
    rounds_done: list[int] = field(default_factory=list)


def run_lockstep(
    cells: Sequence[CellSpec],
    *,
    data_dir: str | None = None,
    device: str = "cpu",
    trainer: str = "stacked",
    on_round: Callable[[int, int, dict[str, Any]], None] | None = None,
    on_finished: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Run ``cells`` (all of one :func:`group_key`) in lockstep; one :class:`Outcome` per cell, in order.

    ``on_round(index, round, metrics)`` reports each cell's rounds; ``on_finished(outcome)`` each
    cell as soon as it is done (a cell with fewer rounds finishes early and leaves the group)."""
    from fedbench.engine import CellRun
    from fedbench.errors import FedbenchError

    keys = {group_key(c) for c in cells}
    if len(keys) > 1:
        raise FedbenchError("lockstep needs cells of one dataset, model and local-training setup; "
                            f"got {len(keys)} different ones")
    outcomes = [Outcome(cell, i) for i, cell in enumerate(cells)]
    runs: dict[int, CellRun] = {}

    def finish(i: int, error: BaseException | None = None) -> None:
        run = runs.pop(i, None)
        out = outcomes[i]
        if error is not None:
            out.error = error
        elif run is not None:
            out.result = run.result()
        if on_finished is not None:
            on_finished(out)

    for i, cell in enumerate(cells):
        try:
            runs[i] = CellRun(cell, data_dir=data_dir, device=device, trainer=trainer)
        except Exception as error:  # noqa: BLE001 - one cell's problem is recorded on that cell
            finish(i, error)
    for i in [i for i, run in runs.items() if run.done]:
        finish(i)

    while runs:
        order = list(runs)
        requests: list[tuple[int, list]] = []
        for i in order:
            try:
                requests.append((i, runs[i].benign_jobs()))
            except Exception as error:  # noqa: BLE001
                finish(i, error)
        if not requests:
            continue
        first = runs[requests[0][0]]
        with first.threads():
            updates = _train_together(first.trainer, first.setup,
                                      [(runs[i].global_params, jobs, runs[i].client_defenses) for i, jobs in requests])
            finished = _finish_together([(runs[i], upd) for (i, _jobs), upd in zip(requests, updates)])
        for (i, _jobs), row in zip(requests, finished):
            if isinstance(row, BaseException):
                if not isinstance(row, Exception):  # an exit or an interrupt is not the cell's failure
                    raise row
                finish(i, row)
                continue
            outcomes[i].rounds_done.append(row["round"])
            if on_round is not None:
                on_round(i, row["round"], row)
            if runs[i].done:
                finish(i)
    return outcomes


def _train_together(trainer, setup, groups: list[tuple[torch.Tensor, list, Sequence]]) -> list[torch.Tensor | BaseException]:
    """The updates of every group ``(its global parameters, its jobs, its client defenses)``, trained
    in one stacked batch; if that raises, each group on its own so that the exception belongs to the
    cell that caused it."""
    saved = [[job.batch_gen.get_state() for job in jobs] for _, jobs, _ in groups]  # a retry draws the same batches
    try:
        return trainer.train_groups(groups, setup)
    except Exception:  # noqa: BLE001 - found out below, cell by cell
        out: list[torch.Tensor | BaseException] = []
        for (start, jobs, defenses), states in zip(groups, saved):
            for job, state in zip(jobs, states):
                job.batch_gen.set_state(state)
            try:
                out.append(trainer.train(start, jobs, setup, defenses=defenses))
            except Exception as error:  # noqa: BLE001
                out.append(error)
        return out


class Cancelled(BaseException):
    """The lockstep group stopped (a timeout, an interrupt) while this cell waited for its training."""


@dataclass
class _Fiber:
    """One cell finishing its round in a thread of its own (see :func:`_finish_together`)."""

    run: Any  # fedbench.engine.CellRun
    updates: torch.Tensor | BaseException
    go: threading.Event = field(default_factory=threading.Event)
    request: tuple | None = None  # (global parameters, jobs, setup) it waits to have trained
    reply: torch.Tensor | BaseException | None = None
    row: dict[str, Any] | BaseException | None = None
    done: bool = False
    cancelled: bool = False
    thread: threading.Thread | None = None


def _finish_together(items: list[tuple[Any, torch.Tensor | BaseException]]) -> list[dict[str, Any] | BaseException]:
    """Finish the round of every item ``(run, its benign updates)``; returns each one's metrics, or the
    exception that stopped it. The plain training of the rounds (malicious clients whose attack asks
    for the standard objective, FLTrust's root update: ``CellRun.finish_round``'s ``train``) is done for
    all cells together, per local setup, in one stacked batch.

    An attack calls its training from deep inside its own code, so each cell with an adversarial round
    finishes it in a thread of its own, and the threads take turns: exactly one runs at a time, in
    cell order, until it asks for training or finishes; once every one of them waits or is done, the
    waiting requests are trained together and the waiting threads resume in turn. Nothing runs
    concurrently, so plugins need not be thread-safe, and the order of everything is fixed: the same
    numbers every time, and those of one cell at a time up to the float rounding of a wider batch (as
    for the benign clients). A cell without malicious clients this round finishes right here."""
    out: list[dict[str, Any] | BaseException | None] = [None] * len(items)
    fibers: list[tuple[int, _Fiber]] = []
    for k, (run, updates) in enumerate(items):
        if isinstance(updates, BaseException):
            out[k] = updates
        elif run.finish_trains:
            fibers.append((k, _Fiber(run, updates)))
        else:
            out[k] = _finish_one(run, updates)
    if len(fibers) == 1:  # nothing to share training with
        k, fiber = fibers[0]
        out[k] = _finish_one(fiber.run, fiber.updates)
    elif fibers:
        for (k, _), row in zip(fibers, _run_fibers([f for _, f in fibers])):
            out[k] = row
    return out  # type: ignore[return-value]


def _finish_one(run, updates, train=None) -> dict[str, Any] | BaseException:
    try:
        return run.finish_round(updates, train=train)
    except Exception as error:  # noqa: BLE001 - one cell's problem is recorded on that cell
        return error


def _run_fibers(fibers: list[_Fiber]) -> list[dict[str, Any] | BaseException]:
    back = threading.Event()  # set by the fiber that holds the turn when it gives it back

    def ask(fiber: _Fiber, start, jobs, setup):
        fiber.request = (start, jobs, setup)
        back.set()
        fiber.go.wait()
        fiber.go.clear()
        if fiber.cancelled:
            raise Cancelled("the lockstep group stopped")
        reply, fiber.reply = fiber.reply, None
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def body(fiber: _Fiber) -> None:
        fiber.go.wait()
        fiber.go.clear()
        try:
            if fiber.cancelled:
                raise Cancelled("the lockstep group stopped")
            fiber.row = _finish_one(fiber.run, fiber.updates,
                                    lambda start, jobs, setup: ask(fiber, start, jobs, setup))
        except BaseException as error:  # noqa: BLE001 - Cancelled: nobody reads it any more
            fiber.row = error
        finally:
            fiber.done = True
            back.set()

    for i, fiber in enumerate(fibers):
        fiber.thread = threading.Thread(target=body, args=(fiber,), name=f"lockstep-cell-{i}", daemon=True)
        fiber.thread.start()
    holder: list[threading.Thread] = []  # the thread that has the turn, while it has it
    try:
        turn = fibers
        while turn:
            for fiber in turn:
                holder[:] = [fiber.thread]
                fiber.go.set()
                back.wait()
                back.clear()
                holder.clear()
            turn = [f for f in fibers if not f.done]
            if not turn:
                break
            by_setup: dict[Any, list[_Fiber]] = {}
            for fiber in turn:
                by_setup.setdefault(fiber.request[2], []).append(fiber)
            for setup, waiting in by_setup.items():
                first = waiting[0].run
                replies = _train_together(first.trainer, setup, [(f.request[0], f.request[1], ()) for f in waiting])
                for fiber, reply in zip(waiting, replies):
                    fiber.reply, fiber.request = reply, None
    except BaseException:
        for fiber in fibers:  # a waiting thread ends at once
            if not fiber.done:
                fiber.cancelled = True
                fiber.go.set()
        for thread in holder:  # the one running plugin code (a hung one, say) at its next line of Python
            _interrupt(thread)
        raise
    for fiber in fibers:
        fiber.thread.join()
    return [f.row for f in fibers]  # type: ignore[misc]


def _interrupt(thread: threading.Thread) -> None:
    """Raise :class:`Cancelled` in ``thread`` at its next Python instruction (CPython's
    ``PyThreadState_SetAsyncExc``): a timeout reaches only the main thread, and a cell whose attack or
    server stage hangs in a loop of Python would otherwise keep a core busy in this process for good.
    Code stuck in C is not reached (the executors' kill of the worker is for that)."""
    import ctypes

    if thread.ident is not None and thread.is_alive():
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(Cancelled))
