"""Presets: the FL-WBC paper's experiments as grid files shipped with the package.

A preset is a TOML file in ``fedbench/presets/`` (package data, found through
:mod:`importlib.resources`, so it works from a wheel as from a checkout). It holds one or more
``[[grid]]`` tables, each a matrix grid in the keys of ``fedbench matrix --config`` (``attacks``,
``defenses``, ``partition``, ``malicious``, ``attack-rounds`` ...). Several grids are how a preset
sweeps what the matrix has no axis for, such as figure 2's 1..5 malicious clients of 10. Top-level
keys say what the experiment is and how long it runs::

    name = "fig3"                        # = the file name
    title = "..."                        # one line
    claim = "..."                        # the paper's claim it tests (reference section 7)
    notes = "..."                        # design choices (optional)
    protocols = ["paper", "reference-code"]   # each its own setting (own leaderboard)
    datasets = ["fmnist", "cifar10"]     # the datasets it may run on; the first is the default
    rounds = 100                         # the full run
    seeds = [0, 1, 2]
    attack-prob = 0.1                    # scenario keys here apply to every grid (a grid's own win)

    [quick]                              # --quick: fewer rounds and seeds, fixed attack rounds
    rounds = 3
    seeds = [0]
    protocols = ["paper"]
    attack-rounds = [2]

    [[grid]]
    attacks = ["poison"]
    defenses = ["wbc:s=0.4", "cma"]
    partition = ["iid", "shards"]
    dataset = "cifar10"                  # optional: this grid only when running on that dataset

:meth:`Preset.cells` expands a preset into :class:`~fedbench.matrix.MatrixCell` s through
:func:`fedbench.matrix.expand` -- for every protocol and grid, with the reference cells (attack
``none``, defense ``fedavg``) the matrix always adds -- ready for :func:`fedbench.matrix.run_matrix`.
:meth:`Preset.estimate` prices them from :data:`ROUND_SECONDS`, seconds per round measured on the
machines named there.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from fedbench.errors import FedbenchError
from fedbench.matrix import MatrixCell, expand, parse_seeds, split_list

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

#: The folder of preset files inside the package.
PRESET_DIR = "presets"

#: Grid keys that are scenario options, in ``fedbench matrix`` spelling -> :func:`fedbench.make_cell` keyword.
SCENARIO_KEYS: dict[str, str] = {
    "model": "model",
    "clients": "num_clients",
    "malicious": "num_malicious",
    "per-round": "clients_per_round",
    "attack-prob": "attack_prob",
    "attack-rounds": "attack_rounds",
    "epochs": "local_epochs",
    "batch-size": "batch_size",
    "lr": "lr",
    "momentum": "momentum",
    "data-frac": "client_data_frac",
    "eval": "eval",
}
_GRID_KEYS = {"attacks", "defenses", "partition", "dataset", "label", *SCENARIO_KEYS}
_QUICK_KEYS = {"rounds", "seeds", "protocols", *SCENARIO_KEYS}
_TOP_KEYS = {"name", "title", "claim", "notes", "protocols", "datasets", "rounds", "seeds", "quick", "grid",
             *SCENARIO_KEYS}


# --------------------------------------------------------------------------------------------------
# Measured cost
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RoundCost:
    """Seconds one cell spends per round (a range where the figure is one), and where it comes from."""

    low: float
    high: float
    source: str


#: Seconds per round of one cell, by (device, dataset, protocol); low..high is a range.
#: CPU: measured 2026-11-29 for this table on 2 AMD EPYC cores (torch 2.14, 2 threads, stacked trainer)
#: shared with other work: 3-round Fashion-MNIST runs of poison (attack in round 2) against fedavg,
#: wbc:s=0.4 and cma, after a warm-up run; the last round evaluates the whole test set. Low is the idle
#: machine (load 1.5: paper 0.62 fedavg, 0.79 wbc; reference-code 4.3 wbc), high the machine under
#: the others' load (load 3-4: paper 1.3-2.9; reference-code 6.3-15). At load 5-7 a round took up to
#: 2.5x the high figure (paper 5-7 s, reference-code 38 s). A fig6 --quick run (12 cells x 3 rounds,
#: one worker) took 219 s at load 4-7. CUDA: the README's figures (H200, stacked trainer, 10 clients a
#: round). CIFAR-10, reference-code, CPU: 20-round cells of the figure-3 grid (fedavg, wbc:s=0.4, cma;
#: poison and clean) in two single-threaded workers at load 2-3, 68-130 s a cell (wbc the dearer).
#: A combination missing here is "not measured" (CIFAR-10 under the paper protocol, CIFAR-10 on a GPU).
_MEASURED_CPU = "measured 2026-11-29, 2 shared AMD EPYC cores, torch 2.14"
ROUND_SECONDS: dict[tuple[str, str, str], RoundCost] = {
    ("cpu", "fmnist", "paper"): RoundCost(0.6, 2.9, _MEASURED_CPU),
    ("cpu", "fmnist", "reference-code"): RoundCost(4.3, 15.0, _MEASURED_CPU),
    ("cpu", "cifar10", "reference-code"): RoundCost(3.4, 6.5, _MEASURED_CPU),
    ("cuda", "fmnist", "paper"): RoundCost(0.040, 0.040, "README: H200, stacked trainer"),
    ("cuda", "fmnist", "reference-code"): RoundCost(1.5, 3.1, "README: H200"),
}


@dataclass(frozen=True)
class Estimate:
    """What running a preset costs: its cells, their rounds, and seconds from :data:`ROUND_SECONDS`
    (``None`` when a protocol of it has no figure for that device and dataset)."""

    cells: int
    rounds: int  # summed over the cells
    low: float | None
    high: float | None
    device: str
    sources: tuple[str, ...] = ()

    def __str__(self) -> str:
        if self.low is None or self.high is None:
            return f"{self.cells} cells, {self.rounds} rounds, {self.device}: not measured"
        span = _span(self.low, self.high)
        return f"{self.cells} cells, {self.rounds} rounds, {self.device}: about {span} on one worker"


def _span(low: float, high: float) -> str:
    """``"3-6 h"``, ``"8 min"``: both ends in the unit that suits the larger."""
    unit, size = ("s", 1) if high < 90 else ("min", 60) if high < 5400 else ("h", 3600)
    digits = 1 if unit != "s" and high / size < 10 else 0
    lo, hi = f"{low / size:.{digits}f}", f"{high / size:.{digits}f}"
    return f"{hi} {unit}" if lo == hi else f"{lo}-{hi} {unit}"


# --------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grid:
    """One ``[[grid]]`` table: a matrix grid (attacks x defenses x partitions) and its scenario."""

    attacks: tuple[str, ...]
    defenses: tuple[str, ...]
    partitions: tuple[str, ...] = ("iid",)
    scenario: Mapping[str, Any] = field(default_factory=dict)  # make_cell keywords
    dataset: str | None = None  # only on this dataset; None: on any of the preset's
    label: str = ""


@dataclass(frozen=True)
class Preset:
    """One experiment of the paper as a grid file. Build with :func:`load`."""

    name: str
    title: str
    claim: str
    protocols: tuple[str, ...]
    datasets: tuple[str, ...]
    rounds: int
    seeds: tuple[int, ...]
    grids: tuple[Grid, ...]
    quick_rounds: int
    quick_seeds: tuple[int, ...]
    quick_protocols: tuple[str, ...]
    quick_scenario: Mapping[str, Any] = field(default_factory=dict)
    notes: str = ""

    def cells(
        self,
        *,
        quick: bool = False,
        rounds: int | None = None,
        seeds: str | int | Sequence[int] | None = None,
        dataset: str | None = None,
        protocols: str | Sequence[str] | None = None,
    ) -> list[MatrixCell]:
        """Every cell of the preset, each validated: for each protocol and grid, what
        :func:`fedbench.matrix.expand` makes of it (reference cells included). A cell two grids
        share appears once.

        ``quick`` takes the ``[quick]`` rounds, seeds, protocols and fixed attack rounds; ``rounds``,
        ``seeds`` (``"0-4"``, ``[0, 1]``), ``dataset`` (one of :attr:`datasets`; default the first) and
        ``protocols`` override either."""
        dataset = self._dataset(dataset)
        protos = self._protocols(protocols, quick)
        n_rounds = rounds if rounds is not None else (self.quick_rounds if quick else self.rounds)
        seed_list = parse_seeds(seeds) if seeds is not None else list(self.quick_seeds if quick else self.seeds)
        extra = dict(self.quick_scenario) if quick else {}
        out: dict[str, MatrixCell] = {}
        for protocol in protos:
            for grid in self._grids(dataset):
                kwargs = {**grid.scenario, **extra}
                for mc in expand(attacks=grid.attacks, defenses=grid.defenses, seeds=seed_list, datasets=[dataset],
                                 partitions=grid.partitions, protocol=protocol, rounds=n_rounds, **kwargs):
                    out.setdefault(mc.key, mc)
        return list(out.values())

    def estimate(self, *, device: str = "cpu", cells: Sequence[MatrixCell] | None = None, **options: Any) -> Estimate:
        """The cost of :meth:`cells` (same options; or of ``cells`` already expanded) on one worker:
        cells x rounds x seconds per round, from :data:`ROUND_SECONDS`."""
        cells = self.cells(**options) if cells is None else cells
        device = "cuda" if device.startswith("cuda") else device
        low = high = 0.0
        sources: list[str] = []
        for mc in cells:
            cost = ROUND_SECONDS.get((device, mc.cell.dataset.name, mc.cell.protocol))
            if cost is None:
                low = high = None
                break
            low += cost.low * mc.cell.rounds
            high += cost.high * mc.cell.rounds
            if cost.source not in sources:
                sources.append(cost.source)
        return Estimate(len(cells), sum(mc.cell.rounds for mc in cells), low, high, device, tuple(sources))

    def summary(self) -> str:
        """One line for a listing: name, title, and the cost of the full and the quick run."""
        parts = []
        for quick in (False, True):
            cells = self.cells(quick=quick)
            cpu, gpu = (self.estimate(device=d, cells=cells) for d in ("cpu", "cuda"))
            costs = [f"{e.device} {_span(e.low, e.high)}" if e.low is not None else f"{e.device} not measured"
                     for e in (cpu, gpu)]
            parts.append(f"{'quick' if quick else 'full'} {cpu.cells} cells x {cells[0].cell.rounds} rounds "
                         f"({', '.join(costs)})")
        return f"{self.name:<7} {self.title}\n        {'; '.join(parts)}"

    def describe(self) -> str:
        """The preset in words: claim, grids, protocols, rounds and seeds, quick variant, cost."""
        lines = [f"{self.name}: {self.title}", f"  claim: {self.claim}"]
        if self.notes:
            lines.append(f"  notes: {self.notes}")
        lines.append(f"  protocols: {', '.join(self.protocols)} (each its own setting)")
        lines.append(f"  datasets: {self.datasets[0]} (default)"
                     + (f"; also {', '.join(self.datasets[1:])}" if len(self.datasets) > 1 else ""))
        for i, grid in enumerate(self.grids, 1):
            scen = ", ".join(f"{k}={_show(v)}" for k, v in grid.scenario.items())
            label = f" ({grid.label})" if grid.label else ""
            lines.append(f"  grid {i}{label}: attacks {', '.join(grid.attacks)}; "
                         f"defenses {', '.join(grid.defenses)}; partitions {', '.join(grid.partitions)}"
                         + (f"; {scen}" if scen else "") + (f"; only on {grid.dataset}" if grid.dataset else ""))
        lines.append(f"  full: {self.rounds} rounds, seeds {_show(list(self.seeds))}, attacks from round 1 "
                     f"with probability {self._attack_prob():g}")
        quick = ", ".join(f"{k}={_show(v)}" for k, v in self.quick_scenario.items())
        lines.append(f"  quick: {self.quick_rounds} rounds, seeds {_show(list(self.quick_seeds))}, protocols "
                     f"{', '.join(self.quick_protocols)}" + (f", {quick}" if quick else ""))
        for quick_flag in (False, True):
            cells = self.cells(quick=quick_flag)
            for device in ("cpu", "cuda"):
                lines.append(f"  cost ({'quick' if quick_flag else 'full'}, {device}): "
                             f"{self.estimate(device=device, cells=cells)}")
        return "\n".join(lines)

    # -- helpers -------------------------------------------------------------------------------------
    def _dataset(self, dataset: str | None) -> str:
        if dataset is None:
            return self.datasets[0]
        if dataset not in self.datasets:
            raise FedbenchError(f"preset {self.name} runs on {', '.join(self.datasets)} (the paper's datasets "
                                f"for it), not {dataset!r}")
        return dataset

    def _protocols(self, protocols: str | Sequence[str] | None, quick: bool) -> list[str]:
        if protocols is None:
            return list(self.quick_protocols if quick else self.protocols)
        chosen = split_list(protocols)
        unknown = [p for p in chosen if p not in self.protocols]
        if unknown or not chosen:
            raise FedbenchError(f"preset {self.name}: unknown protocol {unknown[0] if unknown else '(none)'!r}; "
                                f"its protocols: {', '.join(self.protocols)}")
        return chosen

    def _grids(self, dataset: str) -> list[Grid]:
        grids = [g for g in self.grids if g.dataset in (None, dataset)]
        if not grids:
            raise FedbenchError(f"preset {self.name} has no grid for dataset {dataset!r}")
        return grids

    def _attack_prob(self) -> float:
        probs = {g.scenario.get("attack_prob", 0.1) for g in self.grids}
        return probs.pop() if len(probs) == 1 else float("nan")


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------
def preset_files() -> dict[str, Traversable]:
    """The preset files shipped with the package, by name (file stem), in name order."""
    folder = importlib.resources.files("fedbench") / PRESET_DIR
    found = {entry.name[: -len(".toml")]: entry for entry in folder.iterdir()
             if entry.is_file() and entry.name.endswith(".toml")}
    return dict(sorted(found.items()))


def names() -> list[str]:
    """The names of the shipped presets."""
    return list(preset_files())


def list_presets() -> list[Preset]:
    """Every shipped preset, in name order."""
    return [load(name) for name in names()]


def load(name: str) -> Preset:
    """The preset called ``name``; an unknown name raises a :class:`FedbenchError` listing the known ones."""
    files = preset_files()
    if name not in files:
        raise FedbenchError(f"unknown preset {name!r}; known presets: {', '.join(files) or '(none)'}")
    return parse(files[name].read_text(encoding="utf-8"), name=name)


def parse(text: str, *, name: str) -> Preset:
    """A preset from the text of its file (``name`` is what the file is called, for messages)."""
    try:
        return _parse(text, name)
    except (TypeError, ValueError, AttributeError) as error:  # a value of the wrong type in the file
        raise FedbenchError(f"preset {name}: a value has the wrong type: {error}") from None


def _parse(text: str, name: str) -> Preset:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    where = f"preset {name}"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise FedbenchError(f"{where}: not valid TOML: {error}") from None
    _check_keys(data, _TOP_KEYS, where)
    if data.get("name", name) != name:
        raise FedbenchError(f"{where}: its name key says {data['name']!r}; a preset's name is its file name")
    for key in ("title", "claim", "protocols", "datasets", "rounds", "seeds", "quick", "grid"):
        if key not in data:
            raise FedbenchError(f"{where}: missing key {key!r}")
    shared = _scenario(data, where)
    grids = []
    for i, table in enumerate(data["grid"], 1):
        at = f"{where}, grid {i}"
        _check_keys(table, _GRID_KEYS, at)
        for key in ("attacks", "defenses"):
            if key not in table:
                raise FedbenchError(f"{at}: missing key {key!r}")
        dataset = table.get("dataset")
        if dataset is not None and dataset not in data["datasets"]:
            raise FedbenchError(f"{at}: dataset {dataset!r} is not one of the preset's datasets {data['datasets']}")
        grids.append(Grid(
            attacks=tuple(split_list(table["attacks"])),
            defenses=tuple(split_list(table["defenses"])),
            partitions=tuple(split_list(table.get("partition", "iid"))),
            scenario={**shared, **_scenario(table, at)},
            dataset=dataset,
            label=str(table.get("label", "")),
        ))
    quick = data["quick"]
    _check_keys(quick, _QUICK_KEYS, f"{where}, [quick]")
    protocols = tuple(split_list(data["protocols"]))
    preset = Preset(
        name=name,
        title=str(data["title"]).strip(),
        claim=" ".join(str(data["claim"]).split()),
        notes=" ".join(str(data.get("notes", "")).split()),
        protocols=protocols,
        datasets=tuple(split_list(data["datasets"])),
        rounds=int(data["rounds"]),
        seeds=tuple(parse_seeds(data["seeds"])),
        grids=tuple(grids),
        quick_rounds=int(quick.get("rounds", data["rounds"])),
        quick_seeds=tuple(parse_seeds(quick.get("seeds", data["seeds"]))),
        quick_protocols=tuple(split_list(quick.get("protocols", protocols))),
        quick_scenario=_scenario(quick, f"{where}, [quick]"),
    )
    preset._protocols(list(preset.quick_protocols), quick=True)  # [quick] protocols must be the preset's
    return preset


def _check_keys(table: Mapping[str, Any], known: Iterable[str], where: str) -> None:
    known = set(known)
    for key in table:
        if key.replace("_", "-") not in known:
            raise FedbenchError(f"{where}: unknown key {key!r}; known keys: {', '.join(sorted(known))}")


def _scenario(table: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The make_cell keywords among a table's keys."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        target = SCENARIO_KEYS.get(key.replace("_", "-"))
        if target is None:
            continue
        if target == "attack_rounds":
            value = tuple(int(r) for r in (split_list(value) if isinstance(value, str) else value))
        out[target] = value
    return out
