"""Kill anywhere: a matrix killed at any moment -- in a cell, in a warm-up, inside a store transaction,
right after a commit, while the store is created, while Ctrl-C is being handled -- and resumed, ends
with every cell recorded once, with the numbers of a run that was never interrupted.

The kills are deterministic. A kill point is "the n-th time the process reaches X", where X is a
round (an observer plugin), an SQL statement of the store, the commit of a store transaction, or a
statement of the schema script; the process parks there, writes a marker file, and only then gets
its signal. The points come from a fixed list with counts drawn from a seeded generator, so every
run of this test kills at the same places, whatever the machine's speed.

Speed: one Python process (the "zygote") imports fedbench and torch once; each attempt is a fork of
it that runs ``fedbench matrix`` (``fedbench.cli.main``, what ``python -m fedbench matrix`` runs) --
about twenty imports of torch saved. The zygote never computes, so its children start clean.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or not hasattr(signal, "SIGKILL"),
                                reason="needs fork() and POSIX signals")

GRID = ["matrix", "--attacks", "poison,labelflip", "--defenses", "cma,ctma", "--rounds", "4", "--attack-rounds", "2",
        "--jobs", "1", "--quiet"]
WARM = ["--warmup-rounds", "1"]
N_CELLS = 9  # (2 attacks + none) x (2 defenses + fedavg)

# The zygote: reads one JSON request per line, forks a child per "run" and reaps it on "wait".
ZYGOTE = textwrap.dedent(r'''
    import json, os, re, signal, sys, time
    import torch, sklearn.datasets  # noqa: F401 - imported once, before any fork
    import fedbench, fedbench.engine, fedbench.matrix, fedbench.leaderboard, fedbench.plugins  # noqa: F401
    from fedbench import store as st
    from fedbench.cli import main

    fedbench.plugins.get_manager()

    def child(request):
        # What a user's terminal gives: Ctrl-C raises KeyboardInterrupt, SIGTERM has its default
        # action. A test runner started in the background (a CI job, nohup) hands its children SIGINT
        # ignored, and Python then keeps it ignored -- the SIGINT kills would never land.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        parks = request["parks"]
        state = {"parked": 0}

        def park():
            state["parked"] += 1
            marker = f"{request['marker']}.{state['parked']}"
            with open(marker + ".tmp", "w") as fh:
                fh.write(str(os.getpid()))
            os.rename(marker + ".tmp", marker)
            time.sleep(600)

        counts = {}

        def hit(i):
            counts[i] = counts.get(i, 0) + 1
            return counts[i] == parks[i]["n"]

        class Observer:
            @fedbench.hookimpl
            def round_finished(self, cell, round, metrics):
                for i, p in enumerate(parks):
                    if p["kind"] == "round" and hit(i):
                        park()

        fedbench.register_plugin(Observer(), name="kill-anywhere")

        class Conn:
            """The store's connection, parking before or after chosen statements and commits."""

            def __init__(self, conn):
                self._conn = conn
                self._armed = []

            def __getattr__(self, name):
                return getattr(self._conn, name)

            def __enter__(self):
                self._conn.__enter__()
                return self

            def __exit__(self, *exc):
                committing = exc[0] is None
                now = [i for i, p in enumerate(parks) if committing and p["kind"] == "commit" and hit(i)]
                if any(parks[i]["when"] == "before" for i in now):
                    park()
                out = self._conn.__exit__(*exc)
                armed, self._armed = self._armed, []
                if committing and (any(parks[i]["when"] == "after" for i in now) or armed):
                    park()
                return out

            def _run(self, run, sql, *args):
                now = [i for i, p in enumerate(parks) if p["kind"] == "sql" and re.search(p["pattern"], sql) and hit(i)]
                if any(parks[i]["when"] == "before" for i in now):
                    park()
                out = run(sql, *args)
                if any(parks[i]["when"] == "after" for i in now):
                    park()
                self._armed += [i for i in now if parks[i]["when"] == "committed"]
                return out

            def execute(self, sql, *args):
                return self._run(self._conn.execute, sql, *args)

            def executemany(self, sql, *args):
                return self._run(self._conn.executemany, sql, *args)

        real_connect = st._connect

        def connect(path, *, readonly):
            conn = real_connect(path, readonly=readonly)
            if readonly:
                return conn
            scripted = [i for i, p in enumerate(parks) if p["kind"] == "script"]
            if scripted:
                def trace(statement):
                    if statement.lstrip().upper().startswith(("CREATE", "INSERT")):
                        for i in scripted:
                            if hit(i):
                                park()
                conn.set_trace_callback(trace)
            return Conn(conn)

        st._connect = connect
        sys.argv[0] = "fedbench"
        code = 0
        try:
            main(request["args"], prog_name="fedbench")
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 99
        sys.stdout.flush()
        sys.stderr.flush()
        with open(request["marker"] + ".done", "w") as fh:
            fh.write(str(code))
        os._exit(code)

    for line in sys.stdin:
        request = json.loads(line)
        if request["cmd"] == "run":
            pid = os.fork()
            if pid == 0:
                child(request)
            print(json.dumps({"pid": pid}), flush=True)
        elif request["cmd"] == "wait":
            _, status = os.waitpid(request["pid"], 0)
            code = os.waitstatus_to_exitcode(status)
            print(json.dumps({"code": code}), flush=True)
