"""Attention over the paged KV cache with PyTorch's scaled_dot_product_attention, for a flat step.

A step's tokens are laid out decodes first (one token per sequence), then prefill chunks (several tokens
of one sequence each). New K/V are written to their slots first; then

- decodes attend as one batch. On the CPU with the kernels built (``decode_slots`` left None), the
  ``decode_attention`` kernel (step_cpu.cpp) reads each sequence's keys and values where they lie in the
  pool, through its block table. Otherwise each sequence's context slots are gathered into
  ``[batch, len, kv, d]`` (shorter ones masked) for scaled_dot_product_attention, with the query heads of
  one KV head as that head's query rows, so grouped-query attention needs no copy of K/V per query head;
- each prefill chunk attends to its whole context (cached prefix + earlier chunks + itself), causally.

With sliding windows, blocks that every layer's window has passed leave a sequence (``PagedKVCache.slide``):
a sequence's context then starts at its first kept block (``StepMeta.decode_starts``, a chunk's ``slots``),
and positions within a context are relative to that start (the masks only compare positions).

A layer may score differently (``Scores``): another scale on q.k, scores soft-capped (``c * tanh(s / c)``,
Gemma 2), or a sliding window (a query sees the keys of its last ``window`` positions, itself included).
A window masks the keys outside it; soft-capping runs the scores through torch operations (neither
scaled_dot_product_attention nor the ``decode_attention`` kernel can cap them). The kernel takes a scale
(folded into the queries) but neither of the others, so models with windows or soft-capping attend on
the torch path (``PagedModel.fused`` is off for them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .lora import LoraStep


@dataclass
class PrefillChunk:
    """``length`` query tokens starting at row ``start`` of the step, whose context is ``slots``."""

    start: int
    length: int
    slots: torch.Tensor
    # [length, context] bool (True = may attend); None when the chunk is its whole context (is_causal).
    mask: torch.Tensor | None


@dataclass
class StepMeta:
    """Where a step's tokens go and what each attends to (built once per step, used by every layer)."""

    write_slots: torch.Tensor
    num_decodes: int
    prefills: list[PrefillChunk]
    block_size: int
    # Decodes: each sequence's block table [batch, width] (padded with the zero null block) and context
    # length [batch], for the kernel; for the torch path also its context slots [batch, max context] and a
    # [batch, 1, 1, max context] mask.
    decode_table: torch.Tensor | None = None
    decode_lengths: torch.Tensor | None = None
    decode_slots: torch.Tensor | None = None
    decode_mask: torch.Tensor | None = None
    # The torch path: each row's first position in its table (a multiple of the block size: the blocks
    # before it left the cache); None: every table starts at position 0.
    decode_starts: torch.Tensor | None = None
    # The rows that use LoRA adapters (shard/paged/lora.py); None: every row runs the base model only.
    lora: LoraStep | None = None


