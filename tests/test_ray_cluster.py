"""Attaching to an existing Ray cluster (issue 14): two nodes started with ``ray start`` on this machine
run a small matrix across both, with exactly the numbers of the process pool; an attach that cannot
work is one ``Error:`` line that names the cause and what to check, and it gives up in bounded time.

The cluster runs with token authentication and a token of its own (``RAY_AUTH_MODE=token``,
``RAY_AUTH_TOKEN``), as recent Ray's clusters do, without reading or writing ``~/.ray/auth_token``.
Its processes are stopped by what they are -- every process whose command line names this module's
temporary directory, and their children -- never with ``ray stop``, which stops every Ray on the
machine, another test's or another user's too."""

from __future__ import annotations

import importlib.util
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                reason="ray is not installed (pip install 'fedbench-suite[ray]')")

# poison and the clean run against fedavg and wbc: 4 cells of 3 rounds on the embedded digits data
GRID = ["matrix", "--dataset", "digits", "--attacks", "poison", "--defenses", "wbc", "--rounds", "3",
        "--attack-rounds", "2"]
CELLS = 4

# Waits until both nodes are up (a worker node registers with the head after `ray start` returns)
# and prints their node ids.
WAIT_FOR_NODES = """
import logging, sys, time, ray
ray.init(address=sys.argv[1], logging_level=logging.ERROR)
deadline = time.monotonic() + 60
while len(alive := [n["NodeID"] for n in ray.nodes() if n["Alive"]]) < 2 and time.monotonic() < deadline:
    time.sleep(0.2)
print(" ".join(alive))
"""


