"""Hostile and broken files: a store from a newer fedbench, a damaged store, a store in a read-only
place, a full disk, damaged dataset files and altered warm-start checkpoints.

Each one is a single ``Error: ...`` line and exit code 2 -- or, for a checkpoint, a recomputed
warm-up -- and nothing already stored is lost or changed."""

from __future__ import annotations

import ctypes
import hashlib
import io
import os
import random
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fedbench import store as store_module
from fedbench.cli import main
from fedbench.errors import FedbenchError
from fedbench.matrix import MatrixCell
from fedbench.spec import make_cell
from fedbench.store import SCHEMA_VERSION, Store

GRID = ["--attacks", "poison", "--defenses", "fedavg", "--rounds", "3", "--attack-rounds", "2", "--jobs", "1", "--quiet"]


def filled_store(path: Path, cells: int = 4, rounds: int = 3) -> Path:
    """A real store with finished cells, written through the store's API (no training)."""
    with Store.open(path) as store:
        for seed in range(cells):
            mc = MatrixCell(make_cell(attack="poison", defense="wbc", seed=seed, rounds=rounds, attack_rounds=(2,)))
            store.start(mc.key, mc.cell.to_dict(), 0, mc.info())
            rows = [{"round": r, "adversarial": r == 2, "accuracy": 0.5 + r / 100 + seed / 1000, "loss": 1.0 / r,
                     "eval_n": 300, "success": 0.1 * (r % 7)} for r in range(1, rounds + 1)]
            store.finish(mc.key, {"status": "ok", "worker": "host:1", "versions": {"fedbench": "x"},
                                  "result": {"final_accuracy": 0.5 + seed / 1000, "adversarial_rounds": [2],
                                             "mitigation": [], "rounds": rows, "seconds": 0.1, "timings": {}}})
    return path


def fingerprint(path: Path) -> tuple:
    """The file's bytes and modification time, and which files lie beside it. SQLite's own ``-wal``
    and ``-shm`` files, which any reader of a WAL database opens (and a read-only one cannot remove),
    are left out -- as long as the ``-wal`` holds nothing, i.e. nothing was written."""
    stat = path.stat()
    wal = Path(f"{path}-wal")
    assert not wal.exists() or wal.stat().st_size == 0, "something was written to the store"
    beside = sorted(p.name for p in path.parent.iterdir() if not p.name.endswith(("-wal", "-shm")))
    return hashlib.sha256(path.read_bytes()).hexdigest(), stat.st_mtime_ns, beside


