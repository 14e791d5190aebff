"""Lockstep: cells advanced round by round together, their benign clients trained in one stacked batch,
give the per-round metrics of one cell at a time; faults stay with their cell; the matrix records
lockstep cells exactly as others."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import fedbench
from fedbench.engine import run_cell
from fedbench.errors import FedbenchError
from fedbench.lockstep import group_key, run_lockstep
from fedbench.spec import make_cell

# Float32 rounding: a client's minibatch can be padded to another width when it shares a chunk with
# other cells' clients; its padded slots weigh exactly 0, but the sums run in another order. Over a
# few rounds that stays within 1e-4 of the metrics, far below one test image of the accuracy (1/1797).
TOL = 1e-4

GRID = [
    ("poison", "fedavg"), ("poison", "wbc"), ("backdoor", "cma+wbc"), ("none", "ldp"), ("alie", "krum:f=2"),
    ("signflip", "fltrust"), ("poison:adaptive=true", "cc"), ("none", "fedavg"),
]


def cells(rounds=4, **kw):
    out = []
    for seed in (0, 1):
        for attack, defense in GRID:
            malicious = 2 if "krum" in defense else None
            out.append(make_cell(attack=attack, defense=defense, dataset="digits", rounds=rounds, seed=seed,
                                 attack_rounds=tuple(r for r in (2, 3) if r <= rounds), num_malicious=malicious, **kw))
    return out


def assert_same_rows(a, b):
    assert [r["round"] for r in a] == [r["round"] for r in b]
    for ra, rb in zip(a, b):
        assert set(ra) == set(rb)
        for k in ra:
            if isinstance(ra[k], float):
                assert ra[k] == pytest.approx(rb[k], abs=TOL), (k, ra["round"])
            else:
                assert ra[k] == rb[k]


def test_lockstep_gives_the_per_round_metrics_of_one_cell_at_a_time():
    grid = cells()
    together = run_lockstep(grid)
    assert all(o.error is None for o in together), [str(o.error) for o in together if o.error]
    for cell, out in zip(grid, together):
        alone = run_cell(cell)
        assert out.result.status == alone.status
        assert_same_rows(out.result.rounds, alone.rounds)
        assert [m.rounds for m in out.result.mitigation] == [m.rounds for m in alone.mitigation]
        assert torch.allclose(out.result.final_params, alone.final_params, atol=1e-4)


def test_cells_of_different_lengths_leave_the_group_when_they_are_done():
    short = make_cell(attack="poison", defense="wbc", dataset="digits", rounds=2, attack_rounds=(2,))
    long = make_cell(attack="poison", defense="wbc", dataset="digits", rounds=5, attack_rounds=(2,), seed=3)
    finished = []
    outs = run_lockstep([long, short], on_finished=lambda o: finished.append(o.cell))
    assert finished == [short, long]
    assert [len(o.result.rounds) for o in outs] == [5, 2]
    assert_same_rows(outs[0].result.rounds, run_cell(long).rounds)


@dataclass(kw_only=True)
class Explodes(fedbench.Attack):
    """Raises in its first adversarial round."""

    name: ClassVar[str] = "explodes-test"

    def malicious_updates(self, rnd):
        raise RuntimeError("explodes: boom")


@dataclass(kw_only=True)
class BrokenDefense(fedbench.ClientDefense):
    """A client defense that raises inside the shared training."""

    name: ClassVar[str] = "broken-defense-test"
    per_step: ClassVar[bool] = True

    def after_step(self, state):
        raise ValueError("broken defense")


@dataclass(kw_only=True)
class Unwinds(fedbench.Attack):
    """Sign flipping that records, per cell, that its code unwound (its finally block ran)."""

    name: ClassVar[str] = "unwinds-test"
    unwound: ClassVar[list] = []

    def malicious_updates(self, rnd):
        try:
            return -rnd.train(rnd.client_data)
        finally:
            Unwinds.unwound.append(rnd.generator.initial_seed())


@dataclass(kw_only=True)
class TrainsWithoutGrad(fedbench.Attack):
    """Asks for its training with autograd off: that fails (no gradient), in lockstep as alone."""

    name: ClassVar[str] = "no-grad-test"

    def malicious_updates(self, rnd):
        with torch.no_grad():
            return rnd.train(rnd.client_data)


class _Plugin:
    """The test components above, for the tests that ask for ``faulty_plugins``."""

    @fedbench.hookimpl
    def register_attacks(self, register):
        register(Explodes)
        register(Unwinds)
        register(TrainsWithoutGrad)

    @fedbench.hookimpl
    def register_defenses(self, register):
        register(BrokenDefense)


@pytest.fixture
def faulty_plugins():
    fedbench.register_plugin(_Plugin(), name="lockstep-faults")
    yield
    fedbench.unregister_plugin("lockstep-faults")


def test_a_cell_that_raises_fails_alone_and_the_others_finish_with_their_numbers(faulty_plugins):
    good = cells(rounds=3)[:3]
    bad_attack = make_cell(attack="explodes-test", defense="fedavg", dataset="digits", rounds=3, attack_rounds=(2,))
    bad_defense = make_cell(attack="none", defense="broken-defense-test", dataset="digits", rounds=3)
    outs = run_lockstep([good[0], bad_attack, good[1], bad_defense, good[2]])
    assert "explodes: boom" in str(outs[1].error) and outs[1].rounds_done == [1]
    assert "broken defense" in str(outs[3].error) and outs[3].rounds_done == []
    for cell, out in zip(good, (outs[0], outs[2], outs[4])):
        assert out.error is None
        assert_same_rows(out.result.rounds, run_cell(cell).rounds)


def test_cells_that_cannot_share_a_batch_are_refused():
    a = make_cell(attack="poison", dataset="digits", rounds=2)
    b = make_cell(attack="poison", dataset="digits", rounds=2, batch_size=16)
    assert group_key(a) != group_key(b)
    with pytest.raises(FedbenchError, match="lockstep needs cells of one dataset, model and local-training setup"):
        run_lockstep([a, b])


def test_lockstep_noise_of_wbc_is_the_clients_own():
    """The same client gets the same WBC noise alone and in a batch with other cells' clients: the
    final parameters of a wbc cell agree whether it runs with 15 other cells or alone."""
    grid = cells(rounds=2)
    wbc = [i for i, c in enumerate(grid) if c.defense.client]
    outs = run_lockstep(grid)
    for i in wbc:
        alone = run_cell(grid[i])
        assert math.isclose(float(outs[i].result.final_params.sum()), float(alone.final_params.sum()), abs_tol=1e-3)


def test_a_lockstep_matrix_stores_the_numbers_of_a_plain_one_and_says_how_it_ran(tmp_path):
    from click.testing import CliRunner

    from fedbench.cli import main
    from fedbench.store import Store

    grid = ["matrix", "--attacks", "poison,backdoor", "--defenses", "wbc,cma", "--seeds", "0,1", "--rounds", "3",
            "--attack-rounds", "2", "--quiet"]
    stores = {}
    for mode, jobs in (("--lockstep", "2"), ("--no-lockstep", "1"), ("--lockstep", "1")):
        path = tmp_path / f"{mode}{jobs}.db"
        result = CliRunner().invoke(main, [*grid, mode, "--jobs", jobs, "--store", str(path)])
        assert result.exit_code == 0, result.output
        with Store.read(path) as store:
            cells = {c.key: c for c in store.cells()}
            stores[mode, jobs] = (sorted(store.rounds(list(cells))), {k: c.status for k, c in cells.items()},
                                  {k: store.provenance(k)["worker"] for k in cells})
    plain_rounds, plain_status, plain_workers = stores["--no-lockstep", "1"]
    assert len(plain_status) == 18 and set(plain_status.values()) == {"ok"}
    assert not any("lockstep" in w for w in plain_workers.values())
    for key in (("--lockstep", "2"), ("--lockstep", "1")):
        rounds, status, workers = stores[key]
        assert status == plain_status
        assert [r[:3] for r in rounds] == [r[:3] for r in plain_rounds]
        assert all(abs(a[3] - b[3]) <= TOL for a, b in zip(rounds, plain_rounds) if a[3] is not None)
        assert all(" lockstep x" in w for w in workers.values())


@pytest.mark.skipif(__import__("importlib").util.find_spec("ray") is None, reason="ray is not installed")
def test_lockstep_groups_run_as_ray_tasks_with_the_same_numbers(tmp_path):
    import subprocess
    import sys

    from fedbench.store import Store

    grid = ["matrix", "--attacks", "poison", "--defenses", "wbc", "--seeds", "0,1", "--rounds", "3",
            "--attack-rounds", "2", "--quiet"]
    env = {k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS" and not k.startswith("RAY_AUTH")}
    runs = {}
    for name, extra in (("ray", ["--executor", "ray", "--lockstep", "--jobs", "2"]), ("plain", ["--jobs", "1"])):
        path = tmp_path / f"{name}.db"
        done = subprocess.run([sys.executable, "-m", "fedbench", *grid, *extra, "--store", str(path)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        with Store.read(path) as store:
            keys = [c.key for c in store.cells()]
            runs[name] = (sorted(store.rounds(keys)), {k: store.provenance(k)["worker"] for k in keys})
    assert [r[:3] for r in runs["ray"][0]] == [r[:3] for r in runs["plain"][0]]
    assert all(abs(a[3] - b[3]) <= TOL for a, b in zip(runs["ray"][0], runs["plain"][0]) if a[3] is not None)
    assert all(" lockstep x" in w and "(Ray node " in w for w in runs["ray"][1].values())


def _record_train_groups(monkeypatch):
    """The calls of the stacked trainer's ``train_groups``: (setup, clients per group)."""
    from fedbench.training import StackedTrainer

    calls = []
    original = StackedTrainer.train_groups

    def recording(self, groups, setup):
        groups = list(groups)
        calls.append((setup, [len(jobs) for _, jobs, _ in groups]))
        return original(self, groups, setup)

    monkeypatch.setattr(StackedTrainer, "train_groups", recording)
    return calls