def fedbench(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run the CLI in a process of its own: Ray's state never touches the test process. The timeout
    only keeps a hang from holding the suite; no assertion depends on how long a run takes."""
    return subprocess.run([sys.executable, "-m", "fedbench", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def clean_env() -> dict[str, str]:
    """This process's environment without any Ray address or authentication setting."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("RAY_AUTH")}


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for sock in sockets:
        sock.bind(("", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def cells(path: Path) -> dict[str, tuple[str, str]]:
    """``key -> (status, worker)`` of a store; empty when nothing was ever recorded there."""
    if not path.exists():
        return {}
    with closing(sqlite3.connect(path)) as conn:
        try:
            rows = conn.execute("SELECT key, status, worker FROM cells").fetchall()
        except sqlite3.OperationalError:  # no table yet
            return {}
    return {key: (status, worker) for key, status, worker in rows}


def numbers(path: Path) -> dict[str, list]:
    """Every per-round number of a store, exactly as stored, by cell key."""
    out: dict[str, list] = {}
    with closing(sqlite3.connect(path)) as conn:
        rows = conn.execute("SELECT key, round, name, value FROM rounds ORDER BY key, round, name").fetchall()
    for key, rnd, name, value in rows:
        out.setdefault(key, []).append((rnd, name, value))
    return out


def the_error(run: subprocess.CompletedProcess) -> str:
    """The one ``Error:`` line of a failed run; Ray may log its own tries before it, nothing after."""
    output = run.stdout + run.stderr
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and run.stderr.rstrip().splitlines()[-1] == errors[0], output
    return errors[0]


def ours(marker: str) -> set[int]:
    """The processes whose command line names ``marker``, and all their descendants (Ray renames its
    workers, so they are found as the raylets' children)."""
    parent: dict[int, int] = {}
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                named = marker.encode() in cmdline.read()
        except OSError:  # gone meanwhile
            continue
        if fields[0] == "Z":  # a zombie holds nothing
            continue
        parent[int(entry)] = int(fields[1])
        if named:
            found.add(int(entry))
    while more := {pid for pid, ppid in parent.items() if ppid in found} - found:
        found |= more
    return found


def stop(marker: str) -> None:
    """SIGKILL this module's Ray processes (what ``ray stop --force`` does, for ours only)."""
    for _ in range(3):  # a process that forks while we kill is caught by the next pass
        pids = ours(marker)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not pids:
            return
        time.sleep(0.5)


@dataclass
class Cluster:
    address: str
    nodes: set[str]
    node_manager_port: int  # the worker node's raylet: a port that answers, but not as a head
    env: dict[str, str]


@pytest.fixture(scope="module")
def cluster():
    """A head and a worker node on this machine, 1 CPU each, with token authentication."""
    if not Path("/proc/self/cmdline").exists():
        pytest.skip("needs Linux's /proc to stop only this test's Ray processes")
    # Short: Ray's unix socket paths (under <temp-dir>/session_*/sockets) must stay under 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="fbray", dir="/tmp" if os.path.isdir("/tmp") else None))
    env = {**clean_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    head, dashboard, head_agent, worker_agent, node_manager = free_ports(5)
    common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--object-store-memory", str(100 * 2**20),
              "--disable-usage-stats"]
    starts = [["--head", "--port", str(head), "--include-dashboard", "false", "--dashboard-port", str(dashboard),
               "--dashboard-agent-listen-port", str(head_agent), "--temp-dir", str(root / "head")],
              ["--address", f"127.0.0.1:{head}", "--node-manager-port", str(node_manager),
               "--dashboard-agent-listen-port", str(worker_agent), "--temp-dir", str(root / "worker")]]
    try:
        for args in starts:
            try:
                started = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "start", *args, *common],
                                         env=env, capture_output=True, text=True, timeout=120)
            except subprocess.TimeoutExpired:
                pytest.skip("`ray start` did not finish within 120 s on this machine")
            if started.returncode != 0:
                last = (started.stderr.strip().splitlines() or ["(no output)"])[-1]
                pytest.skip(f"`ray start` cannot start a node on this machine: {last}")
        waited = subprocess.run([sys.executable, "-c", WAIT_FOR_NODES, f"127.0.0.1:{head}"], env=env,
                                capture_output=True, text=True, timeout=120)
        nodes = set(waited.stdout.split())
        assert waited.returncode == 0 and len(nodes) == 2, waited.stderr[-2000:]
        yield Cluster(f"127.0.0.1:{head}", nodes, node_manager, env)
    finally:
        stop(str(root))
        shutil.rmtree(root, ignore_errors=True)


def test_a_matrix_attached_to_a_two_node_cluster_runs_on_both_nodes_with_the_process_pools_numbers(cluster, tmp_path):
    on_ray = fedbench(*GRID, "--executor", "ray", "--ray-address", cluster.address, "--store", str(tmp_path / "ray.db"),
                      env=cluster.env)
    assert on_ray.returncode == 0, on_ray.stdout[-2000:] + on_ray.stderr[-2000:]
    local = fedbench(*GRID, "--executor", "process", "--jobs", "2", "--store", str(tmp_path / "local.db"),
                     env=clean_env())
    assert local.returncode == 0, local.stderr[-2000:]

    ran = cells(tmp_path / "ray.db")
    assert len(ran) == CELLS and {status for status, _ in ran.values()} == {"ok"}
    # Both nodes are on this host, so host:pid cannot tell them apart; the Ray node id can.
    where = {re.fullmatch(r".+:\d+ \(Ray node ([0-9a-f]+)\)", worker).group(1) for _, worker in ran.values()}
    assert where == cluster.nodes
    assert numbers(tmp_path / "ray.db") == numbers(tmp_path / "local.db")
    assert sum(len(rows) for rows in numbers(tmp_path / "ray.db").values()) >= CELLS * 3


def test_an_address_where_nothing_listens_is_one_line_with_what_to_check(tmp_path):
    (port,) = free_ports(1)
    run = fedbench(*GRID, "--executor", "ray", "--ray-address", f"127.0.0.1:{port}", "--store", str(tmp_path / "r.db"),
                   env=clean_env())
    assert run.returncode == 2
    line = the_error(run)
    assert line.startswith(f"Error: cannot attach to the Ray cluster at 127.0.0.1:{port}: "
                           f"nothing listens on port {port} of 127.0.0.1 (tried for ")
    assert f"`ray start --head --port {port}` runs on that machine" in line
    assert cells(tmp_path / "r.db") == {}


def test_a_process_without_the_clusters_token_is_told_which_setting_to_make(cluster, tmp_path):
    env = {**cluster.env, "RAY_AUTH_MODE": "disabled"}  # as Ray's default is for an explicit address
    del env["RAY_AUTH_TOKEN"]
    run = fedbench(*GRID, "--executor", "ray", "--ray-address", cluster.address, "--store", str(tmp_path / "r.db"),
                   env=env)
    assert run.returncode == 2
    line = the_error(run)
    assert f"at {cluster.address}: the cluster refused this process's authentication" in line
    assert "set RAY_AUTH_MODE=token here and the head's token in RAY_AUTH_TOKEN" in line
    assert cells(tmp_path / "r.db") == {}


def test_a_port_that_is_not_the_heads_is_named_as_such(cluster, tmp_path):
    address = f"127.0.0.1:{cluster.node_manager_port}"  # the worker node's raylet: it answers, but not as a head
    run = fedbench(*GRID, "--executor", "ray", "--ray-address", address, "--store", str(tmp_path / "r.db"),
                   env=cluster.env)
    assert run.returncode == 2
    line = the_error(run)
    assert f"at {address}: something listens there, but Ray could not attach to it (ConnectionError: " in line
    assert f"check that {cluster.node_manager_port} is the head's port" in line
    assert "Ray 2." in line and "RAY_AUTH_MODE=token" in line  # the versions and the token are on the list too
    assert cells(tmp_path / "r.db") == {}


def test_an_attach_that_gets_no_answer_gives_up_at_the_time_box(tmp_path):
    """A port that accepts connections but never answers holds each of Ray's own tries for about
    40 s; the time box (shortened to 3 s here) ends the attach with one line all the same."""
    listener = socket.create_server(("", 0))  # the kernel accepts; nobody ever answers
    port = listener.getsockname()[1]
    script = ("import sys; from fedbench.cli import main; from fedbench.executors import RayTasks; "
              "RayTasks.connect_seconds = 3; sys.argv[0] = 'fedbench'; main()")
    try:
        run = subprocess.run([sys.executable, "-c", script, *GRID, "--executor", "ray", "--ray-address",
                              f"127.0.0.1:{port}", "--store", str(tmp_path / "r.db")],
                             env=clean_env(), capture_output=True, text=True, timeout=120)
    finally:
        listener.close()
    assert run.returncode == 2
    line = the_error(run)
    tried = re.search(rf"at 127\.0\.0\.1:{port}: something listens there, but no Ray head answered "
                      r"\(tried for (\d+\.\d) s\)", line)
    assert tried and float(tried.group(1)) >= 3.0, line


KEEPS_SIGTERM = """
import signal
from fedbench.executors import RayTasks

def mine(signum, frame):
    pass

signal.signal(signal.SIGTERM, mine)
backend = RayTasks(1, None)
try:
    print("kept" if signal.getsignal(signal.SIGTERM) is mine else "replaced")
finally:
    backend.close()
"""


def test_a_local_ray_leaves_the_drivers_sigterm_handler_in_place():
    """Starting a local Ray installs a SIGTERM handler that exits at once; the matrix's own handler
    (which records the cells in flight as interrupted) must survive it."""
    done = subprocess.run([sys.executable, "-c", KEEPS_SIGTERM], env=clean_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "kept"
