"""Attention over the paged KV cache with PyTorch's scaled_dot_product_attention, for a flat step.

A step's tokens are laid out decodes first (one token per sequence), then prefill chunks (several tokens
of one sequence each). New K/V are written to their slots first; then

- decodes attend as one batch. On the CPU with the kernels built (``decode_slots`` left None), the
  ``decode_attention`` kernel (step_cpu.cpp) reads each sequence's keys and values where they lie in the
  pool, through its block table. Otherwise each sequence's context slots are gathered into
  ``[batch, len, kv, d]`` (shorter ones masked) for scaled_dot_product_attention, with the query heads of
  one KV head as that head's query rows, so grouped-query attention needs no copy of K/V per query head;
- each prefill chunk attends to its whole context (cached prefix + earlier chunks + itself), causally.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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


def decode_meta(
    table: torch.Tensor, lengths: torch.Tensor, block_size: int, context: int | None
) -> tuple[torch.Tensor, StepMeta]:
    """A decode-only step's positions and meta from its block table [batch, width] and context lengths
    [batch] (the new token included), in tensor operations only (a CUDA graph can hold them).
    ``context``: the tokens of the gathered context span for the torch path (at least the longest
    length); None for the CPU kernel, which reads the pool through the table itself."""
    positions = lengths - 1
    write = table.gather(1, (positions // block_size).unsqueeze(1)).squeeze(1) * block_size
    meta = StepMeta(write + positions % block_size, len(table), [], block_size, table, lengths)
    if context is not None:
        span = torch.arange(context, device=table.device)
        meta.decode_slots = table[:, span // block_size] * block_size + span % block_size
        meta.decode_mask = (span.unsqueeze(0) < lengths.unsqueeze(1)).view(len(table), 1, 1, context)
    return positions, meta


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    meta: StepMeta,
) -> torch.Tensor:
    """q [tokens, heads, d], k/v [tokens, kv_heads, d] -> [tokens, heads * d]; writes k/v to the pools."""
    k_pool.index_copy_(0, meta.write_slots, k)
    v_pool.index_copy_(0, meta.write_slots, v)
    return attend(q, k_pool, v_pool, meta)


def attend(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, meta: StepMeta) -> torch.Tensor:
    """q [tokens, heads, d] -> [tokens, heads * d], the step's keys and values already in the pools."""
    _, heads, dim = q.shape
    kv_heads = k_pool.shape[1]
    group = heads // kv_heads
    outs = []
    b = meta.num_decodes
    slots = meta.decode_slots
    if b and slots is None:
        outs.append(
            torch.ops.paged_step.decode_attention(
                q[:b].reshape(b, heads * dim),
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
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=meta.decode_mask)
        outs.append(out.reshape(b, heads * dim))
    for chunk in meta.prefills:
        keys = k_pool.index_select(0, chunk.slots).transpose(0, 1).unsqueeze(0)  # [1, kv, len, d]
        values = v_pool.index_select(0, chunk.slots).transpose(0, 1).unsqueeze(0)
        query = q[chunk.start : chunk.start + chunk.length].transpose(0, 1).unsqueeze(0)  # [1, heads, n, d]
        out = F.scaled_dot_product_attention(
            query,
            keys,
            values,
            attn_mask=chunk.mask,
            is_causal=chunk.mask is None,
            enable_gqa=group > 1,
        )
        outs.append(out[0].transpose(0, 1).reshape(chunk.length, heads * dim))
    return outs[0] if len(outs) == 1 else torch.cat(outs)
