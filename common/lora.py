"""``--lora-adapters`` (TGI's ``LORA_ADAPTERS``): the LoRA adapters a server loads at start, as
``name=path_or_id`` pairs separated by commas (a bare ``path_or_id`` is named after itself)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# What an adapter's name may be: it is the OpenAI `model` of the requests that use it.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:-]{0,127}")


@dataclass(frozen=True)
class AdapterSource:
    """One adapter given at start: the name requests use, and where its files are (a local directory or a
    hub id)."""

    name: str
    source: str

    def __str__(self) -> str:
        return f"{self.name}={self.source}"


def parse_lora_adapters(text: str | tuple[str, ...]) -> tuple[str, ...]:
    """``"a=/x,b=/y"`` -> ``("a=/x", "b=/y")``, each name once; raises ValueError naming the flag for an
    empty entry, a bad name or a name given twice."""
    parts = text if isinstance(text, tuple) else tuple(text.split(","))
    return tuple(str(source) for source in adapter_sources(parts))


def local_adapters(entries: tuple[str, ...]) -> tuple[str, ...]:
    """The entries with each source as an absolute local directory; ValueError naming the adapter for a
    source that is no directory (a hub id is refused by name: not downloaded yet)."""
    out = []
    for s in adapter_sources(entries):
        path = Path(s.source).expanduser()
        if not path.is_dir():
            hint = (
                "hub ids are not downloaded yet: download the adapter and give its directory"
                if not s.source.startswith((".", "/", "~")) and s.source.count("/") <= 1
                else "no such directory"
            )
            raise ValueError(
                f"`lora_adapters`: adapter {s.name!r}: {s.source!r} is not a local directory ({hint})"
            )
        out.append(str(AdapterSource(s.name, str(path.resolve()))))
    return tuple(out)


def adapter_sources(entries: tuple[str, ...]) -> list[AdapterSource]:
    """The ``name=path_or_id`` entries as ``AdapterSource`` values (see ``parse_lora_adapters``)."""
    out: list[AdapterSource] = []
    for entry in (e.strip() for e in entries):
        if not entry:
            raise ValueError(
                "`lora_adapters` has an empty entry; give name=path_or_id pairs separated by commas"
            )
        name, _, source = entry.partition("=") if "=" in entry else (entry, "", entry)
        name, source = name.strip(), source.strip()
        if not source:
            raise ValueError(f"`lora_adapters`: adapter {name!r} has no path or id")
        if not NAME.fullmatch(name):
            raise ValueError(
                f"`lora_adapters`: adapter name {name!r} must be 1 to 128 letters, digits or ._/:- "
                "(starting with a letter or digit)"
            )
        if any(s.name == name for s in out):
            raise ValueError(f"`lora_adapters`: adapter name {name!r} is given twice")
        out.append(AdapterSource(name, source))
    return out
