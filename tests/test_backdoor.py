"""The trigger backdoors (plugins/backdoor.py). ``backdoor``: trigger, poisoned objective, evaluation
set, parameters, boosting, and real runs on the embedded digits dataset; then ``scaling`` (model
replacement), ``dba`` (distributed triggers) and ``neurotoxin`` (projected onto rarely changed
coordinates), each down to its defining property, and real runs of all three."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch.func import vmap

import fedbench
from fedbench.training import ClientJob, FlatModel, LocalSetup, LoopTrainer, StackedTrainer
from fedbench_plugins.backdoor import (
    DBA,
    Backdoor,
    CoordinateProjection,
    Neurotoxin,
    Scaling,
    patch_mask,
    poisoned_count,
    stamp,
    stripes,
)
from fedbench_plugins.fedavg import FedAvg


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


def ready(cls=Backdoor, **params) -> Backdoor:
    attack = cls(**params)
    assert attack.setup(make_env()) is None  # takes no test images away
    return attack


def hand_round(train=None, *, global_params, client_ids=(0,), data=None, weights=None, forward=None):
    """A ``MaliciousRound`` built by hand (the engine's fields, with test doubles where given)."""
    if data is None:
        data = [(torch.zeros(3, 1, 8, 8), torch.zeros(3, dtype=torch.int64))] * len(client_ids)
    extra = {} if weights is None else {"weights": weights}
    return fedbench.MaliciousRound(
        round=1, global_params=global_params, client_ids=tuple(client_ids), client_data=data, train=train,
        forward=forward, generator=torch.Generator(), **extra,
    )


def digits(attack, defense="fedavg", trainer="stacked", **kw):
    return fedbench.run_cell(fedbench.make_cell(dataset="digits", attack=attack, defense=defense, seed=0, **kw), trainer=trainer)


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


def test_loop_and_stacked_trainers_agree(assert_trainers_agree):
    cell = fedbench.make_cell(dataset="digits", attack="backdoor", defense="fedavg", rounds=5, seed=0, attack_rounds=(2, 4))
    loop, _ = assert_trainers_agree(cell)
    assert loop.adversarial_rounds == [2, 4]
    # the adversarial rounds are where the backdoor jumps (measured: 0.0 -> 0.60 in round 2, 0.996 in round 4)
    assert loop.rounds[0]["success"] < 0.1
    assert loop.rounds[1]["success"] > 0.4 and loop.rounds[3]["success"] > 0.8


# --------------------------------------------------------------------------------------------------
# The family: specs
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,cls,own,cited",
    [
        ("scaling", Scaling, {"size": 3, "gamma": None}, "Model replacement (Bagdasaryan et al. 2020)"),
        ("dba", DBA, {"size": 4, "boost": 1.0, "parts": 4}, "Distributed backdoor attack (Xie et al. 2020)"),
        ("neurotoxin", Neurotoxin, {"size": 3, "boost": 1.0, "ratio": 0.05, "estimate": "update"}, "Neurotoxin (Zhang et al. 2022)"),
    ],
)
def test_family_members_share_the_trigger_parameters_and_cite_their_paper(name, cls, own, cited):
    spec = fedbench.parse_component("attack", name)
    assert dict(spec.params) == {"target": 0, "poison_frac": 0.5, "epochs": 0, **own}
    assert cls.description().startswith(cited)
    assert fedbench.registry().get("attack", name) is cls


@pytest.mark.parametrize(
    "text,name",
    [
        ("scaling:gamma=0", "gamma"),
        ("scaling:boost=2", "boost"),  # scaling has gamma, not boost
        ("dba:parts=0", "parts"),
        ("neurotoxin:ratio=1", "ratio"),
        ("neurotoxin:ratio=-0.1", "ratio"),
        ("neurotoxin:estimate=guess", "estimate"),
    ],
)
def test_family_invalid_parameters_raise_spec_errors_naming_them(text, name):
    with pytest.raises(fedbench.SpecError, match=f"'{name}'"):
        fedbench.parse_component("attack", text)


