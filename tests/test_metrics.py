"""Run metrics: attack-mitigation rounds (reference section 5), evaluation subsets and accuracy."""

from __future__ import annotations

import math

import pytest
import torch

from fedbench import Attack
from fedbench.metrics import Mitigation, evaluate, mitigation_rounds, stratified_subset


def series(successes: list[float], accuracy: float = 0.8) -> list[dict[str, float]]:
    """Metrics after rounds 1, 2, ...: the attack's success and the benign accuracy."""
    return [{"accuracy": accuracy, "success": s} for s in successes]


def below_half(metrics, benign_error):
    return metrics["success"] < 0.5


# --------------------------------------------------------------------------------------------------
# mitigation_rounds
# --------------------------------------------------------------------------------------------------
def test_attack_that_never_took_hold_counts_zero_rounds():
    (m,) = mitigation_rounds(series([0.1, 0.2, 0.1, 0.0]), [2], below_half)
    assert m == Mitigation(attack_round=2, rounds=0, censored=False, peak=0.2)
    assert str(m) == "0"


def test_attack_mitigated_three_rounds_later_counts_three():
    (m,) = mitigation_rounds(series([0.0, 0.9, 0.8, 0.6, 0.3, 0.1]), [2], below_half)
    assert (m.attack_round, m.rounds, m.censored, m.peak) == (2, 3, False, 0.9)
    assert str(m) == "3"


def test_next_attack_before_mitigation_censors_the_count():
    # attacks in rounds 2 and 5; the first never falls below 0.5 before round 5
    first, second = mitigation_rounds(series([0.0, 0.9, 0.8, 0.7, 0.95, 0.4, 0.1]), [2, 5], below_half)
    assert (first.attack_round, first.rounds, first.censored) == (2, 2, True)  # rounds 3 and 4 observed
    assert str(first) == ">2"
    assert (second.attack_round, second.rounds, second.censored, second.peak) == (5, 1, False, 0.95)


def test_end_of_run_before_mitigation_censors_the_count():
    (m,) = mitigation_rounds(series([0.0, 0.0, 0.9, 0.9, 0.8, 0.7]), [3], below_half)
    assert (m.rounds, m.censored) == (3, True)
    assert str(m) == ">3"


def test_attack_in_the_last_round_is_censored_at_zero():
    (m,) = mitigation_rounds(series([0.1, 0.9]), [2], below_half)
    assert (m.attack_round, m.rounds, m.censored) == (2, 0, True)


def test_attack_rounds_after_the_series_are_ignored():
    result = mitigation_rounds(series([0.1, 0.9, 0.2]), [2, 7], below_half)
    assert [m.attack_round for m in result] == [2]
    assert result[0].rounds == 1 and not result[0].censored


def test_adversarial_rounds_are_handled_in_order():
    result = mitigation_rounds(series([0.9, 0.1, 0.9, 0.1]), [3, 1], below_half)
    assert [(m.attack_round, m.rounds) for m in result] == [(1, 1), (3, 1)]


def test_mitigation_criterion_sees_the_benign_error_rate():
    """The paper's second criterion: misclassification accuracy below the benign task's error rate."""
    rows = [{"accuracy": 0.7, "hit": 1.0}, {"accuracy": 0.7, "hit": 0.5}, {"accuracy": 0.75, "hit": 0.2}]
    seen = []

    def hit_below_error(metrics, benign_error):
        seen.append(benign_error)
        return metrics["hit"] < benign_error

    (m,) = mitigation_rounds(rows, [1], hit_below_error, success_key="hit")
    assert (m.rounds, m.censored, m.peak) == (2, False, 1.0)
    assert seen == pytest.approx([0.3, 0.3, 0.25])


def test_an_attack_without_a_success_metric_has_no_mitigation_count():
    """Counting it as mitigated at once (0 rounds) would read as a perfect defense: it is n/a."""
    assert mitigation_rounds([{"accuracy": 0.9}, {"accuracy": 0.8}], [1], lambda metrics, err: True) == []


def test_a_round_without_the_success_metric_gives_a_nan_peak():
    not_yet = lambda metrics, err: metrics.get("success", 1.0) < 0.5  # noqa: E731
    (m,) = mitigation_rounds([{"accuracy": 0.9}, {"accuracy": 0.9, "success": 0.2}], [1], not_yet)
    assert math.isnan(m.peak) and (m.rounds, m.censored) == (1, False)


def test_default_attack_criterion_is_success_below_one_half():
    class Plain(Attack):
        name = "plain"

    attack = Plain()
    assert attack.mitigated({"success": 0.49}, 0.2)
    assert not attack.mitigated({"success": 0.5}, 0.2)
    assert attack.mitigated({}, 0.2)


