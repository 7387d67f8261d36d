"""The paged KV cache: one preallocated pool of fixed-size blocks, block tables, and prefix caching.

Memory is allocated once: ``k`` and ``v`` are ``[layers, blocks * block_size, kv_heads, head_dim]``; a
token's K/V live at a *slot* ``block * block_size + offset``. A sequence owns a list of blocks (its block
table); joining or leaving a batch never copies anyone's cache.

Prefix caching: a full block is named by a SHA-256 digest of its tokens and of every token before it (the
digest of the previous block; the first block's covers the request's cache salt instead). When a prompt
starts with blocks already computed (a shared system prompt, the earlier turns of a conversation), they are
shared, not recomputed. A digest only finds a candidate: a hit also needs the cached block's own tokens,
salt and parent digest to equal the prompt's, so that no crafted prompt can read another request's K/V
(unlike Python's ``hash``, which vLLM's CVE-2025-25183 collided). Requests with different salts (tenants)
never share a block; requests with the same salt do. Blocks nobody holds keep their contents and stay
findable until memory is needed; then the least recently used is evicted.

Sliding windows (``window``: every layer reads at most that many keys, a query's own included): the blocks
wholly before a sequence's window go back to the pool as it moves on (``slide``), so a long sequence holds
about ``window`` tokens of blocks. Its block table keeps their positions (entries set to the null block,
never read: attention starts at the first kept block) and its ``hashes`` keep their digests, so its later
blocks are still named by its whole prefix. A prompt then shares a cached run of blocks that ends where
its computing starts and covers that point's window, whatever came before it (``open``).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import struct
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)


class CacheFullError(RuntimeError):
    """No free block is left (the router's token budget should prevent this)."""


def block_hash(parent: bytes | None, tokens: tuple[int, ...], salt: str = "") -> bytes:
    """The SHA-256 digest naming a full block: of its parent's digest and its token ids (uint32, little
    endian), or, for a sequence's first block (no parent), of the cache salt and its token ids."""
    if parent is None:
        head = salt.encode()
        head = b"\x00" + len(head).to_bytes(4, "little") + head
    else:
        head = b"\x01" + parent
    return hashlib.sha256(head + _uint32s(len(tokens)).pack(*tokens)).digest()


@functools.cache
def _uint32s(count: int) -> struct.Struct:
    """Packs ``count`` token ids (compiled once per length: a block's is always the same)."""
    return struct.Struct(f"<{count}I")


# What a cached block must match besides its digest: (parent digest, salt, tokens).
BlockKey = tuple[bytes | None, str, tuple[int, ...]]


@dataclass
class Sequence:
    """One sequence's tokens and blocks. ``hashes[i]`` names block i once it is full (prefix caching);
    ``salt`` keeps its blocks apart from those of requests with another salt."""

    tokens: list[int]
    blocks: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)
    # Tokens whose K/V are in the cache (the rest of ``tokens`` still has to run).
    computed: int = 0
    released: bool = False
    salt: str = ""
    # The LoRA adapter its rows run with ("" = the base model; already folded into ``salt``).
    adapter: str = ""
    # LongRoPE: it rotates long throughout (it holds more tokens than the switch:
    # backends/paged.open_sequence; already folded into ``salt``).
    long_rope: bool = False
    # Leading blocks given back because every layer's window has passed them: their ``blocks`` entries are
    # the null block (no memory, never read); their digests stay in ``hashes``.
    dropped: int = 0


