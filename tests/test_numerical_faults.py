"""Numerical faults: every server stage meets NaN, +inf, -inf and 1e38 updates as its docstring says.

The scenario is one where every built-in rule is valid: digits, 11 clients per round of which 2
are malicious (f = 2; bulyan needs n >= 4f + 3 = 11, krum n >= 2f + 3), 3 rounds, the fault in
round 2. Both malicious rows carry the fault (``rows=all``), so a rule that trims or drops only one
value per side (``ctma`` at beta = 0.1: floor(0.1 * 11) = 1) lets one through.

An outcome is either "finite" (the rule outvotes, trims, filters or bounds the faulty rows: the run
ends ``ok`` after all 3 rounds with finite parameters) or "diverged" (the faulty rows reach the
global model: the cell is recorded ``diverged`` in round 2 and no round 3 is run). Never an
exception out of ``run_cell``.
"""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner

import fedbench
from fedbench.cli import main

FAULTS = ("nan", "inf", "-inf", "huge")
SCENARIO = {"num_malicious": 2, "clients_per_round": 11, "attack_rounds": (2,)}
ROUNDS, FAULT_ROUND = 3, 2
PRE_AGGREGATOR_TARGETS = ("fedavg", "cma")

F, D = "finite", "diverged"
#: rule (or pre-aggregator+aggregator) -> outcome per fault (nan, inf, -inf, huge), from the docstrings
EXPECTED: dict[str, tuple[str, str, str, str]] = {
    # plain weighted mean: any faulty row reaches the model; 1e38 rows make it ~1e37
    "fedavg": (D, D, D, D),
    # order statistics: 2 of 11 values per coordinate at either end never reach the middle
    "cma": (F, F, F, F),
    # trims floor(0.1 * 11) = 1 per side: one of the two faulty values stays in the mean
    "ctma": (D, D, D, D),
    # clipping does not filter (NaN stays, 0 * inf is NaN); a finite 1e38 row is clipped to C
    "cdp": (D, D, D, F),
    # Krum-based: non-finite rows score +inf, far rows score huge: neither is picked
    "krum": (F, F, F, F),
    "multikrum": (F, F, F, F),
    "bulyan": (F, F, F, F),
    # non-finite rows are dropped; a finite 1e38 row stops the relative-objective rule early (docstring)
    "geomed": (F, F, F, D),
    # a non-finite row contributes nothing; a far one moves the centre by at most tau / n
    "cc": (F, F, F, F),
    # non-finite rows have trust 0; a huge row is normalised to ||g0||
    "fltrust": (F, F, F, F),
    # non-finite rows are at cosine distance 2 (never in the majority); norms sort NaN/inf last
    "flame": (F, F, F, F),
    # NaN histories make every weight NaN; two identical 1e38 rows look like sybils: weight 0
    "foolsgold": (D, D, D, F),
    # non-finite rows score +inf and are the floor(c f) = 2 dropped; a huge row projects hugely
    "dnc": (F, F, F, F),
    # pre-aggregators pass faulty rows on (clip bounds only finite ones); fedavg diverges, cma outvotes
    "clip+fedavg": (D, D, D, F),
    "clip+cma": (F, F, F, F),
    "nnm+fedavg": (D, D, D, D),
    "nnm+cma": (F, F, F, F),
    "bucketing+fedavg": (D, D, D, D),
    "bucketing+cma": (F, F, F, F),
}


def _stacks() -> list[str]:
    reg = fedbench.registry()
    return list(reg.names("aggregator")) + [
        f"{pre}+{agg}" for pre in reg.names("preaggregator") for agg in PRE_AGGREGATOR_TARGETS
    ]


def _fault_cell(stack: str, fault: str, rows: str = "all") -> fedbench.CellSpec:
    return fedbench.make_cell(
        dataset="digits", attack=f"nan:value={fault},rows={rows}", defense=stack, rounds=ROUNDS, **SCENARIO
    )


