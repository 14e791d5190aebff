"""Targeted model poisoning (plugins/poison.py), as reference sections 2 and 5 define it.

* D_m: ``images`` distinct images drawn from the test split (as the authors' code does), each with a
  target label uniform over the wrong classes, from the cell's ``attack`` stream; withheld from benign
  evaluation and never in any client's training data.
* Objective (paper eq. 3): lam * L(D_m) + (1 - lam) * L(own data); lam = 1 trains on D_m only.
* ``boost`` scales the finished malicious update.
* Metrics: misclassification confidence (mean target probability over D_m) and misclassification
  accuracy (fraction of D_m predicted as the target); mitigated when confidence < 0.5 or
  misclassification accuracy < the benign error rate.
"""

from __future__ import annotations

import math

import pytest
import torch

import fedbench
from fedbench import rng
from fedbench.data import load_dataset
from fedbench.spec import parse_component
from fedbench.training import Trainer
from fedbench_plugins.poison import Poison


@pytest.fixture(scope="module")
def digits():
    return load_dataset(parse_component("dataset", "digits"))


def env_for(data, seed=0) -> fedbench.AttackEnv:
    return fedbench.AttackEnv(data.train_x, data.train_y, data.test_x, data.test_y, data.num_classes,
                              rng.generator(seed, "attack"), torch.device("cpu"))