class BlockAllocator:
    """Free blocks, reference counts and the prefix-cache index over a pool of ``num_blocks`` blocks."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.refs = [0] * num_blocks
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))
        self.by_hash: dict[bytes, int] = {}
        self.hash_of: dict[int, bytes] = {}
        # Each named block's (parent digest, salt, tokens): a lookup's hit must match them exactly.
        self.key_of: dict[int, BlockKey] = {}
        # Cached blocks nobody holds, least recently used first: evicted when ``free`` runs out.
        self.evictable: OrderedDict[int, None] = OrderedDict()
        self.hits = 0
        self.queries = 0
        # Lookups whose digest named a block with other tokens, salt or parent: refused, counted.
        self.mismatches = 0

    @property
    def num_free(self) -> int:
        return len(self.free) + len(self.evictable)

    def allocate(self) -> int:
        if self.free:
            block = self.free.pop()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)
            del self.by_hash[self.hash_of.pop(block)]
            del self.key_of[block]
        else:
            raise CacheFullError("the KV cache is full")
        self.refs[block] = 1
        return block

    def hold(self, block: int) -> None:
        if self.refs[block] == 0:
            self.evictable.pop(block, None)
        self.refs[block] += 1

    def release(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if block in self.hash_of:
                self.evictable[block] = None
            else:
                self.free.append(block)

    def lookup(self, h: bytes, key: BlockKey) -> int | None:
        """A cached block with this digest whose (parent digest, salt, tokens) equal ``key`` (held for the
        caller), or None. A block whose digest matches but whose key does not is a miss, counted in
        ``mismatches``: a digest alone never hands out another request's K/V."""
        block = self.find(h, key)
        if block is None:
            return None
        self.hits += 1
        self.hold(block)
        return block

    def find(self, h: bytes, key: BlockKey) -> int | None:
        """``lookup`` without holding the block or counting a hit (the caller holds what it takes)."""
        self.queries += 1
        block = self.by_hash.get(h)
        if block is None:
            return None
        if self.key_of[block] != key:
            self.mismatches += 1
            log.warning("Prefix cache: a block's digest matched but its tokens did not; not shared")
            return None
        return block

    def register(self, block: int, h: bytes, key: BlockKey) -> None:
        """Names a full block so later prompts can share it (the first block with a digest keeps it)."""
        if h not in self.by_hash and block not in self.hash_of:
            self.by_hash[h] = block
            self.hash_of[block] = h
            self.key_of[block] = key


