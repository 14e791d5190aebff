"""FedAvg: the weighted mean of client updates (McMahan et al. 2017), the default aggregator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import fedbench


@dataclass(kw_only=True)
class FedAvg(fedbench.Aggregator):
    """Weighted mean of the client updates, weights = client sample counts (plain FedAvg)."""

    name: ClassVar[str] = "fedavg"

    def aggregate(self, updates, weights, ctx):
        w = weights.to(updates.dtype)
        return (w / w.sum()) @ updates


@fedbench.hookimpl
def register_aggregators(register):
    register(FedAvg)
