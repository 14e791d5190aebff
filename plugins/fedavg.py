"""FedAvg: the weighted mean of client updates (McMahan et al. 2017), the default aggregator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import fedbench
from fedbench.vectors import weighted_mean


@dataclass(kw_only=True)
class FedAvg(fedbench.Aggregator):
    """Weighted mean of the client updates, weights = client sample counts (plain FedAvg).

    NaN/inf: no protection, as in every FedAvg. One row with a NaN or inf entry makes the mean
    non-finite, and a finite but huge row (1e38, say) makes it huge; either way the run diverges in
    that round.
    """

    name: ClassVar[str] = "fedavg"

    def aggregate(self, updates, weights, ctx):
        return weighted_mean(updates, weights)


@fedbench.hookimpl
def register_aggregators(register):
    register(FedAvg)
