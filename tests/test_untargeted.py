"""Untargeted attacks without a view of the benign clients (plugins/untargeted.py).

* ``signflip:scale=``: upload -scale x the honest update (the client's own local training).
* ``gaussian:sigma=``: upload i.i.d. N(0, sigma^2) vectors from the round's attack stream
  (Blanchard et al. 2017: sigma = 200).
* ``labelflip``: honest local training on the client's own data with labels l -> C - 1 - l.
* All untargeted: success = benign error, recorded by the engine every round.
"""

from __future__ import annotations

import pytest
import torch

import fedbench
from fedbench_plugins.untargeted import Gaussian, LabelFlip, SignFlip

ATTACKS = ["signflip", "gaussian", "labelflip"]


def hand_round(*, train=None, client_data=(), f=3, P=7, seed=0, dtype=torch.float32) -> fedbench.MaliciousRound:
    return fedbench.MaliciousRound(
        round=1, global_params=torch.zeros(P, dtype=dtype), client_ids=tuple(range(f)), client_data=list(client_data),
        train=train, forward=None, generator=torch.Generator().manual_seed(seed),
    )


def env_with_classes(num_classes: int) -> fedbench.AttackEnv:
    empty = torch.zeros(1)
    return fedbench.AttackEnv(empty, empty, empty, empty, num_classes, torch.Generator(), torch.device("cpu"))


def digits_cell(attack, defense="fedavg", **kw):
    kw.setdefault("rounds", 4)
    kw.setdefault("attack_rounds", (2, 3))
    return fedbench.make_cell(dataset="digits", attack=attack, defense=defense, **kw)


# --------------------------------------------------------------------------------------------------
# Definitions, on hand-made rounds
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_signflip_uploads_the_negated_honest_update_times_scale(scale):
    honest = torch.tensor([[1.0, -2.0, 0.5], [0.0, 4.0, -1.0]])
    data = [(torch.zeros(2, 1, 8, 8), torch.tensor([3, 4]))] * 2
    calls = []

    def train(d, **kwargs):
        calls.append((d, kwargs))
        return honest.clone()

    out = SignFlip(scale=scale).malicious_updates(hand_round(train=train, client_data=data, f=2, P=3))
    assert torch.equal(out, -scale * honest)
    ((trained_on, kwargs),) = calls
    assert trained_on == data and kwargs == {}  # the clients' own data, the benign objective and setup


def test_gaussian_uploads_zero_mean_noise_with_std_sigma_from_the_attack_stream():
    rnd = hand_round(f=4, P=20_000, dtype=torch.float64)
    out = Gaussian(sigma=3.0).malicious_updates(rnd)
    assert out.shape == (4, 20_000) and out.dtype == torch.float64
    assert abs(float(out.mean())) < 0.05  # std of the mean of 80,000 draws: 3 / 283 = 0.011
    assert float(out.std()) == pytest.approx(3.0, rel=0.02)
    again = Gaussian(sigma=3.0).malicious_updates(hand_round(f=4, P=20_000, dtype=torch.float64))
    assert torch.equal(out, again)  # the same stream gives the same noise
    other = Gaussian(sigma=3.0).malicious_updates(hand_round(f=4, P=20_000, seed=1, dtype=torch.float64))
    assert not torch.equal(out, other)
    assert not torch.equal(out[0], out[1])  # every malicious client draws its own vector


def test_gaussian_defaults_to_blanchard_et_als_sigma_200():
    assert Gaussian().params() == {"sigma": 200.0}
    assert float(Gaussian().malicious_updates(hand_round(P=50_000)).std()) == pytest.approx(200.0, rel=0.02)


def test_labelflip_trains_on_its_own_images_with_labels_mapped_to_c_minus_1_minus_l():
    attack = LabelFlip()
    assert attack.setup(env_with_classes(10)) is None  # takes no test images
    x0, x1 = torch.randn(4, 1, 8, 8), torch.randn(3, 1, 8, 8)
    data = [(x0, torch.tensor([0, 1, 9, 4])), (x1, torch.tensor([5, 5, 2]))]
    seen = []

    def train(d, **kwargs):
        seen.append((d, kwargs))
        return torch.ones(2, 5)

    out = attack.malicious_updates(hand_round(train=train, client_data=data, f=2, P=5))
    assert torch.equal(out, torch.ones(2, 5))
    ((flipped, kwargs),) = seen
    assert kwargs == {}
    assert flipped[0][0] is x0 and flipped[1][0] is x1
    assert flipped[0][1].tolist() == [9, 8, 0, 5] and flipped[1][1].tolist() == [4, 4, 7]


