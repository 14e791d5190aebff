"""The matrix runner: grid expansion, validation, parallel execution, failures, resume and Ctrl-C."""

from __future__ import annotations

import importlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from typing import ClassVar

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

import fedbench
from fedbench import matrix as mx
from fedbench.cli import main
from fedbench.errors import FedbenchError, SpecError
from fedbench.store import Store, lock

# A tiny grid on the embedded digits data: 6 rounds, attacks in rounds 2 and 4.
SCENARIO = {"rounds": 6, "attack_rounds": (2, 4)}
CLI_SCENARIO = ["--rounds", "6", "--attack-rounds", "2,4"]

# Throw-away plugins: an attack that crashes and an aggregator that diverges. They live in a real
# module so that worker processes can import them too.
PLUGIN_SOURCE = textwrap.dedent('''
    from dataclasses import dataclass
    from typing import ClassVar

    import torch

    import fedbench


    @dataclass(kw_only=True)
    class Boom(fedbench.Attack):
        """Crashes in every adversarial round (a broken attack plugin)."""

        name: ClassVar[str] = "boom"

        def malicious_updates(self, rnd):
            raise RuntimeError("boom: the attack plugin crashed")


    @dataclass(kw_only=True)
    class NaNAggregator(fedbench.Aggregator):
        """Returns NaN: the global model diverges in round 1."""

        name: ClassVar[str] = "nan"

        def aggregate(self, updates, weights, ctx):
            return torch.full_like(updates[0], float("nan"))


    @fedbench.hookimpl
    def register_attacks(register):
        register(Boom)


    @fedbench.hookimpl
    def register_aggregators(register):
        register(NaNAggregator)
''')
PLUGIN = "fedbench_matrix_test_plugins"


def numbers(path, keys=None):
    """Every per-round number of a store, exactly as stored (NULL for NaN), by cell key."""
    conn = sqlite3.connect(path)
    out: dict[str, list] = {}
    for key, rnd, name, value in conn.execute("SELECT key, round, name, value FROM rounds ORDER BY key, round, name"):
        if keys is None or key in keys:
            out.setdefault(key, []).append((rnd, name, value))
    conn.close()
    return out


def statuses(path):
    conn = sqlite3.connect(path)
    try:
        return dict(conn.execute("SELECT key, status FROM cells"))
    except sqlite3.OperationalError:
        return {}
    finally:
        conn.close()


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """The same grid -- poison and a crashing attack against wbc and a diverging aggregator, with
    the reference cells -- run in this process (jobs=1) and on two worker processes (jobs=2)."""
    root = tmp_path_factory.mktemp("matrix")
    (root / f"{PLUGIN}.py").write_text(PLUGIN_SOURCE)
    sys.path.insert(0, str(root))
    fedbench.register_plugin(importlib.import_module(PLUGIN), name=PLUGIN)
    try:
        cells = mx.expand(attacks=["poison", "boom"], defenses=["wbc", "nan"], **SCENARIO)
        paths = {}
        for jobs in (1, 2):
            paths[jobs] = root / f"jobs{jobs}.db"
            with Store.open(paths[jobs]) as store:
                report = mx.run_matrix(cells, store, jobs=jobs)
            assert report.ran == len(cells) == 9
    finally:
        fedbench.unregister_plugin(PLUGIN)
        sys.path.remove(str(root))
    return {"cells": cells, **paths}


# --------------------------------------------------------------------------------------------------
# Grid expansion and validation
# --------------------------------------------------------------------------------------------------
def test_grid_adds_clean_and_undefended_reference_cells_for_every_seed():
    cells = mx.expand(attacks=["poison"], defenses=["wbc", "cma"], seeds=[0, 1], rounds=3)
    got = {(mc.cell.attack.name, str(mc.cell.defense), mc.cell.seed) for mc in cells}
    assert got == {(a, d, s) for a in ("none", "poison") for d in ("fedavg", "wbc", "cma") for s in (0, 1)}
    assert all(mc.key == mc.cell.hash() for mc in cells)
    assert len({mc.key for mc in cells}) == len(cells) == 12


