"""Component contracts: attacks, client defenses, aggregators, datasets, models and partitions.

A component is a small keyword-only dataclass. Its fields are its parameters, declared with
:func:`param` (default, one-line doc, optional constraint); the class docstring's first line is the
description ``fedbench list`` shows. One component object is built from a spec for each run, so a
component may keep per-run state (an attack's malicious data set, say) in attributes that are not
fields.

Why dataclasses: the parameters are then plain typed fields that the spec grammar can coerce,
validate, list and hash without any registration boilerplate.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping

from fedbench.errors import SpecError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

KINDS = ("attack", "defense", "preaggregator", "aggregator", "dataset", "model", "partition")
#: The kinds a defense stack is made of; their names share one namespace (``cma+wbc`` must be unambiguous).
STACK_KINDS = ("defense", "preaggregator", "aggregator")


# --------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Range:
    """A numeric interval constraint; ``describe()`` is what error messages show."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __call__(self, value: float) -> bool:
        if isinstance(value, float) and math.isnan(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
            return False
        return True

    def describe(self) -> str:
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {self.lo:g}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {self.hi:g}")
        return " and ".join(parts) or "any number"


POSITIVE = Range(lo=0, lo_open=True)
NON_NEGATIVE = Range(lo=0)
UNIT = Range(lo=0, hi=1)
AT_LEAST_ONE = Range(lo=1)


def param(default: Any, doc: str, *, check: Range | None = None, choices: tuple | None = None) -> Any:
    """Declare a component parameter: its default, a one-line doc and what values are allowed."""
    return field(default=default, metadata={"doc": doc, "check": check, "choices": choices})


@dataclass(frozen=True)
class ParamInfo:
    """What ``fedbench list`` and the spec parser know about one parameter."""

    name: str
    type: type
    default: Any
    doc: str
    check: Range | None
    choices: tuple | None
    #: declared ``T | None``: ``None`` (written ``auto``) lets the component choose from the scenario,
    #: e.g. a robust rule's ``f`` defaults to the scenario's malicious clients per adversarial round
    optional: bool = False

    def allowed(self) -> str:
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        text = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[self.type]
        if self.check is not None:
            text += f" {self.check.describe()}"
        return text + (", or auto" if self.optional else "")

    def coerce(self, owner: str, raw: Any) -> Any:
        """Turn a string (from a spec) or a Python value into this parameter's type, then validate."""
        if self.optional and (raw is None or (isinstance(raw, str) and raw.strip().lower() == "auto")):
            return None
        value = raw
        try:
            if self.type is bool:
                if isinstance(raw, str):
                    low = raw.strip().lower()
                    if low not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError(raw)
                    value = low in ("true", "1", "yes")
                elif not isinstance(raw, bool):
                    raise ValueError(raw)
            elif self.type is int:
                if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                    raise ValueError(raw)
                value = int(raw, 10) if isinstance(raw, str) else int(raw)
            elif self.type is float:
                if isinstance(raw, bool):
                    raise ValueError(raw)
                value = float(raw)
            else:
                value = str(raw)
        except (TypeError, ValueError):
            raise SpecError(
                f"{owner}: parameter '{self.name}' got {raw!r}; allowed: {self.allowed()}"
            ) from None
        bad_choice = self.choices is not None and value not in self.choices
        bad_range = self.check is not None and not self.check(value)
        if bad_choice or bad_range:
            raise SpecError(f"{owner}: parameter '{self.name}' got {raw!r}; allowed: {self.allowed()}")
        return value


# --------------------------------------------------------------------------------------------------
# The base class
# --------------------------------------------------------------------------------------------------
class Component:
    """Base of every pluggable component.

    Subclasses are ``@dataclass(kw_only=True)`` classes with a class attribute ``name`` and fields
    declared with :func:`param`. Constructing one validates every parameter.
    """

    name: ClassVar[str]
    kind: ClassVar[str]

    def __post_init__(self) -> None:
        for info in self.param_info():
            object.__setattr__(self, info.name, info.coerce(self.name, getattr(self, info.name)))

    @classmethod
    def description(cls) -> str:
        """The docstring's first line, as plain text (reST ``literals`` lose their backticks)."""
        doc = (cls.__doc__ or "").strip()
        return re.sub(r"``(.+?)``", r"\1", doc.splitlines()[0]) if doc else ""

    @classmethod
    def param_info(cls) -> tuple[ParamInfo, ...]:
        """The parameters of this component class, computed once per class: resolving the type hints
        cost ~2 ms a call, about 12% of a small digits cell, which builds its components every run."""
        cached = cls.__dict__.get("_param_info")
        if cached is None:
            cached = cls._compute_param_info()
            setattr(cls, "_param_info", cached)
        return cached

    @classmethod
    def _compute_param_info(cls) -> tuple[ParamInfo, ...]:
        if not dataclasses.is_dataclass(cls):
            return ()
        hints = typing.get_type_hints(cls)
        infos = []
        for f in dataclasses.fields(cls):
            if not f.init or "doc" not in f.metadata:
                continue
            hint, optional = hints[f.name], False
            if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint):
                rest = [a for a in typing.get_args(hint) if a is not type(None)]
                if len(rest) != 1:
                    raise TypeError(f"{cls.__name__}.{f.name}: a parameter is one type or that type | None")
                hint, optional = rest[0], True
            infos.append(
                ParamInfo(
                    name=f.name,
                    type=hint,
                    default=f.default,
                    doc=f.metadata["doc"],
                    check=f.metadata["check"],
                    choices=f.metadata["choices"],
                    optional=optional,
                )
            )
        return tuple(infos)

    def params(self) -> dict[str, Any]:
        return {info.name: getattr(self, info.name) for info in self.param_info()}


