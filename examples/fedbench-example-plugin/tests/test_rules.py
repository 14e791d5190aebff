"""How a third party tests a fedbench plugin: hand-computed cases, the checks, one short real run.

The rules are plain objects: build one with its parameters and call it with a stack of updates
``[n, P]``, weights ``[n]`` and a ``fedbench.ServerContext()`` (every field has a default; set
``num_byzantine`` to play the scenario's f). No registry, no training, no data needed.
"""

from __future__ import annotations

from importlib import metadata

import pytest
import torch

import fedbench
import fedbench.plugins
from fedbench_example_plugin import AdaptiveRobustClipping, MeanAroundMedian, arc_clipped_count

ONES = torch.ones(5)


# --------------------------------------------------------------------------------------------------
# example-meamed
# --------------------------------------------------------------------------------------------------
def test_meamed_averages_the_n_minus_f_values_nearest_the_median_per_coordinate():
    updates = torch.tensor([[0.0, 10.0], [2.0, -10.0], [3.0, 1.0], [7.0, 2.0], [100.0, 4.0]])
    # column 0: median 3, distances 3 1 0 4 97 -> keep 3, 2, 0 -> 5/3
    # column 1: median 2, distances 8 12 1 0 2 -> keep 2, 1, 4 -> 7/3
    result = MeanAroundMedian(f=2).aggregate(updates, ONES, fedbench.ServerContext())
    torch.testing.assert_close(result, torch.tensor([5 / 3, 7 / 3]))


def test_meamed_takes_f_from_the_scenario_when_auto():
    updates = torch.tensor([[0.0], [2.0], [3.0], [7.0], [100.0]])
    auto = MeanAroundMedian().aggregate(updates, ONES, fedbench.ServerContext(num_byzantine=2))
    torch.testing.assert_close(auto, torch.tensor([5 / 3]))


def test_meamed_uses_the_statistical_median_for_even_n():
    updates = torch.tensor([[1.0], [2.0], [4.0], [10.0]])  # median 3: distances 2 1 1 7 -> keep 1, 2, 4
    result = MeanAroundMedian(f=1).aggregate(updates, torch.ones(4), fedbench.ServerContext())
    torch.testing.assert_close(result, torch.tensor([7 / 3]))


def test_meamed_with_f_zero_is_the_unweighted_mean():
    updates = torch.tensor([[1.0, -1.0], [2.0, 5.0], [6.0, 2.0]])
    weights = torch.tensor([1.0, 1.0, 100.0])
    result = MeanAroundMedian(f=0).aggregate(updates, weights, fedbench.ServerContext())
    torch.testing.assert_close(result, updates.mean(0))


def test_meamed_does_not_depend_on_the_client_order():
    updates = torch.randn(9, 50, generator=torch.Generator().manual_seed(1))
    rule, ctx = MeanAroundMedian(f=3), fedbench.ServerContext()
    shuffled = updates[torch.randperm(9, generator=torch.Generator().manual_seed(2))]
    assert torch.equal(rule.aggregate(updates, torch.ones(9), ctx), rule.aggregate(shuffled, torch.ones(9), ctx))


def test_meamed_ignores_a_minority_of_nan_updates():
    updates = torch.tensor([[1.0], [2.0], [3.0], [float("nan")], [float("nan")]])
    result = MeanAroundMedian(f=2).aggregate(updates, ONES, fedbench.ServerContext())
    torch.testing.assert_close(result, torch.tensor([2.0]))


def test_meamed_refuses_f_that_leaves_no_value():
    with pytest.raises(fedbench.SpecError, match=r"example-meamed: needs n >= f\+1 .* got n=3, f=3"):
        MeanAroundMedian().check(n=3, f=3)
    MeanAroundMedian(f=2).check(n=3, f=3)  # its own f wins over the scenario's


