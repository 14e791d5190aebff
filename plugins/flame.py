"""FLAME (Nguyen et al., USENIX Security 2022): cluster, clip, then add a little adaptive noise.

Three steps against backdoors (paper Algorithm 1): HDBSCAN on pairwise cosine distances admits the
majority cluster of updates; every admitted update is clipped to the median update norm; Gaussian
noise scaled to that median is added to the average.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

import fedbench
from fedbench.components import NON_NEGATIVE
from fedbench.vectors import cosine_similarities, norms, weighted_sum


def majority_cluster(distances: torch.Tensor) -> torch.Tensor:
    """Which rows HDBSCAN puts in the majority cluster (``[n]`` bool), from pairwise distances ``[n, n]``.

    The paper sets ``min_cluster_size = n // 2 + 1`` (so at most one cluster exists, and it holds a
    majority); ``min_samples = 1`` and ``allow_single_cluster = True`` are what FLPoison and BackFed
    use (the paper states only the minimum cluster size); without the latter HDBSCAN never returns
    the one-cluster answer that a round without attackers should give. Rows labelled noise are out
    (HDBSCAN may leave a spread-out benign update out too). When HDBSCAN finds no cluster at all
    every row is admitted (the paper is silent; BackFed does the same), so clipping and noise still
    apply. scikit-learn needs ``min_cluster_size >= 2``: a single
    update is admitted as it is.
    """
    from sklearn.cluster import HDBSCAN

    n = distances.shape[0]
    if n < 2:
        return torch.ones(n, dtype=torch.bool)
    options = {"metric": "precomputed", "min_cluster_size": n // 2 + 1, "min_samples": 1, "allow_single_cluster": True}
    if "copy" in HDBSCAN().get_params():  # scikit-learn >= 1.5 warns unless it is given
        options["copy"] = True
    labels = torch.from_numpy(HDBSCAN(**options).fit_predict(distances.cpu().numpy()))
    clustered = labels[labels >= 0]
    if len(clustered) == 0:
        return torch.ones(n, dtype=torch.bool)
    return labels == torch.mode(clustered).values


def statistical_median(values: torch.Tensor) -> torch.Tensor:
    """The median of a 1-D tensor; the mean of the two middle values for an even count (numpy's)."""
    ordered = torch.sort(values).values
    n = len(ordered)
    return (ordered[(n - 1) // 2] + ordered[n // 2]) / 2


@dataclass(kw_only=True)
class Flame(fedbench.Aggregator):
    """FLAME (Nguyen et al., USENIX Security 2022): HDBSCAN majority of cosine distances, median-norm clipping, Gaussian noise.

    Definition (paper Algorithm 1), on the updates Δ_i = W_i − G_{t−1}:

    1. c_ij = 1 − cos(Δ_i, Δ_j) for all pairs (one Gram matrix); HDBSCAN on them (precomputed
       metric, min_cluster_size = n//2 + 1, min_samples = 1, allow_single_cluster) admits the
       majority cluster; rows labelled noise are rejected (see :func:`majority_cluster`).
    2. S_t = median of ||Δ_i|| over ALL n updates, admitted or not (the paper's median of the
       Euclidean distances ||W_i − G_{t−1}||; the statistical median, mean of the two middle values);
       each admitted update is scaled by min(1, S_t / ||Δ_i||).
    3. aggregate = unweighted mean of the clipped admitted updates + N(0, σ² I), σ = ``lam`` · S_t,
       drawn from the cell's server stream (``ctx.generator``). The paper adds the noise to the new
       global model G_t = mean of the clipped models; since fedbench's aggregate is the update
       G_t − G_{t−1}, adding it to the aggregate is the same thing.

    λ = 0.001 is the paper's value for image classification. The client weights (sample counts) are
    ignored, as in the paper. The output's norm is at most S_t plus the noise norm (about
    λ S_t √P), however large a malicious update is.

    Conventions elsewhere: Algorithm 1 writes the cosine distances of the local models W_i, and
    FLPoison clusters the full models W_i (HDBSCAN metric="cosine"); fedbench clusters the updates
    Δ_i, whose angles are what separates a backdoored update (the cosine of two full models is close
    to 1 for every pair, dominated by the shared G_{t−1}). FLPoison keeps label 0 rather than the
    largest cluster (the same thing when a cluster must exceed n/2) and scales the noise per layer
    by γ · S_t · std(layer) with γ = 1.2e-5; BackFed uses λ = 0.001 times std(layer), a server
    learning rate, and clusters only the last two layers.

    NaN/inf: a row with a NaN or inf entry gets cosine distance 2 (the largest) to every other row,
    so it never joins the majority cluster and its coefficient is 0 (a zero-weighted NaN row does
    not count, :func:`fedbench.vectors.weighted_sum`); its norm sorts last, so while fewer than half
    the rows are faulty S_t stays finite and so does the aggregate. A finite but huge row is clipped
    to S_t if admitted.
    """

    name: ClassVar[str] = "flame"
    lam: float = fedbench.param(0.001, "noise level λ: noise std = λ × median update norm (paper: 0.001 for images)", check=NON_NEGATIVE)

    def aggregate(self, updates, weights, ctx):
        n = len(updates)
        if n == 0:
            raise fedbench.FedbenchError("flame: no client updates to aggregate; need n >= 1")
        # a non-finite row gets the largest cosine distance, 2, to every other row
        distances = torch.nan_to_num(1.0 - cosine_similarities(updates), nan=2.0).clamp_(0.0, 2.0)
        distances.fill_diagonal_(0.0)
        admitted = majority_cluster(distances)
        row_norms = norms(updates)
        bound = statistical_median(row_norms)
        # mean over the admitted rows of min(1, S_t / ||Δ_i||) Δ_i, as one weighted sum
        scale = torch.where(row_norms > bound, bound / row_norms, torch.ones_like(row_norms))
        scale = torch.where(admitted.to(scale.device), scale, torch.zeros_like(scale))
        out = weighted_sum(scale / int(admitted.sum()), updates)
        if self.lam > 0:
            sigma = self.lam * float(bound)
            gen = ctx.generator
            noise = torch.randn(out.shape, generator=gen, device=gen.device, dtype=out.dtype)
            out = out + sigma * noise.to(out.device)
        return out


@fedbench.hookimpl
def register_aggregators(register):
    register(Flame)
