"""The SQLite result store: schema, outcomes, NaN, stale cells, version check and the driver's lock."""

from __future__ import annotations

import hashlib
import math
import os
import sqlite3
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

from fedbench.cli import main
from fedbench.errors import FedbenchError
from fedbench.matrix import MatrixCell
from fedbench.spec import make_cell
from fedbench import store as store_module
from fedbench.store import SCHEMA_VERSION, Store, lock


def _cell(attack="poison", defense="wbc", seed=0) -> MatrixCell:
    return MatrixCell(make_cell(attack=attack, defense=defense, seed=seed, rounds=3, attack_rounds=(2,)))


def _outcome(status="ok", loss=0.5, message=""):
    rounds = [{"round": r, "adversarial": r == 2, "accuracy": 0.5 + r / 10, "loss": loss, "eval_n": 300,
               "success": 0.25 * r} for r in (1, 2, 3)]
    return {"status": status, "message": message, "worker": "host:1",
            "versions": {"fedbench": "0.1.0", "torch": "2.x", "python": "3.11", "plugins": {"wbc": "wbc (x)"}},
            "result": {"final_accuracy": 0.8, "adversarial_rounds": [2], "rounds": rounds, "seconds": 1.5,
                       "mitigation": [{"attack_round": 2, "rounds": 1, "censored": False, "peak": 0.5}],
                       "timings": {"train": 1.0}}}


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_new_store_has_wal_mode_and_schema_version(tmp_path):
    path = tmp_path / "runs.db"
    Store.open(path).close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert dict(conn.execute("SELECT key, value FROM meta"))["schema_version"] == str(SCHEMA_VERSION)
    assert {"cells", "rounds", "checkpoints", "meta"} <= {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}


def test_outcome_is_stored_with_spec_versions_timings_and_per_round_metrics(tmp_path):
    mc = _cell()
    with Store.open(tmp_path / "runs.db") as store:
        store.start(mc.key, mc.cell.to_dict(), 0, mc.info())
        assert store.statuses() == {mc.key: "running"}
        store.finish(mc.key, _outcome())
        (rec,) = store.cells()
        assert (rec.key, rec.status, rec.attack, rec.defense, rec.seed) == (mc.key, "ok", "poison", "wbc", 0)
        assert rec.spec == mc.cell.to_dict() and rec.key == mc.cell.hash()
        assert rec.final_accuracy == 0.8 and rec.adversarial == [2] and rec.mitigation[0]["rounds"] == 1
        prov = store.provenance(mc.key)
        assert prov["torch"] == "2.x" and prov["plugins"] == {"wbc": "wbc (x)"} and prov["seconds"] == 1.5
        assert prov["timings"] == {"train": 1.0} and prov["started_at"] <= prov["finished_at"]
        rows = store.rounds()
        assert ({r for _, r, _, _ in rows}, len(rows)) == ({1, 2, 3}, 3 * 5)
        assert (mc.key, 2, "adversarial", 1.0) in rows and (mc.key, 3, "success", 0.75) in rows


def test_nan_metrics_read_back_as_nan(tmp_path):
    mc = _cell()
    with Store.open(tmp_path / "runs.db") as store:
        store.start(mc.key, mc.cell.to_dict(), 0, mc.info())
        store.finish(mc.key, _outcome(status="diverged", loss=float("nan"), message="non-finite loss in round 1"))
        losses = [v for _, _, name, v in store.rounds() if name == "loss"]
        assert len(losses) == 3 and all(math.isnan(v) for v in losses)
        assert store.cells()[0].message == "non-finite loss in round 1"


def test_a_rerun_replaces_the_earlier_attempt(tmp_path):
    mc = _cell()
    with Store.open(tmp_path / "runs.db") as store:
        store.start(mc.key, mc.cell.to_dict(), 0, mc.info())
        store.finish(mc.key, {"status": "failed", "message": "RuntimeError: x", "error": "Traceback ...", "result": None})
        store.start(mc.key, mc.cell.to_dict(), 0, mc.info())
        store.finish(mc.key, _outcome())
        (rec,) = store.cells()
        assert (rec.status, rec.message, rec.error, rec.attempts) == ("ok", "", "", 2)
        assert len(store.rounds()) == 15


def test_cells_left_running_by_a_dead_driver_become_interrupted(tmp_path):
    done, left = _cell(seed=0), _cell(seed=1)
    with Store.open(tmp_path / "runs.db") as store:
        for mc in (done, left):
            store.start(mc.key, mc.cell.to_dict(), 0, mc.info())
        store.finish(done.key, _outcome())
        assert store.mark_stale_running() == 1
        assert store.statuses() == {done.key: "ok", left.key: "interrupted"}


