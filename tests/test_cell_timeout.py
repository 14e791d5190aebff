"""--cell-timeout: a plugin that hangs a cell costs that cell, not the grid.

The hanging plugins live in tests/plugins_that_hang.py (importable by worker processes): an attack
that sleeps forever in its adversarial round (round 2), an aggregator that busy-loops from round 2
on, and an attack that blocks SIGALRM first, as code stuck in C would not notice the alarm either.
The cells that finish take well under 0.2 s here, so a timeout of 1 s never stops one of them."""

from __future__ import annotations

import importlib
import math
import re
import shutil
import signal
import sqlite3
import time

import pytest
from click.testing import CliRunner

import fedbench
from fedbench import matrix as mx
from fedbench.cli import main
from fedbench.executors import Alarm, CellTimeout
from fedbench.store import Store

PLUGIN = "plugins_that_hang"
hanging = importlib.import_module(PLUGIN)
TIMEOUT = 1
SCENARIO = ["--rounds", "3", "--attack-rounds", "2"]
GRID = ["--attacks", "poison,test-sleepy", "--defenses", "wbc,test-spin", *SCENARIO]
HUNG = {("test-sleepy", "fedavg"), ("test-sleepy", "wbc"), ("test-sleepy", "test-spin"),
        ("none", "test-spin"), ("poison", "test-spin")}
STOPPED = "stopped after 1 s (--cell-timeout 1): the cell did not finish; the last round it finished was 1"
IN_SLEEPY = f"{STOPPED}; it was stopped in attack 'test-sleepy' of plugin '{PLUGIN}' (registered directly)"
IN_SPIN = f"{STOPPED}; it was stopped in aggregator 'test-spin' of plugin '{PLUGIN}' (registered directly)"


def matrix(store, *args):
    return CliRunner().invoke(main, ["matrix", "--store", str(store), *args])


def records(path):
    with Store.read(path) as store:
        return {(r.attack, r.defense): r for r in store.cells()}