def test_labelflip_uses_the_datasets_number_of_classes():
    attack = LabelFlip()
    attack.setup(env_with_classes(4))
    seen = []

    def train(d):
        seen.append(d)
        return torch.zeros(1, 2)

    attack.malicious_updates(hand_round(train=train, client_data=[(None, torch.tensor([0, 1, 2, 3]))], f=1, P=2))
    assert seen[0][0][1].tolist() == [3, 2, 1, 0]


@pytest.mark.parametrize(
    "text, name", [("signflip:scale=0", "scale"), ("signflip:scale=-1", "scale"), ("gaussian:sigma=0", "sigma")]
)
def test_non_positive_strengths_are_spec_errors_naming_the_parameter(text, name):
    with pytest.raises(fedbench.SpecError, match=f"'{name}'"):
        fedbench.parse_component("attack", text)


def test_descriptions_cite_the_papers_and_all_three_are_untargeted():
    assert SignFlip.description().startswith("Sign flipping (Damaskinos et al. 2018)")
    assert Gaussian.description().startswith("Gaussian Byzantine workers (Blanchard et al. 2017)")
    assert LabelFlip.description().startswith("Label flipping (as in Fang et al. 2020)")
    assert all(cls.untargeted and not cls.omniscient for cls in (SignFlip, Gaussian, LabelFlip))


# --------------------------------------------------------------------------------------------------
# Real runs on digits
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("defense", ["fedavg", "cma"])
@pytest.mark.parametrize("attack", ATTACKS)
def test_every_attack_runs_end_to_end_on_digits(attack, defense):
    result = fedbench.run_cell(digits_cell(attack, defense))
    assert result.status == "ok"
    assert result.adversarial_rounds == [2, 3] and len(result.rounds) == 4


@pytest.mark.parametrize("attack", ["signflip", "labelflip"])
def test_signflip_and_labelflip_lower_accuracy_versus_the_clean_cell_on_digits(attack):
    """Half of every round's 10 clients malicious, 15 rounds all adversarial, seed 0. Measured:
    clean 0.767; signflip 0.197, labelflip 0.500 (seeds 1 and 2: 0.15 / 0.39 and 0.09 / 0.24
    against 0.80 and 0.78 clean)."""
    kw = dict(rounds=15, attack_rounds=tuple(range(1, 16)), num_malicious=5, clients_per_round=10, seed=0)
    clean = fedbench.run_cell(fedbench.make_cell(dataset="digits", attack="none", **kw))
    attacked = fedbench.run_cell(fedbench.make_cell(dataset="digits", attack=attack, **kw))
    assert attacked.status == clean.status == "ok"
    assert attacked.final_accuracy < clean.final_accuracy - 0.2
    assert attacked.rounds[-1]["loss"] > clean.rounds[-1]["loss"]


def test_the_success_of_an_untargeted_attack_is_the_benign_error_in_every_round():
    result = fedbench.run_cell(digits_cell("labelflip", rounds=5, attack_rounds=(2, 4)))
    assert all(row["success"] == pytest.approx(1.0 - row["accuracy"], abs=1e-12) for row in result.rounds)
    assert [m.attack_round for m in result.mitigation] == [2, 4]


def test_gaussian_noise_is_the_same_whatever_the_defense(monkeypatch):
    uploads = []
    original = Gaussian.malicious_updates

    def recorded(self, rnd):
        uploads.append(original(self, rnd))
        return uploads[-1]

    monkeypatch.setattr(Gaussian, "malicious_updates", recorded)
    for defense in ("fedavg", "cma"):
        fedbench.run_cell(digits_cell("gaussian", defense, rounds=2, attack_rounds=(2,)))
    assert len(uploads) == 2 and torch.equal(uploads[0], uploads[1])


def test_loop_and_stacked_trainers_agree_under_labelflip(assert_trainers_agree):
    cell = digits_cell("labelflip", rounds=5, attack_rounds=(2, 4))
    loop, _ = assert_trainers_agree(cell)
    assert loop.adversarial_rounds == [2, 4]
