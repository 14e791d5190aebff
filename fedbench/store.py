"""The SQLite result store: one file holding every cell a matrix ran, its per-round metrics, and the
warm-start checkpoints.

Why SQLite: one portable file, readable while a matrix writes it (WAL mode), queryable with any SQL
tool, and part of the standard library. The driver process is the only writer; workers return their
results to it. Tables:

* ``meta`` -- ``format`` (``fedbench-runs``) and ``schema_version``. A store whose version this
  fedbench does not read is refused with a :class:`FedbenchError` and never written to.
* ``cells`` -- one row per cell, keyed by its hash: the spec as JSON, the status (``ok``,
  ``failed``, ``diverged``, ``interrupted``, ``running``), the error text, results (final accuracy,
  adversarial rounds, attack-mitigation rounds), timings and the versions of fedbench, torch, Python
  and the plugins that produced it.
* ``rounds`` -- the per-round metrics in long form ``(key, round, name, value)``: every attack
  defines its own measures, so they are rows, not columns.
* ``checkpoints`` -- warm-start models (``torch.save`` bytes of tensors only), keyed by the hash of
  the clean warm-up cell that produced them, with the SHA-256 of those bytes. :meth:`Store.checkpoint`
  hands out only bytes that match it; a checkpoint that does not is as good as none (the warm-up is
  recomputed, deterministically). The column came after version 1 was released: it is added in
  place to version 1 stores when they are opened for writing (older fedbench ignores it).

Damage is refused, never written over: every open checks the file (``PRAGMA quick_check``), and any
SQLite error while reading or writing -- a damaged page, a full disk, a read-only file -- becomes one
:class:`FedbenchError` that names the store and what to do. A transaction that fails is rolled back,
so what was stored before stays as it was.

A second driver on the same store is refused: :func:`lock` takes an exclusive lock on
``<store>.lock`` for as long as a matrix (or a ``fedbench run --store``) runs, and removes the file
when it is done.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import sqlite3
import time
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from fedbench.errors import FedbenchError

FORMAT = "fedbench-runs"
SCHEMA_VERSION = 1
DEFAULT_PATH = "fedbench-runs.db"

STATUSES = ("ok", "failed", "diverged", "interrupted", "running")
#: Statuses of a cell whose result is final: a re-run of the same command skips it.
FINISHED = ("ok", "diverged")

_SCHEMA = f"""
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE cells (
    key              TEXT PRIMARY KEY,   -- the cell hash (folded with the warm-up rounds when W > 0)
    cell_hash        TEXT NOT NULL,      -- CellSpec.hash()
    spec             TEXT NOT NULL,      -- CellSpec.to_dict() as JSON
    warmup_rounds    INTEGER NOT NULL DEFAULT 0,
    label            TEXT NOT NULL,      -- e.g. "digits poison vs wbc seed=0"
    dataset          TEXT NOT NULL,      -- short labels (only parameters that differ from defaults)
    partition        TEXT NOT NULL,
    model            TEXT NOT NULL,
    attack           TEXT NOT NULL,
    defense          TEXT NOT NULL,
    seed             INTEGER NOT NULL,
    setting          TEXT NOT NULL,      -- hash of everything but attack, defense and seed: cells
    setting_label    TEXT NOT NULL,      --   of one setting form one leaderboard
    status           TEXT NOT NULL CHECK (status IN ({", ".join(repr(s) for s in STATUSES)})),
    message          TEXT NOT NULL DEFAULT '',   -- why a cell failed or diverged, one line
    error            TEXT NOT NULL DEFAULT '',   -- the traceback of a failure
    final_accuracy   REAL,
    adversarial      TEXT,               -- JSON list of adversarial rounds
    mitigation       TEXT,               -- JSON list of {{attack_round, rounds, censored, peak}}
    attempts         INTEGER NOT NULL DEFAULT 0,
    started_at       REAL,               -- Unix time the driver handed the cell out
    finished_at      REAL,
    seconds          REAL,               -- the engine's own wall time for the run
    timings          TEXT,               -- JSON {{train, aggregate, evaluate}} seconds
    worker           TEXT NOT NULL DEFAULT '',   -- host:pid that ran it
    fedbench_version TEXT NOT NULL DEFAULT '',
    torch_version    TEXT NOT NULL DEFAULT '',
    python_version   TEXT NOT NULL DEFAULT '',
    plugins          TEXT NOT NULL DEFAULT '{{}}' -- JSON {{plugin: origin}}
);
CREATE TABLE rounds (
    key    TEXT NOT NULL REFERENCES cells(key) ON DELETE CASCADE,
    round  INTEGER NOT NULL,
    name   TEXT NOT NULL,
    value  REAL,                         -- NULL stands for NaN (SQLite has no NaN)
    PRIMARY KEY (key, round, name)
) WITHOUT ROWID;
CREATE TABLE checkpoints (
    key        TEXT PRIMARY KEY,         -- hash of the clean warm-up cell
    spec       TEXT NOT NULL,
    data       BLOB NOT NULL,            -- torch.save({{"params": flat tensor}}); load with weights_only=True
    created_at REAL NOT NULL,
    sha256     TEXT                      -- of data; NULL in rows an older fedbench wrote (not trusted)
);
"""


def _guarded(method):
    """Turn an SQLite error inside a :class:`Store` method into one :class:`FedbenchError` (see
    :func:`store_error`). ``with conn:`` has rolled the transaction back by then."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as error:
            raise store_error(self.path, error) from error

    return wrapper


