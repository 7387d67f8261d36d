"""Logits processors on the shard: the plugin contract (``base``) and the chain a sampler runs.

Built in: ``watermark`` (Kirchenbauer et al.) and ``grammar`` (constrained decoding). Plugins add more
through the ``text_generation.logits_processors`` entry point group (common/plugins.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .base import LogitsProcessor, ProcessorArgumentError, ProcessorContext

__all__ = ["LogitsProcessor", "ProcessorArgumentError", "ProcessorContext", "Processors", "RowStates"]

# A row's processor states by processor name (only the processors the row uses).
RowStates = dict[str, Any]


@dataclass(frozen=True)
class _Use:
    """The rows of a batch that use one processor, computed once per batch shape."""

    processor: LogitsProcessor
    rows: list[int]
    index: torch.Tensor


class Processors:
    """The processors of one shard: those any request may name, and those run for every request."""

    def __init__(self, processors: list[LogitsProcessor], always: tuple[str, ...] = ()) -> None:
        self.by_name = {p.name: p for p in sorted(processors, key=lambda p: (p.order, p.name))}
        unknown = [name for name in always if name not in self.by_name]
        if unknown:
            raise ValueError(f"no logits processor named {unknown[0]!r}")
        self.always = always

    @property
    def names(self) -> list[str]:
        return list(self.by_name)

    def new_states(self, requested: dict[str, str], prompt_ids: list[int]) -> RowStates:
        """A new row's states: the processors its request names (with their arguments) and the ones that
        run for every request. Raises ProcessorArgumentError naming a processor that is not available."""
        states: RowStates = {}
        unknown = [name for name in requested if name not in self.by_name]
        if unknown:
            raise ProcessorArgumentError(f"this server has no logits processor `{unknown[0]}`")
        for name, processor in self.by_name.items():
            if name in requested:
                state = processor.new_state(requested[name], prompt_ids)
            elif name in self.always:
                state = processor.new_state(None, prompt_ids)
            else:
                continue
            if state is not None:
                states[name] = state
        return states

    def uses(self, rows: list[RowStates], device: torch.device) -> list[_Use]:
        """Which rows use which processor, in the processors' order (empty when no row uses any)."""
        if not any(rows):
            return []
        uses = []
        for name, processor in self.by_name.items():
            selected = [row for row, states in enumerate(rows) if name in states]
            if selected:
                index = torch.tensor(selected, dtype=torch.long, device=device)
                uses.append(_Use(processor, selected, index))
        return uses

    @staticmethod
    def apply(
        uses: list[_Use], scores: torch.Tensor, rows: list[RowStates], last_ids: torch.Tensor
    ) -> torch.Tensor:
        """Runs each processor on its rows; returns new scores (``scores`` itself is not changed)."""
        for use in uses:
            name = use.processor.name
            part = scores.index_select(0, use.index)
            part = use.processor.apply(part, [rows[r][name] for r in use.rows], last_ids[use.index])
            scores = scores.index_copy(0, use.index, part)
        return scores

    @staticmethod
    def advance(uses: list[_Use], rows: list[RowStates], ids: list[int]) -> None:
        for use in uses:
            name = use.processor.name
            use.processor.advance([rows[r][name] for r in use.rows], [ids[r] for r in use.rows])


def load_processors(enabled: tuple[str, ...], context: ProcessorContext) -> Processors:
    """The shard's processors: every built-in one and the optional ones ``--plugin`` enabled (those run
    for every request), each set up with ``context``. A broken plugin raises PluginError naming it."""
    from common.plugins import PluginError, active

    processors, always = [], []
    for plugin in active("logits_processors", enabled):
        cls = plugin.load()
        if not (isinstance(cls, type) and issubclass(cls, LogitsProcessor)):
            raise PluginError(f"plugin {plugin.name!r}: {plugin.target} is not a LogitsProcessor subclass")
        processor = cls()
        processor.name = plugin.name
        try:
            processor.setup(context)
        except Exception as e:
            raise PluginError(f"plugin {plugin.name!r} failed to set up: {type(e).__name__}: {e}") from e
        processors.append(processor)
        if not plugin.builtin:
            always.append(plugin.name)
    return Processors(processors, tuple(always))
