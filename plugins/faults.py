"""Numerical fault injection: malicious clients upload NaN, +inf, -inf or float32-near-max updates.

Not an attack from the literature but a test of the server stage: what each aggregator and
pre-aggregator does with a non-finite (or barely finite) row is part of its docstring, and this
attack is how the test suite (``tests/test_numerical_faults.py``) and a user's matrix check it.
A rule either outvotes, trims or filters the faulty rows (the run stays finite) or it passes them
into the global model, where the engine records the cell ``diverged`` in that round and stops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

import fedbench

#: The fault values: ``huge`` is 1e38, finite in float32 (max about 3.4e38), but the float32 sum of
#: four such values, or any float32 norm of such a row, overflows to inf.
VALUES = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "huge": 1e38}


@dataclass(kw_only=True)
class NumericalFault(fedbench.Attack):
    """Fault-injection test attack: malicious clients upload updates full of NaN, inf, -inf or 1e38 (huge).

    Definition: with ``rows = all`` every malicious client uploads the constant vector ``value`` in
    every coordinate (no training); with ``rows = one`` only the first malicious client does and the
    others upload their honest local update (``rnd.train``), so exactly one row of the round is
    faulty. ``huge`` = 1e38 is finite but overflows float32 arithmetic (sums, norms, dot products),
    the way a diverging client or a crude boosting attack would. Untargeted: its success is the
    benign error.
    """

    name: ClassVar[str] = "nan"
    untargeted: ClassVar[bool] = True
    value: str = fedbench.param("nan", "what faulty rows hold: nan, inf, -inf or huge (1e38)", choices=tuple(VALUES))
    rows: str = fedbench.param("all", "faulty rows: all malicious clients, or only the first one", choices=("all", "one"))

    def malicious_updates(self, rnd: fedbench.MaliciousRound) -> torch.Tensor:
        flat = rnd.global_params
        fault = torch.full((flat.numel(),), VALUES[self.value], dtype=flat.dtype, device=flat.device)
        if self.rows == "all":
            return fault.expand(len(rnd.client_ids), -1).clone()
        updates = rnd.train(rnd.client_data)
        updates[0] = fault
        return updates


@fedbench.hookimpl
def register_attacks(register):
    register(NumericalFault)