# --------------------------------------------------------------------------------------------------
# scaling: model replacement
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "malicious_weights,benign_weights",
    [([75.0], [74.0, 75.0, 75.0, 74.0]), ([75.0, 74.0, 30.0], [75.0, 200.0]), ([50.0, 50.0], [50.0] * 8)],
)
def test_scaling_makes_fedavg_replace_the_global_model_by_the_attackers(malicious_weights, benign_weights):
    """Benign updates 0: G + fedavg(gamma (X_j - G), 0, ...) = the malicious models' weighted mean
    (X itself for one attacker), with gamma = W / W_mal (n / m for equal weights)."""
    m, p = len(malicious_weights), 6
    g = torch.Generator().manual_seed(3)
    global_params = torch.randn(p, generator=g)
    models = torch.randn(m, p, generator=g)  # the backdoored models X_j
    weights = torch.tensor(malicious_weights + benign_weights)
    attack = ready(Scaling)
    rnd = hand_round(lambda data, **kw: models - global_params, global_params=global_params, client_ids=range(m), weights=weights)

    updates = attack.malicious_updates(rnd)

    gamma = float(weights.sum() / weights[:m].sum())
    assert torch.allclose(updates, gamma * (models - global_params))
    if len(set(malicious_weights + benign_weights)) == 1:
        assert gamma == pytest.approx((m + len(benign_weights)) / m)
    stack = torch.cat([updates, torch.zeros(len(benign_weights), p)])
    new_global = global_params + FedAvg().aggregate(stack, weights, fedbench.ServerContext())
    w = weights[:m] / weights[:m].sum()
    assert torch.allclose(new_global, w @ models, atol=1e-5)
    if m == 1:
        assert torch.allclose(new_global, models[0], atol=1e-5)


def test_scaling_explicit_gamma_is_used_as_given_and_auto_needs_the_round_weights():
    trained = torch.tensor([[1.0, -2.0, 0.5]])
    explicit = ready(Scaling, gamma=7.0)
    rnd = hand_round(lambda data, **kw: trained.clone(), global_params=torch.zeros(3))
    assert torch.equal(explicit.malicious_updates(rnd), 7.0 * trained)
    with pytest.raises(fedbench.FedbenchError, match="gamma"):
        ready(Scaling).malicious_updates(rnd)  # a round that carries no weights


@dataclass(kw_only=True)
class RecordingScaling(Scaling):
    """Test attack: ``scaling`` recording its backdoored models X_j and their weights."""

    name: ClassVar[str] = "test-scaling"
    models: ClassVar[list] = []

    def train_poisoned(self, rnd, data=None, hooks=()):
        trained = super().train_poisoned(rnd, data, hooks)
        RecordingScaling.models.append((rnd.global_params + trained, rnd.weights[: len(rnd.client_ids)].clone()))
        return trained


@dataclass(kw_only=True)
class BenignSilenced(fedbench.Aggregator):
    """Test aggregator: FedAvg with every benign row set to 0 (other clients' updates ~0)."""

    name: ClassVar[str] = "test-benign-silenced"

    def aggregate(self, updates, weights, ctx):
        malicious = torch.tensor([c < ctx.num_byzantine for c in ctx.client_ids])
        return FedAvg().aggregate(torch.where(malicious[:, None], updates, 0.0), weights, ctx)


class ReplacementPlugin:
    @fedbench.hookimpl
    def register_attacks(self, register):
        register(RecordingScaling)

    @fedbench.hookimpl
    def register_aggregators(self, register):
        register(BenignSilenced)


def test_scaling_in_the_engine_leaves_exactly_the_attackers_models_when_benign_updates_vanish(use_plugin):
    """Through the engine, with its real sample-count weights (a Dirichlet split: unequal sizes):
    after the adversarial round the global model is the weighted mean of the 5 backdoored models."""
    use_plugin(ReplacementPlugin(), "replacement")
    RecordingScaling.models.clear()
    result = digits("test-scaling", defense="test-benign-silenced", partition="dirichlet", rounds=2, attack_rounds=(2,))
    ((models, weights),) = RecordingScaling.models
    assert len(set(weights.tolist())) > 1  # unequal weights: gamma is not just n / m
    expected = (weights / weights.sum()) @ models
    assert torch.allclose(result.final_params, expected, atol=1e-5)


def test_scaling_backdoor_outlasts_dilution_where_plain_backdoor_does_not():
    """One adversarial round (3) on digits: measured success 1.000 with scaling (gamma = W / W_mal,
    about 2 with 5 of 10 clients malicious) against 0.551 for the unscaled backdoor."""
    scaled = digits("scaling", rounds=3, attack_rounds=(3,)).rounds[-1]["success"]
    plain = digits("backdoor", rounds=3, attack_rounds=(3,)).rounds[-1]["success"]
    assert scaled > 0.95
    assert scaled > plain + 0.3


# --------------------------------------------------------------------------------------------------
# dba: distributed backdoor attack
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,parts,rows", [(4, 4, [[4], [5], [6], [7]]), (3, 2, [[5, 6], [7]]), (3, 1, [[5, 6, 7]])])
def test_stripes_split_the_patch_into_disjoint_row_bands_whose_union_is_the_patch(size, parts, rows):
    mask = patch_mask((1, 8, 8), size)
    bands = stripes(mask, parts)
    assert bands.shape == (parts, 8, 8)
    assert torch.equal(bands.any(0), mask)
    assert int(bands.sum()) == int(mask.sum())  # disjoint
    for band, expected in zip(bands, rows):
        assert torch.nonzero(band.any(1)).flatten().tolist() == expected
        assert torch.equal(band[expected], mask[expected])