def rows_in(rows: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """For each row of ``rows``, whether it equals some row of ``pool`` exactly."""
    known = {r.numpy().tobytes() for r in pool.flatten(1).contiguous()}
    return torch.tensor([r.numpy().tobytes() in known for r in rows.flatten(1).contiguous()])


def record(monkeypatch, cls, method):
    """Wrap ``cls.method`` so every call's (self, args, result) is appended to the returned list."""
    calls = []
    original = getattr(cls, method)

    def wrapper(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls.append((self, args, out))
        return out

    monkeypatch.setattr(cls, method, wrapper)
    return calls


def digits_cell(attack="poison", defense="fedavg", **kw):
    kw.setdefault("rounds", 1)
    kw.setdefault("attack_rounds", (1,))
    return fedbench.make_cell(dataset="digits", attack=attack, defense=defense, **kw)


# --------------------------------------------------------------------------------------------------
# The malicious set D_m
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("images", [1, 10, 300])
def test_malicious_set_is_distinct_test_images_with_their_true_labels(digits, images):
    attack = Poison(images=images)
    taken = attack.setup(env_for(digits))
    assert taken.shape == (images,)
    assert len(set(taken.tolist())) == images  # distinct (300 = the whole test split, each once)
    assert 0 <= int(taken.min()) and int(taken.max()) < len(digits.test_y)
    assert torch.equal(attack.images_x, digits.test_x[taken])
    assert torch.equal(attack.true_labels, digits.test_y[taken])


def test_asking_for_more_images_than_the_test_split_has_is_an_error(digits):
    with pytest.raises(fedbench.FedbenchError, match="images=301"):
        Poison(images=301).setup(env_for(digits))


def test_target_labels_always_differ_from_the_true_labels_and_are_uniform_over_the_wrong_ones(digits):
    shifts = []
    for seed in range(5):
        attack = Poison(images=300)
        attack.setup(env_for(digits, seed))
        assert (attack.targets != attack.true_labels).all()
        assert ((attack.targets >= 0) & (attack.targets < 10)).all()
        shifts.append((attack.targets - attack.true_labels) % 10)
    counts = torch.bincount(torch.cat(shifts), minlength=10)
    assert counts[0] == 0
    expected = 1500 / 9  # 1,500 draws over 9 wrong classes; std of a count is about 12
    assert all(abs(int(n) - expected) < 50 for n in counts[1:])


def test_malicious_set_is_deterministic_per_seed(digits):
    def draw(seed):
        attack = Poison(images=10)
        taken = attack.setup(env_for(digits, seed))
        return taken.tolist(), attack.targets.tolist()

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


def test_malicious_set_does_not_depend_on_the_defense(monkeypatch):
    calls = record(monkeypatch, Poison, "setup")
    for defense in ("fedavg", "wbc", "cma+wbc:s=1.0"):
        fedbench.run_cell(digits_cell("poison:images=10", defense, seed=7, attack_rounds=()))
    drawn = [(out.tolist(), attack.targets.tolist()) for attack, _, out in calls]
    assert len(drawn) == 3 and drawn[0] == drawn[1] == drawn[2]


@pytest.mark.parametrize("attack, held_out", [("none", 0), ("poison", 1), ("poison:images=10", 10)])
def test_benign_evaluation_leaves_the_malicious_set_out(attack, held_out):
    result = fedbench.run_cell(digits_cell(attack, eval="full", attack_rounds=()))
    assert result.rounds[0]["eval_n"] == 300 - held_out


def test_benign_accuracy_is_measured_on_the_test_split_without_the_malicious_set(monkeypatch, digits):
    """Recompute the engine's accuracy from the global model it hands the attack's metrics."""
    setups = record(monkeypatch, Poison, "setup")
    forwards = []
    original = Poison.metrics

    def grab(self, forward):
        forwards.append(forward)
        return original(self, forward)

    monkeypatch.setattr(Poison, "metrics", grab)
    result = fedbench.run_cell(digits_cell("poison:images=10", eval="full", rounds=2, attack_rounds=(1,)))
    keep = torch.ones(300, dtype=torch.bool)
    keep[setups[0][2]] = False
    with torch.no_grad():
        for row, forward in zip(result.rounds, forwards):
            correct = int((forward(digits.test_x[keep]).argmax(1) == digits.test_y[keep]).sum())
            assert row["accuracy"] == pytest.approx(correct / 290, abs=1e-12)


def test_malicious_set_is_disjoint_from_every_clients_training_data(monkeypatch, digits):
    """Every client's data (benign ones in round 1, malicious ones' own data in round 2) consists of
    train-split rows and contains no D_m image.

    Checked on content: in ``digits`` no test image has an exact duplicate in the train split
    (asserted below), so "no D_m row among the client's rows" is the same as "no D_m index"."""
    setups = record(monkeypatch, Poison, "setup")
    rounds = record(monkeypatch, Poison, "malicious_updates")
    trained: list[list] = [[]]
    original_train = Trainer.train

    def train(self, global_flat, jobs, *args, **kwargs):
        trained[-1].extend(jobs)
        return original_train(self, global_flat, jobs, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train", train)
    # K = 15 = N - M: the benign round 1 trains all 15 benign clients; round 2 has the 5 malicious ones
    cell = digits_cell("poison:images=10", rounds=2, attack_rounds=(2,), clients_per_round=15)
    fedbench.run_cell(cell, on_round=lambda rnd, row: trained.append([]))

    attack, _, taken = setups[0]
    d_m = attack.images_x
    assert torch.equal(d_m, digits.test_x[taken])
    assert not rows_in(d_m, digits.train_x).any()  # precondition of the content check

    benign_round_1 = trained[0]
    assert len(benign_round_1) == 15
    (rnd,) = [args[0] for _, args, _ in rounds]
    client_data = [x for x, _ in rnd.client_data] + [job.x for job in benign_round_1]
    assert len(client_data) == 20  # every client of the federation
    for x in client_data:
        assert rows_in(x, digits.train_x).all()
        assert not rows_in(d_m, x).any()
    # together the clients hold the whole train split (IID, all data), each row once
    assert sum(len(x) for x in client_data) == len(digits.train_y)


# --------------------------------------------------------------------------------------------------
# Metrics and the mitigation criterion
# --------------------------------------------------------------------------------------------------
def test_metrics_are_mean_target_probability_and_fraction_predicted_as_target():
    # six 1x2x2 test images, image t filled with the value t so a forward can tell them apart
    test_x = torch.arange(6.0).view(6, 1, 1, 1).expand(6, 1, 2, 2).contiguous()
    test_y = torch.tensor([0, 1, 2, 3, 0, 1])
    env = fedbench.AttackEnv(test_x, test_y, test_x, test_y, 4, torch.Generator().manual_seed(0), torch.device("cpu"))
    attack = Poison(images=4)
    taken = attack.setup(env)
    target_prob = [0.7, 0.2, 0.5, 0.9]  # image 1: another class gets 0.6, so it is not predicted as target
    table = torch.full((6, 4), 0.25)
    for j, (t, target) in enumerate(zip(taken.tolist(), attack.targets.tolist())):
        p = target_prob[j]
        others = [c for c in range(4) if c != target]
        rest = [0.6, 0.1, 0.1] if j == 1 else [(1 - p) / 3] * 3
        table[t, target] = p
        table[t, others] = torch.tensor(rest)

    def forward(x):
        return table[x[:, 0, 0, 0].round().long()].log()  # softmax(log p) = p

    m = attack.metrics(forward)
    assert m["confidence"] == pytest.approx((0.7 + 0.2 + 0.5 + 0.9) / 4, abs=1e-6)
    assert m["misclassification"] == pytest.approx(3 / 4)
    assert m["success"] == m["confidence"]


@pytest.mark.parametrize(
    "confidence, misclassification, benign_error, mitigated",
    [
        (0.49, 1.0, 0.0, True),  # confidence below 50%
        (0.50, 1.0, 0.2, False),  # 0.5 is not below 0.5
        (0.90, 0.0, 0.2, True),  # misclassification accuracy below the benign error rate
        (0.90, 0.2, 0.2, False),  # equal is not below
        (0.51, 0.3, 0.2, False),  # neither
        (0.10, 0.0, 0.5, True),  # both
    ],
)
def test_mitigated_when_confidence_below_half_or_misclassification_below_benign_error(
    confidence, misclassification, benign_error, mitigated
):
    metrics = {"success": confidence, "confidence": confidence, "misclassification": misclassification}
    assert Poison().mitigated(metrics, benign_error) is mitigated


# --------------------------------------------------------------------------------------------------
# The malicious updates
# --------------------------------------------------------------------------------------------------
def malicious_updates_of(monkeypatch, cell) -> torch.Tensor:
    calls = record(monkeypatch, Poison, "malicious_updates")
    fedbench.run_cell(cell)
    (out,) = [out for _, _, out in calls]
    return out


def test_defaults_follow_the_authors_code():
    assert Poison().params() == {"images": 1, "lam": 1.0, "epochs": 10, "boost": 1.0, "adaptive": False, "rho": 1.0}


def test_boost_scales_the_malicious_update_exactly(monkeypatch):
    plain = malicious_updates_of(monkeypatch, digits_cell("poison"))
    boosted = malicious_updates_of(monkeypatch, digits_cell("poison:boost=3"))
    assert plain.abs().max() > 0
    assert torch.equal(boosted, 3.0 * plain)


def test_with_lam_one_all_malicious_updates_of_a_round_are_identical(monkeypatch):
    cell = digits_cell("poison")
    out = malicious_updates_of(monkeypatch, cell)
    assert out.shape[0] == cell.scenario.num_malicious
    assert out[0].abs().max() > 1e-3
    assert (out - out[0]).abs().max().item() <= 1e-6


def test_with_lam_below_one_malicious_clients_also_train_on_their_own_data(monkeypatch):
    out = malicious_updates_of(monkeypatch, digits_cell("poison:lam=0.5,epochs=1"))
    assert torch.isfinite(out).all()
    assert (out - out[0]).abs().max().item() > 1e-4  # different own data, different updates


class FakeRound:
    """A MaliciousRound whose ``train`` records what it is asked and returns a fixed update."""

    def __init__(self, client_data):
        self.client_ids = tuple(range(len(client_data)))
        self.client_data = client_data
        self.calls = []
        self.result = torch.arange(float(len(client_data) * 3)).view(len(client_data), 3) - 2.5

    def train(self, data, **kwargs):
        self.calls.append((data, kwargs))
        return self.result.clone()


def small_attack(lam, images=2):
    """A Poison with D_m set up on a toy 4-pixel, 3-class test split."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 1, 2, 2, generator=g)
    y = torch.arange(8) % 3
    attack = Poison(images=images, lam=lam, boost=2.0, epochs=4)
    attack.setup(fedbench.AttackEnv(x, y, x, y, 3, torch.Generator().manual_seed(1), torch.device("cpu")))
    return attack


def test_with_lam_one_the_attack_trains_on_the_malicious_set_only():
    attack = small_attack(1.0)
    own = [(torch.zeros(3, 1, 2, 2), torch.zeros(3, dtype=torch.int64))] * 2
    rnd = FakeRound(own)
    out = attack.malicious_updates(rnd)
    ((data, kwargs),) = rnd.calls
    assert kwargs == {"epochs": 4}
    assert len(data) == 2
    for x, y in data:
        assert torch.equal(x, attack.images_x) and torch.equal(y, attack.targets)
    assert torch.equal(out, 2.0 * rnd.result)


def _cross_entropy_by_hand(logits: torch.Tensor, labels: torch.Tensor) -> list[float]:
    out = []
    for row, label in zip(logits.tolist(), labels.tolist()):
        out.append(math.log(sum(math.exp(v) for v in row)) - row[label])
    return out


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.75])
def test_with_lam_below_one_the_objective_is_papers_eq_3(lam):
    attack = small_attack(lam)
    g = torch.Generator().manual_seed(9)
    own_x = torch.randn(5, 1, 2, 2, generator=g)
    own_y = torch.tensor([0, 2, 1, 1, 0])
    rnd = FakeRound([(own_x, own_y), (own_x[:3], own_y[:3])])
    out = attack.malicious_updates(rnd)
    ((data, kwargs),) = rnd.calls
    assert data is rnd.client_data and kwargs["epochs"] == 4
    assert torch.equal(out, 2.0 * rnd.result)

    weight = torch.randn(4, 3, generator=g)
    bias = torch.tensor([0.1, -0.2, 0.3])

    def forward(x):  # a toy linear model
        return x.flatten(1) @ weight + bias

    w = torch.full((5,), 1 / 5)  # the trainer's per-sample weights: the minibatch mean
    value = kwargs["objective"](forward, own_x, own_y, w)
    malicious = _cross_entropy_by_hand(forward(attack.images_x), attack.targets)
    benign = _cross_entropy_by_hand(forward(own_x), own_y)
    expected = lam * sum(malicious) / len(malicious) + (1 - lam) * sum(benign) / len(benign)
    assert value.item() == pytest.approx(expected, rel=1e-5)