''')


def _alive(pid: int) -> bool:
    """Whether a process (a child of the zygote, so not ours to wait for) still runs: not gone, not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


class Zygote:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.runs = 0
        self.children: set[int] = set()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, start_new_session=True, env=env)

    def _ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the zygote died (exit code {self.proc.poll()})"
        return json.loads(line)

    def run(self, args: list[str], parks: list[dict], signals: list[int]) -> tuple[int, int, str]:
        """Run ``fedbench`` with ``args`` in a fresh fork; at its i-th park send ``signals[i]``.
        Returns (exit code as waitstatus_to_exitcode gives it, parks reached, log)."""
        self.runs += 1
        marker = self.workdir / f"run{self.runs}"
        log = self.workdir / f"run{self.runs}.log"
        pid = self._ask({"cmd": "run", "args": args, "parks": parks, "marker": str(marker), "log": str(log)})["pid"]
        self.children.add(pid)
        reached = 0
        done = Path(f"{marker}.done")
        deadline = time.monotonic() + 180
        while reached < len(signals) and not done.exists():
            if Path(f"{marker}.{reached + 1}").exists():
                reached += 1
                os.kill(pid, signals[reached - 1])
                continue
            assert time.monotonic() < deadline, f"run {self.runs} neither parked nor finished:\n{log.read_text()}"
            time.sleep(0.01)
        while _alive(pid) and not done.exists():  # a signal that did not end it must not hang the suite
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                pytest.fail(f"run {self.runs} did not end after {reached} signal(s):\n{log.read_text()}")
            time.sleep(0.01)
        code = self._ask({"cmd": "wait", "pid": pid})["code"]
        self.children.discard(pid)
        return code, reached, log.read_text()

    def close(self) -> None:
        for pid in self.children:  # left parked by a failed test
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("kill"))
    yield z
    z.close()


def snapshot(path: Path) -> dict:
    """Everything the store holds, read without writing (integrity first)."""
    if not path.exists() or path.stat().st_size == 0:
        return {"cells": {}, "rounds": {}, "checkpoints": {}, "tables": set()}
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            return {"cells": {}, "rounds": {}, "checkpoints": {}, "tables": set()}
        assert tables == {"meta", "cells", "rounds", "checkpoints"}, tables  # a schema is all there or not at all
        meta = dict(conn.execute("SELECT key, value FROM meta"))
        assert meta["format"] == "fedbench-runs" and meta["schema_version"] == "1"
        cells = {k: (s, a, acc, m) for k, s, a, acc, m in
                 conn.execute("SELECT key, status, attempts, final_accuracy, message FROM cells")}
        rounds: dict[str, list] = {}
        for key, rnd, name, value in conn.execute("SELECT key, round, name, value FROM rounds ORDER BY key, round, name"):
            rounds.setdefault(key, []).append((rnd, name, value))
        checkpoints = {k: (hashlib.sha256(d).hexdigest(), sha) for k, d, sha in
                       conn.execute("SELECT key, data, sha256 FROM checkpoints")}
        return {"cells": cells, "rounds": rounds, "checkpoints": checkpoints, "tables": tables}
    finally:
        conn.close()


def check_consistent(snap: dict) -> None:
    """No half-written cell: finished cells have every round, the others none; checkpoints match their checksum."""
    for key, (status, attempts, accuracy, _) in snap["cells"].items():
        assert status in ("ok", "running", "interrupted"), (key, status)
        assert attempts >= 1
        rounds = {r for r, _, _ in snap["rounds"].get(key, [])}
        if status == "ok":
            assert accuracy is not None and rounds in ({1, 2, 3, 4}, {2, 3, 4}), (key, rounds)
            names = {}
            for r, n, _ in snap["rounds"][key]:
                names.setdefault(r, set()).add(n)
            assert len({frozenset(v) for v in names.values()}) == 1  # every round has every metric
        else:
            assert not rounds and accuracy is None, (key, status, rounds)
    assert set(snap["rounds"]) <= set(snap["cells"])
    for key, (actual, stored) in snap["checkpoints"].items():
        assert actual == stored, f"checkpoint {key} does not match its checksum"


# Where the kills land. "n" values come from a seeded generator (below); the kinds from this list.
IN_START = r"^\s*INSERT INTO cells"
FINISH_DELETE = r"^DELETE FROM rounds"
FINISH_UPDATE = r"^\s*UPDATE cells SET status=\?"
FINISH_ROUNDS = r"^INSERT INTO rounds"
CHECKPOINT = r"INTO checkpoints"
INTERRUPT = r"^UPDATE cells SET status='interrupted', message=\?, finished_at"
KILL, TERM, INT = signal.SIGKILL, signal.SIGTERM, signal.SIGINT


def schedule() -> list[tuple[str, list[dict], list[int], str]]:
    """(phase, parks, signals, what) for every attempt; phase A is the grid, B the same grid warm-started.

    Each attempt gets at most about one cell further than the one before, so that every kill point is
    reached before its phase's grid is done."""
    rng = random.Random(14)
    n = lambda hi: rng.randint(1, hi)  # noqa: E731
    return [
        ("A", [{"kind": "script", "n": 3}], [KILL], "while the store's schema is created"),
        ("A", [{"kind": "script", "n": 6}], [KILL], "while the store's meta rows are written"),
        ("A", [{"kind": "round", "n": n(4)}], [KILL], "in the first cell"),
        ("A", [{"kind": "sql", "pattern": IN_START, "n": n(2), "when": "after"}], [KILL], "inside a start transaction"),
        ("A", [{"kind": "sql", "pattern": FINISH_DELETE, "n": n(2), "when": "after"}], [KILL],
         "inside a finish transaction, rounds deleted"),
        ("A", [{"kind": "sql", "pattern": FINISH_ROUNDS, "n": n(2), "when": "after"}], [KILL],
         "inside a finish transaction, rounds written, before the commit"),
        ("A", [{"kind": "commit", "n": 1 + n(3), "when": "before"}], [KILL], "just before a commit"),
        ("A", [{"kind": "commit", "n": 1 + n(3), "when": "after"}], [KILL], "just after a commit"),
        ("A", [{"kind": "round", "n": n(4)}], [TERM], "SIGTERM in a cell"),
        ("A", [{"kind": "round", "n": n(4)}], [INT], "Ctrl-C in a cell"),
        ("A", [{"kind": "sql", "pattern": FINISH_UPDATE, "n": n(2), "when": "before"}], [INT],
         "Ctrl-C inside a finish transaction"),
        ("A", [{"kind": "sql", "pattern": FINISH_ROUNDS, "n": n(2), "when": "after"}], [TERM],
         "SIGTERM inside a finish transaction"),
        ("A", [{"kind": "round", "n": n(4)}, {"kind": "sql", "pattern": INTERRUPT, "n": 1, "when": "after"}], [INT, KILL],
         "SIGKILL while a Ctrl-C is being recorded"),
        ("A", [], [], "resume to the end"),
        ("B", [{"kind": "round", "n": 1}], [KILL], "in the warm-up"),
        ("B", [{"kind": "sql", "pattern": CHECKPOINT, "n": 1, "when": "before"}], [KILL], "before the checkpoint is written"),
        ("B", [{"kind": "sql", "pattern": CHECKPOINT, "n": 1, "when": "after"}], [KILL],
         "inside the checkpoint's transaction"),
        ("B", [{"kind": "round", "n": 1}], [TERM], "SIGTERM in the warm-up"),
        ("B", [{"kind": "sql", "pattern": CHECKPOINT, "n": 1, "when": "after"}], [INT],
         "Ctrl-C inside the checkpoint's transaction"),
        ("B", [{"kind": "sql", "pattern": CHECKPOINT, "n": 1, "when": "committed"}], [KILL],
         "right after the checkpoint's commit"),
        ("B", [{"kind": "round", "n": n(3)}], [KILL], "in the first warm-started cell"),
        ("B", [{"kind": "sql", "pattern": IN_START, "n": n(3), "when": "before"}], [TERM], "SIGTERM before a start"),
        ("B", [{"kind": "commit", "n": 2 + n(3), "when": "after"}], [KILL], "just after a commit"),
        ("B", [{"kind": "sql", "pattern": FINISH_DELETE, "n": n(3), "when": "after"}], [INT],
         "Ctrl-C inside a finish transaction"),
        ("B", [{"kind": "round", "n": n(6)}], [KILL], "in a warm-started cell"),
        ("B", [], [], "resume to the end"),
    ]


def test_a_matrix_killed_anywhere_resumes_to_every_cell_once_with_the_same_numbers(zygote, tmp_path):
    reference, path = tmp_path / "reference.db", tmp_path / "runs.db"
    for phase in (GRID, GRID + WARM):
        code, _, log = zygote.run([*phase, "--store", str(reference)], [], [])
        assert code == 0, log
    expected = snapshot(reference)
    assert len(expected["cells"]) == 2 * N_CELLS and {s for s, *_ in expected["cells"].values()} == {"ok"}

    kills, landed = 0, []
    in_flight: dict[str, int] = {}  # cells a kill caught after they started: each one costs an attempt
    finished: dict[str, tuple] = {}  # cells seen ok, and what they held then
    before = snapshot(path)
    for phase, parks, signals, what in schedule():
        args = [*GRID, *(WARM if phase == "B" else []), "--store", str(path)]
        code, reached, log = zygote.run(args, parks, signals)
        after = snapshot(path)
        check_consistent(after)
        for key, seen in finished.items():  # nothing finished is ever lost or changed
            assert (after["cells"][key], after["rounds"][key]) == seen, f"{key} changed ({what})"
        for key, row in after["cells"].items():
            if row[0] == "ok":
                finished.setdefault(key, (row, after["rounds"][key]))
        if not signals:
            assert code == 0, log
            continue
        assert reached == len(signals), f"{what}: the run ended before its kill point (exit {code})\n{log}"
        kills += 1
        landed.append(what)
        last = signals[-1]
        if last == KILL:
            assert code == -KILL
        elif last == INT:
            assert code == 130 and "run the same command again to resume" in log, log
        else:  # SIGTERM: like Ctrl-C while the cells run, exit 143
            assert code == 143 and "run the same command again to resume" in log, log
        for key, (status, attempts, _, message) in after["cells"].items():
            old = before["cells"].get(key)
            if status in ("running", "interrupted") and (old is None or old[1] != attempts):
                in_flight[key] = in_flight.get(key, 0) + 1
            if last in (INT, TERM) and status == "running":
                pytest.fail(f"{what}: a cell was left running after {signal.Signals(last).name}")
            if last in (INT, TERM) and status == "interrupted" and (old is None or old[1] != attempts):
                assert ("Ctrl-C" if last == INT else "SIGTERM") in message, message
        before = after

    assert kills >= 20, landed
    final = snapshot(path)
    assert set(final["cells"]) == set(expected["cells"]), "every cell of both grids, each once"
    assert {s for s, *_ in final["cells"].values()} == {"ok"}
    assert final["rounds"] == expected["rounds"], "the same per-round numbers as a run never interrupted"
    assert final["checkpoints"].keys() == expected["checkpoints"].keys()
    assert {k: v[0] for k, v in final["checkpoints"].items()} == {k: v[0] for k, v in expected["checkpoints"].items()}
    attempts = {k: row[1] for k, row in final["cells"].items()}
    assert attempts == {k: 1 + in_flight.get(k, 0) for k in attempts}, "one attempt per start a kill cut short"
    assert any(v > 1 for v in attempts.values())


def test_sigterm_while_cells_run_records_them_interrupted_and_exits_like_ctrl_c(zygote, tmp_path):
    path = tmp_path / "runs.db"
    code, reached, log = zygote.run([*GRID, "--store", str(path)], [{"kind": "round", "n": 6}], [TERM])
    assert reached == 1 and code == 143, log
    assert "terminated (SIGTERM):" in log and "run the same command again to resume" in log and "Traceback" not in log
    cells = snapshot(path)["cells"]
    assert sorted(s for s, *_ in cells.values()) == ["interrupted", "ok"]
    assert "interrupted (SIGTERM) while running" in next(m for s, _, _, m in cells.values() if s == "interrupted")
    assert not Path(f"{path}.lock").exists()  # released and removed, as after Ctrl-C