def test_malicious_clients_of_many_cells_train_in_one_batch_with_their_own_numbers(monkeypatch):
    """Four poisoning cells (10 epochs over one image) and two label-flipping ones (the scenario's
    setup): in the adversarial round the malicious clients of each setup train in one call, and every
    cell still has the metrics it has alone."""
    grid = [make_cell(attack=a, defense=d, dataset="digits", rounds=3, attack_rounds=(2,), seed=s)
            for a, d, s in [("poison", "fedavg", 0), ("poison", "wbc", 0), ("poison", "cma", 1), ("poison", "fedavg", 2),
                            ("labelflip", "fedavg", 0), ("labelflip", "cma", 1)]]
    calls = _record_train_groups(monkeypatch)
    outs = run_lockstep(grid)
    setup = calls[0][0]  # the scenario's: 1 epoch; 5 of the 10 clients of the adversarial round are malicious
    assert calls == [
        (setup, [10] * 6),  # round 1: the benign clients of all cells
        (setup, [5] * 6),  # round 2: the benign clients, then the malicious ones of each setup
        (dataclasses.replace(setup, epochs=10), [5] * 4),
        (setup, [5] * 2),
        (setup, [10] * 6),  # round 3
    ]
    for cell, out in zip(grid, outs):
        assert out.error is None
        assert_same_rows(out.result.rounds, run_cell(cell).rounds)


