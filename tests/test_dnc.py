"""DnC (plugins/dnc.py, Shejwalkar & Houmansadr NDSS 2021): outlier scores on the top singular
vector of centred random coordinate subsets, n - c*f lowest kept, intersection over iterations."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fedbench
from fedbench.components import ServerContext
from fedbench_plugins.dnc import DnC, outlier_scores, removed_count


def ctx(seed: int = 0, f: int = 0) -> ServerContext:
    return ServerContext(generator=torch.Generator().manual_seed(seed), num_byzantine=f)


def test_dnc_drops_the_c_f_highest_projections_on_the_top_singular_vector():
    # rows [0,0], [2,2], [1,1], [-8,-8]: mean [-1.25,-1.25]; centred rows lie on v = [1,1]/sqrt(2)
    # with projections sqrt(2) * [1.25, 3.25, 2.25, -6.75] -> scores 2 * [1.5625, 10.5625, 5.0625, 45.5625]
    rows = torch.tensor([[0.0, 0.0], [2.0, 2.0], [1.0, 1.0], [-8.0, -8.0]])
    assert outlier_scores(rows).tolist() == pytest.approx([3.125, 21.125, 10.125, 91.125])
    # b >= P: every iteration sees all coordinates
    # f = 1 drops row 3 -> mean of [0,0], [2,2], [1,1] = [1, 1]
    assert DnC(f=1).aggregate(rows, torch.ones(4), ctx()).tolist() == pytest.approx([1.0, 1.0])
    # f = 2 drops rows 3 and 1 -> mean of [0,0], [1,1] = [0.5, 0.5]
    assert DnC(f=2).aggregate(rows, torch.ones(4), ctx()).tolist() == pytest.approx([0.5, 0.5])
    # c = 0.5, f = 2 drops floor(1.0) = 1 row
    assert DnC(f=2, c=0.5).aggregate(rows, torch.ones(4), ctx()).tolist() == pytest.approx([1.0, 1.0])


def test_dnc_with_auto_f_uses_the_scenarios_byzantine_count():
    rows = torch.tensor([[0.0, 0.0], [2.0, 2.0], [1.0, 1.0], [-8.0, -8.0]])
    assert DnC().aggregate(rows, torch.ones(4), ctx(f=2)).tolist() == pytest.approx([0.5, 0.5])
    assert DnC().aggregate(rows, torch.ones(4), ctx(f=0)).tolist() == pytest.approx(rows.mean(dim=0).tolist())


def test_dnc_keeps_only_updates_that_pass_every_iteration():
    # an outlier in each coordinate; with b = 1 each iteration sees one coordinate and drops one row
    rows = torch.tensor([[0.1, 0.0], [0.0, 0.1], [-0.1, 0.0], [0.0, -0.1], [9.0, 0.0], [0.0, 9.0]])
    single = DnC(f=1, b=1, iters=1).aggregate(rows, torch.ones(6), ctx())
    assert single.max().item() > 1  # one iteration drops only one of the two outliers
    both = DnC(f=1, b=1, iters=20).aggregate(rows, torch.ones(6), ctx())
    assert both.tolist() == pytest.approx([0.0, 0.0], abs=1e-7)  # the intersection drops both


def test_dnc_ignores_client_weights_and_keeps_dtype():
    updates = torch.randn(6, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = DnC(f=1, b=10).aggregate(updates, torch.ones(6), ctx(3))
    b = DnC(f=1, b=10).aggregate(updates, torch.arange(1.0, 7.0), ctx(3))
    assert a.dtype == torch.float64 and a.shape == (30,) and torch.equal(a, b)


def test_dnc_check_refuses_cells_where_no_update_would_survive():
    DnC().check(10, 5)
    DnC(f=9).check(10, 5)
    for rule, n, f in [(DnC(), 5, 5), (DnC(f=10), 10, 1), (DnC(c=2.0), 10, 5)]:
        with pytest.raises(fedbench.SpecError, match=r"n - c\*f >= 1"):
            rule.check(n, f)
    with pytest.raises(fedbench.SpecError, match="dnc:f="):
        fedbench.make_cell(dataset="digits", defense="dnc:f=10")
    assert removed_count(0.3, 10) == 3  # decimal c removes what it says despite binary rounding


@settings(derandomize=True, deadline=None, max_examples=20)
@given(seed=st.integers(0, 2**16), n=st.integers(3, 12), f=st.integers(0, 2))
def test_dnc_is_invariant_to_the_order_of_the_updates_given_the_same_coordinate_sample(seed, n, f):
    # the coordinate sample depends only on P and the generator, not on the rows' order
    g = torch.Generator().manual_seed(seed)
    updates = torch.randn(n, 50, generator=g, dtype=torch.float64)
    perm = torch.randperm(n, generator=g)
    out = DnC(f=f, b=10, iters=3).aggregate(updates, torch.ones(n), ctx(seed))
    permuted = DnC(f=f, b=10, iters=3).aggregate(updates[perm], torch.ones(n), ctx(seed))
    assert torch.allclose(out, permuted, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("attack", ["far", "sign-flipped"])
def test_dnc_output_stays_within_the_benign_coordinate_range_under_huge_colluding_attackers(attack):
    g = torch.Generator().manual_seed(1)
    benign = torch.randn(7, 300, generator=g) + torch.randn(300, generator=g)
    if attack == "far":
        malicious = (1e6 * torch.randn(300, generator=g)).expand(3, -1)
    else:
        malicious = (-1e6 * benign.mean(dim=0)).expand(3, -1) + torch.randn(3, 300, generator=g)
    out = DnC().aggregate(torch.cat([malicious, benign]), torch.ones(10), ctx(f=3))
    lo, hi = benign.min(dim=0).values, benign.max(dim=0).values
    assert bool(((out >= lo - 1e-5) & (out <= hi + 1e-5)).all())


def test_dnc_digits_run_under_poisoning_finishes_above_chance():
    cell = fedbench.make_cell(dataset="digits", attack="poison", defense="dnc", rounds=3, attack_rounds=(2,), local_epochs=5)
    result = fedbench.run_cell(cell)
    assert result.status == "ok"
    assert result.final_accuracy > 0.3  # 10 classes: chance is 0.1
