"""Shared pieces of the benchmark suite (``pytest benchmarks/``; not part of the default test run).

Speed goals are ratios measured in one run (the machine is noisy): every benchmark times its
variants interleaved, best of a few repeats, and reports ``variant / baseline`` in its
``extra_info`` and on stdout (run with ``-s`` to see the lines as they come).
"""

from __future__ import annotations

import time

import pytest
import torch


def best_times(variants: dict, repeats: int = 3) -> dict[str, float]:
    """Best wall time of each callable, measured interleaved (A, B, C, A, B, C, ...) after a warm-up."""
    for fn in variants.values():
        fn()
    best = {name: float("inf") for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def report(benchmark, title: str, times: dict[str, float], ratios: dict[str, tuple[str, str]]) -> dict[str, float]:
    """Record times and the named ratios (numerator, denominator) in the benchmark's extra_info."""
    out = {name: times[a] / times[b] for name, (a, b) in ratios.items()}
    benchmark.extra_info.update({f"seconds[{k}]": round(v, 4) for k, v in times.items()})
    benchmark.extra_info.update({k: round(v, 3) for k, v in out.items()})
    lines = [f"{title}:"] + [f"  {k}: {v * 1000:.1f} ms" for k, v in times.items()]
    lines += [f"  {k} = {v:.2f}" for k, v in out.items()]
    print("\n" + "\n".join(lines))
    return out


@pytest.fixture
def fmnist_round():
    """Synthetic data of a paper round on Fashion-MNIST: 10 clients x 600 images [1, 28, 28]
    (speed does not depend on pixel values, so no data files are needed)."""
    from fedbench.models import FmnistCNN
    from fedbench.training import FlatModel

    torch.manual_seed(0)
    model = FlatModel(FmnistCNN().build((1, 28, 28), 10))
    x = torch.randn(10, 600, 1, 28, 28)
    y = torch.randint(0, 10, (10, 600))
    return model, x, y


def jobs(x, y, n=None):
    from fedbench.training import ClientJob

    n = n or x.shape[1]
    return [
        ClientJob(x[i, :n], y[i, :n], torch.Generator().manual_seed(i), defense_key=1000 + i)
        for i in range(len(x))
    ]