def decode_meta(
    table: torch.Tensor,
    lengths: torch.Tensor,
    block_size: int,
    context: int | None,
    starts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, StepMeta]:
    """A decode-only step's positions and meta from its block table [batch, width] and context lengths
    [batch] (the new token included), in tensor operations only (a CUDA graph can hold them).
    ``context``: the tokens of the gathered context span for the torch path (at least the longest
    length less its start); None for the CPU kernel, which reads the pool through the table itself.
    ``starts`` (torch path only): each row's table begins at that position (blocks before it are gone)."""
    positions = lengths - 1
    local = positions if starts is None else positions - starts
    write = table.gather(1, (local // block_size).unsqueeze(1)).squeeze(1) * block_size
    meta = StepMeta(write + positions % block_size, len(table), [], block_size, table, lengths)
    meta.decode_starts = starts
    if context is not None:
        span = torch.arange(context, device=table.device)
        held = lengths if starts is None else lengths - starts
        meta.decode_slots = table[:, span // block_size] * block_size + span % block_size
        meta.decode_mask = (span.unsqueeze(0) < held.unsqueeze(1)).view(len(table), 1, 1, context)
    elif starts is not None:
        raise ValueError("the decode_attention kernel reads tables from position 0")
    return positions, meta


@dataclass(frozen=True)
class Scores:
    """How a layer scores keys: ``scale`` on q.k (None: 1 / sqrt(head_dim)), ``softcap`` (None: none) and
    ``window`` (None: every earlier position)."""

    scale: float | None = None
    softcap: float | None = None
    window: int | None = None


PLAIN = Scores()


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    meta: StepMeta,
    scores: Scores = PLAIN,
) -> torch.Tensor:
    """q [tokens, heads, d], k/v [tokens, kv_heads, d] -> [tokens, heads * d]; writes k/v to the pools."""
    k_pool.index_copy_(0, meta.write_slots, k)
    v_pool.index_copy_(0, meta.write_slots, v)
    return attend(q, k_pool, v_pool, meta, scores)


def capped_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scores: Scores
) -> torch.Tensor:
    """Attention with soft-capped scores: query [B, kv, group, n, d], keys/values [B, kv, len, d], mask
    (True = may attend) broadcastable to [B, kv, group, n, len] -> [B, kv, group, n, d]. The softmax is
    taken in float32 (as transformers' eager attention)."""
    scale = scores.scale if scores.scale is not None else query.shape[-1] ** -0.5
    s = torch.matmul(query, keys.unsqueeze(2).transpose(-1, -2)) * scale
    if scores.softcap is not None:
        s = torch.tanh(s / scores.softcap) * scores.softcap
    s = s.masked_fill(~mask, float("-inf"))
    return torch.matmul(s.softmax(-1, dtype=torch.float32).to(values.dtype), values.unsqueeze(2))


def attend(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, meta: StepMeta, scores: Scores = PLAIN
) -> torch.Tensor:
    """q [tokens, heads, d] -> [tokens, heads * d], the step's keys and values already in the pools."""
    _, heads, dim = q.shape
    kv_heads = k_pool.shape[1]
    group = heads // kv_heads
    outs = []
    b = meta.num_decodes
    slots = meta.decode_slots
    if b and slots is None:
        if scores.softcap is not None or scores.window is not None:
            raise ValueError("the decode_attention kernel takes neither soft-capping nor a window")
        query = q[:b].reshape(b, heads * dim)
        if scores.scale is not None:  # the kernel scales by 1 / sqrt(d)
            query = query * (scores.scale * dim**0.5)
        outs.append(
            torch.ops.paged_step.decode_attention(
                query,
                k_pool,
                v_pool,
                meta.decode_table,
                meta.decode_lengths,
                meta.block_size,
            )
        )
    elif b and slots is not None:
        shape = (*slots.shape, kv_heads, dim)
        flat = slots.view(-1)
        # index_select, not advanced indexing: the latter is orders of magnitude slower here on CPU.
        keys = k_pool.index_select(0, flat).view(shape).transpose(1, 2)  # [b, kv, len, d]
        values = v_pool.index_select(0, flat).view(shape).transpose(1, 2)
        query = q[:b].view(b, kv_heads, group, dim)
        mask = meta.decode_mask
        if mask is None or meta.decode_lengths is None:
            raise ValueError("the gathered decode context comes with its mask and lengths")
        if scores.window is not None:
            # Keys at positions > (length - 1) - window: the query's own and the window - 1 before it
            # (in the gathered span, which begins at the row's start).
            first = meta.decode_lengths - scores.window
            if meta.decode_starts is not None:
                first = first - meta.decode_starts
            first = first.view(b, 1, 1, 1)
            mask = mask & (torch.arange(slots.shape[1], device=slots.device) >= first)
        if scores.softcap is not None:
            out = capped_attention(query.unsqueeze(3), keys, values, mask.unsqueeze(1), scores)
        else:
            out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scores.scale)
        outs.append(out.reshape(b, heads * dim))
    for chunk in meta.prefills:
        keys = k_pool.index_select(0, chunk.slots).transpose(0, 1).unsqueeze(0)  # [1, kv, len, d]
        values = v_pool.index_select(0, chunk.slots).transpose(0, 1).unsqueeze(0)
        query = q[chunk.start : chunk.start + chunk.length].transpose(0, 1).unsqueeze(0)  # [1, heads, n, d]
        if scores.softcap is not None:
            grouped = query.view(1, kv_heads, group, chunk.length, dim)
            out = capped_attention(grouped, keys, values, chunk_mask(chunk, scores.window), scores)
            out = out.view(1, heads, chunk.length, dim)
        else:
            mask = chunk.mask if scores.window is None else chunk_mask(chunk, scores.window)
            out = F.scaled_dot_product_attention(
                query,
                keys,
                values,
                attn_mask=mask,
                is_causal=mask is None,
                enable_gqa=group > 1,
                scale=scores.scale,
            )
        outs.append(out[0].transpose(0, 1).reshape(chunk.length, heads * dim))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def chunk_mask(chunk: PrefillChunk, window: int | None) -> torch.Tensor:
    """[length, context] bool: the chunk's queries (the context's last ``length`` positions) may attend
    to the keys at or before their own position, and within ``window`` of it when given (positions count
    from the context's start, which need not be the sequence's: only their differences matter)."""
    context = chunk.slots.shape[0]
    device = chunk.slots.device
    queries = torch.arange(context - chunk.length, context, device=device).unsqueeze(1)
    keys = torch.arange(context, device=device).unsqueeze(0)
    mask = keys <= queries
    return mask if window is None else mask & (keys > queries - window)