# --------------------------------------------------------------------------------------------------
# Attacks
# --------------------------------------------------------------------------------------------------
@dataclass
class AttackEnv:
    """What an attack may use when a run starts (``Attack.setup``)."""

    train_x: "torch.Tensor"
    train_y: "torch.Tensor"
    test_x: "torch.Tensor"
    test_y: "torch.Tensor"
    num_classes: int
    generator: "torch.Generator"  # the cell's attack stream
    device: "torch.device"


@dataclass
class MaliciousRound:
    """Everything an attack sees in an adversarial round (``Attack.malicious_updates``).

    ``train(...)`` runs ordinary local training (the same trainer benign clients use, without client
    defenses) so an attack only describes *what* to train on and *which objective*; it returns
    updates with a leading client axis. ``benign_updates`` is set only for attacks that declare
    ``omniscient = True``: the engine then trains the benign clients of the round first.
    ``aggregate(updates)`` runs the cell's server stage (pre-aggregators and aggregator) as a black
    box on a candidate stack of all the round's updates, malicious rows first, ``[n, P] -> [P]``:
    what aggregator-aware attacks (Fang, ALIE/IPM with a searched strength) optimise against. It
    never changes the real server's state.
    """

    round: int
    global_params: "torch.Tensor"  # flat [P]
    client_ids: tuple[int, ...]
    client_data: list[tuple["torch.Tensor", "torch.Tensor"]]
    train: Callable[..., "torch.Tensor"]
    forward: Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]  # (flat params, x) -> logits
    generator: "torch.Generator"
    benign_updates: "torch.Tensor | None" = None
    aggregate: Callable[["torch.Tensor"], "torch.Tensor"] | None = None
    #: the server's aggregation weight of every update of the round (the clients' sample counts),
    #: malicious rows first: what a model-replacement attacker needs (Bagdasaryan et al.'s n / eta)
    weights: "torch.Tensor | None" = None


class Attack(Component):
    """Controls the malicious clients of every adversarial round.

    The four abilities the core offers an attack:

    1. change a malicious client's data and objective: ``malicious_updates`` chooses what
       ``MaliciousRound.train`` trains on, with which loss;
    2. change or replace the malicious updates after training (boosting, crafted vectors);
    3. see the round's benign updates, when ``omniscient = True``, and query the cell's server
       stage on candidate updates (``MaliciousRound.aggregate``);
    4. measure its success on the global model every round: ``metrics`` and ``mitigated``.

    Success is the ``success`` metric (0..1, higher = the attack works better). An **untargeted**
    attack (``untargeted = True``: it only wants the model to be worse) has the benign error as its
    success -- the engine records ``success = 1 - accuracy`` every round -- and counts as mitigated
    once the benign accuracy is back within ``RECOVERY`` (2 points) of the round before the attack.
    """

    kind: ClassVar[str] = "attack"
    omniscient: ClassVar[bool] = False
    untargeted: ClassVar[bool] = False
    #: how close to the pre-attack accuracy an untargeted attack's victim must come to count as recovered
    RECOVERY: ClassVar[float] = 0.02
    #: ``False`` only for the ``none`` attack: the run then has no malicious clients at all.
    active: ClassVar[bool] = True

    def setup(self, env: AttackEnv) -> "torch.Tensor | None":
        """Prepare per-run state. Return indices of the test split the attack takes for itself
        (the engine then leaves them out of benign evaluation), or ``None``."""
        return None

    def malicious_updates(self, rnd: MaliciousRound) -> "torch.Tensor":
        """Return the updates ``[len(rnd.client_ids), P]`` the malicious clients upload.

        The default trains honestly on the clients' own data."""
        return rnd.train(rnd.client_data)

    def metrics(self, forward: Callable[["torch.Tensor"], "torch.Tensor"]) -> dict[str, float]:
        """The attack's success measures on the current global model (``forward(x) -> logits``)."""
        return {}

    def mitigated(self, metrics: Mapping[str, float], benign_error: float) -> bool | None:
        """Whether the attack's effect counts as gone in a round with these metrics (section 5 of
        the reference: the threshold that ends an attack-mitigation count).

        ``metrics`` also holds ``pre_attack_accuracy``, the benign accuracy of the round before the
        attack round (``None`` for an attack in the run's first round). Return ``None`` when the
        attack's effect cannot be judged: that attack round then gets no count (n/a), never 0."""
        if self.untargeted:
            before = metrics.get("pre_attack_accuracy")
            return None if before is None else metrics["accuracy"] >= before - self.RECOVERY
        return metrics.get("success", 0.0) < 0.5