def test_fltrust_root_updates_of_many_cells_train_in_one_batch(monkeypatch):
    grid = [make_cell(attack="none", defense="fltrust", dataset="digits", rounds=2, seed=s) for s in (0, 1, 2)]
    calls = _record_train_groups(monkeypatch)
    outs = run_lockstep(grid)
    assert [sizes for _, sizes in calls] == [[10, 10, 10], [1, 1, 1]] * 2  # benign clients, then the root updates
    for cell, out in zip(grid, outs):
        assert_same_rows(out.result.rounds, run_cell(cell).rounds)


def test_a_cell_that_trains_with_autograd_off_fails_alone_in_its_group(faulty_plugins):
    """Autograd's on/off switch is one per thread in torch, and the cells of a group share the
    driver's thread: each cell keeps its own, and its training requests run under it."""
    bad = make_cell(attack="no-grad-test", defense="fedavg", dataset="digits", rounds=3, attack_rounds=(2,))
    good = [make_cell(attack="poison", defense="fedavg", dataset="digits", rounds=3, attack_rounds=(2,), seed=s)
            for s in (1, 2)]
    with pytest.raises(RuntimeError) as alone:
        run_cell(bad)
    outs = run_lockstep([good[0], bad, good[1]])
    assert str(outs[1].error) == str(alone.value) and outs[1].rounds_done == [1]
    for cell, out in zip(good, (outs[0], outs[2])):
        assert out.error is None
        assert_same_rows(out.result.rounds, run_cell(cell).rounds)
    assert torch.is_grad_enabled()