@dataclass(frozen=True)
class CellRecord:
    """A cell row as the driver and the leaderboard need it."""

    key: str
    spec: dict[str, Any]
    warmup_rounds: int
    label: str
    dataset: str
    partition: str
    model: str
    attack: str
    defense: str
    seed: int
    setting: str
    setting_label: str
    status: str
    message: str
    error: str
    final_accuracy: float
    adversarial: list[int]
    mitigation: list[dict[str, Any]]
    attempts: int
    seconds: float | None


class Store:
    """An open result store. Use :meth:`open` (read-write, creates the file) or :meth:`read` (read-only)."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self._conn = conn

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | os.PathLike = DEFAULT_PATH) -> "Store":
        """Open ``path`` for writing, creating a fresh store if the file is missing or empty.

        The version check runs on a read-only connection first, so a file this fedbench cannot read
        is never modified (not even switched to WAL mode)."""
        path = Path(path)
        fresh = not path.exists() or path.stat().st_size == 0 or _no_tables(path)
        if not fresh:
            check_compatible(path)
        try:
            conn = _connect(path, readonly=False)
        except sqlite3.Error as error:
            raise store_error(path, error) from error
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            if fresh:
                # One transaction: a process killed half-way leaves an empty file (a fresh store next
                # time), never a schema without its meta rows, which would be refused as "not a store".
                meta = [("format", FORMAT), ("schema_version", str(SCHEMA_VERSION)), ("created_at", repr(time.time()))]
                conn.executescript(
                    "BEGIN;\n" + _SCHEMA
                    + "".join(f"INSERT INTO meta (key, value) VALUES ('{k}', '{v}');\n" for k, v in meta)
                    + "COMMIT;"
                )
            else:
                columns = {r[1] for r in conn.execute("PRAGMA table_info(checkpoints)")}
                if "sha256" not in columns:  # a version 1 store from before checksums
                    with conn:
                        conn.execute("ALTER TABLE checkpoints ADD COLUMN sha256 TEXT")
        except sqlite3.Error as error:
            conn.close()
            raise store_error(path, error) from error
        except BaseException:
            conn.close()
            raise
        return cls(path, conn)

    @classmethod
    def read(cls, path: str | os.PathLike = DEFAULT_PATH) -> "Store":
        """Open an existing store read-only (safe while a matrix is writing it)."""
        path = Path(path)
        if not path.exists():
            raise FedbenchError(
                f"no result store at {path}; fill one with `fedbench matrix --store {path}` or "
                f"`fedbench run --store {path}` first"
            )
        if path.is_file() and (path.stat().st_size == 0 or _no_tables(path)):
            # Created, but never filled (a process killed while it created the store): an empty store.
            conn = sqlite3.connect(":memory:")
            conn.executescript(_SCHEMA)
            return cls(path, conn)
        check_compatible(path)
        try:
            return cls(path, _connect(path, readonly=True))
        except sqlite3.Error as error:
            raise store_error(path, error) from error

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ cells
    @_guarded
    def statuses(self, keys: Iterable[str] | None = None) -> dict[str, str]:
        """``{key: status}`` of the given keys (all when ``None``) that have a row."""
        rows = self._conn.execute("SELECT key, status FROM cells").fetchall()
        if keys is None:
            return dict(rows)
        wanted = set(keys)
        return {k: s for k, s in rows if k in wanted}

    @_guarded
    def mark_stale_running(self) -> int:
        """Cells left ``running`` by a driver that died (the caller holds the lock, so no driver is
        running them now) become ``interrupted``. Returns how many."""
        with self._conn:
            cur = self._conn.execute(
                "UPDATE cells SET status='interrupted', message=? WHERE status='running'",
                ("the driver stopped without recording a result (killed or crashed); re-run to resume",),
            )
        return cur.rowcount

    @_guarded
    def start(self, key: str, spec: Mapping[str, Any], warmup_rounds: int, info: Mapping[str, Any]) -> None:
        """Record that a cell was handed to a worker (status ``running``). ``info`` holds the labels:
        ``cell_hash``, ``label``, ``dataset``, ``partition``, ``model``, ``attack``, ``defense``,
        ``seed``, ``setting``, ``setting_label``."""
        with self._conn:
            self._conn.execute(
                """INSERT INTO cells (key, cell_hash, spec, warmup_rounds, label, dataset, partition, model, attack,
                                      defense, seed, setting, setting_label, status, attempts, started_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'running', 1, ?)
                   ON CONFLICT(key) DO UPDATE SET status='running', message='', error='', attempts=attempts+1,
                       started_at=excluded.started_at, finished_at=NULL""",
                (key, info["cell_hash"], json.dumps(spec, sort_keys=True), warmup_rounds, info["label"], info["dataset"],
                 info["partition"], info["model"], info["attack"],
                 info["defense"], int(info["seed"]), info["setting"], info["setting_label"], time.time()),
            )

    @_guarded
    def finish(self, key: str, outcome: Mapping[str, Any]) -> None:
        """Record a worker's outcome (see :func:`fedbench.executors.execute`) and its per-round metrics,
        replacing whatever an earlier attempt left, in one transaction."""
        status = outcome["status"]
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        result = outcome.get("result") or {}
        versions = outcome.get("versions") or {}
        with self._conn:
            self._conn.execute("DELETE FROM rounds WHERE key=?", (key,))
            self._conn.execute(
                """UPDATE cells SET status=?, message=?, error=?, final_accuracy=?, adversarial=?, mitigation=?,
                       finished_at=?, seconds=?, timings=?, worker=?, fedbench_version=?, torch_version=?,
                       python_version=?, plugins=? WHERE key=?""",
                (
                    status,
                    outcome.get("message", ""),
                    outcome.get("error", ""),
                    _real(result.get("final_accuracy")),
                    json.dumps(result.get("adversarial_rounds", [])),
                    json.dumps(result.get("mitigation", [])),
                    time.time(),
                    result.get("seconds"),
                    json.dumps(result.get("timings", {})),
                    outcome.get("worker", ""),
                    versions.get("fedbench", ""),
                    versions.get("torch", ""),
                    versions.get("python", ""),
                    json.dumps(versions.get("plugins", {}), sort_keys=True),
                    key,
                ),
            )
            self._conn.executemany(
                "INSERT INTO rounds (key, round, name, value) VALUES (?, ?, ?, ?)",
                [
                    (key, int(row["round"]), name, _real(value))
                    for row in result.get("rounds", [])
                    for name, value in row.items()
                    if name != "round"
                ],
            )

    @_guarded
    def interrupt(self, keys: Iterable[str], message: str) -> None:
        """Mark in-flight cells ``interrupted`` (Ctrl-C, a dead worker): the next run re-runs them."""
        with self._conn:
            self._conn.executemany(
                "UPDATE cells SET status='interrupted', message=?, finished_at=? WHERE key=? AND status='running'",
                [(message, time.time(), k) for k in keys],
            )

    @_guarded
    def cells(self, keys: Iterable[str] | None = None) -> list[CellRecord]:
        """Cell records (all, or those of ``keys`` in that order)."""
        rows = self._conn.execute(
            """SELECT key, spec, warmup_rounds, label, dataset, partition, model, attack, defense, seed, setting,
                      setting_label, status, message, error, final_accuracy, adversarial, mitigation, attempts, seconds
               FROM cells ORDER BY rowid"""
        ).fetchall()
        records = {
            r[0]: CellRecord(
                key=r[0], spec=json.loads(r[1]), warmup_rounds=r[2], label=r[3], dataset=r[4], partition=r[5],
                model=r[6], attack=r[7], defense=r[8], seed=r[9], setting=r[10], setting_label=r[11], status=r[12],
                message=r[13], error=r[14], final_accuracy=_float(r[15]), adversarial=json.loads(r[16] or "[]"),
                mitigation=json.loads(r[17] or "[]"), attempts=r[18], seconds=r[19],
            )
            for r in rows
        }
        if keys is None:
            return list(records.values())
        return [records[k] for k in keys if k in records]

    @_guarded
    def rounds(self, keys: Iterable[str] | None = None) -> list[tuple[str, int, str, float]]:
        """Per-round metrics in long form ``(key, round, name, value)``, NaN where SQLite holds NULL."""
        rows = self._conn.execute("SELECT key, round, name, value FROM rounds ORDER BY key, round, name").fetchall()
        wanted = None if keys is None else set(keys)
        return [(k, r, n, _float(v)) for k, r, n, v in rows if wanted is None or k in wanted]

    @_guarded
    def provenance(self, key: str) -> dict[str, Any]:
        """Versions, worker and timings of one cell (for reports and debugging)."""
        row = self._conn.execute(
            """SELECT fedbench_version, torch_version, python_version, plugins, worker, started_at, finished_at,
                      seconds, timings FROM cells WHERE key=?""",
            (key,),
        ).fetchone()
        if row is None:
            raise KeyError(key)
        names = ("fedbench", "torch", "python", "plugins", "worker", "started_at", "finished_at", "seconds", "timings")
        out = dict(zip(names, row))
        out["plugins"] = json.loads(out["plugins"] or "{}")
        out["timings"] = json.loads(out["timings"] or "{}")
        return out

    # ------------------------------------------------------------------ checkpoints
    @_guarded
    def checkpoint(self, key: str) -> bytes | None:
        """The checkpoint stored under ``key``, or ``None`` when there is none or its bytes do not match
        the SHA-256 stored with them (damaged, altered, or written by a fedbench that stored none)."""
        row = self._conn.execute("SELECT data, sha256 FROM checkpoints WHERE key=?", (key,)).fetchone()
        if row is None:
            return None
        data = bytes(row[0])
        return data if row[1] is not None and hashlib.sha256(data).hexdigest() == row[1] else None

    @_guarded
    def put_checkpoint(self, key: str, spec: Mapping[str, Any], data: bytes) -> None:
        """Store (or replace) a checkpoint with the SHA-256 of its bytes."""
        with self._conn:
            self._conn.execute(
                "INSERT OR REPLACE INTO checkpoints (key, spec, data, created_at, sha256) VALUES (?, ?, ?, ?, ?)",
                (key, json.dumps(spec, sort_keys=True), sqlite3.Binary(data), time.time(),
                 hashlib.sha256(data).hexdigest()),
            )


def check_compatible(path: Path) -> None:
    """Raise a :class:`FedbenchError` unless ``path`` is a store this fedbench reads. Read-only."""
    try:
        conn = _connect(path, readonly=True)
    except sqlite3.Error as error:
        raise FedbenchError(f"cannot open result store {path}: {error}") from None
    try:
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall()) if "meta" in tables else {}
        except sqlite3.DatabaseError as error:
            if _damaged(error):
                raise store_error(path, error) from None
            if isinstance(error, sqlite3.OperationalError):  # cannot read it at all: a folder, no permission
                raise FedbenchError(f"cannot open result store {path}: {error}") from None
            raise FedbenchError(
                f"{path} is not a fedbench result store ({error}); choose another --store path"
            ) from None
        if meta.get("format") == FORMAT and meta.get("schema_version") == str(SCHEMA_VERSION):
            try:
                problems = [r[0] for r in conn.execute("PRAGMA quick_check(1)")]
            except sqlite3.DatabaseError as error:
                raise store_error(path, error) from None
            if problems != ["ok"]:
                problem = " ".join(problems[0].replace("*** in database main ***", "").split())
                raise store_error(path, sqlite3.DatabaseError(problem))
    finally:
        conn.close()
    if meta.get("format") != FORMAT:
        raise FedbenchError(
            f"{path} is an SQLite file but not a fedbench result store; it was left untouched, "
            "choose another --store path"
        )
    version = meta.get("schema_version")
    if version != str(SCHEMA_VERSION):
        raise FedbenchError(
            f"result store {path} has schema version {version}, but this fedbench reads version "
            f"{SCHEMA_VERSION}; it was left untouched. Use the fedbench version that wrote it, or "
            "another --store path for new runs"
        )


def _no_tables(path: Path) -> bool:
    """Whether ``path`` is an SQLite database without a single table: what a process killed while it
    created a store leaves behind (the file header is written before the schema's transaction)."""
    try:
        conn = _connect(path, readonly=True)
    except sqlite3.Error:
        return False
    try:
        return conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
    except sqlite3.Error:
        return False
    finally:
        conn.close()


def _damaged(error: BaseException) -> bool:
    text = str(error)
    return "malformed" in text or "btreeInitPage" in text or "invalid page" in text or "corrupt" in text


def store_error(path: Path, error: sqlite3.Error) -> FedbenchError:
    """One message for an SQLite error on the store at ``path``: what happened and what to do. The
    store is never repaired or rewritten; what was committed before is kept."""
    text = " ".join(str(error).split()) or type(error).__name__
    lowered = text.lower()
    if _damaged(error):
        return FedbenchError(
            f"result store {path} is damaged ({text}); it was left as it is. Restore it from a backup (sqlite3's "
            "'.recover' can save what is readable), or use another --store path"
        )
    if "full" in lowered:
        return FedbenchError(
            f"cannot write result store {path}: {text}; nothing stored before was lost. Free some space and "
            "run the same command again to resume"
        )
    if "readonly" in lowered or "read-only" in lowered:
        return FedbenchError(
            f"cannot write result store {path}: {text}; check that you may write the file and its folder, "
            "or use another --store path"
        )
    if "unable to open" in lowered or "permission" in lowered:
        return FedbenchError(
            f"cannot open result store {path}: {text}; check that you may read and write the file and its "
            "folder, or use another --store path"
        )
    return FedbenchError(f"result store {path}: {type(error).__name__}: {text}")


def _connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    # The path is percent-quoted: in a URI '#', '?' and '%' would otherwise cut or change the file name
    # (runs#1.db opened 'runs', and read-only opens lost their ?mode=ro).
    uri = f"file:{urllib.parse.quote(path.resolve().as_posix(), safe='/')}?mode={'ro' if readonly else 'rwc'}"
    conn = sqlite3.connect(uri, uri=True, timeout=30, isolation_level="DEFERRED")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def _real(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _float(value: Any) -> float:
    return float("nan") if value is None else float(value)


# --------------------------------------------------------------------------------------------------
# The driver's lock
# --------------------------------------------------------------------------------------------------
@contextmanager
def lock(path: str | os.PathLike, holder: str = "fedbench matrix") -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock`` for the duration; refuse at once if another process
    holds it. ``holder`` (the command) is written into the file for that refusal message.

    The lock is released by the OS when the holder dies, so a crash never leaves it stuck. On a
    normal release the holder removes the file while it still holds the lock. A process that
    opened the file before the unlink may then win the lock on an inode no path names any more, so
    every acquirer checks, once it holds the lock, that the path still refers to the very file it
    locked, and starts over if not: two processes never both believe they hold the store."""
    lock_path = Path(f"{Path(path).resolve()}.lock")  # the file the store opens: a symlink gets the same lock
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            advice = ("its folder does not exist" if isinstance(error, FileNotFoundError)
                      else "check that you may write its folder")
            raise FedbenchError(
                f"cannot use result store {path}: cannot create {lock_path} ({error.strerror}); {advice}, "
                "or use another --store path"
            ) from None
        if not _try_lock(fd):
            try:
                os.lseek(fd, 0, os.SEEK_SET)
                owner = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            finally:
                os.close(fd)
            raise FedbenchError(
                f"result store {path} is in use by another fedbench command ({owner}); wait for it to "
                "finish, or use another --store"
            )
        if _names(lock_path, fd):
            break
        _unlock(fd)
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{holder}, pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        yield
    finally:
        try:
            os.unlink(lock_path)  # still holding the lock: see the docstring
        except OSError:  # pragma: no cover - Windows cannot remove an open file; it stays, empty
            os.ftruncate(fd, 0)
        _unlock(fd)
        os.close(fd)


def _names(lock_path: Path, fd: int) -> bool:
    """Whether ``lock_path`` still names the file open as ``fd`` (not unlinked, not replaced)."""
    try:
        on_disk = os.stat(lock_path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (mine.st_dev, mine.st_ino)


try:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        return True

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)

except ImportError:  # pragma: no cover - Windows
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _unlock(fd: int) -> None:
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
