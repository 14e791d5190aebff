"""Metrics of a run: benign accuracy, the evaluation policy, and attack-mitigation rounds.

These live in the core because every attack needs them (reference section 5).

Evaluation policy (``Scenario.eval``):

* ``full`` -- every round on the whole (benign) test set.
* ``auto`` (default) -- the whole test set when it has at most ``AUTO_SUBSET`` images; otherwise a
  fixed, stratified subset of ``AUTO_SUBSET`` test images in every round (drawn once per cell from
  its ``eval`` stream: the same images every round, so round-to-round changes are real) and the
  whole test set in the last round. Each round records ``eval_n``, the number of images behind its
  accuracy: with 1,000 images the standard error of an accuracy near 85% is 1.1 points. The size
  keeps evaluation under 15% of a paper round on a 2-core CPU (measured: 2,000 images cost 20-25%).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

EVAL_POLICIES = ("auto", "full")
AUTO_SUBSET = 1000


def stratified_subset(labels: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """``size`` indices with the label proportions of ``labels`` (largest remainders), sorted."""
    if size >= len(labels):
        return torch.arange(len(labels))
    classes, counts = torch.unique(labels, return_counts=True)
    exact = counts.double() * size / len(labels)
    take = exact.floor().long()
    short = size - int(take.sum())
    if short:
        take[torch.argsort(exact - take, descending=True, stable=True)[:short]] += 1
    chosen = []
    for cls, k in zip(classes.tolist(), take.tolist()):
        idx = torch.nonzero(labels == cls).flatten()
        chosen.append(idx[torch.randperm(len(idx), generator=generator)[:k]])
    return torch.sort(torch.cat(chosen)).values


@torch.no_grad()
def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, batch: int = 256):
    """Accuracy and mean cross-entropy of ``forward`` on ``(x, y)``."""
    correct, loss = 0, 0.0
    for start in range(0, len(y), batch):
        logits = forward(x[start : start + batch])
        yb = y[start : start + batch]
        correct += int((logits.argmax(1) == yb).sum())
        loss += float(F.cross_entropy(logits, yb, reduction="sum"))
    return correct / len(y), loss / len(y)


@dataclass(frozen=True)
class Mitigation:
    """Attack-mitigation rounds after one adversarial round (reference section 5).

    ``rounds`` is the number of rounds after the attack round until the attack's mitigation
    criterion first holds; 0 when it already holds right after the attack round (the attack never
    took hold). When the next adversarial round or the end of the run comes first, ``censored`` is
    true and ``rounds`` is the number of rounds observed without mitigation (reported as ">rounds").
    """

    attack_round: int
    rounds: int
    censored: bool
    peak: float  # the attack's success metric right after the attack round

    def __str__(self) -> str:
        return f">{self.rounds}" if self.censored else str(self.rounds)


def mitigation_rounds(
    series: Sequence[Mapping[str, float]],
    adversarial: Sequence[int],
    mitigated: Callable[[Mapping[str, float], float], Optional[bool]],
    success_key: str = "success",
    first_round: int = 1,
) -> list[Mitigation]:
    """Attack-mitigation rounds for every adversarial round of a run.

    ``series[r - first_round]`` holds the metrics evaluated after round ``r`` (a warm-started run
    begins after round 1) (with ``accuracy``, the benign
    accuracy whose complement is the benign error rate, and the attack's own metrics);
    ``mitigated(metrics, benign_error)`` is the attack's criterion; ``metrics`` also carries
    ``pre_attack_accuracy`` (the benign accuracy of the round before the attack round, ``None`` in the
    first round), and a criterion that answers ``None`` leaves that attack round without a count.

    An attack that reports no ``success_key`` metric has no mitigation count at all (``[]``, shown
    as n/a): counting it as mitigated at once would read as a perfect defense.
    """
    if not any(success_key in row for row in series):
        return []
    attacks = sorted(adversarial)
    last = first_round + len(series) - 1
    out = []
    for i, t in enumerate(attacks):
        if t > last:
            break
        horizon = attacks[i + 1] - 1 if i + 1 < len(attacks) else last  # rounds t..horizon are this attack's
        row = series[t - first_round]
        peak = float(row.get(success_key, float("nan")))
        before = series[t - first_round - 1]["accuracy"] if t > first_round else None
        result, judged = None, True
        for r in range(t, horizon + 1):
            m = series[r - first_round]
            verdict = mitigated({**m, "pre_attack_accuracy": before}, 1.0 - m["accuracy"])
            if verdict is None:
                judged = False
                break
            if verdict:
                result = Mitigation(t, r - t, False, peak)
                break
        if judged:
            out.append(result or Mitigation(t, horizon - t, True, peak))
    return out