def test_specs_that_resolve_to_the_same_cell_appear_once():
    cells = mx.expand(attacks=["poison", "poison:images=1"], defenses=["wbc", "wbc:s=0.4", "fedavg"], rounds=3)
    assert sorted((mc.cell.attack.name, str(mc.cell.defense)) for mc in cells) == [
        ("none", "fedavg"), ("none", "wbc"), ("poison", "fedavg"), ("poison", "wbc")]


def test_several_datasets_and_partitions_multiply_the_grid():
    cells = mx.expand(attacks=["poison"], defenses=["wbc"], datasets=["digits"], partitions=["iid", "shards"], rounds=3)
    assert len(cells) == 8 and {str(mc.cell.partition) for mc in cells} == {"iid", "shards"}
    assert len({mc.setting() for mc in cells}) == 2


def test_spec_lists_keep_parameters_with_their_component():
    assert mx.split_list("poison:images=10,lam=0.5,backdoor") == ["poison:images=10,lam=0.5", "backdoor"]
    assert mx.split_list("wbc, cma+wbc:s=0.2,proxy=update ,ctma:beta=0.4") == [
        "wbc", "cma+wbc:s=0.2,proxy=update", "ctma:beta=0.4"]
    assert mx.split_list(["wbc,cma", "ldp"]) == ["wbc", "cma", "ldp"]
    assert mx.parse_seeds("0,2-4,2") == [0, 2, 3, 4]
    with pytest.raises(SpecError, match="seeds"):
        mx.parse_seeds("zero")


def test_unknown_attack_lists_the_known_ones_before_any_work(tmp_path):
    store = tmp_path / "runs.db"
    result = CliRunner().invoke(main, ["matrix", "--attacks", "poison,nope", "--defenses", "wbc", "--store", str(store)])
    assert result.exit_code == 2
    assert "unknown attack 'nope'" in result.output and "poison" in result.output and "none" in result.output
    assert not store.exists()
    with pytest.raises(SpecError, match="known defenses, pre-aggregators and aggregators: .*wbc"):
        mx.expand(attacks=["poison"], defenses=["wbc", "cma+nothere"])


def test_every_cell_is_validated_before_the_first_runs(tmp_path):
    store = tmp_path / "runs.db"
    bad = [["--defenses", "wbc,wbc:s=-1"], ["--defenses", "wbc", "--dataset", "digits,nodata"],
           ["--defenses", "wbc", "--seeds", "0,x"], ["--defenses", "wbc", "--warmup-rounds", "10", "--rounds", "10"]]
    for args in bad:
        result = CliRunner().invoke(main, ["matrix", "--attacks", "poison", *args, "--store", str(store)])
        assert result.exit_code == 2, args
        assert "Error" in result.output and "Traceback" not in result.output
    assert not store.exists()


def test_config_file_describes_the_same_grid(tmp_path):
    grid = tmp_path / "grid.toml"
    grid.write_text('attacks = ["poison"]\ndefenses = ["wbc", "ctma:beta=0.4"]\nseeds = [0, 1]\nrounds = 3\n'
                    '"attack-rounds" = [2]\n')
    result = CliRunner().invoke(main, ["matrix", "--config", str(grid), "--dry-run", "--store", str(tmp_path / "r.db")])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if " new " in line]
    assert len(lines) == 12 and any("poison vs ctma:beta=0.4 seed=1" in line for line in lines)
    bad = tmp_path / "bad.toml"
    bad.write_text('attacks = ["poison"]\ncolour = "blue"\n')
    result = CliRunner().invoke(main, ["matrix", "--config", str(bad), "--dry-run"])
    assert result.exit_code == 2 and "unknown key 'colour'" in result.output


# --------------------------------------------------------------------------------------------------
# Execution
# --------------------------------------------------------------------------------------------------
def test_two_worker_processes_give_bit_identical_numbers(stores):
    assert statuses(stores[2]) == statuses(stores[1])
    assert numbers(stores[2]) == numbers(stores[1])
    final = "SELECT key, final_accuracy, adversarial, mitigation FROM cells ORDER BY key"
    assert sqlite3.connect(stores[2]).execute(final).fetchall() == sqlite3.connect(stores[1]).execute(final).fetchall()
    workers = {w for (w,) in sqlite3.connect(stores[2]).execute("SELECT worker FROM cells")}
    assert len(workers) == 2 and str(os.getpid()) not in " ".join(workers)


