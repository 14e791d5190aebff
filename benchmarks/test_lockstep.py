"""Lockstep vs one cell at a time (issue 13).

Targets: on a CPU lockstep is no slower than one cell at a time under either protocol (12-cell
Fashion-MNIST grid); on a GPU lockstep gives >= 10x the cells per hour at 60 cells, and the FL-WBC
paper's figure-3 grid (poison with one image vs fedavg, wbc:s=0.4, cma, ctma at three betas; both
protocols; IID and non-IID; 3 seeds; 50 rounds) runs in <= 10 minutes. The GPU benchmarks skip
without CUDA: they are ready to run on a machine that has one (``pytest benchmarks/test_lockstep.py -s``).

Both variants run in this process on the same cells (run_lockstep vs run_cell one after another), the
data loaded once, interleaved, best of the repeats; ratios are cells per hour, lockstep / alone.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from benchmarks.conftest import best_times, report
from fedbench.data import load_dataset
from fedbench.engine import run_cell
from fedbench.lockstep import run_lockstep
from fedbench.spec import make_cell

DEFENSES = ("fedavg", "wbc:s=0.4", "cma", "ctma:beta=0.1", "ctma:beta=0.2", "ctma:beta=0.3")


def _data_dir() -> str:
    candidates = [os.environ.get("FEDBENCH_DATA_DIR"), str(Path(__file__).resolve().parents[2] / "shared" / "datasets")]
    found = next((c for c in candidates if c and (Path(c) / "FashionMNIST" / "raw").is_dir()), None)
    if found is None:
        pytest.skip("needs the Fashion-MNIST files (FEDBENCH_DATA_DIR or ../shared/datasets)")
    return found


def _grid(n: int, protocol: str, rounds: int, **kw):
    """``n`` cells of the figure-3 kind: poison (one image) and the clean run against the fig-3 defenses."""
    cells = []
    seed = 0
    while len(cells) < n:
        for attack in ("poison", "none"):
            for defense in DEFENSES:
                if len(cells) < n:
                    cells.append(make_cell(attack=attack, defense=defense, dataset="fmnist", protocol=protocol,
                                           rounds=rounds, seed=seed, attack_rounds=(2,) if attack == "poison" else None,
                                           **kw))
        seed += 1
    return cells


def _compare(benchmark, title, cells, data_dir, device, repeats=2):
    """Cells per hour: one ``run_cell`` after another, ``run_lockstep``, and ``run_lockstep`` with each
    cell's malicious training on its own (as before it was batched across cells)."""
    from fedbench import lockstep

    def malicious_per_cell():
        batched = lockstep._finish_together
        lockstep._finish_together = lambda items: [u if isinstance(u, BaseException) else run.finish_round(u)
                                                   for run, u in items]
        try:
            run_lockstep(cells, data_dir=data_dir, device=device)
        finally:
            lockstep._finish_together = batched

    load_dataset(cells[0].dataset, data_dir)
    times = best_times({
        "alone": lambda: [run_cell(c, data_dir=data_dir, device=device) for c in cells],
        "lockstep": lambda: run_lockstep(cells, data_dir=data_dir, device=device),
        "lockstep, malicious per cell": malicious_per_cell,
    }, repeats=repeats)
    return report(benchmark, title, times, {"cells_per_hour lockstep/alone": ("alone", "lockstep"),
                                            "lockstep: malicious batched/per cell": ("lockstep, malicious per cell", "lockstep")})


@pytest.mark.timeout(3600)
@pytest.mark.parametrize("protocol", ["paper", "reference-code"])
def test_cpu_lockstep_vs_one_cell_at_a_time(benchmark, protocol):
    """12 Fashion-MNIST cells, 2 rounds, on a quarter (paper) or a tenth (reference code: 480 local
    steps of batch 10 a round in full, 4-15 s on this CPU) of each client's data, so that the
    comparison fits in minutes on 2 cores; one timed repeat after a warm-up."""
    data_dir = _data_dir()
    frac = 0.25 if protocol == "paper" else 0.1
    cells = _grid(12, protocol, 2, client_data_frac=frac)
    _compare(benchmark, f"12 fmnist cells, {protocol} protocol, CPU", cells, data_dir, "cpu", repeats=1)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("n", [12, 60])
@pytest.mark.parametrize("protocol", ["paper", "reference-code"])
def test_gpu_lockstep_vs_one_cell_at_a_time(benchmark, n, protocol):
    """The CPU benchmark's cells (the same data fractions: launch-bound steps stay launch-bound on
    fewer of them), 3 rounds (the second adversarial), at 12 and 60 cells: 60 reference-code cells one
    at a time would otherwise take 60 x 1.5-3 s a round."""
    data_dir = _data_dir()
    cells = _grid(n, protocol, 3, client_data_frac=0.25 if protocol == "paper" else 0.1)
    _compare(benchmark, f"{n} fmnist cells, {protocol} protocol, GPU", cells, data_dir, "cuda", repeats=1)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


@needs_cuda
@pytest.mark.timeout(3600)
def test_gpu_figure3_grid_wall_time(benchmark, tmp_path):
    """The figure-3 grid through the matrix (lockstep is the GPU default), into a store."""
    from fedbench.matrix import expand, run_matrix
    from fedbench.store import Store

    data_dir = _data_dir()
    cells = []
    for protocol in ("paper", "reference-code"):
        cells += expand(attacks=["poison"], defenses=list(DEFENSES), seeds=[0, 1, 2], datasets=["fmnist"],
                        partitions=["iid", "shards"], protocol=protocol, rounds=50)
    start = time.perf_counter()
    with Store.open(tmp_path / "fig3.db") as store:
        result = run_matrix(cells, store, jobs=1, data_dir=data_dir, device="cuda")
    seconds = time.perf_counter() - start
    assert result.count("ok") == len(cells)
    report(benchmark, f"figure-3 grid, {len(cells)} cells x 50 rounds, GPU", {"grid": seconds, "budget": 600.0},
           {"grid/10min": ("grid", "budget")})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


@pytest.mark.timeout(3600)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_thousand_clients_a_round(benchmark, device):
    """Issue 13: a cell with 1,000 clients a round (1,010 clients, 5 of them malicious; 60 Fashion-MNIST
    images each, the paper protocol) against wbc:s=0.4, two rounds, the second adversarial: the round
    time and the peak memory (the GPU's allocator peak; on the CPU the process's peak RSS, the dataset
    included). On the GPU the stacked trainer takes all 1,000 clients in one stack."""
    import resource

    data_dir = _data_dir()
    cell = make_cell(attack="poison", defense="wbc:s=0.4", dataset="fmnist", num_clients=1010, clients_per_round=1000,
                     rounds=2, attack_rounds=(2,))
    load_dataset(cell.dataset, data_dir)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rounds = []
    start = time.perf_counter()

    def on_round(rnd, row):
        rounds.append(time.perf_counter())

    result = run_cell(cell, data_dir=data_dir, device=device, on_round=on_round)
    assert result.status == "ok"
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    times = {"round 1 (set-up included)": rounds[0] - start, "round 2 (adversarial)": rounds[1] - rounds[0]}
    report(benchmark, f"1,000 clients a round, wbc:s=0.4, {device}", times, {})
    print(f"  peak memory: {peak / 2**30:.2f} GiB; train / aggregate / evaluate: "
          + " / ".join(f"{v:.2f} s" for v in result.timings.values()))
    benchmark.extra_info["peak_memory_gib"] = round(peak / 2**30, 3)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
