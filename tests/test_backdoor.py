"""The trigger-patch backdoor (plugins/backdoor.py): trigger, poisoned objective, evaluation set,
parameters, boosting, and real runs on the embedded digits dataset."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch.func import vmap

import fedbench
from fedbench_plugins.backdoor import Backdoor, patch_mask, poisoned_count, stamp


def make_env(n_test=1500, num_classes=10, shape=(1, 8, 8), seed=0):
    g = torch.Generator().manual_seed(123)
    train_x = torch.randn(200, *shape, generator=g)
    train_x[3, 0, 2, 2] = 5.0  # the brightest training pixel: the trigger's value
    return fedbench.AttackEnv(
        train_x=train_x,
        train_y=torch.randint(0, num_classes, (200,), generator=g),
        test_x=torch.randn(n_test, *shape, generator=g),
        test_y=torch.arange(n_test) % num_classes,
        num_classes=num_classes,
        generator=torch.Generator().manual_seed(seed),
        device=torch.device("cpu"),
    )


def ready(**params) -> Backdoor:
    attack = Backdoor(**params)
    assert attack.setup(make_env()) is None  # takes no test images away
    return attack


# --------------------------------------------------------------------------------------------------
# Trigger
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels", [1, 3])
def test_trigger_stamps_exactly_the_bottom_right_patch(channels):
    mask = patch_mask((channels, 8, 8), 3)
    assert mask.shape == (8, 8) and int(mask.sum()) == 9
    assert mask[5:, 5:].all() and not mask[:5].any() and not mask[:, :5].any()

    x = torch.randn(4, channels, 8, 8)
    out = stamp(x, mask, 2.5)
    changed = out != x
    assert changed.sum() == 4 * channels * 9
    assert (out[..., 5:, 5:] == 2.5).all()
    assert torch.equal(out[..., :5, :], x[..., :5, :]) and torch.equal(out[..., :, :5], x[..., :, :5])


def test_trigger_value_is_the_brightest_training_pixel():
    attack = ready(size=2)
    assert attack.value == 5.0
    assert (attack.eval_triggered[..., 6:, 6:] == 5.0).all()
    assert torch.equal(attack.eval_triggered[..., :6, :], attack.eval_x[..., :6, :])


def test_patch_larger_than_the_image_is_refused():
    with pytest.raises(fedbench.FedbenchError, match="size=9"):
        Backdoor(size=9).setup(make_env())


# --------------------------------------------------------------------------------------------------
# The poisoned objective
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("frac", [0.1, 0.25, 0.3, 0.5, 0.75, 1.0])
def test_poisoned_count_is_the_ceiling_without_float_noise(frac):
    for k in range(1, 65):
        expected = math.ceil(Fraction(str(frac)) * k)  # exact arithmetic: 0.1 * 30 -> 3, not 4
        assert int(poisoned_count(frac, torch.tensor(k))) == expected


@pytest.mark.parametrize("frac,k,width", [(0.3, 7, 10), (0.5, 11, 32), (1.0, 5, 8), (0.01, 20, 20)])
def test_objective_poisons_ceil_frac_k_real_samples_and_no_padding(frac, k, width):
    attack = ready(poison_frac=frac, target=7)
    n = math.ceil(Fraction(str(frac)) * k)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(width, 1, 8, 8, generator=g)
    x[k:] = 0.0  # padding slots, as the stacked trainer pads them
    y = torch.randint(0, 7, (width,), generator=g)  # no real sample has the target label already
    w = torch.zeros(width)
    w[:k] = 1.0 / k
    logits = torch.randn(width, 10, generator=g)
    seen = []

    def forward(inp):
        seen.append(inp.clone())
        return logits

    loss = attack.objective(forward, x, y, w)

    (xin,) = seen
    stamped = (xin != x).flatten(1).any(1)
    assert stamped.tolist() == [True] * n + [False] * (width - n)
    assert (xin[:n, :, 5:, 5:] == 5.0).all()
    # the labels: exactly the first n become the target; checked through the weighted cross-entropy
    y_expected = y.clone()
    y_expected[:n] = 7
    expected = (F.cross_entropy(logits, y_expected, reduction="none") * w).sum()
    assert torch.allclose(loss, expected, atol=1e-6)
    assert not torch.allclose(loss, (F.cross_entropy(logits, y, reduction="none") * w).sum())


def test_objective_under_vmap_matches_per_client_calls():
    """The stacked trainer vmaps the objective over clients with different k (padded batches)."""
    attack = ready(poison_frac=0.4, target=3)
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(64, 10, generator=g)

    def forward(inp):
        return inp.flatten(1) @ weight

    width, ks = 12, [12, 5, 1]
    xs = torch.randn(len(ks), width, 1, 8, 8, generator=g)
    ys = torch.randint(0, 10, (len(ks), width), generator=g)
    ws = torch.zeros(len(ks), width)
    for i, k in enumerate(ks):
        xs[i, k:] = 0.0
        ws[i, :k] = 1.0 / k
    batched = vmap(lambda x, y, w: attack.objective(forward, x, y, w))(xs, ys, ws)
    single = torch.stack([attack.objective(forward, xs[i, :k], ys[i, :k], ws[i, :k]) for i, k in enumerate(ks)])
    assert torch.allclose(batched, single, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Evaluation set and metrics
# --------------------------------------------------------------------------------------------------
def test_evaluation_set_excludes_target_images_and_is_capped():
    attack = Backdoor(target=4)
    env = make_env(n_test=1500)
    attack.setup(env)
    assert len(attack.eval_y) == 1000  # 1,350 candidates, capped at 1,000
    assert not (attack.eval_y == 4).any()
    assert torch.equal(attack.eval_y, env.test_y[attack.eval_index])
    assert len(torch.unique(attack.eval_index)) == 1000

    small = Backdoor(target=4)
    small.setup(make_env(n_test=50))
    assert len(small.eval_y) == 45 and not (small.eval_y == 4).any()

    again = Backdoor(target=4)
    again.setup(make_env(n_test=1500))  # same attack stream seed -> same images
    assert torch.equal(again.eval_index, attack.eval_index)


def test_target_outside_the_labels_is_refused():
    with pytest.raises(fedbench.FedbenchError, match="target=10"):
        Backdoor(target=10).setup(make_env(num_classes=10))


def test_metrics_are_success_on_triggered_and_accuracy_on_clean_images():
    attack = ready(target=2)

    def forward(inp):  # predicts the target iff the patch is there, else the true label
        triggered = (inp[:, 0, 7, 7] == 5.0) & (inp[:, 0, 5, 5] == 5.0)
        labels = torch.where(triggered, torch.tensor(2), lookup(inp))
        return F.one_hot(labels, 10).float()

    def lookup(inp):  # the clean evaluation images' true labels, by position
        return attack.eval_y[: len(inp)]

    m = attack.metrics(forward)
    assert m == {"success": 1.0, "clean_accuracy": 1.0}
    assert attack.mitigated(m, 0.0) is False
    assert attack.mitigated({"success": 0.49, "clean_accuracy": 1.0}, 0.0) is True


# --------------------------------------------------------------------------------------------------
# Parameters and boosting
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,name",
    [
        ("backdoor:poison_frac=0", "poison_frac"),
        ("backdoor:poison_frac=1.5", "poison_frac"),
        ("backdoor:boost=0", "boost"),
        ("backdoor:size=0", "size"),
        ("backdoor:target=-1", "target"),
        ("backdoor:epochs=-1", "epochs"),
    ],
)
def test_invalid_parameters_raise_spec_errors_naming_them(text, name):
    with pytest.raises(fedbench.SpecError, match=f"'{name}'"):
        fedbench.parse_component("attack", text)


def test_spec_defaults_and_description():
    spec = fedbench.parse_component("attack", "backdoor")
    assert dict(spec.params) == {"target": 0, "poison_frac": 0.5, "size": 3, "boost": 1.0, "epochs": 0}
    assert Backdoor.description().startswith("Trigger-patch backdoor (Bagdasaryan et al. 2020)")


@pytest.mark.parametrize("boost,epochs,expected_epochs", [(1.0, 0, None), (3.0, 2, 2), (0.5, 0, None)])
def test_boost_scales_the_trained_update(boost, epochs, expected_epochs):
    attack = ready(boost=boost, epochs=epochs)
    trained = torch.tensor([[1.0, -2.0, 0.5], [0.0, 4.0, -1.0]])
    calls = []

    def train(data, **kwargs):
        calls.append((data, kwargs))
        return trained.clone()

    data = [(torch.zeros(3, 1, 8, 8), torch.zeros(3, dtype=torch.int64))] * 2
    rnd = fedbench.MaliciousRound(
        round=1, global_params=torch.zeros(3), client_ids=(0, 1), client_data=data, train=train,
        forward=None, generator=torch.Generator(),
    )
    out = attack.malicious_updates(rnd)
    assert torch.equal(out, trained * boost)
    ((got_data, kwargs),) = calls
    assert got_data is data
    assert kwargs["objective"] == attack.objective and kwargs["epochs"] == expected_epochs


# --------------------------------------------------------------------------------------------------
# Real runs on digits
# --------------------------------------------------------------------------------------------------
def test_backdoor_takes_hold_on_digits_while_accuracy_stays():
    """30 rounds, seed 0, the paper's random schedule (p = 0.1): adversarial rounds 5, 15, 17, 24,
    26, 27, 28. Measured: success 1.000 / 0.929 / 0.884 in rounds 28-30 (mean 0.938), benign
    accuracy 0.857 at the end (0.877 without any attack), clean accuracy on the success images 0.843."""
    result = fedbench.run_cell(fedbench.make_cell(dataset="digits", attack="backdoor", defense="fedavg", rounds=30, seed=0))
    assert result.status == "ok"
    rows = result.rounds
    first = result.adversarial_rounds[0]
    assert max(r["success"] for r in rows[: first - 1]) < 0.1  # the patch alone does not mean "target"
    assert result.adversarial_rounds[-1] >= 25
    last = rows[-3:]
    assert sum(r["success"] for r in last) / 3 > 0.8
    assert all(r["success"] > 0.7 for r in last)
    assert result.final_accuracy > 0.75
    assert rows[-1]["clean_accuracy"] > 0.75


def test_loop_and_stacked_trainers_agree():
    cell = fedbench.make_cell(dataset="digits", attack="backdoor", defense="fedavg", rounds=5, seed=0, attack_rounds=(2, 4))
    loop = fedbench.run_cell(cell, trainer="loop")
    stacked = fedbench.run_cell(cell, trainer="stacked")
    assert loop.adversarial_rounds == stacked.adversarial_rounds == [2, 4]
    for a, b in zip(loop.rounds, stacked.rounds):
        for key in ("accuracy", "loss", "success", "clean_accuracy"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), (a["round"], key)
    # the adversarial rounds are where the backdoor jumps (measured: 0.0 -> 0.60 in round 2, 0.996 in round 4)
    assert loop.rounds[0]["success"] < 0.1
    assert loop.rounds[1]["success"] > 0.4 and loop.rounds[3]["success"] > 0.8
