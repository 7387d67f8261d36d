"""CUDA graphs of the paged backend's decode-only steps.

A decode step of a small batch on a GPU is a few hundred short kernels, and launching them from Python
takes longer than running them: at batch 1 a 1B model's step reads its weights in well under a
millisecond, while its launches take several. A CUDA graph replays the whole step in one launch.

A graph holds fixed shapes and addresses, so steps are padded into buckets: the batch up to the next
captured batch size (``--cuda-graphs``, TGI's flag) and the context up to the next power of two of KV
blocks per sequence, up to ``MAX_CONTEXT`` tokens. Each (batch, width) graph is captured the first time a
step needs it; all share one memory pool (they never run at the same time) and write their logits into
one buffer. A step outside every bucket, a step with prompt chunks, or a device without graphs runs
eagerly, as before; so does every step after a failed capture, and every step of a mixture-of-experts
model (its experts' products are sized by the step's routing, on the host).

The graph's inputs are two buffers it owns: the token ids [batch], and the block table [batch, width]
with each row's context length in an extra last column, copied from the host in one transfer per step.
Padding rows hold the KV cache's scratch block and a length of 1: they write their K/V to the scratch
block's first slot, attend to it alone, and their logits are dropped. Positions, write slots, the
gathered context slots and the mask are computed inside the graph (``decode_meta``).

``capture=False`` runs the same padded step eagerly: the bucketing and padding are then testable on any
device (tests/unit/shard/paged/test_graphs.py).
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .attention import decode_meta
from .kv_cache import PagedKVCache
from .model import PagedModel

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE  # what CUDAGraph.pool() returns

log = logging.getLogger(__name__)

# Batch sizes captured when --cuda-graphs is not given (TGI captures a similar ladder).
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Longest context a graph covers (vLLM's max_seq_len_to_capture); longer steps run eagerly, since every
# row of a graph gathers its bucket's whole span.
MAX_CONTEXT = 8192
# Most bytes of K and V a graph's step gathers for one layer (batch x span tokens): they live in the
# graphs' memory pool, beside the KV cache's.
MAX_GATHERED_BYTES = 2**30


@dataclass
class Graph:
    """One captured (batch, width) step: its input buffers and the CUDA graph itself."""

    batch: int
    width: int
    ids: torch.Tensor  # [batch]
    table: torch.Tensor  # [batch, width + 1]: block ids, then the context length
    graph: torch.cuda.CUDAGraph | None = None  # once captured
    steps: int = 0  # steps served


class DecodeGraphs:
    """Runs decode-only steps of ``model`` through CUDA graphs (see the module docstring)."""

    def __init__(
        self,
        model: PagedModel,
        cache: PagedKVCache,
        batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
        capture: bool = True,
        max_context: int = MAX_CONTEXT,
    ) -> None:
        if not batch_sizes or min(batch_sizes) < 1:
            raise ValueError(f"batch sizes to capture must be positive: {batch_sizes}")
        self.model = model
        self.cache = cache
        self.batch_sizes = tuple(sorted(set(batch_sizes)))
        self.capture = capture
        bs = cache.block_size
        self.max_width = max(1, max_context // bs)
        pool = cache.k_layers[0]  # [slots, kv_heads, head_dim]
        self.token_bytes = 2 * pool.shape[1] * pool.shape[2] * pool.element_size()  # one token's K and V
        self.graphs: dict[tuple[int, int], Graph] = {}
        self.pool: _POOL_HANDLE | None = None
        # Every graph writes its logits into this one buffer [largest batch, vocab], allocated outside
        # the pool: a graph's own logits are then free pool memory once it is captured, not one more
        # [batch, vocab] float32 tensor kept alive per graph.
        self.logits: torch.Tensor | None = None
        # An MoE layer sizes each expert's product from the step's routing (a host read), which a graph
        # cannot hold: such models decode eagerly (shard/paged/moe.py).
        self.failed = model.spec.has_experts
        if self.failed:
            log.info("Mixture-of-experts layers: decode steps run without CUDA graphs")

    def bucket(self, batch: int, width: int) -> tuple[int, int] | None:
        """The (batch, width) graph a step of ``batch`` rows and ``width`` blocks per row runs in; None
        when no graph holds it (more rows or context than any, or a gather over MAX_GATHERED_BYTES)."""
        i = bisect.bisect_left(self.batch_sizes, batch)
        if i == len(self.batch_sizes) or width > self.max_width:
            return None
        key = self.batch_sizes[i], min(1 << (width - 1).bit_length(), self.max_width)
        gathered = key[0] * key[1] * self.cache.block_size * self.token_bytes
        return key if gathered <= MAX_GATHERED_BYTES else None

    def run(self, ids: torch.Tensor, table: list[list[int]], lengths: list[int]) -> torch.Tensor | None:
        """The step's float32 logits [rows, vocab], or None when no graph serves it (run it eagerly).
        ``table``: each row's block ids, padded to the step's width; ``lengths``: each row's context,
        the new token included."""
        if self.failed:
            return None
        rows, width = len(table), len(table[0])
        key = self.bucket(rows, width)
        if key is None:
            return None
        graph = self.graphs.get(key)
        if graph is None:
            graph = self._make(*key)
            if graph is None:
                return None
        batch, cols = key
        scratch = self.cache.scratch_block
        host = [row + [scratch] * (cols - width) + [n] for row, n in zip(table, lengths, strict=True)]
        host += [[scratch] * cols + [1]] * (batch - rows)
        graph.table.copy_(torch.tensor(host))
        graph.ids[:rows].copy_(ids)
        graph.steps += 1
        if graph.graph is not None and self.logits is not None:  # the logits buffer comes with a capture
            graph.graph.replay()
            return self.logits[:rows].clone()
        return self._forward(graph)[:rows]

    # -- capture ----------------------------------------------------------------------------------
    def _forward(self, graph: Graph) -> torch.Tensor:
        """The padded step, in tensor operations only (what the graph records)."""
        bs = self.cache.block_size
        table, lengths = graph.table[:, :-1], graph.table[:, -1]
        # The CPU kernels read the pool through the table; the torch path gathers the bucket's span.
        context = None if self.model.fused else graph.width * bs
        positions, meta = decode_meta(table, lengths, bs, context)
        return self.model(graph.ids, positions, meta, self.cache, None)

    def _make(self, batch: int, width: int) -> Graph | None:
        device = self.cache.device
        table = torch.full((batch, width + 1), self.cache.scratch_block, dtype=torch.long, device=device)
        table[:, -1] = 1  # every row padding until a step fills it
        graph = Graph(batch, width, torch.zeros(batch, dtype=torch.long, device=device), table)
        if self.capture:
            try:
                self._capture(graph)
            except Exception:  # an operation that cannot be captured, or no memory: eager from now on
                log.exception(
                    "CUDA graph capture failed (batch %d, %d blocks); decoding eagerly", batch, width
                )
                self._give_up()
                return None
            log.info(
                "Captured a CUDA graph: batch %d, context up to %d tokens",
                batch,
                width * self.cache.block_size,
            )
        self.graphs[(batch, width)] = graph
        return graph

    def _capture(self, graph: Graph) -> None:
        # Warm-up runs on a side stream first (cuBLAS and the allocator set themselves up outside the
        # capture), as torch.cuda.graphs asks. All rows are padding: only the scratch block is written.
        side = torch.cuda.Stream(self.cache.device)
        side.wait_stream(torch.cuda.current_stream(self.cache.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                warm = self._forward(graph)
        torch.cuda.current_stream(self.cache.device).wait_stream(side)
        if self.logits is None:
            self.logits = warm.new_empty(self.batch_sizes[-1], warm.shape[1])
        out = self.logits[: graph.batch]
        cuda_graph = torch.cuda.CUDAGraph()
        # thread_local: the event loop's thread may touch CUDA (a failed step's empty_cache) meanwhile.
        with torch.cuda.graph(cuda_graph, pool=self.pool, capture_error_mode="thread_local"):
            out.copy_(self._forward(graph))
        if self.pool is None:
            self.pool = cuda_graph.pool()
        graph.graph = cuda_graph

    def _give_up(self) -> None:
        """After a failed capture: every graph and the pool's memory go, and steps run eagerly."""
        self.failed = True
        self.graphs.clear()
        self.pool = None
        self.logits = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
