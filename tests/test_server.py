"""The server stage of a defense stack (fedbench/server.py, components.ServerContext): pre-aggregators
in order, then one aggregator; what the engine tells the server; checks before any cell runs; the
trusted root data; optional ``auto`` parameters; one namespace for the parts of a stack."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import fedbench
from fedbench import engine
from fedbench.components import ServerContext
from fedbench.errors import FedbenchError, SpecError
from fedbench.server import Server


@dataclass(kw_only=True)
class AddRowIndex(fedbench.PreAggregator):
    """Test pre-aggregator: adds (row index + 1) * step to each row, so its order shows in the result."""

    name: ClassVar[str] = "test-addrow"
    step: float = fedbench.param(1.0, "step", check=fedbench.Range())

    def preaggregate(self, updates, weights, ctx):
        return updates + self.step * torch.arange(1, len(updates) + 1, dtype=updates.dtype).unsqueeze(1), weights


@dataclass(kw_only=True)
class PairUp(fedbench.PreAggregator):
    """Test pre-aggregator: means of consecutive pairs (rows no longer belong to one client)."""

    name: ClassVar[str] = "test-pairs"
    keeps_clients: ClassVar[bool] = False

    def output_count(self, n):
        return (n + 1) // 2

    def preaggregate(self, updates, weights, ctx):
        n = len(updates)
        pad = torch.cat([updates, updates[-1:]]) if n % 2 else updates
        pw = torch.cat([weights, weights[-1:]]) if n % 2 else weights
        return pad.view(-1, 2, updates.shape[1]).mean(1), pw.view(-1, 2).sum(1)


@dataclass(kw_only=True)
class Spy(fedbench.Aggregator):
    """Test aggregator: the plain mean; records every context it gets and keeps a round counter."""

    name: ClassVar[str] = "test-spy"
    seen: ClassVar[list] = []
    f: int | None = fedbench.param(None, "Byzantine clients assumed (auto: the scenario's)", check=fedbench.Range(lo=0))

    def __post_init__(self):
        super().__post_init__()
        self.calls = 0  # per-cell state

    def check(self, n, f):
        f = self.f if self.f is not None else f
        self.require(n, f, 2 * f + 1, "n >= 2f+1")

    def aggregate(self, updates, weights, ctx):
        self.calls += 1
        root = ctx.root_update() if ctx.root_update is not None else None
        Spy.seen.append({"n": len(updates), "ids": ctx.client_ids, "round": ctx.round, "f": ctx.byzantine(self.f),
                         "calls": self.calls, "root": root,
                         "global": None if ctx.global_params is None else ctx.global_params.clone()})
        return updates.mean(0)


@dataclass(kw_only=True)
class RootAsker(Spy):
    """Test aggregator: asks the server for trusted root data."""

    name: ClassVar[str] = "test-root"
    root: int = fedbench.param(50, "root samples", check=fedbench.AT_LEAST_ONE)

    def root_samples(self):
        return self.root


class ServerPlugin:
    @fedbench.hookimpl
    def register_preaggregators(self, register):
        register(AddRowIndex)
        register(PairUp)

    @fedbench.hookimpl
    def register_aggregators(self, register):
        register(Spy)
        register(RootAsker)


@pytest.fixture
def server_plugin(use_plugin):
    Spy.seen.clear()
    return use_plugin(ServerPlugin(), "server-test")


def small_cell(defense: str, **kw):
    kw = {"dataset": "digits", "rounds": 3, "attack": "poison", "attack_rounds": (2,), "num_malicious": 2, **kw}
    return fedbench.make_cell(defense=defense, **kw)


# --------------------------------------------------------------------------------------------------
# The grammar
# --------------------------------------------------------------------------------------------------
def test_preaggregators_keep_their_written_order_and_run_before_the_aggregator(server_plugin):
    stack = fedbench.parse_defense("test-addrow:step=1+test-pairs+test-spy+wbc")
    assert [p.name for p in stack.preaggregators] == ["test-addrow", "test-pairs"]
    assert stack.aggregator.name == "test-spy" and [c.name for c in stack.client] == ["wbc"]
    assert str(stack) == "test-addrow+test-pairs+test-spy+wbc"
    swapped = fedbench.parse_defense("test-pairs+test-addrow+test-spy")
    updates = torch.zeros(4, 1)
    ctx = ServerContext(client_ids=(0, 1, 2, 3))
    # add row index then pair: rows 1,2,3,4 -> pairs 1.5, 3.5 -> mean 2.5; pair then add: 0,0 -> 1,2 -> 1.5
    assert Server.build(stack)(updates, torch.ones(4), ctx).item() == 2.5
    assert Server.build(swapped)(updates, torch.ones(4), ctx).item() == 1.5


def test_a_stack_of_only_a_preaggregator_implies_fedavg_and_prints_without_it(server_plugin):
    stack = fedbench.parse_defense("test-addrow")
    assert stack.aggregator.name == "fedavg" and str(stack) == "test-addrow"


def test_stacks_without_preaggregators_serialise_as_before_so_their_hashes_stay():
    assert "preaggregators" not in fedbench.parse_defense("cma+wbc").to_dict()
    cell = small_cell("cma+wbc")
    assert fedbench.CellSpec.from_dict(cell.to_dict()) == cell


def test_a_stack_with_preaggregators_round_trips_through_its_dict(server_plugin):
    cell = small_cell("test-addrow:step=2+test-spy")
    again = fedbench.CellSpec.from_dict(cell.to_dict())
    assert again == cell and again.hash() == cell.hash()
    assert again.hash() != small_cell("test-addrow:step=3+test-spy").hash()


def test_optional_parameters_default_to_auto_and_take_numbers(server_plugin):
    auto = fedbench.parse_defense("test-spy").aggregator
    assert dict(auto.params) == {"f": None} and auto.canonical() == "test-spy:f=auto"
    assert fedbench.parse_defense("test-spy:f=auto") == fedbench.parse_defense("test-spy")
    assert dict(fedbench.parse_defense("test-spy:f=1").aggregator.params) == {"f": 1}
    with pytest.raises(SpecError, match=r"parameter 'f' got '-1'; allowed: an integer >= 0, or auto"):
        fedbench.parse_defense("test-spy:f=-1")


# --------------------------------------------------------------------------------------------------
# Checks before any cell runs
# --------------------------------------------------------------------------------------------------
def test_a_rule_beyond_its_breakdown_point_is_refused_when_the_cell_is_made(server_plugin):
    with pytest.raises(SpecError, match=r"test-spy: needs n >= 2f\+1 .* got n=10, f=5; .*--per-round.*--malicious.*test-spy:f="):
        small_cell("test-spy", num_malicious=5)
    assert small_cell("test-spy:f=4", num_malicious=5).defense.aggregator.name == "test-spy"


def test_the_check_sees_the_row_count_after_the_preaggregators(server_plugin):
    small_cell("test-spy", num_malicious=2)  # n = 10 >= 5
    with pytest.raises(SpecError, match=r"got n=5, f=3"):
        small_cell("test-pairs+test-spy", num_malicious=3)  # 10 rows -> 5 pairs < 7


def test_the_matrix_refuses_an_impossible_cell_before_any_runs(server_plugin, tmp_path):
    from click.testing import CliRunner

    from fedbench.cli import main

    store = tmp_path / "r.db"
    result = CliRunner().invoke(main, ["matrix", "--attacks", "poison", "--defenses", "cma,test-spy",
                                       "--rounds", "3", "--store", str(store)])
    assert result.exit_code == 2, result.output
    assert "test-spy: needs n >= 2f+1" in result.output and "got n=10, f=5" in result.output
    assert not store.exists()


# --------------------------------------------------------------------------------------------------
# What the engine tells the server
# --------------------------------------------------------------------------------------------------
def test_the_server_gets_client_ids_round_global_model_and_f(server_plugin):
    result = fedbench.run_cell(small_cell("test-spy"))
    assert result.status == "ok" and [s["round"] for s in Spy.seen] == [1, 2, 3]
    assert [s["calls"] for s in Spy.seen] == [1, 2, 3]  # one object for the whole cell
    assert all(s["f"] == 2 and s["n"] == 10 and len(set(s["ids"])) == 10 for s in Spy.seen)
    assert Spy.seen[1]["ids"][:2] == (0, 1)  # round 2 is adversarial: malicious clients 0 and 1 first
    assert not set(Spy.seen[0]["ids"]) & {0, 1}
    assert not torch.equal(Spy.seen[0]["global"], Spy.seen[1]["global"])
    assert all(s["root"] is None for s in Spy.seen)


def test_client_ids_are_withheld_after_a_preaggregator_that_mixes_rows(server_plugin):
    fedbench.run_cell(small_cell("test-addrow+test-spy", rounds=1, attack_rounds=(1,)))
    fedbench.run_cell(small_cell("test-pairs+test-spy", rounds=1, attack_rounds=(1,)))
    assert Spy.seen[0]["ids"] is not None and Spy.seen[1]["ids"] is None and Spy.seen[1]["n"] == 5


def test_two_cells_never_share_a_server_object(server_plugin):
    fedbench.run_cell(small_cell("test-spy", rounds=2))
    fedbench.run_cell(small_cell("test-spy", rounds=2))
    assert [s["calls"] for s in Spy.seen] == [1, 2, 1, 2]


def test_root_data_is_held_out_from_every_client_and_trains_the_global_model(server_plugin, monkeypatch):
    splits = []
    real_take = engine.take_fraction
    monkeypatch.setattr(engine, "take_fraction", lambda parts, frac: splits.append(parts) or real_take(parts, frac))
    cell = small_cell("test-root:root=50")
    result = fedbench.run_cell(cell)
    root = engine.root_indices(50, 1497, cell.seed)
    assert result.status == "ok" and len(root) == 50 and len(set(root.tolist())) == 50
    assert all(not torch.isin(part, root).any() for part in splits[0])
    assert sum(len(p) for p in splits[0]) == 1497 - 50
    assert all(s["root"] is not None and s["root"].shape == s["global"].shape for s in Spy.seen)
    assert float(Spy.seen[0]["root"].norm()) > 0

    fedbench.run_cell(small_cell("test-spy"))  # no root asked: every training sample goes to a client
    assert sum(len(p) for p in splits[1]) == 1497


def test_asking_for_more_root_data_than_there_is_is_a_clear_error(server_plugin):
    with pytest.raises(FedbenchError, match="asks for 5000 root samples, but the training set has only 1497"):
        fedbench.run_cell(small_cell("test-root:root=5000"))


# --------------------------------------------------------------------------------------------------
# fedbench list
# --------------------------------------------------------------------------------------------------
def test_descriptions_lose_rest_backticks():
    @dataclass(kw_only=True)
    class Quoted(fedbench.Aggregator):
        """Keeps ``x`` and ``y_z`` readable."""

        name: ClassVar[str] = "quoted"

    assert Quoted.description() == "Keeps x and y_z readable."


def test_fedbench_plugins_names_the_left_out_plugin_of_an_unknown_name(monkeypatch):
    monkeypatch.setenv("FEDBENCH_PLUGINS", "poison")
    fedbench.plugins.reset()
    with pytest.raises(SpecError) as err:
        fedbench.make_cell(attack="poison")  # the default defense, fedavg, is a plugin left out
    assert "'fedavg' is registered by plugin 'fedavg', which FEDBENCH_PLUGINS=poison leaves out" in str(err.value)
    with pytest.raises(SpecError, match=r"FEDBENCH_PLUGINS=poison loads only those plugins and the core"):
        fedbench.parse_component("attack", "nope")


@dataclass(kw_only=True)
class OracleProbe(fedbench.Attack):
    """Test attack: honest updates, after asking the server oracle what they would aggregate to."""

    name: ClassVar[str] = "test-oracle"
    omniscient: ClassVar[bool] = True
    answers: ClassVar[list] = []

    def malicious_updates(self, rnd):
        honest = rnd.train(rnd.client_data)
        OracleProbe.answers.append((rnd.round, rnd.aggregate(torch.cat([honest, rnd.benign_updates]))))
        return honest


def test_the_server_oracle_answers_what_the_real_aggregation_then_does_without_touching_its_state(use_plugin):
    class Plugin(ServerPlugin):
        @fedbench.hookimpl
        def register_attacks(self, register):
            register(OracleProbe)

    Spy.seen.clear()
    OracleProbe.answers.clear()
    use_plugin(Plugin(), "oracle-test")
    result = fedbench.run_cell(small_cell("test-spy", attack="test-oracle"))
    assert result.status == "ok"
    (rnd, answer), = OracleProbe.answers
    real = [s for s in Spy.seen if s["global"] is not None]
    # the oracle's copy ran once in round 2 (its own counter: 2), the real rule kept counting 1, 2, 3
    assert [s["calls"] for s in real] == [1, 2, 2, 3] and [s["round"] for s in real] == [1, 2, 2, 3]
    delta = real[3]["global"] - real[2]["global"]
    assert rnd == 2 and torch.allclose(answer, delta, atol=1e-6)


def test_the_server_oracle_wants_every_update_of_the_round():
    weights = torch.ones(3)
    oracle = engine._server_oracle(Server.build(fedbench.parse_defense("cma")), weights, ServerContext(), 0, 1)
    assert torch.equal(oracle(torch.tensor([[1.0], [2.0], [9.0]])), torch.tensor([2.0]))
    with pytest.raises(FedbenchError, match="takes all 3 updates of the round"):
        oracle(torch.zeros(2, 1))


def test_a_stage_returning_the_wrong_shape_is_an_error_naming_it():
    @dataclass(kw_only=True)
    class Scalar(fedbench.Aggregator):
        """Returns one number instead of a vector."""

        name: ClassVar[str] = "test-scalar"

        def aggregate(self, updates, weights, ctx):
            return updates.sum()

    @dataclass(kw_only=True)
    class Drop(fedbench.PreAggregator):
        """Drops a row without saying so in output_count."""

        name: ClassVar[str] = "test-drop"

        def preaggregate(self, updates, weights, ctx):
            return updates[1:], weights[1:]

    u, w = torch.ones(3, 4), torch.ones(3)
    with pytest.raises(FedbenchError, match=r"aggregator 'test-scalar' returned shape \(\); expected \(4,\)"):
        Server([], Scalar())(u, w, ServerContext())
    with pytest.raises(FedbenchError, match=r"pre-aggregator 'test-drop' returned updates \(2, 4\) .* expected \(3, 4\)"):
        Server([Drop()], Scalar())(u, w, ServerContext())


def test_a_stage_is_checked_with_its_own_f_when_it_sets_one(server_plugin):
    seen = []

    class Recording(Spy):
        def check(self, n, f):
            seen.append(f)

    Server([], Recording(f=1)).check(10, 5)
    Server([], Recording()).check(10, 5)
    assert seen == [1, 5]


def test_python_dash_m_fedbench_runs_the_command():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "fedbench", "list", "aggregators"], capture_output=True, text=True)
    assert out.returncode == 0 and "fedavg" in out.stdout and "Usage" not in out.stderr
