"""FLTrust (plugins/fltrust.py, Cao et al. NDSS 2021): ReLU-cosine trust to a server update on root
data, client updates rescaled to the server update's norm, and root data that never reach a client."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fedbench
import fedbench.engine
from fedbench import rng
from fedbench.components import ServerContext
from fedbench.data import load_dataset
from fedbench_plugins.fltrust import FLTrust


def aggregate(rows, g0, weights=None, rule=None):
    updates = torch.as_tensor(rows, dtype=torch.float32)
    g0 = torch.as_tensor(g0, dtype=torch.float32)
    weights = torch.ones(len(updates)) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    return (rule or FLTrust()).aggregate(updates, weights, ServerContext(root_update=lambda: g0))


# --------------------------------------------------------------------------------------------------
# The definition
# --------------------------------------------------------------------------------------------------
def test_fltrust_weights_relu_cosine_trust_and_rescales_updates_to_the_server_norm():
    # g0 = [3, 4], ||g0|| = 5
    # g1 = [6, 8]:   cos = 1,                TS = 1,   rescaled to [3, 4]
    # g2 = [0, 2]:   cos = 8 / (5 * 2) = 0.8, TS = 0.8, rescaled to [0, 5]
    # g3 = [-3, -4]: cos = -1,               TS = 0 (ReLU)
    # aggregate = (1 * [3, 4] + 0.8 * [0, 5]) / 1.8 = [3 / 1.8, 8 / 1.8]
    out = aggregate([[6.0, 8.0], [0.0, 2.0], [-3.0, -4.0]], [3.0, 4.0])
    assert out.tolist() == pytest.approx([3 / 1.8, 8 / 1.8], rel=1e-6)


def test_fltrust_returns_the_zero_update_when_no_client_has_positive_trust():
    out = aggregate([[-3.0, -4.0], [4.0, -3.0], [0.0, 0.0]], [3.0, 4.0])  # opposite, orthogonal, zero
    assert torch.equal(out, torch.zeros(2))


def test_fltrust_ignores_client_weights():
    rows, g0 = [[6.0, 8.0], [0.0, 2.0]], [3.0, 4.0]
    assert torch.equal(aggregate(rows, g0, weights=[1.0, 1.0]), aggregate(rows, g0, weights=[1000.0, 1.0]))


def test_fltrust_gives_nan_and_zero_updates_no_trust():
    out = aggregate([[6.0, 8.0], [float("nan"), 1.0], [0.0, 0.0]], [3.0, 4.0])
    assert out.tolist() == pytest.approx([3.0, 4.0])


def test_fltrust_keeps_dtype_and_shape():
    updates = torch.randn(5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    g0 = updates.mean(dim=0)
    out = FLTrust().aggregate(updates, torch.ones(5), ServerContext(root_update=lambda: g0))
    assert out.shape == (7,) and out.dtype == torch.float64


def test_fltrust_without_root_data_in_the_context_is_a_clear_error():
    with pytest.raises(fedbench.FedbenchError, match="root"):
        FLTrust().aggregate(torch.ones(2, 3), torch.ones(2), ServerContext())


def test_fltrust_declares_its_root_data_size_with_the_papers_default_of_100():
    assert FLTrust().root_samples() == 100
    assert fedbench.parse_defense("fltrust:root=37").aggregator.build().root_samples() == 37
    with pytest.raises(fedbench.SpecError, match="'root'"):
        fedbench.parse_defense("fltrust:root=0")


@settings(derandomize=True, deadline=None, max_examples=20)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 12))
def test_fltrust_is_invariant_to_the_order_of_the_updates(seed, n):
    g = torch.Generator().manual_seed(seed)
    updates = torch.randn(n, 30, generator=g, dtype=torch.float64)
    g0 = torch.randn(30, generator=g, dtype=torch.float64) + updates.mean(dim=0)
    perm = torch.randperm(n, generator=g)
    ctx = ServerContext(root_update=lambda: g0)
    out = FLTrust().aggregate(updates, torch.ones(n), ctx)
    permuted = FLTrust().aggregate(updates[perm], torch.ones(n), ctx)
    assert torch.allclose(out, permuted, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("attack", ["far", "sign-flipped"])
def test_fltrust_output_norm_stays_within_the_server_update_norm_under_huge_attackers(attack):
    g = torch.Generator().manual_seed(1)
    direction = torch.randn(200, generator=g)
    benign = direction + 0.5 * torch.randn(7, 200, generator=g)
    g0 = direction + 0.5 * torch.randn(200, generator=g)
    if attack == "far":
        malicious = 1e6 * torch.randn(3, 200, generator=g) + 1e6 * direction
    else:
        malicious = -1e6 * benign[:3]
    out = FLTrust().aggregate(torch.cat([malicious, benign]), torch.ones(10), ServerContext(root_update=lambda: g0))
    assert torch.linalg.vector_norm(out) <= torch.linalg.vector_norm(g0) * (1 + 1e-5)
    if attack == "sign-flipped":  # negative cosine: the attackers get no trust at all
        clean = FLTrust().aggregate(benign, torch.ones(7), ServerContext(root_update=lambda: g0))
        assert torch.allclose(out, clean, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Root data in a real cell
# --------------------------------------------------------------------------------------------------
def record_partitions(monkeypatch) -> dict:
    """Record the root indices and the client partitions (after any root removal) the engine uses."""
    seen: dict = {}
    real_root, real_take = fedbench.engine.root_indices, fedbench.engine.take_fraction

    def root_indices(count, n_train, seed):
        seen["root"] = real_root(count, n_train, seed)
        return seen["root"]

    def take_fraction(parts, frac):
        seen["parts"] = [p.clone() for p in parts]
        return real_take(parts, frac)

    monkeypatch.setattr(fedbench.engine, "root_indices", root_indices)
    monkeypatch.setattr(fedbench.engine, "take_fraction", take_fraction)
    return seen


def test_fltrust_root_samples_never_reach_a_client_and_other_cells_keep_their_partitions(monkeypatch):
    seen = record_partitions(monkeypatch)
    kwargs = dict(dataset="digits", attack="poison", rounds=1, attack_rounds=(1,))
    assert fedbench.run_cell(fedbench.make_cell(defense="fltrust:root=100", **kwargs)).status == "ok"
    root, held_out = seen["root"], seen["parts"]
    assert root is not None and len(root) == 100 and len(torch.unique(root)) == 100
    for part in held_out:  # benign and malicious clients train on train_x[part]
        assert not torch.isin(part, root).any()

    assert fedbench.run_cell(fedbench.make_cell(defense="fedavg", **kwargs)).status == "ok"
    assert seen["root"] is None
    data = load_dataset(fedbench.parse_component("dataset", "digits"), None)
    cell = fedbench.make_cell(defense="fedavg", **kwargs)
    plain = cell.partition.build().split(data.train_y, cell.scenario.num_clients, rng.generator(cell.seed, "partition"))
    assert [len(p) for p in seen["parts"]] == [len(p) for p in plain]  # nothing held out without fltrust
    for full, reduced in zip(seen["parts"], held_out):  # with fltrust: the same partition minus the root set
        assert torch.equal(full[~torch.isin(full, root)], reduced)
    assert sum(len(p) for p in seen["parts"]) - sum(len(p) for p in held_out) == 100


def test_fltrust_digits_run_under_poisoning_finishes_above_chance():
    cell = fedbench.make_cell(dataset="digits", attack="poison", defense="fltrust", rounds=3, attack_rounds=(2,), local_epochs=5)
    result = fedbench.run_cell(cell)
    assert result.status == "ok"
    assert result.final_accuracy > 0.3  # 10 classes: chance is 0.1
