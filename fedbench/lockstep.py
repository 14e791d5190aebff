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
the whole group: it is raised in the cell that is running, and thrown into the cells that wait.
"""

from __future__ import annotations

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
    """Thrown into the cells still waiting in their round when the lockstep group stops (a timeout,
    an interrupt), so that their code unwinds."""


@dataclass
class _Fiber:
    """One cell finishing its round as a greenlet of its own (see :func:`_finish_together`)."""

    run: Any  # fedbench.engine.CellRun
    updates: torch.Tensor
    greenlet: Any = None
    request: tuple | None = None  # (global parameters, jobs, setup) it waits to have trained
    row: dict[str, Any] | BaseException | None = None
    grad_enabled: bool = True  # autograd's mode where the cell stopped (a thread-wide switch in torch)


def _finish_together(items: list[tuple[Any, torch.Tensor | BaseException]]) -> list[dict[str, Any] | BaseException]:
    """Finish the round of every item ``(run, its benign updates)``, in order; returns each one's
    metrics, or the exception that stopped it. The plain training of the rounds (malicious clients
    whose attack trains with the standard objective and no hooks of its own, FLTrust's root update:
    ``CellRun.finish_round``'s ``train``) is done for all cells together, one stacked batch per local
    setup.

    An attack calls its training from deep inside its own code, so each cell finishes its round as a
    greenlet (a coroutine with a stack of its own, in this thread), and the cells take turns: one
    runs, in cell order, until it asks for training or finishes; once every one of them waits or is
    done, the waiting requests are trained together and the waiting cells resume in turn. It is all
    one thread: plugin code never runs concurrently, torch's thread-local settings are the driver's,
    the order of everything is fixed (the same numbers every time, and those of one cell at a time up
    to the float rounding of a wider batch, as for the benign clients), and a timeout's alarm or an
    interrupt lands in the code that is running, as it would without lockstep."""
    out: list[dict[str, Any] | BaseException | None] = [None] * len(items)
    fibers: list[tuple[int, _Fiber]] = []
    for k, (run, updates) in enumerate(items):
        if isinstance(updates, BaseException):
            out[k] = updates
        else:
            fibers.append((k, _Fiber(run, updates)))
    for (k, _), row in zip(fibers, _run_fibers([f for _, f in fibers])):
        out[k] = row
    return out  # type: ignore[return-value]


def _run_fibers(fibers: list[_Fiber]) -> list[dict[str, Any] | BaseException]:
    from greenlet import getcurrent, greenlet

    driver = getcurrent()

    def train(fiber: _Fiber, start, jobs, setup):
        if getcurrent() is not fiber.greenlet:  # kept by an attack and called later, or from its own thread
            return fiber.run.trainer.train(start, jobs, setup)
        reply = driver.switch((start, jobs, setup))
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def body(fiber: _Fiber):
        try:
            return fiber.run.finish_round(fiber.updates, train=lambda start, jobs, setup: train(fiber, start, jobs, setup))
        except Exception as error:  # noqa: BLE001 - one cell's problem is recorded on that cell
            return error

    def resume(fiber: _Fiber, value=None) -> None:
        """Run ``fiber`` until it asks for training or finishes, under its own autograd mode."""
        mine = torch.is_grad_enabled()
        torch.set_grad_enabled(fiber.grad_enabled)
        try:
            got = fiber.greenlet.switch(value)
        finally:
            fiber.grad_enabled = torch.is_grad_enabled()
            torch.set_grad_enabled(mine)
        if fiber.greenlet.dead:
            fiber.row, fiber.request = got, None
        else:
            fiber.request = got

    for fiber in fibers:
        fiber.greenlet = greenlet(lambda *_, fiber=fiber: body(fiber), parent=driver)  # the first switch's value is ignored
    try:
        for fiber in fibers:
            resume(fiber)
        while True:
            waiting = [f for f in fibers if not f.greenlet.dead]
            if not waiting:
                break
            by_setup: dict[Any, list[_Fiber]] = {}
            for fiber in waiting:  # each request trains under the autograd mode it was made in, as alone
                by_setup.setdefault((fiber.request[2], fiber.grad_enabled), []).append(fiber)
            replies: dict[int, torch.Tensor | BaseException] = {}
            for (setup, grad_enabled), group in by_setup.items():
                with torch.set_grad_enabled(grad_enabled):
                    trained = _train_together(group[0].run.trainer, setup, [(f.request[0], f.request[1], ()) for f in group])
                replies.update({id(f): r for f, r in zip(group, trained)})
            for fiber in waiting:
                resume(fiber, replies[id(fiber)])
    except BaseException:
        for fiber in fibers:  # unwind the cells still waiting (their finally blocks run here and now)
            for _ in range(3):  # one that catches Cancelled and asks again gets it again
                if not fiber.greenlet:  # false once it is dead
                    break
                try:
                    fiber.greenlet.throw(Cancelled("the lockstep group stopped"))
                except BaseException:  # noqa: BLE001 - the Cancelled coming back, or what unwinding raised
                    pass
        raise
    return [f.row for f in fibers]  # type: ignore[misc]