# --------------------------------------------------------------------------------------------------
# example-arc
# --------------------------------------------------------------------------------------------------
# norms 1, 2, 3, 4, 50
ARC_UPDATES = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, -4.0], [30.0, 40.0]])


def test_arc_clips_floor_2f_n_minus_f_over_n_updates():
    assert [arc_clipped_count(10, f) for f in range(6)] == [0, 1, 3, 4, 4, 5]
    assert arc_clipped_count(5, 1) == 1 and arc_clipped_count(5, 2) == 2


def test_arc_with_f_one_clips_the_largest_update_to_the_second_largest_norm():
    clipped, weights = AdaptiveRobustClipping(f=1).preaggregate(ARC_UPDATES, ONES, fedbench.ServerContext())
    expected = ARC_UPDATES.clone()
    expected[4] = torch.tensor([2.4, 3.2])  # direction (0.6, 0.8), norm 4
    torch.testing.assert_close(clipped, expected)
    assert torch.equal(weights, ONES)


def test_arc_with_f_two_clips_the_two_largest_to_the_third_largest_norm():
    ctx = fedbench.ServerContext(num_byzantine=2)  # f = auto takes the scenario's 2
    clipped, _ = AdaptiveRobustClipping().preaggregate(ARC_UPDATES, ONES, ctx)
    expected = ARC_UPDATES.clone()
    expected[3] = torch.tensor([0.0, -3.0])
    expected[4] = torch.tensor([1.8, 2.4])
    torch.testing.assert_close(clipped, expected)


def test_arc_with_f_zero_changes_nothing():
    clipped, _ = AdaptiveRobustClipping(f=0).preaggregate(ARC_UPDATES, ONES, fedbench.ServerContext())
    assert torch.equal(clipped, ARC_UPDATES)


def test_arc_refuses_more_than_half_byzantine():
    with pytest.raises(fedbench.SpecError, match=r"example-arc: needs n >= 2f .* got n=10, f=6"):
        AdaptiveRobustClipping().check(n=10, f=6)
    AdaptiveRobustClipping().check(n=10, f=5)


# --------------------------------------------------------------------------------------------------
# In fedbench: registration, spec parsing, a short run
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def only_this_plugin(monkeypatch):
    """Load only the ``poison`` entry point, and this module registered directly (so the test runs the
    code in this checkout whether or not the package is installed)."""
    import fedbench_example_plugin

    monkeypatch.setenv("FEDBENCH_PLUGINS", "poison")
    fedbench.register_plugin(fedbench_example_plugin, name="example-under-test")
    yield
    fedbench.unregister_plugin("example-under-test")  # also resets the registry


def test_the_stack_runs_a_short_poisoned_cell_on_digits(only_this_plugin):
    cell = fedbench.make_cell(dataset="digits", attack="poison", defense="example-arc+example-meamed:f=3",
                              rounds=2, attack_rounds=(1,))
    assert str(cell.defense) == "example-arc+example-meamed:f=3"
    result = fedbench.run_cell(cell)
    assert result.status == "ok" and [r["adversarial"] for r in result.rounds] == [True, False]
    assert 0.0 <= result.final_accuracy <= 1.0


def test_a_cell_beyond_the_breakdown_point_is_refused_before_it_runs(only_this_plugin):
    with pytest.raises(fedbench.SpecError, match="example-meamed: needs n >= f"):
        fedbench.make_cell(dataset="digits", defense="example-meamed:f=10")  # 10 clients per round


def test_the_installed_package_registers_both_rules_through_its_entry_point():
    try:
        dist = metadata.distribution("fedbench-example-plugin")
    except metadata.PackageNotFoundError:
        pytest.skip("fedbench-example-plugin is not installed (pip install it to run this test)")
    fedbench.plugins.reset()
    reg = fedbench.registry()
    origin = f"example (fedbench-example-plugin {dist.version})"
    assert reg.entries("preaggregator")["example-arc"].origin == origin
    assert reg.entries("aggregator")["example-meamed"].origin == origin
