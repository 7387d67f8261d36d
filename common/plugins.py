"""Plugin discovery: Python entry points, one group per extension point.

- ``text_generation.backends``: a model backend. The entry point is a factory
  ``(ShardConfig, torch.device, Parallel) -> Backend``; ``--backend NAME`` picks it.
- ``text_generation.logits_processors``: a ``shard.processors.LogitsProcessor`` subclass.
- ``text_generation.router_extensions``: a callable ``(aiohttp.web.Application, RouterConfig) -> None``
  that adds routes and middlewares to the router before it starts.

The server's own plugins (this distribution's entry points) are always on: its backends are picked by
``--backend``/``--quantize`` and its logits processors only act on requests that ask for them. Plugins of
other distributions are optional: ``--plugin NAME`` enables every entry point called NAME, in any group.
A plugin that is named but missing or broken stops the start with an error naming it.

``NamedPlugins`` serves the groups whose objects a flag picks by name among built-ins and plugins (the
router's ``text_generation.tool_parsers`` and ``text_generation.reasoning_parsers``).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

T = TypeVar("T")

GROUPS = {
    "backends": "text_generation.backends",
    "logits_processors": "text_generation.logits_processors",
    "router_extensions": "text_generation.router_extensions",
}
# The distribution that ships the server (and its built-in plugins).
BUILTIN_DISTRIBUTION = "text-generation-server"


class PluginError(RuntimeError):
    """A plugin that was asked for is not installed or cannot be loaded."""


@dataclass(frozen=True)
class Plugin:
    group: str  # a key of GROUPS
    name: str
    target: str  # "module:attribute"
    distribution: str
    version: str

    @property
    def builtin(self) -> bool:
        return _normalize(self.distribution) == _normalize(BUILTIN_DISTRIBUTION)

    def load(self) -> Any:
        """The entry point's object; PluginError (naming the plugin and its package) when it fails."""
        try:
            return _entry_point(self).load()
        except Exception as e:
            raise PluginError(
                f"plugin {self.name!r} ({self.group}, from {self.distribution} {self.version}) failed to load "
                f"{self.target}: {type(e).__name__}: {e}"
            ) from e


def _normalize(name: str) -> str:
    return name.lower().replace("_", "-")


def _entry_point(plugin: Plugin) -> importlib.metadata.EntryPoint:
    for ep in importlib.metadata.entry_points(group=GROUPS[plugin.group]):
        if ep.name == plugin.name and ep.value == plugin.target:
            return ep
    raise PluginError(f"plugin {plugin.name!r} ({plugin.group}) is no longer installed")


def discover() -> list[Plugin]:
    """Every installed plugin, by group then name (one entry per distinct entry point)."""
    found: dict[tuple[str, str, str], Plugin] = {}
    for group, entry_group in GROUPS.items():
        for ep in importlib.metadata.entry_points(group=entry_group):
            dist = ep.dist
            plugin = Plugin(
                group=group,
                name=ep.name,
                target=ep.value,
                distribution=dist.metadata["Name"] if dist is not None else "?",
                version=dist.version if dist is not None else "?",
            )
            found.setdefault((group, ep.name, ep.value), plugin)
    return sorted(found.values(), key=lambda p: (list(GROUPS).index(p.group), not p.builtin, p.name))


def active(group: str, enabled: tuple[str, ...] = ()) -> list[Plugin]:
    """The plugins of ``group`` that run: the built-in ones, and the optional ones named in ``enabled``."""
    return [p for p in discover() if p.group == group and (p.builtin or p.name in enabled)]


def find(group: str, name: str) -> Plugin:
    """The plugin ``name`` of ``group`` (a plugin shadows a built-in of the same name only if built in)."""
    matches = [p for p in discover() if p.group == group and p.name == name]
    if not matches:
        known = ", ".join(p.name for p in discover() if p.group == group) or "none"
        raise PluginError(f"no {group} plugin named {name!r} is installed (installed: {known})")
    return sorted(matches, key=lambda p: not p.builtin)[0]


def check_enabled(enabled: tuple[str, ...]) -> list[Plugin]:
    """Loads every plugin ``--plugin`` names, so that a missing or broken one fails before anything
    starts. Returns them."""
    plugins = discover()
    out = []
    for name in enabled:
        named = [p for p in plugins if p.name == name]
        if not named:
            optional = sorted({p.name for p in plugins if not p.builtin})
            raise PluginError(
                f"--plugin {name}: no installed plugin has this name "
                f"(optional plugins installed: {', '.join(optional) or 'none'})"
            )
        for plugin in named:
            plugin.load()
            out.append(plugin)
    return out


@dataclass(frozen=True)
class NamedPlugins(Generic[T]):
    """Objects picked by name (the router's tool-call and reasoning parsers): built-in factories, then
    the entry points of ``group`` (callables taking no argument), which naming enables; a built-in of the
    same name wins. ``kind`` names an object in errors; what a plugin returns must be an instance of
    ``protocol`` (a runtime-checkable protocol of ``T``)."""

    group: str  # the entry point group
    kind: str
    builtins: Mapping[str, Callable[[], T]]
    protocol: type

    def names(self) -> list[str]:
        """The built-in names, then those of installed plugins."""
        plugins = sorted({ep.name for ep in importlib.metadata.entry_points(group=self.group)})
        return list(self.builtins) + [n for n in plugins if n not in self.builtins]

    def get(self, name: str) -> T:
        """A new object of the built-in or plugin called ``name``; PluginError when there is none or it
        fails to load."""
        if name in self.builtins:
            return self.builtins[name]()
        for ep in importlib.metadata.entry_points(group=self.group):
            if ep.name != name:
                continue
            dist = f"{ep.dist.metadata['Name']} {ep.dist.version}" if ep.dist is not None else "?"
            try:
                value = ep.load()()
            except Exception as e:
                raise PluginError(
                    f"{self.kind} {name!r} (from {dist}) failed to load {ep.value}: {type(e).__name__}: {e}"
                ) from e
            if not isinstance(value, self.protocol):
                raise PluginError(
                    f"{self.kind} {name!r} (from {dist}) is not a {self.protocol.__name__}: {value!r}"
                )
            return cast(T, value)
        raise PluginError(f"no {self.kind} named {name!r} (known: {', '.join(self.names())})")
