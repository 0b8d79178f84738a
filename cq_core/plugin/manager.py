"""Plugin discovery: built-ins plus the ``cq`` entry-point group.

Built-in plugins (listed in :data:`DEFAULT_PLUGINS`) go through the same hooks
as third-party ones. ``CQ_DISABLE_PLUGINS=a,b`` blocks plugins by name (the
entry-point name, or the built-in module name such as ``cq_core.builtin.rtn``).

An installed plugin that fails to import (a package pip is still installing, a missing
dependency, a syntax error), that implements a hook cq does not define (a misspelled hook
name) or one with arguments the hook does not take, or whose registration hook raises does
not stop cq: it is left out, recorded as a :class:`BrokenPlugin` (``Registry.broken``; the CLI prints one warning
naming its distribution and entry point and how to silence it), and a lookup of a name it
might have registered says so.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from typing import Any

import pluggy

from cq_core.errors import PluginError, UsageError, printable, quoted
from cq_core.plugin import hookspecs
from cq_core.plugin.draft import Migration
from cq_core.plugin.executors import Executor
from cq_core.plugin.layouts import LayoutConverter
from cq_core.plugin.types import (
    Detection,
    Format,
    MetadataWriter,
    ModelFilter,
    Optimizer,
    ShapeRead,
)

DEFAULT_PLUGINS: tuple[str, ...] = (
    "cq_core.builtin.rtn",
    "cq_core.builtin.learned",
    "cq_core.builtin.gptq",
    "cq_core.builtin.comfy_metadata",
    "cq_core.builtin.legacy_scaled",
    "cq_core.builtin.local_executor",
)
ENTRY_POINT_GROUP = "cq"
DISABLE_ENV = "CQ_DISABLE_PLUGINS"


def disabled_plugins() -> set[str]:
    return {name.strip() for name in os.environ.get(DISABLE_ENV, "").split(",") if name.strip()}


def unknown_disabled_plugins() -> list[str]:
    """Names in ``CQ_DISABLE_PLUGINS`` that are neither a built-in nor an installed entry point of
    group ``cq`` (a typo blocks nothing, so the CLI warns about it)."""
    known = set(DEFAULT_PLUGINS) | {ep.name for ep in importlib_metadata.entry_points(group=ENTRY_POINT_GROUP)}
    return sorted(disabled_plugins() - known)


@dataclass(frozen=True)
class BrokenPlugin:
    """An installed plugin left out: it failed to import, or a registration hook raised."""

    name: str
    #: ``name = value`` as the entry point declares it
    entry_point: str
    distribution: str | None
    version: str | None
    #: ``ModuleNotFoundError: No module named 'x'`` (type and message, cut to a line)
    error: str

    def sentence(self) -> str:
        """One sentence: which plugin, from which distribution, what failed, what to do."""
        dist = f"{self.distribution} {self.version}" if self.distribution else "an unknown distribution"
        return (f"the cq plugin {self.name!r} (entry point {self.entry_point!r} of {dist}) could not be loaded "
                f"({self.error}), so what it registers is missing; reinstall {self.distribution or 'it'}, or set "
                f"{DISABLE_ENV}={self.name} to skip it")


def _error_line(exc: BaseException) -> str:
    # One line: pluggy's validation messages span several (and escaping shows them as \n).
    return printable(f"{type(exc).__name__}: {' '.join(str(exc).split())}", 300)


class CqPluginManager(pluggy.PluginManager):
    """pluggy's manager, loading each ``cq`` entry point on its own: one that fails to import is
    recorded in :attr:`broken` and left out instead of stopping every command."""

    def __init__(self, project_name: str) -> None:
        super().__init__(project_name)
        self.broken: list[BrokenPlugin] = []
        #: plugin object -> (distribution name, version), for entry-point plugins
        self.distributions: dict[int, tuple[str | None, str | None]] = {}

    def load_setuptools_entrypoints(self, group: str, name: str | None = None) -> int:
        count = 0
        for dist in list(importlib_metadata.distributions()):
            for ep in dist.entry_points:
                if (ep.group != group or (name is not None and ep.name != name) or self.has_plugin(ep.name)
                        or self.is_blocked(ep.name) or any(b.name == ep.name for b in self.broken)):
                    continue
                dist_name = dist.metadata["name"] if dist.metadata else None
                try:
                    plugin = ep.load()
                except (Exception, SystemExit) as exc:  # noqa: BLE001 (any failure of the plugin's own code)
                    self.broken.append(BrokenPlugin(ep.name, f"{ep.name} = {ep.value}", dist_name,
                                                    dist.version, _error_line(exc)))
                    continue
                try:
                    self.register(plugin, name=ep.name)
                except pluggy.PluginValidationError as exc:  # a hookimpl whose arguments its hook does not take
                    if self.has_plugin(ep.name):  # pluggy may have added the hooks before the one it refused
                        self.unregister(name=ep.name)
                    self.broken.append(BrokenPlugin(ep.name, f"{ep.name} = {ep.value}", dist_name,
                                                    dist.version, _error_line(exc)))
                    continue
                self.distributions[id(plugin)] = (dist_name, dist.version)
                count += 1
        return count

    def leave_out_unknown_hooks(self) -> None:
        """Unregister every plugin that implements a hook cq does not define (what pluggy's
        ``check_pending`` refuses, which would stop every command) and record it in
        :attr:`broken`, naming the unknown hook and the closest hook cq defines."""
        specs = sorted(name for name in vars(hookspecs) if name.startswith("cq_"))
        unknown: dict[str, list[str]] = {}
        plugins: dict[str, Any] = {}
        for name, caller in list(vars(self.hook).items()):
            if name.startswith("_") or caller.has_spec():
                continue
            for impl in caller.get_hookimpls():
                if not impl.opts.get("optionalhook"):
                    unknown.setdefault(impl.plugin_name, []).append(name)
                    plugins[impl.plugin_name] = impl.plugin
        for plugin_name, hooks in unknown.items():
            plugin = plugins[plugin_name]
            problems = []
            for hook in sorted(hooks):
                close = difflib.get_close_matches(hook, specs, n=1, cutoff=0.6)
                problems.append(f"{hook!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            dist, version = self.distributions.get(id(plugin)) or _distribution_of(plugin)
            entry = next((f"{ep.name} = {ep.value}" for ep in importlib_metadata.entry_points(group=ENTRY_POINT_GROUP)
                          if ep.name == plugin_name), f"{plugin_name} = {getattr(plugin, '__name__', plugin_name)}")
            self.unregister(plugin)
            self.broken.append(BrokenPlugin(plugin_name, entry, dist, version,
                                            f"it implements {', '.join(problems)}, which cq does not define"))


def make_plugin_manager(
    *, load_entry_points: bool = True, extra_plugins: Iterable[Any] = ()
) -> pluggy.PluginManager:
    """Build a plugin manager with the built-ins, entry points and ``extra_plugins``.

    ``extra_plugins`` are modules or module names registered after the
    built-ins; tests use them instead of entry points so the suite never
    depends on what happens to be installed.
    """
    pm = CqPluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    blocked = disabled_plugins()
    for name in blocked:
        pm.set_blocked(name)
    for plugin in (*DEFAULT_PLUGINS, *extra_plugins):
        module = importlib.import_module(plugin) if isinstance(plugin, str) else plugin
        name = plugin if isinstance(plugin, str) else module.__name__
        if name not in blocked and not pm.is_registered(module):
            pm.register(module, name=name)
    if load_entry_points:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    pm.leave_out_unknown_hooks()
    pm.check_pending()  # nothing is left for it to refuse
    return pm


@dataclass
class Registry:
    """Everything the installed plugins registered, by name, with who registered it."""

    plugin_manager: pluggy.PluginManager
    formats: dict[str, type[Format]] = field(default_factory=dict)
    optimizers: dict[str, type[Optimizer]] = field(default_factory=dict)
    model_filters: dict[str, ModelFilter] = field(default_factory=dict)
    metadata_writers: dict[str, type[MetadataWriter]] = field(default_factory=dict)
    migrations: dict[str, type[Migration]] = field(default_factory=dict)
    layout_converters: dict[str, LayoutConverter] = field(default_factory=dict)
    executors: dict[str, type[Executor]] = field(default_factory=dict)
    #: (kind, name) -> plugin name
    owners: dict[tuple[str, str], str] = field(default_factory=dict)
    #: installed plugins left out because they failed (see :class:`BrokenPlugin`)
    broken: list[BrokenPlugin] = field(default_factory=list)

    KINDS = {
        "format": ("cq_register_formats", "formats"),
        "optimizer": ("cq_register_optimizers", "optimizers"),
        "model filter": ("cq_register_model_filters", "model_filters"),
        "metadata writer": ("cq_register_metadata_writers", "metadata_writers"),
        "migration": ("cq_register_migrations", "migrations"),
        "layout converter": ("cq_register_layout_converters", "layout_converters"),
        "executor": ("cq_register_executors", "executors"),
    }

    @classmethod
    def from_plugin_manager(cls, pm: pluggy.PluginManager) -> Registry:
        registry = cls(pm, broken=list(getattr(pm, "broken", [])))
        failed: set[str] = set()
        for kind, (hook_name, attr) in cls.KINDS.items():
            table = getattr(registry, attr)
            for impl in getattr(pm.hook, hook_name).get_hookimpls():
                if impl.plugin_name in failed:
                    continue
                try:
                    impl.function(register=registry._registrar(kind, table, impl.plugin_name))
                except PluginError:
                    raise
                except Exception as exc:  # noqa: BLE001 (a plugin's own code failed: leave the plugin out)
                    failed.add(impl.plugin_name)
                    registry._leave_out(impl.plugin, impl.plugin_name, f"{hook_name} raised {_error_line(exc)}")
        return registry

    def _leave_out(self, plugin: Any, name: str, error: str) -> None:
        """Drop everything plugin ``name`` registered and record it as broken."""
        for (kind, item), owner in list(self.owners.items()):
            if owner == name:
                del getattr(self, self.KINDS[kind][1])[item]
                del self.owners[(kind, item)]
        dist, version = getattr(self.plugin_manager, "distributions", {}).get(id(plugin)) or _distribution_of(plugin)
        self.broken.append(BrokenPlugin(name, f"{name} = {getattr(plugin, '__name__', name)}", dist, version, error))
        self.plugin_manager.unregister(plugin)

    def _registrar(self, kind: str, table: dict[str, Any], plugin_name: str) -> Callable[[Any], None]:
        def register(item: Any) -> None:
            name = getattr(item, "name", None)
            if not isinstance(name, str) or not name:
                raise PluginError(f"Plugin {plugin_name!r} registered a {kind} without a name.")
            previous = self.owners.get((kind, name))
            if previous is not None:
                raise PluginError(
                    f"The {kind} {name!r} is registered by both {previous!r} and {plugin_name!r}; "
                    f"uninstall one or block it with {DISABLE_ENV}."
                )
            table[name] = item
            self.owners[(kind, name)] = plugin_name

        return register

    # -- lookups with errors that list the valid names -----------------------------

    def _lookup(self, kind: str, table: dict[str, Any], name: str) -> Any:
        try:
            return table[name]
        except KeyError:
            valid = ", ".join(sorted(table)) or "none installed"
            raise UsageError(f"Unknown {kind} {quoted(name)}; valid: {valid}{self.missing_note()}.") from None

    def missing_note(self) -> str:
        """``; it may be one that ... could not load`` for the broken plugins, or ``""``."""
        if not self.broken:
            return ""
        names = ", ".join(f"{b.name!r} ({b.distribution or 'unknown distribution'})" for b in self.broken)
        return (f" (the installed plugin{'s' if len(self.broken) > 1 else ''} {names} could not be loaded and may "
                "provide it; see the warning above)")

    def format(self, name: str) -> type[Format]:
        return self._lookup("format", self.formats, name)

    def default_format(self) -> type[Format]:
        """The format ``cq convert`` uses without ``--format``: the first registered one whose
        class sets ``is_default`` (cq-fp8's ``float8_e4m3fn``); :class:`UsageError` when no
        installed format does."""
        for cls in self.formats.values():
            if cls.is_default:
                return cls
        installed = ", ".join(sorted(self.formats)) or "none installed"
        raise UsageError(f"No installed format is the default (cq-fp8 provides it); pass --format, one of: "
                         f"{installed}{self.missing_note()}.")

    def optimizer(self, name: str) -> type[Optimizer]:
        return self._lookup("optimizer", self.optimizers, name)

    def model_filter(self, name: str) -> ModelFilter:
        return self._lookup("model preset", self.model_filters, name)

    def metadata_writer(self, name: str) -> type[MetadataWriter]:
        return self._lookup("metadata writer", self.metadata_writers, name)

    def migration(self, name: str) -> type[Migration]:
        return self._lookup("migration", self.migrations, name)

    def executor(self, name: str) -> type[Executor]:
        return self._lookup("executor", self.executors, name)

    def detect_components(self, keys: list[str], metadata: dict[str, str]) -> list[Detection]:
        """Every component the plugins recognise, each with its preset (see ``cq_detect_model``).

        Claims come in hook call order; a claim whose prefix overlaps (equals,
        contains or sits inside) an earlier one is dropped, unless its preset
        keeps everything (a VAE), which always stands. The result's prefixes
        thus never overlap, except for keep-all components, which win inside
        their prefix.
        """
        claims: list[Detection] = []
        for result in self.plugin_manager.hook.cq_detect_model(keys=keys, metadata=metadata):
            claims.extend([result] if isinstance(result, Detection) else list(result))
        chosen: list[Detection] = []
        for claim in claims:
            if not isinstance(claim, Detection):
                raise PluginError(f"cq_detect_model returned {claim!r}; expected a Detection, a list of them or None.")
            if self._keeps_all(claim):
                if not any(c.prefix == claim.prefix and self._keeps_all(c) for c in chosen):
                    chosen.append(claim)
            elif not any(_overlap(claim.prefix, c.prefix) for c in chosen if not self._keeps_all(c)):
                chosen.append(claim)
        # The model components first, in claim order: the first is the file's main model.
        return sorted(chosen, key=self._keeps_all)

    def detect_model(self, keys: list[str], metadata: dict[str, str]) -> Detection | None:
        """The file's main component (its first model component), or None."""
        components = self.detect_components(keys, metadata)
        return next((c for c in components if not self._keeps_all(c)), components[0] if components else None)

    def _keeps_all(self, detection: Detection) -> bool:
        preset = self.model_filters.get(detection.preset)
        return bool(preset is not None and preset.keep_all)

    def shape_read_layers(self, keys: list[str], metadata: dict[str, str]) -> dict[str, ShapeRead]:
        """Every tensor whose stored shape a plugin says the loader reads, with why and which dimensions."""
        merged: dict[str, ShapeRead] = {}
        # pluggy calls the last registered plugin first; reversed, the first plugin's answer wins.
        for answer in reversed(self.plugin_manager.hook.cq_shape_read_layers(keys=keys, metadata=metadata)):
            for name, read in (answer or {}).items():
                merged.setdefault(name, read if isinstance(read, ShapeRead) else ShapeRead(str(read)))
        return merged

    # -- listing ---------------------------------------------------------------------

    def versions_of(self, uses: Iterable[tuple[str, str]]) -> dict[str, str]:
        """Distribution name -> version for cq-core and the plugins that registered ``uses``
        ((kind, name) pairs as in :attr:`KINDS`), sorted by name; unknown versions are "unknown"."""
        wanted = {self.owners[use] for use in uses if use in self.owners}
        versions = {"cq-core": _core_version()}
        for row in self.describe_plugins():
            if row["name"] in wanted and row["distribution"]:
                versions[row["distribution"]] = row["version"] or "unknown"
        return dict(sorted(versions.items()))

    def describe_plugins(self) -> list[dict[str, Any]]:
        """Every registered plugin: name, distribution, version, hooks, what it registers."""
        dists = {
            id(plugin): (dist.metadata["name"], dist.version) for plugin, dist in self.plugin_manager.list_plugin_distinfo()
        }
        dists.update(getattr(self.plugin_manager, "distributions", {}))
        rows = []
        for name, plugin in sorted(self.plugin_manager.list_name_plugin(), key=lambda p: p[0]):
            if plugin is None:  # blocked
                continue
            dist_name, version = dists.get(id(plugin)) or _distribution_of(plugin)
            registers = {
                kind: sorted(n for (k, n), owner in self.owners.items() if k == kind and owner == name)
                for kind in self.KINDS
            }
            rows.append(
                {
                    "name": name,
                    "distribution": dist_name,
                    "version": version,
                    "hooks": sorted(h.name for h in self.plugin_manager.get_hookcallers(plugin) or []),
                    "registers": {k: v for k, v in registers.items() if v},
                }
            )
        for broken in self.broken:
            rows.append({"name": broken.name, "distribution": broken.distribution, "version": broken.version,
                         "hooks": [], "registers": {}, "error": broken.error})
        return sorted(rows, key=lambda row: row["name"])


def _overlap(a: str, b: str) -> bool:
    """Whether two component prefixes overlap: one contains the other."""
    return a.startswith(b) or b.startswith(a)


def _distribution_of(module: Any) -> tuple[str | None, str | None]:
    """The installed distribution that provides a module (for built-ins: cq-core)."""
    return _distribution_of_package(getattr(module, "__name__", "").split(".")[0])


@functools.lru_cache(maxsize=None)
def _distribution_of_package(top: str) -> tuple[str | None, str | None]:
    # packages_distributions() scans every installed distribution (about 0.3 s): once per package.
    for dist_name in importlib_metadata.packages_distributions().get(top, []):
        try:
            return dist_name, importlib_metadata.version(dist_name)
        except importlib_metadata.PackageNotFoundError:
            continue
    return None, None


@functools.lru_cache(maxsize=1)
def _core_version() -> str:
    try:
        return importlib_metadata.version("cq-core")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


_registry: Registry | None = None
#: Called once with each broken plugin when the process-wide registry is built (the CLI warns).
_broken_reporter: Callable[[BrokenPlugin], None] | None = None


def report_broken_plugins(reporter: Callable[[BrokenPlugin], None] | None) -> None:
    """Have ``reporter(plugin)`` called for each :class:`BrokenPlugin` when :func:`get_registry`
    builds the registry (the CLI prints each as a warning); None stops it."""
    global _broken_reporter
    _broken_reporter = reporter


def get_registry() -> Registry:
    """The process-wide registry, built on first use."""
    global _registry
    if _registry is None:
        _registry = Registry.from_plugin_manager(make_plugin_manager())
        if _broken_reporter is not None:
            for broken in _registry.broken:
                _broken_reporter(broken)
    return _registry


def resolve_registry(registry: Registry | None) -> Registry:
    """The registry an entry point works with: the one it was given, else the process-wide one.

    The public functions (:func:`cq_core.convert`, ``verify``, ``inspect``, ``migrate``) call
    this once and pass the result down; nothing below them looks the registry up itself.
    """
    return registry if registry is not None else get_registry()


def set_registry(registry: Registry | None) -> None:
    """Replace the process-wide registry (tests; None rebuilds it on next use)."""
    global _registry
    _registry = registry
