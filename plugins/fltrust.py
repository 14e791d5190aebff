"""FLTrust (Cao, Fang, Liu, Gong, NDSS 2021): trust bootstrapped from a small clean root data set.

The server holds ``root`` clean training samples that no client ever sees (the engine removes them
from every partition, but only for a stack that asks, see :meth:`FLTrust.root_samples`). Each round
it trains the current global model on them with the clients' local setup; that server update g0
(``ServerContext.root_update()``) is the trust anchor against which every client update is scored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

import fedbench
from fedbench.components import AT_LEAST_ONE
from fedbench.vectors import norms, weighted_sum


@dataclass(kw_only=True)
class FLTrust(fedbench.Aggregator):
    """FLTrust (Cao et al., NDSS 2021): weight updates by ReLU(cosine) to a server update on clean root data.

    Definition (the paper's aggregation rule), with g0 the server update on the root data:

        TS_i  = ReLU(cos(g_i, g0))                    trust score
        ĝ_i   = ||g0|| / ||g_i|| * g_i                magnitude normalised to the server update's
        g     = sum_i TS_i ĝ_i / sum_j TS_j

    so the aggregate is a convex combination of vectors of norm ||g0||: its norm never exceeds
    ||g0||, however large a malicious update is, and an update pointing away from g0 gets weight 0.
    When every trust score is 0 (no client agrees with the server at all) the rule returns the zero
    update, i.e. the global model stays as it is (BackFed does the same; FLPoison instead falls back
    to the uniform mean of the normalised updates). A zero or non-finite client update has trust 0.
    The client weights (sample counts) are ignored, as in the paper.

    fedbench adds the aggregate to the global model (the paper's global learning rate alpha = 1 in the
    update convention). The root data are ``root`` training samples drawn from the cell's ``root``
    stream and held out from every client, uniformly over the training set (the paper's default: 100
    examples distributed like the overall training data); BackFed draws them from the test split and
    FLPoison class-stratified from the training set. The n cosines to g0 need no Gram matrix: one
    matrix-vector product with the unit vector g0 / ||g0||, and the aggregate is one more.
    """

    name: ClassVar[str] = "fltrust"
    root: int = fedbench.param(100, "clean training samples the server holds out as its root data set (paper: 100)", check=AT_LEAST_ONE)

    def root_samples(self) -> int:
        return self.root

    def aggregate(self, updates, weights, ctx):
        if ctx.root_update is None:
            raise fedbench.FedbenchError(
                "fltrust: the server has no root data in this context (ServerContext.root_update is None); "
                "the engine provides it for a stack that declares root_samples()"
            )
        g0 = ctx.root_update().to(device=updates.device, dtype=updates.dtype)
        g0_norm = float(norms(g0.unsqueeze(0))[0])
        if len(updates) == 0 or not 0 < g0_norm < math.inf:
            return torch.zeros_like(g0)
        row_norms = norms(updates)
        # cos_i = g_i . (g0 / ||g0||) / ||g_i||; against the unit vector a dot cannot exceed ||g_i||
        dots = (updates @ (g0 / g0_norm)).to(torch.float64)
        cos = torch.where(row_norms > 0, dots / row_norms, torch.zeros_like(dots)).clamp(-1.0, 1.0)
        trust = torch.where(cos > 0, cos, torch.zeros_like(cos))  # ReLU; NaN (a non-finite row) -> 0
        total = float(trust.sum())
        if total == 0:
            return torch.zeros_like(g0)
        # sum_i TS_i (||g0|| / ||g_i||) g_i / sum_j TS_j, as one weighted sum of the raw rows
        coefficients = torch.where(trust > 0, trust * g0_norm / (row_norms * total), torch.zeros_like(trust))
        return weighted_sum(coefficients, updates)



@fedbench.hookimpl
def register_aggregators(register):
    register(FLTrust)
