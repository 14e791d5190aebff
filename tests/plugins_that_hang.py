"""Test plugins that hang a cell in round 2, for tests/test_cell_timeout.py. They live in a module
of their own (not a test file) so that worker processes can import them (``fedbench.register_plugin``
ships a module plugin to workers by its name)."""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from typing import ClassVar

import fedbench

FOREVER = 10**6  # seconds: a sleep no test waits out


@dataclass(kw_only=True)
class Sleepy(fedbench.Attack):
    """Test attack: sleeps forever in its adversarial round."""

    name: ClassVar[str] = "test-sleepy"

    def malicious_updates(self, rnd):
        time.sleep(FOREVER)


@dataclass(kw_only=True)
class Spin(fedbench.Aggregator):
    """Test aggregator: the weighted mean, except that it busy-loops forever from round 2 on."""

    name: ClassVar[str] = "test-spin"

    def aggregate(self, updates, weights, ctx):
        while ctx.round >= 2:
            pass
        w = weights.to(updates.dtype)
        return (w / w.sum()) @ updates


@dataclass(kw_only=True)
class Deaf(fedbench.Attack):
    """Test attack: blocks SIGALRM, then sleeps forever -- like code stuck in C, the worker's alarm
    cannot stop it; only the driver killing the worker can. Never run it in the test process."""

    name: ClassVar[str] = "test-deaf"

    def malicious_updates(self, rnd):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(FOREVER)


class HangWarmUp:
    """A plugin whose round_finished hook sleeps forever in round 2 of a 2-round cell: the clean
    warm-up of a grid run with --warmup-rounds 2 (its cells have more rounds)."""

    @fedbench.hookimpl
    def round_finished(self, cell, round, metrics):
        if cell.rounds == 2 and round == 2:
            time.sleep(FOREVER)


@fedbench.hookimpl
def register_attacks(register):
    register(Sleepy)
    register(Deaf)


@fedbench.hookimpl
def register_aggregators(register):
    register(Spin)
