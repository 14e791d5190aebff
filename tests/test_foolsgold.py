"""FoolsGold (plugins/foolsgold.py, Fung et al. RAID 2020): per-client update histories, cosine
similarity with pardoning, logit weights; sybils get weight 0 and state lives exactly one cell."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fedbench
from fedbench.components import ServerContext
from fedbench.vectors import cosine_similarities
from fedbench_plugins.foolsgold import FoolsGold, foolsgold_weights


def aggregate(rule: FoolsGold, rows, ids) -> torch.Tensor:
    updates = torch.as_tensor(rows, dtype=torch.float64)
    return rule.aggregate(updates, torch.ones(len(updates)), ServerContext(client_ids=tuple(ids)))


def test_foolsgold_weights_follow_algorithm_1_with_pardoning_and_the_logit():
    # histories H1 = [1, 0], H2 = [3, 4], H3 = [-3, 4]
    # cs (diagonal 0): cs12 = 0.6, cs13 = -0.6, cs23 = 7/25 = 0.28;  v = max_j cs_ij = [0.6, 0.6, 0.28]
    # pardoning row 3 (v_1 = v_2 = 0.6 > 0.28): cs31 = -0.6 * 0.28/0.6 = -0.28, cs32 = 0.28 * 0.28/0.6
    # alpha = 1 - max_j cs_ij = [0.4, 0.4, 1 - 0.28**2/0.6]; divided by the max: [0.4/a3, 0.4/a3, 1]
    # logit (kappa = 1): ln(x / (1 - x)) + 0.5 for x = 0.4/a3; +inf -> 1 for client 3
    a3 = 1 - 0.28**2 / 0.6
    x = 0.4 / a3
    w = math.log(x / (1 - x)) + 0.5
    rows = [[1.0, 0.0], [3.0, 4.0], [-3.0, 4.0]]
    alpha = foolsgold_weights(cosine_similarities(torch.tensor(rows, dtype=torch.float64)), kappa=1.0)
    assert alpha.tolist() == pytest.approx([w, w, 1.0], rel=1e-12)
    # aggregate = weighted mean of this round's updates (= the histories in a first round)
    out = aggregate(FoolsGold(), rows, [0, 1, 2])
    expected = [(w * 1 + w * 3 - 3) / (2 * w + 1), (w * 4 + 4) / (2 * w + 1)]
    assert out.tolist() == pytest.approx(expected, rel=1e-12)


def test_foolsgold_kappa_scales_the_logit_before_clipping():
    rows = torch.tensor([[1.0, 0.0], [3.0, 4.0], [-3.0, 4.0]], dtype=torch.float64)
    a1 = foolsgold_weights(cosine_similarities(rows), kappa=1.0)
    a2 = foolsgold_weights(cosine_similarities(rows), kappa=2.0)
    assert a2[0].item() == pytest.approx(min(1.0, 2 * a1[0].item()))


def test_foolsgold_sums_each_clients_history_over_rounds():
    rule = FoolsGold()
    aggregate(rule, [[1.0, 0.0], [0.0, 1.0]], [7, 3])
    aggregate(rule, [[0.0, 1.0], [1.0, 1.0], [5.0, 5.0]], [7, 3, 9])  # client 9 is new
    history = {cid: rule._history[row].tolist() for cid, row in rule._rows.items()}
    assert history == {7: [1.0, 1.0], 3: [1.0, 2.0], 9: [5.0, 5.0]}


def test_foolsgold_gives_sybils_zero_weight_over_rounds():
    g = torch.Generator().manual_seed(0)
    rule = FoolsGold()
    ids = list(range(10))  # ids 0-2 are sybils: the same (huge) update every round
    for _ in range(3):
        sybil = 1e6 * torch.randn(1, 50, generator=g, dtype=torch.float64)
        honest = torch.randn(7, 50, generator=g, dtype=torch.float64)
        updates = torch.cat([sybil.expand(3, -1), honest])
        out = rule.aggregate(updates, torch.ones(10), ServerContext(client_ids=tuple(ids)))
        lo, hi = honest.min(dim=0).values, honest.max(dim=0).values
        assert bool(((out >= lo - 1e-9) & (out <= hi + 1e-9)).all())  # nothing of the 1e6 sybils
    rows = torch.tensor([rule._rows[c] for c in ids])
    alpha = foolsgold_weights(cosine_similarities(rule._history[rows]), kappa=1.0)
    assert alpha[:3].tolist() == [0.0, 0.0, 0.0] and bool((alpha[3:] > 0).all())


def test_foolsgold_returns_the_zero_update_when_every_client_looks_like_a_sybil():
    out = aggregate(FoolsGold(), [[1.0, 2.0], [2.0, 4.0], [3.0, 6.0]], [0, 1, 2])  # all parallel
    assert out.tolist() == [0.0, 0.0]


def test_foolsgold_refuses_to_run_without_client_ids():
    with pytest.raises(fedbench.FedbenchError, match="client"):
        FoolsGold().aggregate(torch.ones(3, 2), torch.ones(3), ServerContext(client_ids=None))


def test_foolsgold_ignores_client_weights_and_keeps_dtype():
    g = torch.Generator().manual_seed(2)
    updates = torch.randn(5, 9, generator=g)
    ctx = ServerContext(client_ids=(0, 1, 2, 3, 4))
    a = FoolsGold().aggregate(updates, torch.ones(5), ctx)
    b = FoolsGold().aggregate(updates, torch.arange(1.0, 6.0), ctx)
    assert a.dtype == torch.float32 and torch.equal(a, b)


@settings(derandomize=True, deadline=None, max_examples=15)
@given(seed=st.integers(0, 2**16), n=st.integers(2, 10))
def test_foolsgold_is_invariant_to_permuting_rows_together_with_client_ids(seed, n):
    g = torch.Generator().manual_seed(seed)
    plain, permuted = FoolsGold(), FoolsGold()
    for _ in range(3):
        ids = torch.randperm(12, generator=g)[:n].tolist()
        updates = torch.randn(n, 20, generator=g, dtype=torch.float64)
        updates[: n // 2] += torch.randn(20, generator=g, dtype=torch.float64)  # some similar clients
        perm = torch.randperm(n, generator=g).tolist()
        out = plain.aggregate(updates, torch.ones(n), ServerContext(client_ids=tuple(ids)))
        out_p = permuted.aggregate(updates[perm], torch.ones(n), ServerContext(client_ids=tuple(ids[i] for i in perm)))
        assert torch.allclose(out, out_p, rtol=1e-10, atol=1e-12)


def metrics(result):
    return [(row["accuracy"], row["loss"], row["success"]) for row in result.rounds]


def test_foolsgold_state_lives_one_cell_so_cells_run_in_sequence_match_fresh_runs():
    a = fedbench.make_cell(dataset="digits", attack="poison", defense="foolsgold", rounds=3, attack_rounds=(2,), local_epochs=5)
    b = fedbench.make_cell(dataset="digits", attack="poison", defense="foolsgold", rounds=3, attack_rounds=(1, 3), seed=1)
    first_a = fedbench.run_cell(a)
    first_b = fedbench.run_cell(b)
    again_a = fedbench.run_cell(a)
    again_b = fedbench.run_cell(b)
    assert metrics(first_a) == metrics(again_a) and torch.equal(first_a.final_params, again_a.final_params)
    assert metrics(first_b) == metrics(again_b) and torch.equal(first_b.final_params, again_b.final_params)
    # the history matters within a cell: a second round on the same object differs from a fresh one
    rows, ids = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), (0, 1, 2)
    stateful = FoolsGold()
    stateful.aggregate(torch.tensor([[5.0, 5.0], [5.0, 5.0], [0.0, 1.0]]), torch.ones(3), ServerContext(client_ids=ids))
    later = stateful.aggregate(rows, torch.ones(3), ServerContext(client_ids=ids))
    assert not torch.equal(later, FoolsGold().aggregate(rows, torch.ones(3), ServerContext(client_ids=ids)))


def test_foolsgold_digits_run_under_poisoning_finishes_above_chance():
    cell = fedbench.make_cell(dataset="digits", attack="poison", defense="foolsgold", rounds=3, attack_rounds=(2,), local_epochs=5)
    result = fedbench.run_cell(cell)
    assert result.status == "ok"
    assert result.final_accuracy > 0.3  # 10 classes: chance is 0.1
