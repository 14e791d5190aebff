"""Lockstep: the cells of a grid advanced round by round together, their benign clients trained as
one stacked batch.

Cells that share dataset, model and local-training setup (:func:`group_key`) have clients of the same
shapes, so the benign clients of all of them -- each starting from its own cell's global model and
running its own cell's client defenses -- can be trained in one call of the stacked trainer (client
axis = cells x clients). Everything else stays per cell (:class:`fedbench.engine.CellRun`): the
malicious clients, aggregation, evaluation, the metrics and the result. On a GPU that turns many
launch-bound rounds of 10 clients into few rounds of hundreds; on a CPU, which is compute-bound
already at 10 clients (the stacked trainer works in chunks of 10 there), it is about parity.

Same numbers: a client's batches come from its own stream and its defense noise from its own key
(:mod:`fedbench.rng`), so neither depends on which clients share its batch. What can change is float
rounding, since a client's minibatch may be padded to a different width when it shares a chunk with
other cells' clients (the padded slots weigh exactly 0, but a wider matrix product may sum in another
order): per-round metrics agree with one-cell-at-a-time runs to within float32 rounding, amplified
over the rounds as any two trainers' are (tests/test_lockstep.py states the tolerance).

Faults stay per cell: a cell whose round raises is recorded failed and leaves the group; if the
shared training itself raises (a client defense's plugin), each cell's clients are trained again on
their own, so the exception lands on the cell whose defense raised.
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
        updates = _train_together([(runs[i], jobs) for i, jobs in requests])
        for (i, _jobs), upd in zip(requests, updates):
            run = runs[i]
            try:
                if isinstance(upd, BaseException):
                    raise upd
                row = run.finish_round(upd)
            except Exception as error:  # noqa: BLE001
                finish(i, error)
                continue
            outcomes[i].rounds_done.append(row["round"])
            if on_round is not None:
                on_round(i, row["round"], row)
            if run.done:
                finish(i)
    return outcomes


def _train_together(requests: list[tuple[Any, list]]) -> list[torch.Tensor | BaseException]:
    """The benign updates of every request ``(run, jobs)``, trained in one stacked batch; if that
    raises, each request on its own so that the exception belongs to the cell that caused it."""
    first = requests[0][0]
    saved = [[job.batch_gen.get_state() for job in jobs] for _, jobs in requests]  # a retry draws the same batches
    try:
        with first.threads():
            return first.trainer.train_groups(
                [(run.global_params, jobs, run.client_defenses) for run, jobs in requests], first.setup)
    except Exception:  # noqa: BLE001 - found out below, cell by cell
        out: list[torch.Tensor | BaseException] = []
        for (run, jobs), states in zip(requests, saved):
            for job, state in zip(jobs, states):
                job.batch_gen.set_state(state)
            try:
                with run.threads():
                    out.append(run.trainer.train(run.global_params, jobs, run.setup, defenses=run.client_defenses))
            except Exception as error:  # noqa: BLE001
                out.append(error)
        return out