def test_dba_refuses_more_stripes_than_trigger_rows():
    with pytest.raises(fedbench.FedbenchError, match="parts=5"):
        DBA(size=4, parts=5).setup(make_env())


def test_dba_client_i_stamps_stripe_i_mod_parts_and_keeps_its_true_labels():
    attack = ready(DBA, poison_frac=0.5, target=9)
    ids = (0, 1, 2, 3, 4)
    g = torch.Generator().manual_seed(4)
    data = [(torch.zeros(6, 1, 8, 8), torch.randint(0, 9, (6,), generator=g)) for _ in ids]
    captured = []

    def train(got, **kwargs):
        captured.append((got, kwargs))
        return torch.zeros(len(got), 3)

    attack.malicious_updates(hand_round(train, global_params=torch.zeros(3), client_ids=ids, data=data))
    ((got, kwargs),) = captured
    assert kwargs["objective"] == attack.objective
    for (x, y_coded), (_, y), c in zip(got, data, ids):
        seen = []
        attack.objective(lambda inp: seen.append(inp) or torch.zeros(len(inp), 10), x, y_coded, torch.full((6,), 1 / 6))
        stamped = seen[0][:3]  # ceil(0.5 * 6) poisoned samples, all carrying the client's stripe only
        assert torch.equal(stamped[:, 0] == 5.0, attack.part_masks[c % 4].expand(3, 8, 8))
        assert (seen[0][3:] == 0).all()
        assert torch.equal(y_coded % 10, y)


def test_dba_objective_under_vmap_matches_per_client_calls():
    attack = ready(DBA, poison_frac=0.4, target=3)
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(64, 10, generator=g)
    width, ks, parts = 12, [12, 5, 1], [0, 3, 1]
    xs = torch.randn(len(ks), width, 1, 8, 8, generator=g)
    ys = torch.randint(0, 10, (len(ks), width), generator=g) + 10 * torch.tensor(parts)[:, None]
    ws = torch.zeros(len(ks), width)
    for i, k in enumerate(ks):
        xs[i, k:] = 0.0
        ws[i, :k] = 1.0 / k

    def objective(x, y, w):
        return attack.objective(lambda inp: inp.flatten(1) @ weight, x, y, w)

    batched = vmap(objective)(xs, ys, ws)
    single = torch.stack([objective(xs[i, :k], ys[i, :k], ws[i, :k]) for i, k in enumerate(ks)])
    assert torch.allclose(batched, single, atol=1e-5)


def test_dba_full_trigger_succeeds_more_than_each_partial_trigger_on_digits():
    """Attacks in rounds 10, 12, 14 of a digits run (benign accuracy about 0.7 by then). Measured
    full / best stripe: 0.577 / 0.487 (round 12), 0.805 / 0.693 (14), 0.434 / 0.232 (15)."""
    rows = digits("dba", rounds=15, attack_rounds=(10, 12, 14)).rounds
    best_part = [max(row[f"success_part{j}"] for j in range(4)) for row in rows]
    for row, best in zip(rows[11:], best_part[11:]):  # rounds 12..15
        assert row["success"] > best, row["round"]
    assert rows[13]["success"] > 0.7 and rows[13]["success"] > best_part[13] + 0.05


# --------------------------------------------------------------------------------------------------
# neurotoxin
# --------------------------------------------------------------------------------------------------
def linear_model() -> FlatModel:
    torch.manual_seed(0)
    return FlatModel(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)))


@pytest.mark.parametrize("trainer_cls", [LoopTrainer, StackedTrainer])
def test_coordinate_projection_is_sgd_with_masked_gradients(trainer_cls):
    """The per-step hook equals SGD (with momentum) whose every gradient is masked: the kept
    coordinates follow that path, the others never leave the global model."""
    model = linear_model()
    start = model.flatten()
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(20, 1, 8, 8, generator=g), torch.randint(0, 10, (20,), generator=g)
    keep = torch.rand(model.num_params, generator=g) > 0.3
    setup = LocalSetup(epochs=2, batch_size=8, lr=0.1, momentum=0.5)

    job = ClientJob(x, y, batch_gen=torch.Generator().manual_seed(7))
    update = trainer_cls(model).train(start, [job], setup, defenses=[CoordinateProjection(keep, start)])[0]

    flat, buf, order = start.clone(), None, torch.Generator().manual_seed(7)
    for _ in range(setup.epochs):
        for idx in torch.split(torch.randperm(20, generator=order), setup.batch_size):
            leaf = flat.clone().requires_grad_(True)
            loss = F.cross_entropy(model.forward(leaf)(x[idx]), y[idx])
            (grad,) = torch.autograd.grad(loss, leaf)
            grad = torch.where(keep, grad, 0.0)
            buf = grad if buf is None else setup.momentum * buf + grad
            flat = flat - setup.lr * buf
    assert torch.allclose(update, flat - start, atol=1e-6)
    assert (update[~keep] == 0).all()
    assert (update[keep] != 0).float().mean() > 0.9