def content(path: Path) -> tuple:
    """What a store holds (cells and per-round numbers), read without writing."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        cells = conn.execute("SELECT key, status, attempts, final_accuracy FROM cells ORDER BY key").fetchall()
        rounds = conn.execute("SELECT key, round, name, value FROM rounds ORDER BY key, round, name").fetchall()
        return cells, rounds
    finally:
        conn.close()


def one_error_line(result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def commands(path: Path) -> list[list[str]]:
    return [["matrix", *GRID, "--store", str(path)], ["leaderboard", "--store", str(path)],
            ["export", "--store", str(path), "--cells", "-"], ["run", "--rounds", "1", "--quiet", "--store", str(path)],
            ["matrix", *GRID, "--dry-run", "--store", str(path)]]


# --------------------------------------------------------------------------------------------------
# A store from a newer fedbench
# --------------------------------------------------------------------------------------------------
def test_a_store_written_by_a_newer_fedbench_is_refused_and_left_untouched(tmp_path):
    path = filled_store(tmp_path / "runs.db")
    conn = sqlite3.connect(path)  # what a newer fedbench leaves: WAL mode, a higher version
    conn.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION + 1),))
    conn.commit()
    conn.close()
    before = fingerprint(path)
    for args in commands(path):
        one_error_line(CliRunner().invoke(main, args), f"schema version {SCHEMA_VERSION + 1}", "left untouched")
    with pytest.raises(FedbenchError, match="schema version"):
        Store.open(path)
    assert fingerprint(path) == before


# --------------------------------------------------------------------------------------------------
# A damaged store
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", [0.2, 0.5, 0.8])
def test_a_store_damaged_mid_way_is_refused_with_one_line_and_not_modified(tmp_path, where):
    path = filled_store(tmp_path / "runs.db", cells=12, rounds=30)
    pages = path.stat().st_size // 4096
    assert pages > 10
    first = max(2, int(pages * where))  # page 1 (the header and the schema) stays: the damage is inside
    garbage = random.Random(first).randbytes(2 * 4096)
    with open(path, "r+b") as fh:
        fh.seek((first - 1) * 4096)
        fh.write(garbage)
    before = fingerprint(path)
    for args in commands(path):
        one_error_line(CliRunner().invoke(main, args), str(path), "is damaged", "left as it is")
    for opener in (Store.open, Store.read):
        with pytest.raises(FedbenchError, match="is damaged"):
            opener(path)
    assert fingerprint(path) == before


# --------------------------------------------------------------------------------------------------
# A read-only place
# --------------------------------------------------------------------------------------------------
def _without_file_permission_override() -> None:  # pragma: no cover - runs in the child
    """Drop the capabilities that let root ignore file permissions (from the bounding set, so the
    exec'd Python has none of them): chmod then binds root as it binds everyone."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2, 3):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def fedbench_as_a_plain_user(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python -m fedbench ARGS``, with file permissions enforced even when the tests run as root."""
    preexec = _without_file_permission_override if os.geteuid() == 0 else None
    try:
        return subprocess.run([sys.executable, "-m", "fedbench", *args], capture_output=True, text=True, cwd=cwd,
                              preexec_fn=preexec, timeout=300)
    except subprocess.SubprocessError as error:
        if "prctl" in str(error) or "Exception occurred in preexec_fn" in str(error):
            pytest.skip("running as root and cannot drop CAP_DAC_OVERRIDE here, so chmod cannot make a file read-only")
        raise


@pytest.fixture
def read_only_store(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    path = filled_store(folder / "runs.db")
    probe = fedbench_as_a_plain_user(["--version"], tmp_path)
    assert probe.returncode == 0, probe.stderr
    yield path
    folder.chmod(0o755)
    path.chmod(0o644)


def test_a_store_in_a_read_only_folder_is_refused_for_writing_and_still_read(read_only_store):
    path = read_only_store
    path.chmod(0o444)
    path.parent.chmod(0o555)
    before, stored = fingerprint(path), content(path)
    out = fedbench_as_a_plain_user(["matrix", *GRID, "--store", str(path)], path.parent.parent)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [out.stderr.strip()], out.stderr
    assert out.stderr.startswith("Error: cannot use result store") and "Permission denied" in out.stderr
    board = fedbench_as_a_plain_user(["leaderboard", "--store", str(path), "--format", "csv"], path.parent.parent)
    assert board.returncode == 0, board.stderr
    assert "defense" in board.stdout.splitlines()[0] and "wbc" in board.stdout, board.stdout
    assert (fingerprint(path), content(path)) == (before, stored)


def test_a_read_only_store_file_in_a_writable_folder_is_refused_for_writing(read_only_store):
    path = read_only_store
    path.chmod(0o444)
    before, stored = fingerprint(path), content(path)
    out = fedbench_as_a_plain_user(["matrix", *GRID, "--store", str(path)], path.parent)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert out.stderr.startswith(f"Error: cannot write result store {path}") and "readonly" in out.stderr
    assert (fingerprint(path), content(path)) == (before, stored)
    assert fingerprint(path)[2] == ["runs.db"]


# --------------------------------------------------------------------------------------------------
# A full disk
# --------------------------------------------------------------------------------------------------
class FullDisk:
    """The store's connection on a disk that fills up: the ``fail_at``-th write statement (or the
    commit of its transaction) fails as SQLite's SQLITE_FULL does, and so does everything after it."""

    def __init__(self, conn: sqlite3.Connection, state: dict) -> None:
        self._conn, self._state = conn, state

    def __getattr__(self, name):
        return getattr(self._conn, name)

    def __enter__(self):
        self._conn.__enter__()
        return self

    def __exit__(self, *exc):
        if exc[0] is None and self._state["writes"] >= self._state["fail_at"] and self._state["on_commit"]:
            self._conn.rollback()
            raise sqlite3.OperationalError("database or disk is full")
        return self._conn.__exit__(*exc)

    def _write(self, run, sql, *args):
        if sql.lstrip().split(None, 1)[0].upper() in ("INSERT", "UPDATE", "DELETE", "REPLACE", "CREATE", "ALTER"):
            self._state["writes"] += 1
            if self._state["writes"] >= self._state["fail_at"] and not self._state["on_commit"]:
                raise sqlite3.OperationalError("database or disk is full")
        return run(sql, *args)

    def execute(self, sql, *args):
        return self._write(self._conn.execute, sql, *args)

    def executemany(self, sql, *args):
        return self._write(self._conn.executemany, sql, *args)


@pytest.mark.parametrize("fail_at,on_commit", [(1, False), (4, False), (6, True)],
                         ids=["first-write", "finish-of-a-cell", "commit-of-a-cell"])
def test_a_full_disk_is_one_error_and_nothing_stored_is_lost(tmp_path, monkeypatch, fail_at, on_commit):
    path = tmp_path / "runs.db"
    first = CliRunner().invoke(main, ["matrix", *GRID, "--store", str(path)])  # 2 cells: none and poison, fedavg
    assert first.exit_code == 0, first.output
    cells_before, rounds_before = content(path)
    real_connect = store_module._connect
    state = {"writes": 0, "fail_at": fail_at, "on_commit": on_commit}
    monkeypatch.setattr(store_module, "_connect", lambda p, *, readonly: real_connect(p, readonly=readonly)
                        if readonly else FullDisk(real_connect(p, readonly=readonly), state))
    more = ["matrix", *GRID, "--defenses", "fedavg,cma", "--store", str(path)]  # 2 more cells
    one_error_line(CliRunner().invoke(main, more), f"cannot write result store {path}", "database or disk is full",
                   "nothing stored before was lost")
    monkeypatch.setattr(store_module, "_connect", real_connect)
    cells_after, rounds_after = content(path)
    assert [c for c in cells_after if c[0] in {k for k, *_ in cells_before}] == cells_before
    assert [r for r in rounds_after if r[0] in {k for k, *_ in cells_before}] == rounds_before
    assert {status for _, status, _, _ in cells_after} <= {"ok", "running"}  # a cell in flight resumes next time
    again = CliRunner().invoke(main, more)
    assert again.exit_code == 0, again.output
    assert len(content(path)[0]) == 4 and {s for _, s, _, _ in content(path)[0]} == {"ok"}


# --------------------------------------------------------------------------------------------------
# Damaged dataset files
# --------------------------------------------------------------------------------------------------
RAW = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@pytest.fixture
def damaged_fmnist(fmnist_dir, tmp_path, monkeypatch):
    """A copy of the raw Fashion-MNIST files; the test damages one. Downloading is made to fail (as
    offline), so a damaged file is never silently replaced from the network."""
    from torchvision import datasets

    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in RAW:
        shutil.copyfile(fmnist_dir / "FashionMNIST" / "raw" / name, raw / name)

    def offline(self):
        raise RuntimeError("no network in this test")

    monkeypatch.setattr(datasets.FashionMNIST, "download", offline)
    return raw


@pytest.mark.slow
@pytest.mark.parametrize("name,size", [("train-images-idx3-ubyte", 10), ("train-images-idx3-ubyte", 1000),
                                       ("t10k-labels-idx1-ubyte", 10008 + 7)],
                         ids=["header-cut", "images-cut", "labels-too-long"])
def test_a_truncated_or_wrong_size_dataset_file_is_one_data_error_and_nothing_is_stored(damaged_fmnist, tmp_path,
                                                                                       name, size):
    with open(damaged_fmnist / name, "r+b") as fh:
        fh.truncate(size)  # past the end: the file grows
    store = tmp_path / "runs.db"
    data = str(damaged_fmnist.parent.parent)
    for args in (["matrix", "--attacks", "poison", "--defenses", "fedavg", "--dataset", "fmnist", "--rounds", "1",
                  "--jobs", "1", "--quiet", "--data-dir", data, "--store", str(store)],
                 ["run", "--dataset", "fmnist", "--rounds", "1", "--quiet", "--data-dir", data, "--store", str(store)]):
        one_error_line(CliRunner().invoke(main, args), "fmnist")
    assert not store.exists() and not Path(f"{store}.lock").exists()


@pytest.mark.slow
def test_a_damaged_dataset_file_is_named_in_the_error(damaged_fmnist):
    with open(damaged_fmnist / "train-images-idx3-ubyte", "r+b") as fh:
        fh.truncate(1000)
    result = CliRunner().invoke(main, ["run", "--dataset", "fmnist", "--rounds", "1", "--quiet",
                                       "--data-dir", str(damaged_fmnist.parent.parent)])
    one_error_line(result, "train-images-idx3-ubyte")


# --------------------------------------------------------------------------------------------------
# Warm-start checkpoints
# --------------------------------------------------------------------------------------------------
class Payload:
    """What a hostile checkpoint could hold: unpickling it runs code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).touch, ())


def _saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


WARM_GRID = ["matrix", "--attacks", "poison", "--defenses", "fedavg,cma", "--rounds", "3", "--attack-rounds", "2",
             "--warmup-rounds", "1", "--jobs", "1", "--quiet"]


@pytest.fixture(scope="module")
def warm_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("warm") / "runs.db"
    result = CliRunner().invoke(main, [*WARM_GRID, "--store", str(path)])
    assert result.exit_code == 0, result.output
    return path


@pytest.mark.parametrize("tamper", ["bytes-changed", "code-inside", "not-finite", "wrong-structure"])
def test_an_altered_warm_start_checkpoint_is_recomputed_never_used(warm_store, tmp_path, tamper):
    path = tmp_path / "runs.db"
    shutil.copyfile(warm_store, path)
    conn = sqlite3.connect(path)
    ((key, original),) = conn.execute("SELECT key, data FROM checkpoints").fetchall()
    params = torch.load(io.BytesIO(original), weights_only=True)["params"]
    marker = tmp_path / "code-ran"
    if tamper == "bytes-changed":  # damage: the checksum no longer matches
        data = bytearray(original)
        data[len(data) // 2] ^= 0xFF
        conn.execute("UPDATE checkpoints SET data=? WHERE key=?", (bytes(data), key))
    else:  # deliberate: new bytes with a matching checksum
        data = {"code-inside": _saved({"params": Payload(str(marker))}),
                "not-finite": _saved({"params": torch.full_like(params, float("nan"))}),
                "wrong-structure": _saved([params])}[tamper]
        conn.execute("UPDATE checkpoints SET data=?, sha256=? WHERE key=?", (data, hashlib.sha256(data).hexdigest(), key))
    conn.commit()
    conn.close()
    numbers = content(warm_store)[1]
    result = CliRunner().invoke(main, [*WARM_GRID, "--force", "--store", str(path)])
    assert result.exit_code == 0, result.output
    assert not marker.exists()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT data FROM checkpoints WHERE key=?", (key,)).fetchone()[0] == original  # recomputed
    conn.close()
    assert content(path)[1] == numbers  # every cell ran from the true warm-up, as before


def test_a_checkpoint_without_a_checksum_from_an_older_store_is_recomputed(warm_store, tmp_path):
    path = tmp_path / "runs.db"
    shutil.copyfile(warm_store, path)
    conn = sqlite3.connect(path)
    conn.execute("UPDATE checkpoints SET sha256=NULL")
    conn.commit()
    conn.close()
    with Store.open(path) as store:
        (key,) = [k for k, in store._conn.execute("SELECT key FROM checkpoints")]
        assert store.checkpoint(key) is None