def test_a_crashing_cell_is_recorded_as_failed_and_the_matrix_goes_on(stores):
    with Store.read(stores[2]) as store:
        records = store.cells()
    failed = [r for r in records if r.status == "failed"]
    assert sorted(r.defense for r in failed) == ["fedavg", "wbc"] and {r.attack for r in failed} == {"boom"}
    assert all(r.message == f"attack 'boom' of plugin '{PLUGIN}' (registered directly) raised "
               "RuntimeError: boom: the attack plugin crashed" for r in failed)
    assert all("Traceback" in r.error and "malicious_updates" in r.error for r in failed)
    assert sum(r.status == "ok" for r in records) == 4


def test_a_diverging_cell_is_recorded_as_diverged(stores):
    with Store.read(stores[2]) as store:
        diverged = [r for r in store.cells() if r.status == "diverged"]
        assert {r.defense for r in diverged} == {"nan"} and len(diverged) == 3
        assert all("non-finite" in r.message and "round 1" in r.message for r in diverged)
        assert all(len([x for x in store.rounds([r.key]) if x[2] == "accuracy"]) == 1 for r in diverged)


def test_failed_and_diverged_cells_are_shown_in_the_leaderboard(stores):
    result = CliRunner().invoke(main, ["leaderboard", "--store", str(stores[1]), "--format", "md"])
    assert result.exit_code == 0
    assert (f"failed: boom vs wbc, seed 0 -- attack 'boom' of plugin '{PLUGIN}' (registered directly) raised "
            "RuntimeError: boom: the attack plugin crashed") in result.output
    assert "diverged: poison vs nan, seed 0 -- non-finite loss or parameters in round 1" in result.output


def test_rerun_skips_finished_cells_and_retries_failed_ones_only_when_asked(stores):
    with Store.read(stores[1]) as store:
        cells = stores["cells"]
        assert mx.plan(cells, store) == []
        assert {mc.cell.attack.name for mc in mx.plan(cells, store, retry_failed=True)} == {"boom"}
        assert len(mx.plan(cells, store, retry_failed=True)) == 2
        assert len(mx.plan(cells, store, force=True)) == 9


# Runs the matrix CLI with an observer plugin that parks the process inside its second cell: after the
# first round of the second cell it writes a marker file and sleeps. A kill then always lands mid-cell,
# whatever the machine's speed (a poll for the first 'ok' alone raced the second cell's start).
PARK_IN_SECOND_CELL = textwrap.dedent('''
    import os, sys, time
    import fedbench
    from fedbench.cli import main

    class Park:
        seen = []

        @fedbench.hookimpl
        def round_finished(self, cell, round, metrics):
            if cell.hash() not in self.seen:
                self.seen.append(cell.hash())
            if len(self.seen) == 2:
                open(os.environ["PARK_MARKER"], "w").close()
                time.sleep(600)

    fedbench.register_plugin(Park(), name="park")
    sys.argv[0] = "fedbench"
    main()
''')


