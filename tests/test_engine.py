"""One federated run: schedule, client selection, local training, aggregation, evaluation."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import ClassVar

import pytest

from fedbench.metrics import AUTO_SUBSET
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import fedbench
from fedbench import FedbenchError, Scenario, make_cell, run_cell
from fedbench import engine
from fedbench.cli import main
from fedbench.components import ClientDefense
from fedbench.engine import attack_schedule, select_clients
from fedbench.models import CifarCNN, FmnistCNN, MLP
from fedbench.plugins import registry
from fedbench.rng import generator
from fedbench.training import ClientJob, FlatModel, LocalSetup, LoopTrainer, StackedTrainer


# --------------------------------------------------------------------------------------------------
# The attack schedule
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("seed", [0, 1])
def test_schedule_makes_a_fraction_p_of_rounds_adversarial(p, seed):
    rounds = 2000
    schedule = attack_schedule(Scenario(attack_prob=p), rounds, seed, active=True)
    std = math.sqrt(rounds * p * (1 - p))
    assert abs(len(schedule) - rounds * p) < 4 * std
    assert schedule == sorted(set(schedule)) and 1 <= schedule[0] and schedule[-1] <= rounds


def test_schedule_depends_on_the_seed():
    sc = Scenario(attack_prob=0.3)
    assert attack_schedule(sc, 200, 0, True) != attack_schedule(sc, 200, 1, True)
    assert attack_schedule(sc, 200, 0, True) == attack_schedule(sc, 200, 0, True)


def test_schedule_with_probability_zero_or_one():
    assert attack_schedule(Scenario(attack_prob=0.0), 50, 0, True) == []
    assert attack_schedule(Scenario(attack_prob=1.0), 50, 0, True) == list(range(1, 51))


def test_explicit_attack_rounds_are_exactly_the_adversarial_rounds():
    sc = Scenario(attack_rounds=(7, 3, 12), attack_prob=1.0)
    assert attack_schedule(sc, 10, 0, True) == [3, 7]  # round 12 is past the run; attack_prob is ignored


def test_no_adversarial_rounds_without_an_active_attack_or_malicious_clients():
    assert attack_schedule(Scenario(attack_prob=1.0), 20, 0, active=False) == []
    assert attack_schedule(Scenario(attack_prob=1.0, num_malicious=0), 20, 0, active=True) == []


# --------------------------------------------------------------------------------------------------
# Client selection
# --------------------------------------------------------------------------------------------------
def test_adversarial_round_selects_all_malicious_plus_distinct_benign_clients():
    sc = Scenario(num_clients=30, num_malicious=4, clients_per_round=9)
    selections = set()
    for rnd in range(1, 51):
        benign, malicious = select_clients(sc, 4, rnd, adversarial=True, seed=0)
        assert malicious == [0, 1, 2, 3]
        assert len(benign) == 5 == len(set(benign))
        assert all(4 <= c < 30 for c in benign)
        selections.add(tuple(benign))
    assert len(selections) > 40  # a fresh random draw every round


def test_benign_round_selects_k_distinct_benign_clients():
    sc = Scenario(num_clients=30, num_malicious=4, clients_per_round=9)
    for rnd in range(1, 51):
        benign, malicious = select_clients(sc, 4, rnd, adversarial=False, seed=0)
        assert malicious == []
        assert len(set(benign)) == 9 and all(4 <= c < 30 for c in benign)


def test_without_malicious_clients_every_client_can_be_selected():
    sc = Scenario(num_clients=12, num_malicious=3, clients_per_round=9)
    seen = set()
    for rnd in range(1, 31):
        benign, malicious = select_clients(sc, 0, rnd, adversarial=False, seed=0)
        assert malicious == [] and len(set(benign)) == 9
        seen.update(benign)
    assert seen == set(range(12))


@pytest.fixture
def selections(monkeypatch):
    """Every ``select_clients`` result of the runs in a test, in order."""
    log = []

    def recording(*args, **kwargs):
        result = real(*args, **kwargs)
        log.append(result)
        return result

    real = engine.select_clients
    monkeypatch.setattr(engine, "select_clients", recording)
    return log


def test_schedule_and_client_selection_do_not_depend_on_the_defense(toy_plugin, selections):
    attack_calls = registry().get("attack", "test-boost").calls
    results = []
    for defense in ("fedavg", "test-noise:scale=0.05+test-shrink+test-mean"):
        selections.clear()
        attack_calls.clear()
        cell = make_cell(dataset="digits", attack="test-boost", defense=defense, attack_prob=0.5, rounds=4, seed=3)
        result = run_cell(cell)
        results.append((result.adversarial_rounds, list(selections), list(attack_calls), result.rounds))
    (sched_a, sel_a, calls_a, rows_a), (sched_b, sel_b, calls_b, rows_b) = results
    assert sched_a == sched_b and sched_a, "the seed should give at least one adversarial round"
    assert sel_a == sel_b
    assert calls_a == calls_b
    assert rows_a != rows_b  # the defenses did change the training


# --------------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------------
def test_fedavg_weights_updates_by_sample_count():
    fedavg = registry().get("aggregator", "fedavg")()
    updates = torch.tensor([[1.0, 2.0, 3.0], [5.0, 6.0, 7.0]])
    out = fedavg.aggregate(updates, torch.tensor([1.0, 3.0]), fedbench.ServerContext())
    assert torch.allclose(out, torch.tensor([4.0, 5.0, 6.0]))  # (1*u1 + 3*u2) / 4
    equal = fedavg.aggregate(updates, torch.tensor([10, 10]), fedbench.ServerContext())
    assert torch.allclose(equal, torch.tensor([3.0, 4.0, 5.0]))


def test_engine_weights_clients_by_their_share_malicious_first(toy_plugin, selections):
    """digits: 1,497 training images over 40 clients are shares of 38 (clients 0-16) and 37; the
    reference-code protocol trains on the first ceil(80%) of each: 31 and 30 samples."""
    cell = make_cell(dataset="digits", attack="test-boost", defense="test-record", protocol="reference-code",
                     local_epochs=1, num_clients=40, attack_rounds=(1,), rounds=2)
    result = run_cell(cell)
    calls = registry().get("aggregator", "test-record").calls
    assert result.adversarial_rounds == [1]
    assert len(calls) == 2 == len(selections)
    for (shape, weights), (benign, malicious) in zip(calls, selections):
        assert shape[0] == 10  # K updates every round
        assert weights == [31.0 if c < 17 else 30.0 for c in malicious + benign]
    assert selections[0][1] == [0, 1, 2, 3, 4] and selections[1][1] == []


# --------------------------------------------------------------------------------------------------
# Local training: the loop and stacked trainers agree
# --------------------------------------------------------------------------------------------------
def _synthetic_clients(shape, sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)) for n in sizes]


def _jobs(data, round_=1):
    return [ClientJob(x, y, batch_gen=generator(0, "train", round_, c), defense_key=fedbench.rng.derive_seed(0, "defense", round_, c))
            for c, (x, y) in enumerate(data)]


def _both_trainers(module, data, setup, defenses=()):
    model = FlatModel(module)
    flat = model.flatten()
    loop = LoopTrainer(model).train(flat, _jobs(data), setup, defenses=defenses)
    stacked = StackedTrainer(model).train(flat, _jobs(data), setup, defenses=defenses)
    return loop, stacked


# 13, 37 and 70 samples with batch 32: 1, 2 and 3 steps per epoch, ragged last batches
SIZES = (13, 37, 70)
SETUP = LocalSetup(epochs=2, batch_size=32, lr=0.05, momentum=0.5)


@pytest.mark.parametrize(
    "model, shape, n_params",
    [(FmnistCNN(), (1, 28, 28), 28_938), (CifarCNN(), (3, 32, 32), 62_006), (MLP(), (1, 8, 8), 4_810)],
    ids=["fmnist-cnn", "cifar-cnn", "mlp"],
)
def test_loop_and_stacked_trainers_agree(model, shape, n_params):
    torch.manual_seed(0)
    loop, stacked = _both_trainers(model.build(shape, 10), _synthetic_clients(shape, SIZES), SETUP)
    assert loop.shape == stacked.shape == (3, n_params)
    assert loop.abs().max() > 1e-3 and not torch.allclose(loop[0], loop[1])  # real, distinct updates
    assert (loop - stacked).abs().max() < 1e-4


def shifted_labels(forward, x, y, w):
    """An attack-style objective: cross-entropy towards the next label."""
    return (F.cross_entropy(forward(x), (y + 1) % 10, reduction="none") * w).sum()


@pytest.mark.parametrize("model, shape", [(FmnistCNN(), (1, 28, 28)), (MLP(), (1, 8, 8))], ids=["fmnist-cnn", "mlp"])
def test_loop_and_stacked_trainers_agree_on_another_objective(model, shape):
    torch.manual_seed(0)
    module = model.build(shape, 10)
    data = _synthetic_clients(shape, SIZES)
    flat_model = FlatModel(module)
    flat = flat_model.flatten()
    plain = LoopTrainer(flat_model).train(flat, _jobs(data), SETUP)
    loop = LoopTrainer(flat_model).train(flat, _jobs(data), SETUP, objective=shifted_labels)
    stacked = StackedTrainer(flat_model).train(flat, _jobs(data), SETUP, objective=shifted_labels)
    assert (loop - plain).abs().max() > 1e-3  # the objective was used
    assert (loop - stacked).abs().max() < 1e-4


@dataclass(kw_only=True)
class JitterWeights(ClientDefense):
    """Test per-step defense: shrinks and jitters the weight tensors of active clients after each step."""

    name: ClassVar[str] = "test-jitter"
    per_step: ClassVar[bool] = True

    def after_step(self, state):
        for k, (p, is_weight) in enumerate(zip(state.params, state.is_weight)):
            if not is_weight:
                continue
            noise = fedbench.rng.uniform(state.keys, ("test-jitter", state.epoch, state.step, k), p.shape[1:]) - 0.5
            active = state.active.view(-1, *[1] * (p.dim() - 1))
            p.copy_(torch.where(active, 0.99 * p + 0.01 * noise, p))


def test_loop_and_stacked_trainers_agree_with_a_per_step_defense():
    torch.manual_seed(0)
    data = _synthetic_clients((1, 8, 8), SIZES)
    plain, _ = _both_trainers(MLP().build((1, 8, 8), 10), data, SETUP)
    torch.manual_seed(0)
    loop, stacked = _both_trainers(MLP().build((1, 8, 8), 10), data, SETUP, defenses=[JitterWeights()])
    assert (loop - plain).abs().max() > 1e-3  # the defense did act
    assert (loop - stacked).abs().max() < 1e-4


def test_stacked_trainer_result_does_not_depend_on_chunking():
    data = _synthetic_clients((1, 8, 8), (20, 30, 40, 50, 60))
    torch.manual_seed(0)
    model = FlatModel(MLP().build((1, 8, 8), 10))
    flat = model.flatten()
    whole = StackedTrainer(model, chunk=10).train(flat, _jobs(data), SETUP)
    pairs = StackedTrainer(model, chunk=2).train(flat, _jobs(data), SETUP)
    assert (whole - pairs).abs().max() < 1e-5


def test_client_defenses_transform_the_finished_updates_in_order(toy_plugin):
    data = _synthetic_clients((1, 8, 8), (20, 30))
    torch.manual_seed(0)
    model = FlatModel(MLP().build((1, 8, 8), 10))
    flat = model.flatten()
    shrink = registry().get("defense", "test-shrink")
    plain = LoopTrainer(model).train(flat, _jobs(data), SETUP)
    shrunk = LoopTrainer(model).train(flat, _jobs(data), SETUP, defenses=[shrink(factor=0.5), shrink(factor=0.2)])
    assert torch.allclose(shrunk, 0.1 * plain)


def test_no_jobs_give_an_empty_update_stack():
    model = FlatModel(MLP().build((1, 8, 8), 10))
    assert StackedTrainer(model).train(model.flatten(), [], SETUP).shape == (0, model.num_params)


# --------------------------------------------------------------------------------------------------
# Whole runs
# --------------------------------------------------------------------------------------------------
def test_runs_of_the_same_cell_are_identical(toy_plugin):
    cell = make_cell(dataset="digits", attack="test-boost:boost=3", attack_rounds=(2,), rounds=3)
    first, second = run_cell(cell), run_cell(cell)
    assert first.rounds == second.rounds
    assert first.adversarial_rounds == second.adversarial_rounds == [2]
    other_seed = run_cell(make_cell(dataset="digits", attack="test-boost:boost=3", attack_rounds=(2,), rounds=3, seed=1))
    assert other_seed.rounds != first.rounds


def test_loop_and_stacked_trainers_give_the_same_run():
    cell = make_cell(dataset="digits", rounds=2)
    stacked, loop = run_cell(cell, trainer="stacked"), run_cell(cell, trainer="loop")
    for a, b in zip(stacked.rounds, loop.rounds):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=2 / 300)


def test_none_attack_has_no_adversarial_rounds():
    result = run_cell(make_cell(dataset="digits", attack="none", attack_prob=1.0, rounds=3))
    assert result.adversarial_rounds == []
    assert [row["adversarial"] for row in result.rounds] == [False] * 3
    assert result.mitigation == []
    assert result.status == "ok"


def test_adversarial_rows_and_attack_calls_follow_the_schedule(toy_plugin):
    result = run_cell(make_cell(dataset="digits", attack="test-boost", attack_rounds=(2, 4), rounds=5))
    assert result.adversarial_rounds == [2, 4]
    assert [row["adversarial"] for row in result.rounds] == [False, True, False, True, False]
    assert registry().get("attack", "test-boost").calls == [(2, (0, 1, 2, 3, 4)), (4, (0, 1, 2, 3, 4))]
    assert result.mitigation == []  # test-boost reports no success metric: no mitigation count (n/a)


def test_run_result_records_rounds_metrics_and_timings():
    result = run_cell(make_cell(dataset="digits", rounds=2))
    assert [row["round"] for row in result.rounds] == [1, 2]
    assert all({"accuracy", "loss", "eval_n", "adversarial"} <= set(row) for row in result.rounds)
    assert result.final_accuracy == result.rounds[-1]["accuracy"]
    assert set(result.timings) == {"train", "aggregate", "evaluate"} and result.seconds > 0
    payload = json.loads(json.dumps(result.to_dict()))
    assert payload["hash"] == result.cell.hash()


def test_digits_fedavg_learns_in_30_rounds():
    result = CliRunner().invoke(main, ["run", "--dataset", "digits", "--rounds", "30", "--seed", "0", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["status"] == "ok"
    assert payload["final_accuracy"] > 0.8
    assert payload["rounds"][-1]["accuracy"] > payload["rounds"][0]["accuracy"]


def test_eval_auto_uses_a_fixed_subset_except_in_the_last_round(toy_plugin):
    auto = run_cell(make_cell(dataset="test-blobs", rounds=3))
    assert [row["eval_n"] for row in auto.rounds] == [AUTO_SUBSET, AUTO_SUBSET, 2500]
    full = run_cell(make_cell(dataset="test-blobs", rounds=3, eval="full"))
    assert [row["eval_n"] for row in full.rounds] == [2500, 2500, 2500]
    assert full.final_accuracy == auto.final_accuracy  # the same model, the same full test set at the end


def test_digits_evaluates_on_its_whole_test_split():
    result = run_cell(make_cell(dataset="digits", rounds=1))
    assert result.rounds[0]["eval_n"] == 300


@dataclass(kw_only=True)
class ImageThief(fedbench.Attack):
    """Test attack that takes 50 test images for itself."""

    name: ClassVar[str] = "test-thief"

    def setup(self, env):
        return torch.arange(50)


@dataclass(kw_only=True)
class ShortChanger(fedbench.Attack):
    """Test attack that uploads one update however many malicious clients it controls."""

    name: ClassVar[str] = "test-short"

    def malicious_updates(self, rnd):
        return torch.zeros(1, rnd.global_params.numel())


@dataclass(kw_only=True)
class NaNAggregator(fedbench.Aggregator):
    """Test aggregator that destroys the model."""

    name: ClassVar[str] = "test-nan"

    def aggregate(self, updates, weights, ctx):
        return torch.full((updates.shape[1],), float("nan"))


class MisbehavingPlugin:
    @fedbench.hookimpl
    def register_attacks(self, register):
        register(ImageThief)
        register(ShortChanger)

    @fedbench.hookimpl
    def register_aggregators(self, register):
        register(NaNAggregator)


def test_test_images_an_attack_takes_are_left_out_of_benign_evaluation(use_plugin):
    use_plugin(MisbehavingPlugin(), "misbehaving")
    result = run_cell(make_cell(dataset="digits", attack="test-thief", rounds=1, attack_prob=0.0))
    assert result.rounds[0]["eval_n"] == 300 - 50


def test_attack_returning_updates_of_the_wrong_shape_is_an_error(use_plugin):
    use_plugin(MisbehavingPlugin(), "misbehaving")
    with pytest.raises(FedbenchError, match=r"attack 'test-short' returned updates of shape \(1, \d+\), expected \(5, "):
        run_cell(make_cell(dataset="digits", attack="test-short", attack_rounds=(1,), rounds=1))


def test_run_stops_as_diverged_when_the_model_becomes_non_finite(use_plugin):
    use_plugin(MisbehavingPlugin(), "misbehaving")
    result = run_cell(make_cell(dataset="digits", defense="test-nan", rounds=5))
    assert result.status == "diverged"
    assert len(result.rounds) == 1
    assert "round 1" in result.message
    assert result.mitigation == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_a_gpu_is_a_clean_error():
    with pytest.raises(FedbenchError, match="no CUDA GPU"):
        run_cell(make_cell(dataset="digits", rounds=1), device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_run_agrees_with_the_cpu_run(toy_plugin):
    cell = make_cell(dataset="digits", attack="test-boost:boost=2", attack_rounds=(2,), rounds=3)
    cpu = run_cell(cell, device="cpu")
    for trainer in ("stacked", "loop"):
        gpu = run_cell(cell, device="cuda", trainer=trainer)
        assert gpu.status == "ok" and gpu.adversarial_rounds == cpu.adversarial_rounds == [2]
        for a, b in zip(cpu.rounds, gpu.rounds):
            assert b["loss"] == pytest.approx(a["loss"], abs=1e-3)
    noisy = run_cell(make_cell(dataset="digits", defense="test-noise", rounds=2), device="cuda")
    assert noisy.status == "ok"


def test_unknown_device_is_a_clean_error():
    with pytest.raises(FedbenchError, match="unknown device 'tpu'"):
        run_cell(make_cell(dataset="digits", rounds=1), device="tpu")


# --------------------------------------------------------------------------------------------------
# Slow: the paper's model on the real Fashion-MNIST
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_fmnist_paper_model_learns_in_five_rounds(fmnist_dir):
    result = CliRunner().invoke(
        main, ["run", "--dataset", "fmnist", "--data-dir", str(fmnist_dir), "--rounds", "5", "--json"]
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["cell"]["model"]["name"] == "fmnist-cnn"
    assert [row["eval_n"] for row in payload["rounds"]] == [AUTO_SUBSET] * 4 + [10000]
    assert payload["final_accuracy"] > 0.6
    print(f"fmnist: accuracy {payload['final_accuracy']:.4f}, {payload['seconds'] / 5:.2f} s per round, "
          f"timings {payload['timings']}")
