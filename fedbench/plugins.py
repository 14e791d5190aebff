"""The plugin manager: loads entry points, honours ``FEDBENCH_PLUGINS``, and builds the registry.

``FEDBENCH_PLUGINS=a,b`` loads only the entry points named ``a`` and ``b`` (the core's own datasets,
models, partitions and the ``none`` attack are always there). :func:`register_plugin` adds a plugin
object directly, for notebooks and tests.
"""

from __future__ import annotations

import os
import types
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pluggy

from fedbench import hookspecs
from fedbench.components import BASES, STACK_KINDS, Component
from fedbench.errors import FedbenchError, UnknownComponentError, one_line

ENTRY_POINT_GROUP = "fedbench"
_HOOK_FOR_KIND = {
    "attack": "register_attacks",
    "defense": "register_defenses",
    "preaggregator": "register_preaggregators",
    "aggregator": "register_aggregators",
    "dataset": "register_datasets",
    "model": "register_models",
    "partition": "register_partitions",
}
_PLURAL = {
    "attack": "attacks",
    "defense": "client defenses",
    "preaggregator": "pre-aggregators",
    "aggregator": "aggregators",
    "dataset": "datasets",
    "model": "models",
    "partition": "partitions",
}

_manager: pluggy.PluginManager | None = None
#: plugins that failed to import or to register: name -> (origin, one-line error). Every other plugin
#: keeps working; ``fedbench list`` shows these, and an unknown name's error mentions them.
_broken: dict[str, tuple[str, str]] = {}
_ORIGINS: dict[str, str] = {"fedbench": "fedbench (core)"}
_registry: "Registry | None" = None
_extra: list[tuple[Any, str]] = []


@dataclass(frozen=True)
class Entry:
    cls: type[Component]
    origin: str  # plugin name and version, e.g. "wbc (fedbench-suite 0.1.0)"


class Registry:
    """Every registered component, by kind and name."""

    def __init__(self) -> None:
        self._by_kind: dict[str, dict[str, Entry]] = {kind: {} for kind in BASES}

    def add(self, kind: str, cls: type, origin: str) -> None:
        base = BASES[kind]
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise FedbenchError(f"plugin {origin} registered {cls!r} as {kind}, which is not a {base.__name__}")
        name = getattr(cls, "name", None)
        if not name:
            raise FedbenchError(f"plugin {origin} registered {cls.__name__} without a 'name'")
        known = self._by_kind[kind]
        if name in known and known[name].cls is not cls:
            raise FedbenchError(
                f"{kind} '{name}' is registered twice: by {known[name].origin} and by {origin}"
            )
        if kind in STACK_KINDS:  # one namespace: a defense stack names parts without their kind
            for other in STACK_KINDS:
                if other != kind and name in self._by_kind[other]:
                    raise FedbenchError(
                        f"'{name}' is registered twice in defense stacks: as {other} by "
                        f"{self._by_kind[other][name].origin} and as {kind} by {origin}"
                    )
        known[name] = Entry(cls, origin)

    def names(self, kind: str) -> list[str]:
        return sorted(self._by_kind[kind])

    def entries(self, kind: str) -> dict[str, Entry]:
        return dict(sorted(self._by_kind[kind].items()))

    def kind_of(self, name: str) -> str | None:
        for kind, known in self._by_kind.items():
            if name in known:
                return kind
        return None

    def get(self, kind: str, name: str) -> type[Component]:
        try:
            return self._by_kind[kind][name].cls
        except KeyError:
            raise UnknownComponentError(unknown_message(kind, name, self.names(kind))) from None


def unknown_message(kind: str, name: str, known: list[str], kinds: tuple[str, ...] | None = None) -> str:
    """``unknown attack 'x'; known attacks: ...``, plus, when ``FEDBENCH_PLUGINS`` restricts loading,
    which left-out plugin registers the name (``kinds``: where to look, default ``(kind,)``)."""
    text = f"unknown {kind} '{name}'; known {_PLURAL[kind]}: {', '.join(known) or '(none loaded)'}"
    if _broken:
        text += "; plugins that failed to load: " + "; ".join(f"{n} ({why})" for n, (_, why) in sorted(_broken.items()))
    return text + _left_out_hint(name, kinds or (kind,))