def _assert_outcome(result, expected: str) -> None:
    if expected == F:
        assert result.status == "ok", result.message
        assert [row["round"] for row in result.rounds] == list(range(1, ROUNDS + 1))
        assert all(math.isfinite(row["loss"]) for row in result.rounds)
        assert bool(torch.isfinite(result.final_params).all())
    else:
        assert result.status == "diverged"
        assert result.message == f"non-finite loss or parameters in round {FAULT_ROUND}"
        # the engine stops at the first non-finite global model: no later round is run
        assert [row["round"] for row in result.rounds] == list(range(1, FAULT_ROUND + 1))


def test_the_outcome_table_covers_every_registered_rule_and_pre_aggregator_stack():
    missing = sorted(set(_stacks()) - set(EXPECTED))
    assert not missing, f"add the NaN/inf outcome of {missing} (from their docstrings) to EXPECTED"


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("stack", _stacks())
def test_server_stage_meets_numerical_faults_as_its_docstring_says(stack, fault):
    assert stack in EXPECTED, f"add the NaN/inf outcome of {stack} (from its docstring) to EXPECTED"
    result = fedbench.run_cell(_fault_cell(stack, fault))  # an exception here would crash a matrix cell
    _assert_outcome(result, EXPECTED[stack][FAULTS.index(fault)])


def test_fault_attack_uploads_the_value_in_all_or_exactly_one_malicious_row():
    from fedbench_plugins.faults import NumericalFault

    flat = torch.zeros(6)
    rnd = fedbench.MaliciousRound(
        round=1, global_params=flat, client_ids=(0, 1, 2), client_data=[], train=lambda data: torch.ones(3, 6),
        forward=None, generator=torch.Generator(),
    )
    everything = NumericalFault(value="-inf").malicious_updates(rnd)
    assert everything.shape == (3, 6) and bool((everything == -math.inf).all())
    one = NumericalFault(value="huge", rows="one").malicious_updates(rnd)
    assert bool((one[0] == 1e38).all()) and bool((one[1:] == 1).all())
    assert torch.isnan(NumericalFault().malicious_updates(rnd)).all()  # default: nan in every row
    assert NumericalFault.description().lower().startswith("fault-injection test attack")


def test_ctma_trims_one_faulty_row_but_not_two():
    assert fedbench.run_cell(_fault_cell("ctma", "nan", rows="one")).status == "ok"
    assert fedbench.run_cell(_fault_cell("ctma", "nan", rows="all")).status == "diverged"


def test_matrix_records_diverged_cells_as_results_and_exits_zero(tmp_path):
    from fedbench.store import Store

    store = tmp_path / "runs.db"
    args = ["matrix", "--attacks", "nan", "--defenses", "fedavg,cma", "--rounds", "3", "--attack-rounds", "2",
            "--malicious", "2", "--per-round", "11", "--jobs", "1", "--quiet", "--store", str(store)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    with Store.read(store) as st:
        cells = {(c.attack.split(":")[0], c.defense): c for c in st.cells()}
    assert cells[("nan", "fedavg")].status == "diverged"
    assert cells[("nan", "fedavg")].message == "non-finite loss or parameters in round 2"
    assert cells[("nan", "cma")].status == "ok"
    assert cells[("none", "cma")].status == cells[("none", "fedavg")].status == "ok"


@pytest.mark.parametrize("fault", [math.nan, math.inf, -math.inf])
def test_dnc_drops_non_finite_rows_instead_of_failing_in_its_decomposition(fault):
    from fedbench_plugins.dnc import DnC

    honest = torch.randn(9, 50, generator=torch.Generator().manual_seed(0))
    updates = torch.cat([torch.full((2, 50), fault), honest])
    out = DnC(f=2).aggregate(updates, torch.ones(11), fedbench.ServerContext())  # eigh raised here before
    expected = DnC(f=0).aggregate(honest, torch.ones(9), fedbench.ServerContext())  # the honest mean
    assert torch.allclose(out, expected)
