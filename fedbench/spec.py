"""Specs are data: the ``name:k=v`` grammar, frozen cell descriptions and their stable hashes.

Everything a user types to name a component is parsed here and nowhere else:

* a component: ``poison`` or ``poison:images=10,lam=0.5``;
* a defense stack: ``cma+wbc:s=0.4`` -- any number of client defenses (applied in the order given)
  plus at most one aggregator, ``fedavg`` when none is named.

Parsing looks names up in the plugin registry, coerces and validates every parameter and fills in
defaults, so ``wbc`` and ``wbc:s=0.4`` are the same spec with the same hash.

Deliberate corners of the grammar (tests/test_fuzz_grammar.py holds them):

* ``poison:`` -- a ``:`` with nothing after it -- is an error, like a trailing ``,``: it is almost
  always a truncated spec (``poison:$PARAMS`` with the variable unset), and the defaults have one
  spelling, ``poison``.
* Every spec a parser returns writes itself back (``canonical()``, ``str()``) as text that parses to
  an equal spec with the same hash; so a float is written without a ``+`` in its exponent
  (``1e20``, not ``1e+20``: ``+`` joins a defense stack) and ``-0.0`` is stored as ``0.0`` (the two
  are equal, so they must not hash apart; scenario numbers too).
* Anything else that cannot be parsed raises :class:`SpecError` naming the component or the text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from fedbench.components import STACK_KINDS, Component, ParamInfo
from fedbench.errors import SpecError
from fedbench.plugins import Registry, registry, unknown_message

SPEC_VERSION = 1


# --------------------------------------------------------------------------------------------------
# Components and defense stacks
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ComponentSpec:
    """One named component with all its parameters resolved (sorted ``(name, value)`` pairs)."""

    kind: str
    name: str
    params: tuple[tuple[str, Any], ...] = ()

    def __str__(self) -> str:
        """Short label: only parameters that differ from their defaults."""
        defaults = {info.name: info.default for info in self.info()}
        changed = [(k, v) for k, v in self.params if defaults.get(k) != v]
        return _label(self.name, changed)

    def canonical(self) -> str:
        return _label(self.name, self.params)

    def info(self, reg: Registry | None = None) -> tuple[ParamInfo, ...]:
        return (reg or registry()).get(self.kind, self.name).param_info()

    def build(self, reg: Registry | None = None) -> Any:
        """A fresh component object for one run (parameters re-validated: a spec may come from a store
        written by another version of the plugin)."""
        cls = (reg or registry()).get(self.kind, self.name)
        return cls(**dict(resolve(self.kind, cls, dict(self.params)).params))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "params": dict(self.params)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ComponentSpec":
        return cls(data["kind"], data["name"], tuple(sorted(data["params"].items())))


def _label(name: str, params) -> str:
    if not params:
        return name
    return name + ":" + ",".join(f"{k}={format_value(v)}" for k, v in params)


def format_value(value: Any) -> str:
    """A parameter value as the spec grammar writes it (``true``/``false`` for booleans, ``auto``
    for an optional parameter left to the component)."""
    if value is None:
        return "auto"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value).replace("e+", "e")  # 1e+20 would split a defense stack at its '+'
    return str(value)


def resolve(kind: str, cls: type[Component], raw: Mapping[str, Any]) -> ComponentSpec:
    """Validate ``raw`` parameters against ``cls`` and fill defaults."""
    infos = {info.name: info for info in cls.param_info()}
    unknown = sorted(set(raw) - set(infos))
    if unknown:
        allowed = ", ".join(f"{i.name} ({i.allowed()}, default {format_value(i.default)})" for i in infos.values())
        raise SpecError(
            f"{cls.name}: unknown parameter '{unknown[0]}'; "
            f"{'parameters: ' + allowed if allowed else 'it takes no parameters'}"
        )
    values = {name: info.coerce(cls.name, raw.get(name, info.default)) for name, info in infos.items()}
    # -0.0 == 0.0, so the two must not hash apart (JSON writes them differently)
    values = {name: 0.0 if isinstance(v, float) and v == 0 else v for name, v in values.items()}
    cls(**values)  # cross-parameter validation in __post_init__, if the component has any
    return ComponentSpec(kind, cls.name, tuple(sorted(values.items())))


def _split_params(text: str) -> tuple[str, dict[str, str]]:
    name, colon, rest = text.strip().partition(":")
    name = name.strip()
    if not name:
        raise SpecError(f"empty component name in {text!r}")
    params: dict[str, str] = {}
    if colon and not rest.strip():
        raise SpecError(f"{name}: nothing after ':' in {text!r}; write {name} for its defaults or {name}:key=value")
    if colon:
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or not key or not value.strip():
                raise SpecError(f"{name}: expected key=value, got {item.strip()!r} in {text!r}")
            if key in params:
                raise SpecError(f"{name}: parameter '{key}' given twice in {text!r}")
            params[key] = value.strip()
    return name, params


def parse_component(kind: str, text: str, reg: Registry | None = None) -> ComponentSpec:
    """Parse ``name`` or ``name:k=v,...`` as a component of ``kind``."""
    reg = reg or registry()
    name, params = _split_params(text)
    return resolve(kind, reg.get(kind, name), params)


@dataclass(frozen=True)
class DefenseStack:
    """A defense stack: client defenses in the order they run inside benign clients' training, and
    the server stage -- pre-aggregators in the order they run, then the one aggregator."""

    client: tuple[ComponentSpec, ...]
    aggregator: ComponentSpec
    preaggregators: tuple[ComponentSpec, ...] = ()

    def parts(self) -> tuple[ComponentSpec, ...]:
        """Every part in canonical order: pre-aggregators, the aggregator, client defenses."""
        return (*self.preaggregators, self.aggregator, *self.client)

    def __str__(self) -> str:
        return "+".join(str(part) for part in self.parts() if not _implied(part, self))

    def to_dict(self) -> dict[str, Any]:
        data = {"client": [c.to_dict() for c in self.client], "aggregator": self.aggregator.to_dict()}
        if self.preaggregators:  # only when present, so stacks without them keep their hashes
            data["preaggregators"] = [p.to_dict() for p in self.preaggregators]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DefenseStack":
        return cls(
            tuple(ComponentSpec.from_dict(c) for c in data["client"]),
            ComponentSpec.from_dict(data["aggregator"]),
            tuple(ComponentSpec.from_dict(p) for p in data.get("preaggregators", ())),
        )


def _implied(part: ComponentSpec, stack: DefenseStack) -> bool:
    """``fedavg`` is left out of a label when anything else is in the stack (``wbc`` = ``fedavg+wbc``)."""
    return (part is stack.aggregator and part.name == "fedavg" and not part.params
            and bool(stack.client or stack.preaggregators))


def parse_defense(text: str, reg: Registry | None = None) -> DefenseStack:
    """Parse a defense stack such as ``cma+wbc:s=0.4`` or ``nnm+bucketing:s=2+krum``.

    Each part is a client defense, a pre-aggregator or an aggregator (their names share one
    namespace). Client defenses keep their order, pre-aggregators theirs; where the aggregator is
    written does not matter, it always runs after the pre-aggregators."""
    reg = reg or registry()
    parts = [p for p in text.split("+")]
    if not text.strip() or any(not p.strip() for p in parts):
        raise SpecError(f"empty part in defense stack {text!r}")
    found: dict[str, list[ComponentSpec]] = {kind: [] for kind in STACK_KINDS}
    for part in parts:
        name, params = _split_params(part)
        kind = next((k for k in STACK_KINDS if name in reg.names(k)), None)
        if kind is None:
            known = sorted(n for k in STACK_KINDS for n in reg.names(k))
            raise SpecError(unknown_message("defense", name, known, STACK_KINDS).replace(
                "known client defenses", "known defenses, pre-aggregators and aggregators"))
        found[kind].append(resolve(kind, reg.get(kind, name), params))
    aggregators = found["aggregator"]
    if len(aggregators) > 1:
        raise SpecError(
            f"defense stack {text!r} names {len(aggregators)} aggregators "
            f"({', '.join(a.name for a in aggregators)}); a stack takes at most one"
        )
    aggregator = aggregators[0] if aggregators else resolve("aggregator", reg.get("aggregator", "fedavg"), {})
    return DefenseStack(tuple(found["defense"]), aggregator, tuple(found["preaggregator"]))


# --------------------------------------------------------------------------------------------------
# Scenario and protocols
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scenario:
    """The federated setting. Defaults are the FL-WBC paper's text (reference section 1)."""

    num_clients: int = 100
    num_malicious: int = 5
    clients_per_round: int = 10
    attack_prob: float = 0.1
    attack_rounds: tuple[int, ...] | None = None  # explicit schedule; overrides attack_prob
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.0
    client_data_frac: float = 1.0  # the authors' code trains on the first 80% of each client's data
    eval: str = "auto"  # see fedbench.metrics.EVAL_POLICIES

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", "float") and isinstance(value, (int, float)) and not isinstance(value, bool):
                if f.type == "int" and float(value).is_integer():
                    object.__setattr__(self, f.name, int(value))
                elif f.type == "float":
                    object.__setattr__(self, f.name, float(value) + 0.0)  # + 0.0: -0.0 would hash apart from 0.0

        def need(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise SpecError(f"scenario: {name}={getattr(self, name)!r} is not allowed; {allowed}")

        need(self.num_clients >= 1, "num_clients", "need at least 1 client")
        need(0 <= self.num_malicious < self.num_clients, "num_malicious", "need 0 <= num_malicious < num_clients")
        need(
            1 <= self.clients_per_round <= self.num_clients - self.num_malicious,
            "clients_per_round",
            "need 1 <= clients_per_round <= num_clients - num_malicious",
        )
        need(self.num_malicious <= self.clients_per_round, "num_malicious", "need num_malicious <= clients_per_round")
        need(0.0 <= self.attack_prob <= 1.0, "attack_prob", "need 0 <= attack_prob <= 1")
        need(self.local_epochs >= 1, "local_epochs", "need >= 1")
        need(self.batch_size >= 1, "batch_size", "need >= 1")
        need(0 < self.lr < math.inf, "lr", "need a finite number > 0")
        need(0.0 <= self.momentum < 1.0, "momentum", "need 0 <= momentum < 1")
        need(0.0 < self.client_data_frac <= 1.0, "client_data_frac", "need 0 < client_data_frac <= 1")
        from fedbench.metrics import EVAL_POLICIES

        need(self.eval in EVAL_POLICIES, "eval", "one of " + ", ".join(EVAL_POLICIES))
        if self.attack_rounds is not None:
            rounds = tuple(self.attack_rounds)
            need(all(isinstance(r, int) and r >= 1 for r in rounds), "attack_rounds", "rounds count from 1")
            object.__setattr__(self, "attack_rounds", tuple(sorted(set(rounds))))

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


#: Named presets of scenario parameters (never branches in the engine). ``paper`` is the paper's text;
#: ``reference-code`` is what the authors' public code does (reference section 1).
PROTOCOLS: dict[str, dict[str, Any]] = {
    "paper": {},
    "reference-code": {"local_epochs": 10, "batch_size": 10, "momentum": 0.5, "client_data_frac": 0.8},
}


# --------------------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CellSpec:
    """One complete run: what ``fedbench run`` runs and what the matrix has one of per cell."""

    dataset: ComponentSpec
    partition: ComponentSpec
    model: ComponentSpec
    attack: ComponentSpec
    defense: DefenseStack
    scenario: Scenario = field(default_factory=Scenario)
    protocol: str = "paper"
    seed: int = 0
    rounds: int = 30

    def to_dict(self) -> dict[str, Any]:
        scenario = dataclasses.asdict(self.scenario)
        if scenario["attack_rounds"] is not None:
            scenario["attack_rounds"] = list(scenario["attack_rounds"])
        return {
            "version": SPEC_VERSION,
            "dataset": self.dataset.to_dict(),
            "partition": self.partition.to_dict(),
            "model": self.model.to_dict(),
            "attack": self.attack.to_dict(),
            "defense": self.defense.to_dict(),
            "scenario": scenario,
            "protocol": self.protocol,
            "seed": self.seed,
            "rounds": self.rounds,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CellSpec":
        if data.get("version") != SPEC_VERSION:
            raise SpecError(f"cell spec version {data.get('version')!r} is not supported (need {SPEC_VERSION})")
        scenario = dict(data["scenario"])
        if scenario.get("attack_rounds") is not None:
            scenario["attack_rounds"] = tuple(scenario["attack_rounds"])
        return cls(
            dataset=ComponentSpec.from_dict(data["dataset"]),
            partition=ComponentSpec.from_dict(data["partition"]),
            model=ComponentSpec.from_dict(data["model"]),
            attack=ComponentSpec.from_dict(data["attack"]),
            defense=DefenseStack.from_dict(data["defense"]),
            scenario=Scenario(**scenario),
            protocol=data["protocol"],
            seed=data["seed"],
            rounds=data["rounds"],
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def hash(self) -> str:
        """Stable across processes, dict orders and Python versions: SHA-256 of canonical JSON."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def label(self) -> str:
        return f"{self.dataset} {self.attack} vs {self.defense} seed={self.seed}"


def make_cell(
    *,
    dataset: str = "digits",
    partition: str = "iid",
    model: str | None = None,
    attack: str = "none",
    defense: str = "fedavg",
    protocol: str = "paper",
    seed: int = 0,
    rounds: int = 30,
    reg: Registry | None = None,
    **scenario: Any,
) -> CellSpec:
    """Build a validated cell from spec strings.

    The scenario is layered: the paper's defaults, then the dataset's own defaults (a small dataset
    may use fewer clients), then the protocol preset, then explicit keyword arguments.
    """
    reg = reg or registry()
    ds = parse_component("dataset", dataset, reg)
    ds_cls = reg.get("dataset", ds.name)
    if protocol not in PROTOCOLS:
        raise SpecError(f"unknown protocol '{protocol}'; known protocols: {', '.join(PROTOCOLS)}")
    unknown = sorted(set(scenario) - set(Scenario.field_names()))
    if unknown:
        raise SpecError(f"unknown scenario parameter '{unknown[0]}'; known: {', '.join(Scenario.field_names())}")
    values = {**dict(ds_cls.scenario_defaults), **PROTOCOLS[protocol]}
    values.update({k: v for k, v in scenario.items() if v is not None})
    if not isinstance(rounds, int) or rounds < 1:
        raise SpecError(f"rounds={rounds!r} is not allowed; need an integer >= 1")
    late = [r for r in (values.get("attack_rounds") or ()) if r > rounds]
    if late:
        raise SpecError(
            f"attack round {late[0]} is beyond the last round ({rounds}); give attack rounds "
            f"between 1 and {rounds}, or more --rounds"
        )
    cell = CellSpec(
        dataset=ds,
        partition=parse_component("partition", partition, reg),
        model=parse_component("model", model or ds_cls.default_model, reg),
        attack=parse_component("attack", attack, reg),
        defense=parse_defense(defense, reg),
        scenario=Scenario(**values),
        protocol=protocol,
        seed=int(seed),
        rounds=rounds,
    )
    from fedbench.server import Server

    # A rule beyond its breakdown point (krum with n < 2f+3, ...) is refused here, before any cell runs.
    Server.build(cell.defense, reg).check(n=cell.scenario.clients_per_round, f=cell.scenario.num_malicious)
    return cell