def _left_out_hint(name: str, kinds: tuple[str, ...]) -> str:
    """Why a name is unknown when ``FEDBENCH_PLUGINS`` is set: the entry point that would register it.

    Only on this error path are the left-out entry points imported, to ask their register hooks."""
    selected = _selected_names()
    if selected is None:
        return ""
    restriction = f"FEDBENCH_PLUGINS={os.environ.get('FEDBENCH_PLUGINS', '')}"
    for ep in _entry_points():
        if ep.name in selected:
            continue
        names: list[str] = []
        try:
            plugin = ep.load()
            for kind in kinds:
                hook = getattr(plugin, _HOOK_FOR_KIND[kind], None)
                if hook is not None:
                    hook(register=lambda cls: names.append(getattr(cls, "name", None)))
        except Exception:  # noqa: BLE001 - a broken plugin must not hide the original error
            continue
        if name in names:
            return (f" ('{name}' is registered by plugin '{ep.name}', which {restriction} leaves out; "
                    f"add {ep.name} to FEDBENCH_PLUGINS or unset it)")
    return f" ({restriction} loads only those plugins and the core)"


def _selected_names() -> set[str] | None:
    raw = os.environ.get("FEDBENCH_PLUGINS")
    if raw is None:
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


def _dist_label(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"{ep.name} ({dist.name} {dist.version})" if dist is not None else ep.name


def _entry_points() -> list[metadata.EntryPoint]:
    return sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def get_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, built on first use."""
    global _manager
    if _manager is None:
        pm = pluggy.PluginManager("fedbench")
        pm.add_hookspecs(hookspecs)
        from fedbench import builtins  # the core's own components, always present

        pm.register(builtins, name="fedbench")
        selected = _selected_names()
        available = _entry_points()
        if selected is not None:
            missing = selected - {ep.name for ep in available}
            if missing:
                raise FedbenchError(
                    f"FEDBENCH_PLUGINS names unknown plugin(s) {', '.join(sorted(missing))}; "
                    f"installed: {', '.join(ep.name for ep in available) or '(none)'}"
                )
        for ep in available:
            if selected is not None and ep.name not in selected:
                continue
            if pm.get_plugin(ep.name) is not None:
                continue
            try:
                plugin = ep.load()
            except Exception as error:  # noqa: BLE001 - a plugin that cannot be imported must not take the rest down
                _broken[ep.name] = (_dist_label(ep), f"cannot be imported: {one_line(error)}")
                continue
            pm.register(plugin, name=ep.name)
            _ORIGINS[ep.name] = _dist_label(ep)
        for plugin, name in _extra:
            if pm.is_registered(plugin):  # e.g. a notebook registering a module its entry point loaded
                continue
            if pm.get_plugin(name) is not None:
                raise FedbenchError(f"a plugin named '{name}' is already loaded (from an entry point); choose another name")
            pm.register(plugin, name=name)
            _ORIGINS[name] = f"{name} (registered directly)"
        try:
            pm.check_pending()  # a misspelled hook name is an error, not a silent no-op
        except pluggy.PluginValidationError as error:
            name = pm.get_name(error.plugin) or repr(error.plugin)
            raise FedbenchError(f"plugin {_ORIGINS.get(name, name)}: {error}") from None
        _manager = pm
    return _manager



def register_plugin(plugin: Any, name: str | None = None) -> None:
    """Register a plugin object (module, class or instance with hookimpls) in this process.

    It survives :func:`reset`, so a notebook can register once and keep using the registry."""
    name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
    _extra[:] = [(p, n) for p, n in _extra if n != name] + [(plugin, name)]
    reset()


def registered_plugins() -> list[tuple[Any, str]]:
    """``(plugin, name)`` of every plugin added with :func:`register_plugin` (e.g. so the matrix
    runner can register them again in its worker processes)."""
    return list(_extra)


def unregister_plugin(name: str) -> None:
    """Remove a plugin added by :func:`register_plugin`."""
    _extra[:] = [(p, n) for p, n in _extra if n != name]
    reset()


def reset() -> None:
    """Forget the manager and registry so they are rebuilt (after the environment changed)."""
    global _manager, _registry
    _manager = None
    _registry = None
    _broken.clear()


def registry() -> Registry:
    """Every component of every loaded plugin."""
    global _registry
    if _registry is None:
        pm = get_manager()
        reg = Registry()
        # Each plugin's register hooks run first into a list: a plugin whose hook raises is left out
        # whole (marked broken), so it never stands half-registered beside the others.
        pending: dict[str, list[tuple[str, type]]] = {}
        for kind, hook_name in _HOOK_FOR_KIND.items():
            for impl in getattr(pm.hook, hook_name).get_hookimpls():
                name = impl.plugin_name
                if name in _broken:
                    continue
                found = pending.setdefault(name, [])
                try:
                    impl.function(register=lambda cls, kind=kind, found=found: found.append((kind, cls)))
                except Exception as error:  # noqa: BLE001 - a broken plugin must not take the rest down
                    _broken[name] = (_ORIGINS.get(name, name), f"raised while registering {_PLURAL[kind]}: {one_line(error)}")
                    pending.pop(name, None)
        for name, found in pending.items():
            for kind, cls in found:
                reg.add(kind, cls, _ORIGINS.get(name, name))
        _registry = reg
    return _registry


def broken_plugins() -> dict[str, tuple[str, str]]:
    """Plugins that failed to import or to register: name -> (origin, one-line error)."""
    registry()
    return dict(sorted(_broken.items()))


def plugin_of_module(module: str | None) -> tuple[str, str] | None:
    """The loaded plugin whose code ``module`` (a module's ``__name__``) is, as ``(name, source)`` --
    source ``entry point fedbench.poison = fedbench_plugins.poison, fedbench-suite 0.1.0`` or
    ``registered directly`` -- or ``None`` for the core (``fedbench.*``) and for code that belongs to
    no plugin (torch, the standard library).

    A plugin's code is its own module (a package: its submodules too) and the modules defining the
    components it registers. This is how a cell that fails names the plugin whose code raised
    (:func:`fedbench.executors.failure_of`), so it never raises itself."""
    if not module or module == "fedbench" or module.startswith("fedbench."):
        return None
    try:
        owners, packages = _plugin_modules()
    except Exception:  # noqa: BLE001 - called while reporting another failure
        return None
    return owners.get(module) or next((o for prefix, o in packages.items() if module.startswith(prefix)), None)


_modules_cache: tuple[Any, Any, Any] | None = None  # (manager, registry, what _plugin_modules returns)


def _plugin_modules() -> tuple[dict[str, tuple[str, str]], dict[str, tuple[str, str]]]:
    """module -> (plugin name, source) and package prefix (``pkg.``) -> the same, for every loaded
    plugin but the core; rebuilt when the manager or the registry is."""
    global _modules_cache
    pm, reg = get_manager(), registry()
    if _modules_cache is not None and _modules_cache[0] is pm and _modules_cache[1] is reg:
        return _modules_cache[2]
    points = {ep.name: ep for ep in _entry_points()}

    def source(name: str) -> str:
        ep = points.get(name)
        if ep is None or _ORIGINS.get(name) != _dist_label(ep):
            return "registered directly"
        dist = getattr(ep, "dist", None)
        return f"entry point {ENTRY_POINT_GROUP}.{ep.name} = {ep.value}" + (f", {dist.name} {dist.version}" if dist else "")

    owners: dict[str, tuple[str, str]] = {}
    packages: dict[str, tuple[str, str]] = {}
    for name, plugin in pm.list_name_plugin():
        if name == "fedbench" or plugin is None:
            continue
        if isinstance(plugin, types.ModuleType):
            owners.setdefault(plugin.__name__, (name, source(name)))
            if hasattr(plugin, "__path__"):
                packages.setdefault(plugin.__name__ + ".", (name, source(name)))
        else:  # a class or an instance with hookimpls
            owners.setdefault(getattr(plugin, "__module__", None) or type(plugin).__module__, (name, source(name)))
    name_of_origin = {origin: name for name, origin in _ORIGINS.items()}
    for kind in BASES:
        for entry in reg.entries(kind).values():
            name = name_of_origin.get(entry.origin)
            if name is not None and name != "fedbench" and not entry.cls.__module__.startswith("fedbench."):
                owners.setdefault(entry.cls.__module__, (name, source(name)))
    _modules_cache = (pm, reg, (owners, packages))
    return owners, packages


def plugin_versions() -> dict[str, str]:
    """Loaded plugin names with their origins, for provenance records."""
    get_manager()
    return {name: origin for name, origin in sorted(_ORIGINS.items()) if get_manager().get_plugin(name)}
