"""A made-up installed distribution for plugin tests: its entry points lead to a module of its own."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest


def installed(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    version: str,
    entry_points: str,
    module: str,
    source: str,
) -> Iterator[Path]:
    """For a fixture to ``yield from``: the distribution ``name`` ``version`` with ``entry_points`` (the
    text of its entry_points.txt) and the module ``module`` (``source``), installed in ``tmp_path``, which
    is put on sys.path until the test ends."""
    info = tmp_path / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(entry_points)
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))  # also invalidates the import caches
    monkeypatch.delitem(sys.modules, module, raising=False)
    yield tmp_path
    sys.modules.pop(module, None)