def test_resume_after_kill_9_runs_every_cell_once_with_the_same_numbers(stores, tmp_path):
    path, marker = tmp_path / "runs.db", tmp_path / "parked"
    args = ["matrix", "--attacks", "poison", "--defenses", "fedavg", *CLI_SCENARIO, "--jobs", "1", "--store", str(path)]
    proc = subprocess.Popen([sys.executable, "-c", PARK_IN_SECOND_CELL, *args, "--quiet"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PARK_MARKER": str(marker)})
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists(), f"the matrix never reached its second cell (exit code {proc.poll()})"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = statuses(path)
    assert sorted(before.values()) == ["ok", "running"], before  # killed in the second of two cells

    result = CliRunner().invoke(main, [*args, "--csv", str(tmp_path / "board.csv")])
    assert result.exit_code == 0, result.output
    assert "1 cells run" in result.output and "1 taken from" in result.output
    # what to do with the store next, with its path as a shell word
    assert f"next: fedbench report --store {path} --out report/" in result.output
    assert f"fedbench plot --store {path} --kind rounds --seed 0 --out rounds.png" in result.output
    conn = sqlite3.connect(path)
    after = dict(conn.execute("SELECT key, status FROM cells"))
    assert len(after) == 2 and set(after.values()) == {"ok"}
    attempts = dict(conn.execute("SELECT key, attempts FROM cells"))
    assert all(attempts[k] == 1 for k, s in before.items() if s == "ok")
    rounds = conn.execute("SELECT key, name, COUNT(*), MIN(round), MAX(round) FROM rounds GROUP BY key, name").fetchall()
    assert {(n, lo, hi) for _, _, n, lo, hi in rounds} == {(6, 1, 6)}
    assert numbers(path) == numbers(stores[1], set(after))
    board = pd.read_csv(tmp_path / "board.csv")
    assert list(board["defense"]) == ["fedavg"] and board.loc[0, "poison/status"] == "ok"


def test_ctrl_c_keeps_finished_cells_marks_the_running_one_interrupted_and_resumes(stores, tmp_path):
    class InterruptInSecondCell(mx.Progress):
        finished = 0

        def task_finished(self, task, outcome):
            self.finished += 1

        def round_done(self, key, rnd):
            if self.finished == 1 and rnd == 3:
                raise KeyboardInterrupt

    cells = mx.expand(attacks=["poison"], defenses=["fedavg"], **SCENARIO)
    path = tmp_path / "runs.db"
    with Store.open(path) as store:
        with pytest.raises(KeyboardInterrupt):
            mx.run_matrix(cells, store, jobs=1, progress=InterruptInSecondCell())
        assert sorted(store.statuses().values()) == ["interrupted", "ok"]
        assert "Ctrl-C" in next(r.message for r in store.cells() if r.status == "interrupted")
        report = mx.run_matrix(cells, store, jobs=1)
    assert (report.ran, report.skipped, report.count("ok")) == (1, 1, 2)
    assert numbers(path) == numbers(stores[1], {mc.key for mc in cells})


def test_ctrl_c_exits_130_with_a_resume_hint(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mx, "run_matrix", interrupted)
    result = CliRunner().invoke(main, ["matrix", "--attacks", "poison", "--defenses", "wbc", "--store",
                                       str(tmp_path / "r.db")])
    assert result.exit_code == 130
    assert "interrupted" in result.output and "run the same command again to resume" in result.output


def test_warm_start_trains_one_clean_checkpoint_per_seed_and_starts_cells_from_it(tmp_path, monkeypatch):
    import torch

    from fedbench import engine

    calls = []

    class Result:
        def __init__(self, cell, start_round, params):
            self.status, self.message, self.final_params = "ok", "", params
            self._dict = {"final_accuracy": 0.5, "adversarial_rounds": [], "mitigation": [], "seconds": 0.0,
                          "timings": {}, "rounds": [{"round": r, "adversarial": False, "accuracy": 0.5, "loss": 1.0,
                                                     "eval_n": 1} for r in range(start_round, cell.rounds + 1)]}

        def to_dict(self):
            return self._dict

    def fake_run_cell(cell, *, initial_params=None, start_round=1, **kwargs):
        calls.append((cell, None if initial_params is None else float(initial_params[0]), start_round))
        return Result(cell, start_round, torch.full((3,), float(cell.seed + 1)))

    monkeypatch.setattr(engine, "run_cell", fake_run_cell)
    monkeypatch.setattr(mx, "require_warm_start", lambda: None)
    cells = mx.expand(attacks=["poison"], defenses=["wbc"], seeds=[0, 1], warmup_rounds=4, rounds=6)
    assert all(mc.key != mc.cell.hash() for mc in cells)
    with Store.open(tmp_path / "runs.db") as store:
        mx.run_matrix(cells, store, jobs=1)
        warmups = [c for c in calls if c[0].rounds == 4]
        assert [(c[0].attack.name, str(c[0].defense), c[0].seed, c[2]) for c in warmups] == [
            ("none", "fedavg", 0, 1), ("none", "fedavg", 1, 1)]
        runs = [c for c in calls if c[0].rounds == 6]
        assert len(runs) == 8 and all(start == 5 and first == cell.seed + 1 for cell, first, start in runs)
        assert all(store.checkpoint(c[0].hash()) is not None for c in warmups)
        assert {r for _, r, _, _ in store.rounds()} == {5, 6}
        calls.clear()
        mx.run_matrix(cells, store, jobs=1, force=True)  # the checkpoints are reused
        assert [c[0].rounds for c in calls] == [6] * 8


def test_warm_start_end_to_end_when_the_engine_supports_it(tmp_path):
    try:
        mx.require_warm_start()
    except FedbenchError as error:
        assert "--warmup-rounds 0" in str(error)
        pytest.skip("the engine cannot start from a checkpoint yet (run_cell(initial_params=, start_round=))")
    path = tmp_path / "runs.db"
    result = CliRunner().invoke(main, ["matrix", "--attacks", "poison", "--defenses", "wbc", "--rounds", "6",
                                       "--warmup-rounds", "3", "--attack-rounds", "4", "--jobs", "1", "--store", str(path)])
    assert result.exit_code == 0, result.output
    assert "warm start: 3 rounds of clean FedAvg" in result.output
    rounds = sqlite3.connect(path).execute("SELECT MIN(round), MAX(round), COUNT(DISTINCT key) FROM rounds").fetchone()
    assert rounds == (4, 6, 4)


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install 'fedbench-suite[ray]')")
def test_ray_executor_gives_the_same_numbers_as_the_process_pool(stores, tmp_path):
    import ray

    cells = mx.expand(attacks=["poison"], defenses=["wbc"], **SCENARIO)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with Store.open(tmp_path / "ray.db") as store:
            report = mx.run_matrix(cells, store, executor="ray")
    finally:
        ray.shutdown()
    assert report.ran == 4 and report.count("ok") == 4
    assert numbers(tmp_path / "ray.db") == numbers(stores[2], {mc.key for mc in cells})


def test_ray_executor_without_ray_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` sees when it is not installed
    result = CliRunner().invoke(main, ["matrix", "--attacks", "poison", "--defenses", "wbc", "--executor", "ray",
                                       "--store", str(tmp_path / "r.db")])
    assert result.exit_code == 2 and "pip install 'fedbench-suite[ray]'" in result.output
    assert not (tmp_path / "r.db").exists()


def test_lock_is_held_while_the_matrix_runs(tmp_path, monkeypatch):
    path = tmp_path / "runs.db"
    seen = []

    def probe(*args, **kwargs):
        with pytest.raises(FedbenchError, match="in use"):
            with lock(path):
                pass
        seen.append(True)
        return mx.MatrixReport(keys=[])

    monkeypatch.setattr(mx, "run_matrix", probe)
    result = CliRunner().invoke(main, ["matrix", "--attacks", "poison", "--defenses", "wbc", "--store", str(path)])
    assert result.exit_code == 0, result.output
    assert seen == [True]


def test_plugin_that_worker_processes_cannot_load_is_refused_before_any_work(tmp_path):
    import types

    local = types.ModuleType("made_up_in_memory")
    fedbench.register_plugin(local, name="in-memory")
    try:
        cells = mx.expand(attacks=["poison"], defenses=["wbc"], rounds=2)
        with Store.open(tmp_path / "runs.db") as store:
            with pytest.raises(FedbenchError, match="plugin 'in-memory' .* use --jobs 1"):
                mx.run_matrix(cells, store, jobs=2)
            assert store.statuses() == {}
    finally:
        fedbench.unregister_plugin("in-memory")


# --------------------------------------------------------------------------------------------------
# Missing data: one error before any cell, and failures of the environment do not stick
# --------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class Mounted(fedbench.Dataset):
    """Test dataset whose files are there only while ``Mounted.available`` (a data folder that a
    mistyped --data-dir, or a worker machine without the files, does not have)."""

    name: ClassVar[str] = "test-mounted"
    default_model: ClassVar[str] = "mlp"
    scenario_defaults: ClassVar[dict] = {"num_clients": 6, "num_malicious": 1, "clients_per_round": 3}
    available: ClassVar[bool] = False
    loads: ClassVar[int] = 0

    def load(self, data_dir):
        if not Mounted.available:
            raise fedbench.DataError(f"test-mounted: no files under {data_dir}")
        Mounted.loads += 1
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(260, 1, 2, 2, generator=g), torch.arange(260) % 2
        return fedbench.DatasetTensors(x[:200], y[:200], x[200:], y[200:], num_classes=2)


class MountedPlugin:
    @fedbench.hookimpl
    def register_datasets(self, register):
        register(Mounted)


@pytest.fixture
def mounted(use_plugin):
    from fedbench.data import load_dataset

    Mounted.available, Mounted.loads = False, 0
    load_dataset.cache_clear()
    use_plugin(MountedPlugin(), "mounted")
    yield Mounted
    load_dataset.cache_clear()


MOUNTED = ["matrix", "--attacks", "poison", "--defenses", "wbc", "--dataset", "test-mounted", "--seeds", "0,1",
           "--rounds", "2", "--attack-rounds", "1", "--jobs", "1"]


def test_missing_data_stops_the_matrix_before_any_cell_and_stores_nothing(mounted, tmp_path):
    store = tmp_path / "runs.db"
    result = CliRunner().invoke(main, [*MOUNTED, "--data-dir", str(tmp_path / "typo"), "--store", str(store)])
    assert result.exit_code == 2, result.output
    assert result.output == f"Error: test-mounted: no files under {tmp_path / 'typo'}\n"
    assert list(tmp_path.iterdir()) == []  # no store, no lock file
    with Store.open(store) as st:
        with pytest.raises(fedbench.DataError, match="no files under"):
            mx.run_matrix(mx.expand(attacks=["poison"], defenses=["wbc"], datasets=["test-mounted"], rounds=2),
                          st, jobs=1)
        assert st.statuses() == {}


def test_the_grid_loads_each_dataset_once_before_the_cells(mounted, tmp_path):
    mounted.available = True
    result = CliRunner().invoke(main, [*MOUNTED, "--store", str(tmp_path / "runs.db")])
    assert result.exit_code == 0, result.output
    assert mounted.loads == 1  # the driver's check; the cells (jobs=1) reuse it


def test_data_a_worker_cannot_find_is_retried_by_the_next_run_without_retry_failed(mounted, tmp_path, monkeypatch):
    """The driver finds the data but the workers do not (a Ray node without the files, a folder
    unmounted mid-run): the cells are recorded interrupted, not failed, and the next run re-runs them."""
    store = tmp_path / "runs.db"
    with monkeypatch.context() as m:
        m.setattr(mx, "check_data", lambda cells, data_dir=None: None)
        first = CliRunner().invoke(main, [*MOUNTED, "--store", str(store)])
    assert first.exit_code == 1, first.output
    assert set(statuses(store).values()) == {"interrupted"} and len(statuses(store)) == 8
    with Store.read(store) as st:
        assert all(r.message.startswith("DataError: test-mounted: no files under") and "next run retries it" in r.message
                   for r in st.cells())
    assert "8 cell(s) did not finish" in first.output

    mounted.available = True
    second = CliRunner().invoke(main, [*MOUNTED, "--store", str(store)])
    assert second.exit_code == 0, second.output
    assert "8 cells run" in second.output and set(statuses(store).values()) == {"ok"}


def test_a_cell_that_raises_after_its_data_loaded_still_fails_and_sticks(stores):
    with Store.read(stores[1]) as store:
        assert {r.status for r in store.cells() if r.attack == "boom" and r.defense != "nan"} == {"failed"}
        assert {mc.cell.attack.name for mc in mx.plan(stores["cells"], store, retry_failed=True)} == {"boom"}
        assert mx.plan(stores["cells"], store) == []


def test_rich_progress_prints_labels_and_messages_literally():
    import io

    from rich.console import Console

    buffer = io.StringIO()
    progress = mx.RichProgress(Console(file=buffer, force_terminal=True, width=200, color_system=None))
    task = mx.Task("k1", "digits mark[/] vs [bold]wbc seed=0", 2, {})
    progress.start(1, 0, [task], "in this process")
    progress.task_started(task)
    progress.round_done("k1", 1)
    progress.task_finished(task, {"status": "failed", "message": "ValueError: expected [/red] here"})
    progress.stop()
    text = buffer.getvalue()
    assert "failed      digits mark[/] vs [bold]wbc seed=0  ValueError: expected [/red] here" in text


def test_a_missing_gpu_stops_the_matrix_before_any_cell_and_stores_nothing(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    store = tmp_path / "r.db"
    result = CliRunner().invoke(main, ["matrix", "--attacks", "poison", "--defenses", "fedavg", *CLI_SCENARIO,
                                       "--device", "cuda", "--store", str(store)])
    assert result.exit_code == 2, result.output
    assert "torch sees no CUDA GPU here" in result.output
    assert not store.exists()