# --------------------------------------------------------------------------------------------------
# Client defenses
# --------------------------------------------------------------------------------------------------
@dataclass
class StepState:
    """One local SGD iteration, for all clients being trained together (leading client axis C).

    ``params`` are the parameters after the optimizer step; a defense may change them in place
    (under ``torch.no_grad``). ``prev_*`` are ``None`` at the first iteration of each local epoch.
    ``updates`` is W_i - W_{i-1} of this iteration; ``grads`` the minibatch gradients.
    ``active`` ([C] bool) marks clients that really stepped (``False`` for padded steps of a client
    with fewer batches); a defense must leave inactive clients untouched.
    ``keys`` ([C] int64) are the clients' defense keys: draw noise for all clients at once with
    :func:`fedbench.rng.laplace_keyed` / :func:`~fedbench.rng.uniform` and a counter that names the
    defense and the step, e.g. ``("wbc", state.epoch, state.step)``. A client's draws then depend on
    its key and the counter only, not on the other clients in the batch (or whether they are
    active), so the loop and stacked trainers agree.
    """

    step: int  # iteration within the local epoch, from 0
    epoch: int
    lr: float
    params: list["torch.Tensor"]
    grads: list["torch.Tensor"]
    updates: list["torch.Tensor"]
    prev_grads: list["torch.Tensor"] | None
    prev_updates: list["torch.Tensor"] | None
    is_weight: list[bool]  # conv / linear weight tensors (not biases)
    keys: "torch.Tensor"  # [C] int64, each client's defense key
    active: "torch.Tensor"


class ClientDefense(Component):
    """Runs inside every benign client's local training.

    ``after_step`` is called after each local SGD iteration (only when ``per_step = True``, so that
    defenses without it cost nothing); ``on_update`` transforms the finished updates ``[C, P]``
    before upload. Noise comes from the clients' defense keys through the counter-based generator
    of :mod:`fedbench.rng` (see :class:`StepState`), never from torch's global stream."""

    kind: ClassVar[str] = "defense"
    per_step: ClassVar[bool] = False

    def after_step(self, state: StepState) -> None:
        """Change ``state.params`` in place after an optimizer step."""

    def on_update(self, updates: "torch.Tensor", keys: "torch.Tensor") -> "torch.Tensor":
        """Return the updates ``[C, P]`` to upload; ``keys`` ``[C]`` int64 are the clients' defense
        keys (draw with a counter of your own, e.g. ``fedbench.rng.laplace_keyed(keys, ("ldp",), ...)``)."""
        return updates


# --------------------------------------------------------------------------------------------------
# The server stage: pre-aggregators and aggregators
# --------------------------------------------------------------------------------------------------
@dataclass
class ServerContext:
    """What a real server knows in a round besides the updates and their weights.

    ``client_ids[i]`` is the client that sent row ``i`` (``None`` once a pre-aggregator has mixed
    rows, e.g. bucketing); ``num_byzantine`` is the number of malicious clients the scenario puts in
    an adversarial round, the default ``f`` of robust rules; ``generator`` is the cell's server
    stream for this round; ``root_update()``, set only when a stage asks for root data
    (:meth:`ServerStage.root_samples`), trains the current global model on the server's trusted root
    data set with the clients' local-training setup and returns that update ``[P]``.

    Every field has a default so a rule can be called by hand: ``rule.aggregate(u, w, ServerContext())``.
    """

    round: int = 1
    client_ids: tuple[int, ...] | None = None
    global_params: "torch.Tensor | None" = None
    num_byzantine: int = 0
    generator: "torch.Generator | None" = None
    root_update: Callable[[], "torch.Tensor"] | None = None

    def __post_init__(self) -> None:
        if self.generator is None:
            import torch

            self.generator = torch.Generator().manual_seed(0)

    def byzantine(self, f: int | None) -> int:
        """A rule's ``f``: its own parameter when set, else the scenario's."""
        return self.num_byzantine if f is None else f


