"""Result stores filled by hand for the leaderboard, statistics, plot and report tests: every expected
number can be worked out from the values written here."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import fedbench
from fedbench.matrix import MatrixCell
from fedbench.spec import make_cell
from fedbench.store import Store

ROUNDS = 4  # attack in round 2


def put(store, attack, defense, seed, acc, *, success=None, mitigation=(), status="ok", message="", warmup=0):
    """Record one cell with final accuracy ``acc`` and per-round ``success`` (rounds 1..4)."""
    mc = MatrixCell(make_cell(attack=attack, defense=defense, seed=seed, rounds=ROUNDS, attack_rounds=(2,)), warmup)
    adversarial = [2] if attack != "none" else []
    rounds = [{"round": r, "adversarial": r in adversarial, "accuracy": acc, "loss": 0.3, "eval_n": 300,
               **({"success": success[r - 1]} if success else {})} for r in range(1, ROUNDS + 1)]
    result = None if status == "failed" else {
        "final_accuracy": acc, "adversarial_rounds": adversarial, "rounds": rounds, "seconds": 0.1, "timings": {},
        "mitigation": [{"attack_round": 2, "rounds": k, "censored": c, "peak": success[1] if success else math.nan}
                       for k, c in mitigation]}
    store.start(mc.key, mc.cell.to_dict(), warmup, mc.info())
    store.finish(mc.key, {"status": status, "message": message, "result": result})
    return mc


def fill_two_seeds(path):
    """Two seeds of poison against fedavg and wbc, with the clean reference cells; returns ``path``.

    Seed 1 is seed 0 shifted down by 0.1 in accuracy. poison's success after the attack in round 2:
    fedavg 0.9, 0.8, 0.7 (still active at the end: censored), wbc 0.8, 0.2, 0.2 (mitigated in 1)."""
    with Store.open(path) as store:
        for seed, shift in ((0, 0.0), (1, 0.1)):
            put(store, "none", "fedavg", seed, 0.90 - shift)
            put(store, "none", "wbc", seed, 0.88 - shift)
            put(store, "poison", "fedavg", seed, 0.70 - shift, success=[0.1, 0.9, 0.8, 0.7], mitigation=[(2, True)])
            put(store, "poison", "wbc", seed, 0.80 - shift, success=[0.1, 0.8, 0.2, 0.2], mitigation=[(1, False)])
    return path


@dataclass(kw_only=True)
class Sneaky(fedbench.ClientDefense):
    """A defense whose name is HTML."""

    name: ClassVar[str] = '<script>alert("x")</script>'


class SneakyPlugin:
    @fedbench.hookimpl
    def register_defenses(self, register):
        register(Sneaky)