def numbers(path, keys):
    """Every per-round number of the cells ``keys``, exactly as stored, by key."""
    conn = sqlite3.connect(path)
    out: dict[str, list] = {}
    for key, rnd, name, value in conn.execute("SELECT key, round, name, value FROM rounds ORDER BY key, round, name"):
        if key in keys:
            out.setdefault(key, []).append((rnd, name, value))
    conn.close()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run of poison against wbc without any hanging plugin (the reference), and the same grid
    with the hanging attack and aggregator added, under --cell-timeout 1, with --jobs 1 and 2."""
    root = tmp_path_factory.mktemp("timeout")
    fedbench.register_plugin(hanging, name=PLUGIN)
    try:
        out = {"reference": root / "reference.db"}
        assert matrix(out["reference"], "--attacks", "poison", "--defenses", "wbc", *SCENARIO, "--jobs", "1").exit_code == 0
        for jobs in (1, 2):
            out[jobs] = root / f"jobs{jobs}.db"
            out[f"result{jobs}"] = matrix(out[jobs], *GRID, "--jobs", str(jobs), "--cell-timeout", str(TIMEOUT))
        yield out
    finally:
        fedbench.unregister_plugin(PLUGIN)


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_hung_cell_is_failed_with_the_timeout_and_the_last_round_it_finished(runs, jobs):
    cells = records(runs[jobs])
    assert len(cells) == 9
    assert {pair for pair, r in cells.items() if r.status == "failed"} == HUNG
    for pair in HUNG:
        assert cells[pair].message == (IN_SLEEPY if pair[0] == "test-sleepy" else IN_SPIN), pair
        assert "CellTimeout" in cells[pair].error and "Traceback" in cells[pair].error


@pytest.mark.parametrize("jobs", [1, 2])
def test_the_other_cells_are_ok_with_the_numbers_of_a_run_without_the_hanging_plugins(runs, jobs):
    cells, reference = records(runs[jobs]), records(runs["reference"])
    ok = {pair: r for pair, r in cells.items() if r.status == "ok"}
    assert set(ok) == set(reference) == {("none", "fedavg"), ("none", "wbc"), ("poison", "fedavg"), ("poison", "wbc")}
    keys = {r.key for r in ok.values()}
    assert keys == {r.key for r in reference.values()}
    assert numbers(runs[jobs], keys) == numbers(runs["reference"], keys) and len(numbers(runs[jobs], keys)) == 4


@pytest.mark.parametrize("jobs", [1, 2])
def test_timed_out_cells_end_the_command_as_any_failed_cell_does(runs, jobs):
    """Exit 1 with the leaderboard printed, as for a cell whose plugin raised: the command itself
    did its job (exit 2 is for errors the user must fix before anything runs)."""
    result = runs[f"result{jobs}"]
    assert result.exit_code == 1, result.output
    assert "5 cell(s) did not finish" in result.output and "9 cells run" in result.output
    assert "failed: test-sleepy vs wbc, seed 0 -- stopped after 1 s (--cell-timeout 1)" in result.output


def test_a_second_run_skips_timed_out_cells_unless_retry_failed(runs, tmp_path):
    store = tmp_path / "runs.db"
    shutil.copy(runs[2], store)
    again = matrix(store, *GRID, "--jobs", "2", "--cell-timeout", str(TIMEOUT))
    assert again.exit_code == 1 and "0 cells run" in again.output and "9 taken from" in again.output
    assert {pair: r.attempts for pair, r in records(store).items()} == {pair: 1 for pair in records(runs[2])}

    retried = matrix(store, *GRID, "--jobs", "2", "--cell-timeout", str(TIMEOUT), "--retry-failed")
    assert retried.exit_code == 1 and "5 cells run" in retried.output, retried.output
    cells = records(store)
    assert {pair for pair, r in cells.items() if r.attempts == 2} == HUNG
    assert {pair for pair, r in cells.items() if r.status == "failed"} == HUNG


def test_a_task_the_alarm_cannot_stop_has_its_worker_killed_and_the_grid_goes_on(runs, tmp_path, monkeypatch):
    """test-deaf blocks SIGALRM before it sleeps: only the driver's backstop can stop it. It kills
    the worker once the task is STUCK_GRACE_S past its timeout (1 s here, to keep the test short)."""
    monkeypatch.setattr(mx, "STUCK_GRACE_S", 1.0)
    store = tmp_path / "runs.db"
    result = matrix(store, "--attacks", "test-deaf", "--defenses", "wbc", *SCENARIO, "--jobs", "2", "--cell-timeout", "1")
    assert result.exit_code == 1, result.output
    cells = records(store)
    assert {pair for pair, r in cells.items() if r.status == "failed"} == {("test-deaf", "fedavg"), ("test-deaf", "wbc")}
    killed = re.compile(r"stopped after (\d+(\.\d)?) s \(--cell-timeout 1\): the cell did not finish and did not stop at "
                        r"its timeout \(stuck where the alarm cannot reach it, in C code say\), so its worker process "
                        r"was killed; the last round it finished was 1")
    seconds = []
    for pair in (("test-deaf", "fedavg"), ("test-deaf", "wbc")):
        found = killed.fullmatch(cells[pair].message)
        assert found, cells[pair].message
        seconds.append(float(found[1]))
    # The first is killed once past timeout + grace; the other, in flight beside it and past its own
    # timeout too, is recorded with it rather than run again.
    assert max(seconds) >= 1 + 1 and min(seconds) >= 1
    ok = {cells[p].key for p in (("none", "fedavg"), ("none", "wbc")) if cells[p].status == "ok"}
    assert len(ok) == 2 and numbers(store, ok) == numbers(runs["reference"], ok)


def test_a_hung_warm_up_is_stopped_and_its_cells_fail_with_its_message(use_plugin, tmp_path):
    use_plugin(hanging.HangWarmUp(), "hang-warm-up")
    store = tmp_path / "runs.db"
    result = matrix(store, "--attacks", "poison", "--defenses", "wbc", "--rounds", "4", "--attack-rounds", "3",
                    "--warmup-rounds", "2", "--jobs", "1", "--cell-timeout", str(TIMEOUT))
    assert result.exit_code == 1, result.output
    cells = records(store)
    assert len(cells) == 4 and {r.status for r in cells.values()} == {"failed"}
    assert all(r.message.startswith(f"its clean warm-up failed: {STOPPED}") for r in cells.values())
    warm_up = mx.expand(attacks=["poison"], defenses=["wbc"], rounds=4, attack_rounds=(3,), warmup_rounds=2)[0].warmup_cell()
    with Store.read(store) as st:
        assert st.checkpoint(warm_up.hash()) is None


@pytest.mark.parametrize("value", ["0", "-3", "nan", "inf"])
def test_the_cell_timeout_must_be_a_finite_positive_number_of_seconds(value, tmp_path):
    store = tmp_path / "runs.db"
    result = matrix(store, "--attacks", "poison", "--defenses", "wbc", "--cell-timeout", value)
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"Error: --cell-timeout {value} is not allowed; need a finite number of seconds "
                                     "> 0 (e.g. 3600), or no timeout at all")
    assert not store.exists()
    preset = CliRunner().invoke(main, ["reproduce", "fig2", "--quick", "--store", str(store), "--cell-timeout", value])
    assert preset.exit_code == 2 and "--cell-timeout" in preset.stderr and not store.exists()


def test_run_matrix_refuses_a_timeout_that_is_not_a_positive_number(tmp_path):
    cells = mx.expand(attacks=["poison"], defenses=["wbc"], rounds=2)
    with Store.open(tmp_path / "runs.db") as store:
        for bad in (0, -1.0, math.nan, True, "30"):
            with pytest.raises(fedbench.FedbenchError, match="cell_timeout .* is not allowed"):
                mx.run_matrix(cells, store, jobs=1, cell_timeout=bad)
        assert store.statuses() == {}


def test_the_alarm_interrupts_a_sleep_and_restores_the_timer_and_handler_it_found():
    def outer(signum, frame):
        raise AssertionError("the outer alarm fired")

    previous = signal.signal(signal.SIGALRM, outer)
    signal.setitimer(signal.ITIMER_REAL, 100)
    try:
        started = time.monotonic()
        with pytest.raises(CellTimeout):
            with Alarm(0.05):
                time.sleep(30)
        assert time.monotonic() - started < 10
        assert signal.getsignal(signal.SIGALRM) is outer
        assert 90 < signal.getitimer(signal.ITIMER_REAL)[0] <= 100
        with Alarm(None):  # no timeout: nothing changes
            assert signal.getsignal(signal.SIGALRM) is outer
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --------------------------------------------------------------------------------------------------
# The driver's backstop, on a stand-in for the process pool
# --------------------------------------------------------------------------------------------------
class StuckPool:
    """A backend like the process pool (``stops_stuck``) whose task ``stuck`` never finishes, and
    whose other tasks finish only once the pool was restarted -- so one is in flight when the
    stuck one is stopped. Its workers report each task's start, as real ones do."""

    slots = 2
    where = "on a stand-in pool"
    stops_stuck = True

    def __init__(self, stuck: str) -> None:
        self.stuck, self.submitted, self.restarts = stuck, [], []
        self._handles: dict[int, str] = {}
        self._starts: list[tuple[str, int]] = []

    def submit(self, task):
        handle = len(self.submitted)
        self.submitted.append(task["key"])
        self._handles[handle] = task["key"]
        self._starts.append((task["key"], 0))
        return handle

    def wait(self, handles, timeout):
        return [h for h in handles if self.restarts and self._handles[h] != self.stuck]

    def result(self, handle):
        return {"key": self._handles[handle], "status": "ok", "message": "", "error": "", "result": None}

    def progress(self):
        out, self._starts = self._starts, []
        return out

    def restart(self, kill=False):
        self.restarts.append(kill)