def test_store_of_another_schema_version_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "runs.db"
    Store.open(path).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.execute("UPDATE meta SET value='999' WHERE key='schema_version'")
    conn.commit()
    conn.close()
    before = _sha(path)
    with pytest.raises(FedbenchError, match="schema version 999.*left untouched"):
        Store.open(path)
    result = CliRunner().invoke(main, ["matrix", "--attacks", "poison", "--defenses", "wbc", "--store", str(path)])
    assert result.exit_code == 2 and "schema version 999" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["leaderboard", "--store", str(path)])
    assert result.exit_code == 2 and "schema version 999" in result.output
    assert _sha(path) == before
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_a_file_that_is_not_a_store_is_refused_and_left_untouched(tmp_path):
    text = tmp_path / "leaderboard.csv"
    text.write_text("defense,score\nwbc,0.5\n" * 100)
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.commit()
    for path in (text, other):
        before = _sha(path)
        with pytest.raises(FedbenchError, match="not a fedbench result store"):
            Store.open(path)
        assert _sha(path) == before


def test_lock_refuses_a_second_holder(tmp_path):
    path = tmp_path / "runs.db"
    with lock(path):
        with pytest.raises(FedbenchError, match=r"in use by another fedbench command \(fedbench matrix, pid "):
            with lock(path):
                pass
    with lock(path):  # released, so it can be taken again
        pass


def test_second_matrix_on_a_store_in_use_is_refused(tmp_path):
    path = tmp_path / "runs.db"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from fedbench.store import lock
            with lock({str(path)!r}):
                print("locked", flush=True)
                sys.stdin.read()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = CliRunner().invoke(main, ["matrix", "--attacks", "poison", "--defenses", "wbc", "--store", str(path)])
        assert result.exit_code == 2
        assert f"in use by another fedbench command (fedbench matrix, pid {holder.pid}," in result.output
        assert not path.exists()
    finally:
        holder.communicate("")
    assert holder.returncode == 0


def test_the_lock_file_is_removed_when_the_holder_is_done(tmp_path):
    path = tmp_path / "runs.db"
    with lock(path, "fedbench run"):
        assert (tmp_path / "runs.db.lock").read_text().startswith("fedbench run, pid ")
    assert list(tmp_path.iterdir()) == []


def test_no_lock_file_stays_beside_a_file_refused_as_not_a_store(tmp_path):
    text = tmp_path / "notes.db"
    text.write_text("not sqlite\n" * 100)
    result = CliRunner().invoke(main, ["matrix", "--attacks", "poison", "--defenses", "wbc", "--rounds", "2",
                                       "--store", str(text)])
    assert result.exit_code == 2 and "not a fedbench result store" in result.output
    result = CliRunner().invoke(main, ["run", "--rounds", "1", "--store", str(text)])
    assert result.exit_code == 2 and "not a fedbench result store" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.db"]


def test_an_acquirer_that_locked_an_unlinked_lock_file_starts_over(tmp_path, monkeypatch):
    """The race the unlink on release opens: between our open and our flock, the holder removes the
    file and a third process takes a fresh one. Our flock then succeeds on a file no path names; the
    check after locking sees that, starts over, and finds the new holder."""
    path, lock_path = tmp_path / "runs.db", tmp_path / "runs.db.lock"
    real_try_lock = store_module._try_lock
    third: list[int] = []

    def racing_try_lock(fd):
        if not third:
            os.unlink(lock_path)
            third.append(os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644))
            os.write(third[0], b"fedbench matrix, pid 1, started just now")
            assert real_try_lock(third[0])
        return real_try_lock(fd)

    monkeypatch.setattr(store_module, "_try_lock", racing_try_lock)
    try:
        with pytest.raises(FedbenchError, match=r"in use by another fedbench command \(fedbench matrix, pid 1, "):
            with lock(path):
                pass
    finally:
        os.close(third[0])
    assert lock_path.exists()  # the third process's file: only its holder removes it


def test_a_store_in_a_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FedbenchError, match="cannot use result store .*nowhere"):
        with lock(tmp_path / "nowhere" / "runs.db"):
            pass


@pytest.mark.parametrize("name", ["runs#1.db", "a%20b.db", "what?.db"])
def test_a_store_path_with_uri_characters_opens_exactly_that_file(tmp_path, name):
    path, mc = tmp_path / name, _cell()
    with Store.open(path) as store:
        store.start(mc.key, mc.cell.to_dict(), 0, mc.info())
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(("-wal", "-shm"))) == [name]
    with Store.read(path) as store:
        assert store.statuses() == {mc.key: "running"}


def test_a_symlink_to_a_store_shares_its_lock(tmp_path):
    real = tmp_path / "b.db"
    link = tmp_path / "a.db"
    link.symlink_to(real)
    with lock(real):
        with pytest.raises(FedbenchError, match="is in use"):
            with lock(link):
                pass
