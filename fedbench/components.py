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
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping

from fedbench.errors import SpecError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

KINDS = ("attack", "defense", "aggregator", "dataset", "model", "partition")


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

    def allowed(self) -> str:
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        text = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[self.type]
        if self.check is not None:
            text += f" {self.check.describe()}"
        return text

    def coerce(self, owner: str, raw: Any) -> Any:
        """Turn a string (from a spec) or a Python value into this parameter's type, then validate."""
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
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    @classmethod
    def param_info(cls) -> tuple[ParamInfo, ...]:
        if not dataclasses.is_dataclass(cls):
            return ()
        hints = typing.get_type_hints(cls)
        infos = []
        for f in dataclasses.fields(cls):
            if not f.init or "doc" not in f.metadata:
                continue
            infos.append(
                ParamInfo(
                    name=f.name,
                    type=hints[f.name],
                    default=f.default,
                    doc=f.metadata["doc"],
                    check=f.metadata["check"],
                    choices=f.metadata["choices"],
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
    """

    round: int
    global_params: "torch.Tensor"  # flat [P]
    client_ids: tuple[int, ...]
    client_data: list[tuple["torch.Tensor", "torch.Tensor"]]
    train: Callable[..., "torch.Tensor"]
    forward: Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]  # (flat params, x) -> logits
    generator: "torch.Generator"
    benign_updates: "torch.Tensor | None" = None


class Attack(Component):
    """Controls the malicious clients of every adversarial round.

    The four abilities the core offers an attack:

    1. change a malicious client's data and objective: ``malicious_updates`` chooses what
       ``MaliciousRound.train`` trains on, with which loss;
    2. change or replace the malicious updates after training (boosting, crafted vectors);
    3. see the round's benign updates, when ``omniscient = True``;
    4. measure its success on the global model every round: ``metrics`` and ``mitigated``.
    """

    kind: ClassVar[str] = "attack"
    omniscient: ClassVar[bool] = False
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

    def mitigated(self, metrics: Mapping[str, float], benign_error: float) -> bool:
        """Whether the attack's effect counts as gone in a round with these metrics (section 5 of
        the reference: the threshold that ends an attack-mitigation count)."""
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
    generators: list["torch.Generator"]  # one defense stream per client
    active: "torch.Tensor"


class ClientDefense(Component):
    """Runs inside every benign client's local training.

    ``after_step`` is called after each local SGD iteration (only when ``per_step = True``, so that
    defenses without it cost nothing); ``on_update`` transforms the finished updates ``[C, P]``
    before upload."""

    kind: ClassVar[str] = "defense"
    per_step: ClassVar[bool] = False

    def after_step(self, state: StepState) -> None:
        """Change ``state.params`` in place after an optimizer step."""

    def on_update(self, updates: "torch.Tensor", generators: list["torch.Generator"]) -> "torch.Tensor":
        """Return the updates ``[C, P]`` to upload; ``generators`` has one defense stream per client."""
        return updates


# --------------------------------------------------------------------------------------------------
# Aggregators
# --------------------------------------------------------------------------------------------------
class Aggregator(Component):
    """The server rule: client updates ``[n_clients, P]`` and weights ``[n_clients]`` -> one update ``[P]``."""

    kind: ClassVar[str] = "aggregator"

    def aggregate(
        self, updates: "torch.Tensor", weights: "torch.Tensor", generator: "torch.Generator"
    ) -> "torch.Tensor":
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
    "aggregator": Aggregator,
    "dataset": Dataset,
    "model": Model,
    "partition": Partition,
}