def test_neurotoxin_masks_the_largest_change_first_by_gradient_then_by_global_update():
    model = linear_model()
    g = torch.Generator().manual_seed(8)
    data = [(torch.randn(10, 1, 8, 8, generator=g), torch.randint(0, 10, (10,), generator=g)) for _ in range(2)]

    def forward(flat, inp):
        return model.forward(flat)(inp)

    first, second = model.flatten(), model.flatten() + 0.01 * torch.randn(model.num_params, generator=g)
    k = int(0.05 * model.num_params)

    def top(values):
        return set(torch.topk(values.abs(), k).indices.tolist())

    for estimate in ("update", "gradient"):
        attack = ready(Neurotoxin, estimate=estimate)
        rnd1 = hand_round(
            lambda d, **kw: torch.ones(2, model.num_params), global_params=first, client_ids=(0, 1), data=data, forward=forward
        )
        masked = set(torch.nonzero(~attack.keep_mask(rnd1)).flatten().tolist())
        leaf = first.clone().requires_grad_(True)
        x, y = torch.cat([d[0] for d in data]), torch.cat([d[1] for d in data])
        (grad,) = torch.autograd.grad(F.cross_entropy(forward(leaf, x), y), leaf)
        assert masked == top(grad)  # first adversarial round: the clean-data gradient
        attack.malicious_updates(rnd1)

        rnd2 = hand_round(rnd1.train, global_params=second, client_ids=(0, 1), data=data, forward=forward)
        masked = set(torch.nonzero(~attack.keep_mask(rnd2)).flatten().tolist())
        if estimate == "update":
            assert masked == top(second - first)  # the global model's change since the last attack
        else:
            leaf = second.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(F.cross_entropy(forward(leaf, x), y), leaf)
            assert masked == top(grad)


@dataclass(kw_only=True)
class RecordingNeurotoxin(Neurotoxin):
    """Test attack: ``neurotoxin`` recording its mask and updates in every adversarial round."""

    name: ClassVar[str] = "test-neurotoxin"
    log: ClassVar[list] = []

    def malicious_updates(self, rnd):
        keep = self.keep_mask(rnd)
        updates = super().malicious_updates(rnd)
        RecordingNeurotoxin.log.append((keep, updates))
        return updates


class NeurotoxinPlugin:
    @fedbench.hookimpl
    def register_attacks(self, register):
        register(RecordingNeurotoxin)


@pytest.mark.parametrize("trainer", ["loop", "stacked"])
def test_neurotoxin_update_is_exactly_zero_outside_its_mask_in_real_rounds(use_plugin, trainer):
    use_plugin(NeurotoxinPlugin(), "neurotoxin-log")
    RecordingNeurotoxin.log.clear()
    result = digits("test-neurotoxin", trainer=trainer, rounds=4, attack_rounds=(2, 4))
    assert result.status == "ok" and len(RecordingNeurotoxin.log) == 2  # gradient, then update estimate
    for keep, updates in RecordingNeurotoxin.log:
        assert int((~keep).sum()) == int(0.05 * keep.numel())
        assert (updates[:, ~keep] == 0).all()
        assert (updates[:, keep] != 0).float().mean() > 0.9  # and trained everywhere else (measured 0.99)


# --------------------------------------------------------------------------------------------------
# The new members on digits: both trainers, two aggregators
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attack", ["scaling", "dba", "neurotoxin"])
def test_family_loop_and_stacked_trainers_agree(attack, assert_trainers_agree):
    assert_trainers_agree(fedbench.make_cell(dataset="digits", attack=attack, rounds=5, attack_rounds=(2, 4)))


@pytest.mark.parametrize("defense", ["fedavg", "cma"])
@pytest.mark.parametrize("attack", ["scaling", "dba", "neurotoxin"])
def test_family_runs_end_to_end_on_digits(attack, defense):
    """Attacks in rounds 2, 4, 5; measured success after round 5 between 0.69 (dba, cma) and 1.0
    (scaling: with 5 of 10 clients malicious, the coordinate-wise median sits among them)."""
    result = digits(attack, defense=defense, rounds=6, attack_rounds=(2, 4, 5))
    assert result.status == "ok" and result.adversarial_rounds == [2, 4, 5]
    assert all(0.0 <= row["success"] <= 1.0 for row in result.rounds)
    assert result.rounds[0]["success"] < 0.05 and result.rounds[4]["success"] > 0.5
