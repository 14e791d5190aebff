"""Whole-command costs: the README quickstart, and --jobs 2 vs --jobs 1.

Targets (issue 6, 2-core CPU): the quickstart <= 60 s wall including start-up; --jobs 2 >= 1.3x the
cells per minute of --jobs 1."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.conftest import report

QUICKSTART = ["matrix", "--attacks", "poison", "--defenses", "wbc,cma,ldp", "--quiet"]
#: 150 rounds, so that cells cost seconds and worker start-up (about 4 s: torch, sklearn) does not dominate.
GRID = ["matrix", "--attacks", "poison,backdoor", "--defenses", "wbc,cma", "--seeds", "0,1", "--rounds", "150", "--quiet"]


def _fedbench(args, store) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fedbench.cli", *args, "--store", str(store)], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def test_quickstart_wall_time(benchmark, tmp_path):
    seconds = _fedbench(QUICKSTART, tmp_path / "q.db")
    report(benchmark, "README quickstart (digits, 8 cells, default --jobs)", {"quickstart": seconds, "budget": 60.0},
           {"quickstart/60s": ("quickstart", "budget")})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


def _shared_fmnist() -> Path | None:
    candidates = [os.environ.get("FEDBENCH_DATA_DIR"), str(Path(__file__).resolve().parents[2] / "shared" / "datasets")]
    return next((Path(c) for c in candidates if c and (Path(c) / "FashionMNIST" / "raw").is_dir()), None)


def test_jobs2_vs_jobs1_on_convolutional_cells(benchmark, tmp_path):
    """8 Fashion-MNIST cells of 5 rounds: here ``--jobs 1`` runs two-threaded convolutions in one
    process, ``--jobs 2`` two single-threaded workers."""
    data = _shared_fmnist()
    if data is None:
        pytest.skip("needs the Fashion-MNIST files (FEDBENCH_DATA_DIR or ../shared/datasets)")
    grid = ["matrix", "--attacks", "poison", "--defenses", "fedavg,cma", "--dataset", "fmnist", "--rounds", "5",
            "--seeds", "0,1", "--data-dir", str(data), "--quiet"]
    times = {
        "jobs1": _fedbench([*grid, "--jobs", "1"], tmp_path / "j1.db"),
        "jobs2": _fedbench([*grid, "--jobs", "2"], tmp_path / "j2.db"),
    }
    report(benchmark, "8-cell fmnist grid", times, {"cells_per_minute jobs2/jobs1": ("jobs1", "jobs2")})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


def test_jobs2_vs_jobs1_cells_per_minute(benchmark, tmp_path):
    # 18 cells: (poison, backdoor, none) x (wbc, cma, fedavg) x 2 seeds
    times = {
        "jobs1": _fedbench([*GRID, "--jobs", "1"], tmp_path / "j1.db"),
        "jobs2": _fedbench([*GRID, "--jobs", "2"], tmp_path / "j2.db"),
    }
    report(benchmark, "18-cell digits grid", times, {"cells_per_minute jobs2/jobs1": ("jobs1", "jobs2")})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