def test_a_stop_while_cells_wait_for_training_reaches_the_caller_and_unwinds_them(faulty_plugins, monkeypatch):
    """An interrupt (or a group timeout) in the driver while cells wait for their batched malicious
    training: it reaches the caller, and every waiting cell's code unwinds then and there."""
    from fedbench import lockstep

    Unwinds.unwound.clear()
    original = lockstep._train_together
    calls = []

    def interrupted(trainer, setup, groups):
        calls.append(groups)
        if len(calls) == 3:  # after the benign clients of rounds 1 and 2: the malicious ones of round 2
            raise KeyboardInterrupt
        return original(trainer, setup, groups)

    monkeypatch.setattr(lockstep, "_train_together", interrupted)
    grid = [make_cell(attack="unwinds-test", defense="fedavg", dataset="digits", rounds=2, attack_rounds=(2,), seed=s)
            for s in (0, 1, 2)]
    with pytest.raises(KeyboardInterrupt):
        run_lockstep(grid)
    assert all(defenses == () for _, _, defenses in calls[2])  # it was the malicious training
    assert len(Unwinds.unwound) == 3 and len(set(Unwinds.unwound)) == 3


def test_when_the_batched_malicious_training_raises_each_cell_trains_its_own(monkeypatch):
    """A failure of the shared malicious batch is found out cell by cell: here it raised only because
    it was shared, so every cell trains its malicious clients on its own, with its own numbers."""
    from fedbench.training import StackedTrainer

    original = StackedTrainer.train_groups

    def fails_when_malicious(self, groups, setup):
        if setup.epochs == 10:
            raise RuntimeError("shared batch failed")
        return original(self, groups, setup)

    monkeypatch.setattr(StackedTrainer, "train_groups", fails_when_malicious)
    grid = [make_cell(attack="poison", defense=d, dataset="digits", rounds=3, attack_rounds=(2,), seed=s)
            for d, s in (("fedavg", 0), ("cma", 1))]
    outs = run_lockstep(grid)
    for cell, out in zip(grid, outs):
        assert out.error is None
        assert_same_rows(out.result.rounds, run_cell(cell).rounds)


@pytest.mark.parametrize("hang", ["test-spin", "test-sleepy"])
def test_a_timeout_lands_in_the_lockstep_cell_that_hangs(hang):
    """Cells whose aggregator loops forever, or whose attack sleeps forever, in their adversarial
    round -- two of each, beside a healthy cell: the group's alarm stops the cell that is running,
    there (its traceback names the plugin's code), and the caller gets the timeout."""
    import importlib
    import traceback

    from fedbench.executors import Alarm, CellTimeout

    hanging = importlib.import_module("plugins_that_hang")
    fedbench.register_plugin(hanging, name="lockstep-hang")
    attack, defense = ("poison", "test-spin") if hang == "test-spin" else ("test-sleepy", "fedavg")
    try:
        grid = [make_cell(attack="poison", defense="fedavg", dataset="digits", rounds=3, attack_rounds=(2,))]
        grid += [make_cell(attack=attack, defense=defense, dataset="digits", rounds=3, attack_rounds=(2,), seed=s)
                 for s in (0, 1)]
        with pytest.raises(CellTimeout) as stopped, Alarm(5):
            run_lockstep(grid)
    finally:
        fedbench.unregister_plugin("lockstep-hang")
    frames = [f.name for f in traceback.extract_tb(stopped.value.__traceback__)]
    assert ("aggregate" if hang == "test-spin" else "malicious_updates") in frames
    assert "_run_fibers" in frames