class Recorder(mx.Progress):
    def __init__(self):
        self.events = []

    def task_started(self, task):
        self.events.append(("started", task.key))

    def task_restarted(self, task):
        self.events.append(("restarted", task.key))

    def task_finished(self, task, outcome):
        self.events.append((outcome["status"], task.key))


def test_a_stuck_task_is_failed_and_the_one_in_flight_beside_it_runs_again_in_the_same_run(tmp_path, monkeypatch):
    monkeypatch.setattr(mx, "STUCK_GRACE_S", 0.0)
    innocent, stuck, waiting = mx.expand(attacks=["poison"], defenses=["wbc"], rounds=3)[:3]
    tasks = [mx._cell_task(innocent, {"timeout": None}, None), mx._cell_task(stuck, {"timeout": 0.01}, None),
             mx._cell_task(waiting, {"timeout": None}, None)]
    pool, progress = StuckPool(stuck.key), Recorder()
    with Store.open(tmp_path / "runs.db") as store:
        done = [(task.key, outcome["status"]) for task, outcome in mx._drive(tasks, pool, store, progress)]
        cells = {r.key: r for r in store.cells()}
    assert done == [(stuck.key, "failed"), (innocent.key, "ok"), (waiting.key, "ok")]
    assert pool.restarts == [True]  # killed, once
    assert pool.submitted == [innocent.key, stuck.key, innocent.key, waiting.key]
    assert progress.events == [("started", innocent.key), ("started", stuck.key), ("failed", stuck.key),
                               ("restarted", innocent.key), ("started", waiting.key), ("ok", innocent.key),
                               ("ok", waiting.key)]
    assert cells[stuck.key].status == "failed" and "so its worker process was killed; no round had finished" in cells[stuck.key].message
    assert cells[innocent.key].status == "ok" and cells[innocent.key].attempts == 1
