"""The running batch: requests that decode together, joined (concatenate) and left (select) in one place."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .backends.base import Backend
from .sampling import Sampler, TokenHistory
from .types import RequestSpec


class Batch:
    """Requests decoding together on this shard.

    Everything per-row (sampling parameters, token history, the next input token, the backend's KV state)
    is kept in the same row order as ``requests``; ``select`` and ``concatenate`` keep them aligned.
    """

    def __init__(
        self,
        requests: list[RequestSpec],
        sampler: Sampler,
        history: TokenHistory,
        next_ids: torch.Tensor,
        state: Any,
    ) -> None:
        self.requests = requests
        self.sampler = sampler
        self.history = history
        self.next_ids = next_ids
        self.state = state

    @property
    def request_ids(self) -> list[int]:
        return [r.id for r in self.requests]

    def __len__(self) -> int:
        return len(self.requests)

    def rows(self, keep_ids: list[int], state_of: Callable[[torch.Tensor], Any] | None) -> Batch:
        """The rows of ``keep_ids`` (held by this batch, in that order), their KV state from
        ``state_of(row index)`` (None: no state, for rows whose KV went back); ``self`` is unchanged."""
        position = {rid: row for row, rid in enumerate(self.request_ids)}
        rows = [position[rid] for rid in keep_ids]
        index = torch.tensor(rows, dtype=torch.long, device=self.next_ids.device)
        return Batch(
            [self.requests[row] for row in rows],
            self.sampler.select(rows),
            self.history.select(index),
            self.next_ids[index],
            None if state_of is None else state_of(index),
        )

    def select(self, keep_ids: list[int], backend: Backend) -> Batch | None:
        """Keeps only ``keep_ids`` (in that order); None when nothing is left. The rest's KV is freed."""
        if keep_ids == self.request_ids:
            return self
        if not keep_ids:
            backend.release(self.state)
            return None
        return self.rows(keep_ids, lambda index: backend.select(self.state, index))

    @staticmethod
    def concatenate(batches: list[Batch], backend: Backend) -> Batch:
        """Merges batches into one; no row's cache is recomputed."""
        if len(batches) == 1:
            return batches[0]
        return Batch(
            [r for b in batches for r in b.requests],
            Sampler.concatenate([b.sampler for b in batches]),
            TokenHistory.concatenate([b.history for b in batches]),
            torch.cat([b.next_ids for b in batches]),
            backend.concatenate([b.state for b in batches]),
        )