class PagedKVCache:
    """The pool tensors plus the allocator; sequences grow block by block."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        window: int | None = None,
    ) -> None:
        """``window``: the most keys any layer reads up to a query, itself included (``ModelSpec.kv_window``);
        None when some layer reads them all (no block leaves a live sequence)."""
        # Two more blocks than the allocator hands out: the null block, all zeros, which padding in a
        # batch's block table points at, and the scratch block, which the padding rows of a CUDA graph's
        # step write to (shard/paged/graphs.py). Zeroed memory is committed now (allocated once).
        shape = (num_layers, (num_blocks + 2) * block_size, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # Each layer's pools [slots, kv_heads, d], as views made once (not an indexing per layer per step).
        self.k_layers = list(self.k.unbind(0))
        self.v_layers = list(self.v.unbind(0))
        self.block_size = block_size
        self.null_block = num_blocks
        self.scratch_block = num_blocks + 1
        self.allocator = BlockAllocator(num_blocks, block_size)
        self.device = device
        self.window = window

    @property
    def num_tokens(self) -> int:
        return self.allocator.num_blocks * self.block_size

    def tokens_in_use(self) -> int:
        return (self.allocator.num_blocks - self.allocator.num_free) * self.block_size

    # -- sequences --------------------------------------------------------------------------------
    def open(self, tokens: list[int], use_prefix_cache: bool, salt: str = "") -> Sequence:
        """A new sequence for a prompt; its longest cached prefix of full blocks (short of the last
        token, whose logits are needed) is shared instead of computed. Only blocks cached under the same
        ``salt`` (the request's cache_salt; "" = none) are shared, and its own blocks carry it.

        With a window, the prefix needs only the blocks its window reaches (``kept_from``): a prefix of k
        blocks is shared when blocks [kept_from(k), k) are all cached, the earlier ones being absent or not
        (a long conversation whose first blocks were evicted still finds its last ones). Every block's
        digest is still computed from the whole prompt, so a hit has the very prefix it continues."""
        seq = Sequence(list(tokens), salt=salt)
        if not use_prefix_cache:
            return seq
        bs = self.block_size
        parent: bytes | None = None
        found: list[int | None] = []
        # The usable prefix so far (blocks), and where the current run of cached blocks starts.
        best = run = 0
        for start in range(0, len(tokens) - bs, bs):
            block_tokens = tuple(tokens[start : start + bs])
            h = block_hash(parent, block_tokens, salt)
            block = self.allocator.find(h, (parent, salt, block_tokens))
            seq.hashes.append(h)
            found.append(block)
            parent = h
            if block is not None and run <= self.kept_from(len(found) * bs):
                best = len(found)
            elif block is None:
                if self.window is None:
                    break  # every later prefix needs this block
                run = len(found)
        first = self.kept_from(best * bs)
        for i in range(first, best):
            block = found[i]
            assert block is not None
            self.allocator.hold(block)
            seq.blocks.append(block)
        seq.blocks[:0] = [self.null_block] * first
        seq.dropped = first
        del seq.hashes[best:]
        seq.computed = best * bs
        self.allocator.hits += best
        return seq

    def kept_from(self, computed: int) -> int:
        """The first block a sequence with ``computed`` tokens in the cache still reads: its next query (at
        position ``computed``) and every later one see keys from ``computed - window + 1`` on (transformers'
        rule: a window covers the query and the ``window - 1`` positions before it), so no layer reads the
        blocks wholly before that again. 0 without a window."""
        if self.window is None:
            return 0
        return max(computed - self.window + 1, 0) // self.block_size

    def slide(self, seq: Sequence) -> None:
        """Gives back the blocks of ``seq`` that every layer's window has passed (``kept_from``): their
        table entries become the null block, their digests stay (and a sealed block given back stays
        findable in the prefix cache until evicted). Only sealed blocks go: ``seal`` names a sequence's
        blocks in order and must find each one's memory. Safe whenever ``computed`` will not go back below
        its value now (a step's tokens are never cut below where the step started: ``truncate``)."""
        first = min(self.kept_from(seq.computed), len(seq.hashes))
        for i in range(seq.dropped, first):
            self.allocator.release(seq.blocks[i])
            seq.blocks[i] = self.null_block
        seq.dropped = max(seq.dropped, first)

    def reserve(self, seq: Sequence, total: int) -> None:
        """Makes sure ``seq`` has blocks for ``total`` tokens."""
        need = -(-total // self.block_size) - len(seq.blocks)
        if need > self.allocator.num_free:
            raise CacheFullError(
                f"the KV cache is full: {need} more blocks needed, {self.allocator.num_free} free"
            )
        for _ in range(need):
            seq.blocks.append(self._allocate())

    def _allocate(self) -> int:
        """A block for a sequence, zeroed: attention reads a sequence's whole last block and masks the
        slots not written yet, and a zero weight times a NaN left by an earlier owner would still be NaN."""
        block = self.allocator.allocate()
        bs = self.block_size
        self.k[:, block * bs : (block + 1) * bs].zero_()
        self.v[:, block * bs : (block + 1) * bs].zero_()
        return block

    def truncate(self, seq: Sequence, length: int) -> None:
        """Forgets ``seq``'s tokens from ``length`` on (drafts the model did not accept): their slots are
        written again as it goes on, and the blocks wholly past ``length`` go back to the pool. Only
        tokens past every sealed block may go."""
        assert length >= len(seq.hashes) * self.block_size, "sealed blocks cannot be truncated"
        del seq.tokens[length:]
        seq.computed = min(seq.computed, length)
        keep = -(-length // self.block_size)
        assert keep >= seq.dropped, "dropped blocks cannot be truncated"
        for block in seq.blocks[keep:]:
            self.allocator.release(block)
        del seq.blocks[keep:]

    def slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        """Pool slots of the sequence's tokens [start, end) (none of them in a block given back)."""
        bs = self.block_size
        if start < seq.dropped * bs:
            raise ValueError(f"token {start} is in a block the window has passed (first kept: {seq.dropped})")
        return [seq.blocks[i // bs] * bs + i % bs for i in range(start, end)]

    def seal(self, seq: Sequence) -> None:
        """Registers the sequence's newly completed blocks in the prefix cache."""
        bs = self.block_size
        full = seq.computed // bs
        while len(seq.hashes) < full:
            i = len(seq.hashes)
            parent = seq.hashes[-1] if seq.hashes else None
            block_tokens = tuple(seq.tokens[i * bs : (i + 1) * bs])
            h = block_hash(parent, block_tokens, seq.salt)
            seq.hashes.append(h)
            self.allocator.register(seq.blocks[i], h, (parent, seq.salt, block_tokens))

    def fork(self, seq: Sequence) -> Sequence:
        """A copy that shares the full blocks and gets its own copy of the partial last block."""
        child = Sequence(list(seq.tokens), computed=seq.computed, hashes=list(seq.hashes), salt=seq.salt,
                         adapter=seq.adapter, dropped=seq.dropped, long_rope=seq.long_rope)  # fmt: skip
        bs = self.block_size
        full = seq.computed // bs
        for block in seq.blocks[seq.dropped : full]:
            self.allocator.hold(block)
        child.blocks = list(seq.blocks[:full])
        for block in seq.blocks[full:]:
            copy = self._allocate()
            src = slice(block * bs, (block + 1) * bs)
            dst = slice(copy * bs, (copy + 1) * bs)
            self.k[:, dst] = self.k[:, src]
            self.v[:, dst] = self.v[:, src]
            child.blocks.append(copy)
        return child

    def release(self, seq: Sequence) -> None:
        if seq.released:
            return
        seq.released = True
        for block in seq.blocks[seq.dropped :]:
            self.allocator.release(block)
        seq.blocks = []
        seq.dropped = 0