# --------------------------------------------------------------------------------------------------
# stratified_subset
# --------------------------------------------------------------------------------------------------
def test_stratified_subset_keeps_label_proportions():
    labels = torch.tensor([0] * 500 + [1] * 300 + [2] * 200)
    labels = labels[torch.randperm(1000, generator=torch.Generator().manual_seed(0))]
    subset = stratified_subset(labels, 100, torch.Generator().manual_seed(1))
    assert len(subset) == 100
    assert torch.bincount(labels[subset]).tolist() == [50, 30, 20]
    assert len(torch.unique(subset)) == 100
    assert torch.equal(subset, torch.sort(subset).values)


def test_stratified_subset_rounds_by_largest_remainders():
    labels = torch.tensor([0] * 7 + [1] * 4 + [2] * 2)  # exact shares of 5: 2.69, 1.54, 0.77
    subset = stratified_subset(labels, 5, torch.Generator().manual_seed(0))
    assert torch.bincount(labels[subset], minlength=3).tolist() == [3, 1, 1]


def test_stratified_subset_is_deterministic_for_a_seed():
    labels = torch.arange(5000) % 10
    a = stratified_subset(labels, 2000, torch.Generator().manual_seed(3))
    b = stratified_subset(labels, 2000, torch.Generator().manual_seed(3))
    c = stratified_subset(labels, 2000, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_stratified_subset_of_at_least_the_whole_set_is_everything():
    labels = torch.tensor([1, 0, 1])
    assert torch.equal(stratified_subset(labels, 3, torch.Generator()), torch.arange(3))
    assert torch.equal(stratified_subset(labels, 10, torch.Generator()), torch.arange(3))


# --------------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------------
def test_evaluate_gives_accuracy_and_mean_cross_entropy_over_batches():
    x = torch.arange(5, dtype=torch.float32)
    y = torch.tensor([0, 1, 1, 0, 1])

    def forward(xb):  # predicts class 1 with logit margin ln 3 for every input: p(1) = 3/4
        return torch.stack([torch.zeros_like(xb), torch.full_like(xb, math.log(3.0))], dim=1)

    accuracy, loss = evaluate(forward, x, y, batch=2)
    assert accuracy == pytest.approx(3 / 5)
    expected = (3 * -math.log(0.75) + 2 * -math.log(0.25)) / 5
    assert loss == pytest.approx(expected, rel=1e-6)


def test_the_criterion_sees_the_accuracy_of_the_round_before_the_attack():
    seen = []
    rows = [{"accuracy": 0.8, "success": 0.0}, {"accuracy": 0.3, "success": 0.7}, {"accuracy": 0.79, "success": 0.2}]
    mitigation_rounds(rows, [2], lambda m, err: seen.append(m["pre_attack_accuracy"]) or False)
    assert seen == [0.8, 0.8]
    seen.clear()
    mitigation_rounds(rows, [1], lambda m, err: seen.append(m["pre_attack_accuracy"]) or False)
    assert seen == [None, None, None]


def test_an_unjudgeable_attack_round_gets_no_count():
    rows = [{"accuracy": 0.3, "success": 0.7}, {"accuracy": 0.8, "success": 0.2}, {"accuracy": 0.4, "success": 0.6}]
    criterion = lambda m, err: None if m["pre_attack_accuracy"] is None else m["accuracy"] >= 0.75  # noqa: E731
    assert [(m.attack_round, str(m)) for m in mitigation_rounds(rows, [1, 3], criterion)] == [(3, ">0")]


def test_an_untargeted_attack_is_mitigated_once_accuracy_is_back_within_two_points():
    class Untargeted(Attack):
        name = "untargeted"
        untargeted = True

    rows = [{"accuracy": a, "success": 1 - a} for a in (0.80, 0.40, 0.70, 0.785, 0.79)]
    (m,) = mitigation_rounds(rows, [2], Untargeted().mitigated)
    assert (m.attack_round, m.rounds, m.censored) == (2, 2, False)  # 0.785 >= 0.80 - 0.02
    assert m.peak == pytest.approx(0.6)
    assert mitigation_rounds(rows, [1], Untargeted().mitigated) == []  # no round before round 1


def test_the_engine_records_an_untargeted_attacks_success_as_the_benign_error(use_plugin):
    import fedbench

    class Flip(Attack):
        """Test attack: uploads the negated honest update."""

        name = "test-flip"
        untargeted = True

        def malicious_updates(self, rnd):
            return -rnd.train(rnd.client_data)

    class FlipPlugin:
        @fedbench.hookimpl
        def register_attacks(self, register):
            register(Flip)

    use_plugin(FlipPlugin(), "flip")
    result = fedbench.run_cell(fedbench.make_cell(dataset="digits", attack="test-flip", rounds=4, attack_rounds=(3,)))
    assert all(row["success"] == pytest.approx(1 - row["accuracy"]) for row in result.rounds)
    assert [m.attack_round for m in result.mitigation] == [3]