class ServerStage(Component):
    """What pre-aggregators and aggregators share: checks of n and f, and trusted root data.

    A server-stage object is built for one cell and lives exactly as long as it, so a stateful rule
    (centered clipping's centre, FoolsGold's history) keeps its state in plain attributes."""

    def check(self, n: int, f: int) -> None:
        """Raise :class:`SpecError` when the rule cannot work with ``n`` rows per round of which ``f``
        may be Byzantine. ``f`` is already resolved: the rule's own ``f`` parameter when it has one
        and it is set, else the scenario's. Called for every cell before any cell runs."""

    def root_samples(self) -> int:
        """How many clean training samples the server holds out as its root data (0: none)."""
        return 0

    def require(self, n: int, f: int, minimum: int, condition: str) -> None:
        """Raise the breakdown-point error when ``n < minimum`` (``condition`` says the rule, e.g.
        ``n >= 2f+3``), naming the rule, n, f and what would make the cell valid."""
        if n >= minimum:
            return
        fixes = "more clients per round (--per-round), fewer malicious clients (--malicious)"
        if "f" in {info.name for info in self.param_info()}:
            fixes += f", or a smaller f ({self.name}:f=...)"
        raise SpecError(f"{self.name}: needs {condition} (n updates per round, f Byzantine), got n={n}, f={f}; use {fixes}")


class PreAggregator(ServerStage):
    """A server stage in front of the aggregator: updates ``[n, P]`` and weights ``[n]`` -> a new stack.

    Pre-aggregators run in the order the defense stack names them (``nnm+bucketing:s=2+krum``).
    ``keeps_clients`` says whether row ``i`` of the output still comes from client ``i`` (clipping,
    nearest-neighbour mixing) or not (bucketing); when not, later stages see ``client_ids = None``."""

    kind: ClassVar[str] = "preaggregator"
    keeps_clients: ClassVar[bool] = True

    def output_count(self, n: int) -> int:
        """Rows out for ``n`` rows in (so the aggregator's n can be checked before a run)."""
        return n

    def preaggregate(
        self, updates: "torch.Tensor", weights: "torch.Tensor", ctx: ServerContext
    ) -> tuple["torch.Tensor", "torch.Tensor"]:
        raise NotImplementedError


class Aggregator(ServerStage):
    """The server rule: client updates ``[n, P]``, weights ``[n]`` and a :class:`ServerContext` -> one update ``[P]``."""

    kind: ClassVar[str] = "aggregator"

    def aggregate(self, updates: "torch.Tensor", weights: "torch.Tensor", ctx: ServerContext) -> "torch.Tensor":
        raise NotImplementedError


# --------------------------------------------------------------------------------------------------
# Datasets, models, partitions
# --------------------------------------------------------------------------------------------------
@dataclass
class DatasetTensors:
    """A loaded dataset: float images ``[n, C, H, W]`` (normalised) and int64 labels."""

    train_x: "torch.Tensor"
    train_y: "torch.Tensor"
    test_x: "torch.Tensor"
    test_y: "torch.Tensor"
    num_classes: int


class Dataset(Component):
    """A data source. ``default_model`` names a registered model; ``scenario_defaults`` may scale the
    paper's scenario down for a small dataset (shown by ``fedbench list datasets``)."""

    kind: ClassVar[str] = "dataset"
    default_model: ClassVar[str]
    scenario_defaults: ClassVar[Mapping[str, Any]] = {}

    def load(self, data_dir: str | None) -> DatasetTensors:
        raise NotImplementedError


class Model(Component):
    """A model architecture; ``build(input_shape, num_classes)`` returns a fresh ``torch.nn.Module``."""

    kind: ClassVar[str] = "model"

    def build(self, input_shape: tuple[int, ...], num_classes: int) -> "torch.nn.Module":
        raise NotImplementedError


class Partition(Component):
    """Splits the training set among clients: ``split(labels, n_clients, generator)`` -> index tensors."""

    kind: ClassVar[str] = "partition"

    def split(
        self, labels: "torch.Tensor", n_clients: int, generator: "torch.Generator"
    ) -> list["torch.Tensor"]:
        raise NotImplementedError


BASES: dict[str, type[Component]] = {
    "attack": Attack,
    "defense": ClientDefense,
    "preaggregator": PreAggregator,
    "aggregator": Aggregator,
    "dataset": Dataset,
    "model": Model,
    "partition": Partition,
}
