"""FoolsGold (Fung, Yoon, Beschastnikh, RAID 2020): down-weight clients whose update histories look alike.

Sybils pushing one poisoning objective send updates that point the same way round after round,
while honest clients' histories diverge. FoolsGold keeps each client's summed history and gives a
client a weight that shrinks to 0 as its history's cosine similarity to some other client's nears 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

import fedbench
from fedbench.components import POSITIVE
from fedbench.vectors import cosine_similarities, weighted_sum


#: 1 - cos below this is float64 rounding of parallel histories, not a real difference
ROUNDING = 1e-9


def foolsgold_weights(similarities: torch.Tensor, kappa: float) -> torch.Tensor:
    """Paper Algorithm 1, lines after the similarities: ``[n, n]`` cosine similarities -> weights alpha ``[n]`` in [0, 1].

    1. cs_ii = 0 (the authors' code: ``cs - I``), v_i = max_j cs_ij;
    2. pardoning: cs_ij *= v_i / v_j wherever v_j > v_i (an honest client that merely resembles a
       sybil is not punished as hard as the sybil);
    3. alpha_i = 1 - max_j cs_ij, clipped to [0, 1], divided by its maximum;
    4. logit: alpha_i = kappa (ln(alpha_i / (1 - alpha_i)) + 0.5), clipped to [0, 1]
       (alpha = 1 gives +inf -> 1, alpha = 0 gives -inf -> 0).

    All alphas are 0 exactly when every client has a history pointing the same way as some other
    client's (after pardoning): then the weights are all 0 and the caller decides (FoolsGold below
    returns the zero update). "The same way" allows for float64 rounding: if no alpha exceeds
    :data:`ROUNDING` the rescaling in step 3 would only blow rounding noise up to weight 1, so all
    weights are 0 (the authors' code has no such guard: parallel histories there get rounding-noise
    weights).
    """
    cs = similarities.clone()
    cs.fill_diagonal_(0.0)
    v = cs.max(dim=1).values
    larger = v.unsqueeze(0) > v.unsqueeze(1)  # [i, j]: v_j > v_i (then v_j > 0)
    ratio = v.unsqueeze(1) / torch.where(larger, v.unsqueeze(0), torch.ones_like(cs))
    cs = torch.where(larger, cs * ratio, cs)
    alpha = (1.0 - cs.max(dim=1).values).clamp(0.0, 1.0)
    top = alpha.max()
    if top <= ROUNDING:
        return torch.zeros_like(alpha)
    alpha = alpha / top
    alpha = kappa * (torch.log(alpha / (1.0 - alpha)) + 0.5)
    return alpha.clamp(0.0, 1.0)


@dataclass(kw_only=True)
class FoolsGold(fedbench.Aggregator):
    """FoolsGold (Fung et al., RAID 2020): weight clients by how unlike other clients their update histories are.

    Definition (paper Algorithm 1, without the optional importance weighting): each client i keeps
    the history H_i = sum of all its updates so far, this round's included (state on this object,
    which lives for one cell); the cosine similarities of the histories of this round's clients
    (one Gram matrix) give the weights alpha_i of :func:`foolsgold_weights` (max similarity,
    pardoning, 1 − max, rescale by the maximum, logit with confidence ``kappa``); the aggregate is
    the alpha-weighted mean of this round's updates, sum_i alpha_i Δ_i / sum_i alpha_i. When every
    alpha is 0 (every client looks like a sybil of another, e.g. all histories identical) the
    aggregate is the zero update: the global model stays. Client weights (sample counts) are ignored.

    Not included: the paper's optional "importance" feature weighting, which weights the output
    layer's features by their magnitude in the global model before the similarities (FLPoison keeps
    only the output layer's top features instead; BackFed has none). Conventions elsewhere: Algorithm 1
    applies the unnormalised sum sum_i alpha_i Δ_i, as FLPoison does (FLPoison also rescales
    updates of norm > 1 to norm 1 before the history, adds eps = 1e-6 to the max similarities and in
    the logit); BackFed normalises the alphas to sum 1 (a weighted mean, as here) but sums unit-norm
    updates into the history. The authors' code sets an alpha of exactly 1
    to 0.99 before the logit, which gives kappa (ln 99 + 0.5) ≈ 5.1 kappa instead of +inf: the two
    differ after clipping only for kappa < 0.2.

    Needs to know which client sent which row: behind a pre-aggregator that mixes rows (bucketing)
    ``ctx.client_ids`` is ``None`` and the rule refuses to run.

    NaN/inf: no protection (the paper is silent). A row with a NaN or inf entry enters its client's
    history, every cosine similarity with that history is NaN, so every alpha is NaN and the
    aggregate is NaN: the run diverges. A finite but huge row is not bounded either: it passes with
    its alpha (several identical huge rows look like sybils of each other and get alpha 0).
    """

    name: ClassVar[str] = "foolsgold"
    kappa: float = fedbench.param(1.0, "confidence κ of the logit: alpha = κ (ln(alpha / (1 − alpha)) + 0.5) (authors' code: 1)", check=POSITIVE)

    _rows: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _history: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def aggregate(self, updates, weights, ctx):
        if ctx.client_ids is None:
            raise fedbench.FedbenchError(
                "foolsgold: needs to know which client sent each update (its history is per client), but a "
                "pre-aggregator in front of it mixes rows (e.g. bucketing); put foolsgold without such a stage"
            )
        if len(ctx.client_ids) != len(updates):
            raise fedbench.FedbenchError(
                f"foolsgold: got {len(updates)} updates but {len(ctx.client_ids)} client ids"
            )
        if len(updates) == 0:
            raise fedbench.FedbenchError("foolsgold: no client updates to aggregate; need n >= 1")
        rows = self._history_rows(ctx.client_ids, updates)
        self._history.index_add_(0, rows, updates.to(self._history.dtype))
        alpha = foolsgold_weights(cosine_similarities(self._history[rows]), self.kappa)
        total = float(alpha.sum())
        if total == 0:
            return torch.zeros_like(updates[0])
        return weighted_sum(alpha / total, updates)

    def _history_rows(self, client_ids: tuple[int, ...], updates: torch.Tensor) -> torch.Tensor:
        """Row of each client in the history buffer, adding zero rows for new clients (the buffer
        doubles its capacity when full, so a growing population costs amortised O(1) copies)."""
        for cid in client_ids:
            if cid not in self._rows:
                self._rows[cid] = len(self._rows)
        if self._history is not None and self._history.shape[1] != updates.shape[1]:
            raise fedbench.FedbenchError(
                f"foolsgold: updates have {updates.shape[1]} parameters, earlier rounds had {self._history.shape[1]}"
            )
        needed = len(self._rows)
        if self._history is None:
            self._history = updates.new_zeros((max(needed, 1), updates.shape[1]))
        elif needed > len(self._history):
            grown = self._history.new_zeros((max(needed, 2 * len(self._history)), self._history.shape[1]))
            grown[: len(self._history)] = self._history
            self._history = grown
        return torch.tensor([self._rows[c] for c in client_ids], dtype=torch.long, device=self._history.device)


@fedbench.hookimpl
def register_aggregators(register):
    register(FoolsGold)
