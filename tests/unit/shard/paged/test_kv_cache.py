"""The prefix cache cannot be fooled: blocks are named by SHA-256 digests, a hit needs equal tokens, salt
and parent, and requests with different cache salts never share a block (issue 17, CVE-2025-25183)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shard.backends.paged import Chunk, PagedBackend
from shard.paged import kv_cache
from shard.paged.kv_cache import BlockAllocator, PagedKVCache, block_hash

pytestmark = pytest.mark.timeout(60)

CPU = torch.device("cpu")
BS = 4


def make_cache(num_blocks: int = 32) -> PagedKVCache:
    return PagedKVCache(1, num_blocks, BS, 1, 2, torch.float32, CPU)


def run(cache: PagedKVCache, tokens: list[int], salt: str = "") -> list[int]:
    """As a request would: opens the prompt, "computes" all of it, seals its full blocks, leaves.
    Returns its block table (the blocks stay cached, evictable)."""
    seq = cache.open(tokens, use_prefix_cache=True, salt=salt)
    cache.reserve(seq, len(tokens))
    seq.computed = len(tokens)
    cache.seal(seq)
    blocks = list(seq.blocks)
    cache.release(seq)
    return blocks


def shared(cache: PagedKVCache, tokens: list[int], salt: str = "") -> list[int]:
    """The blocks a new request for ``tokens`` would share (released again at once)."""
    seq = cache.open(tokens, use_prefix_cache=True, salt=salt)
    blocks = list(seq.blocks)
    assert seq.computed == len(blocks) * BS
    cache.release(seq)
    return blocks


PROMPT = list(range(100, 113))  # 13 tokens: three full blocks, and the last token always runs


def test_block_hash_is_a_sha256_chain_that_covers_the_salt() -> None:
    first = block_hash(None, (1, 2, 3, 4))
    assert isinstance(first, bytes) and len(first) == 32
    assert first == block_hash(None, (1, 2, 3, 4), "")  # deterministic, no per-process seed
    assert block_hash(None, (1, 2, 3, 4), "tenant-a") != first
    assert block_hash(None, (1, 2, 3, 4), "tenant-a") != block_hash(None, (1, 2, 3, 4), "tenant-b")
    assert block_hash(first, (5, 6, 7, 8)) != block_hash(block_hash(None, (9, 2, 3, 4)), (5, 6, 7, 8))
    # Token ids are fixed-width: no two token lists of one length share their bytes.
    assert block_hash(None, (1, 2**16, 3, 4)) != block_hash(None, (2**16, 1, 3, 4))
    assert block_hash(None, (2**32 - 1, 0, 0, 0)) != block_hash(None, (0, 0, 0, 2**32 - 1))


def test_same_salt_shares_and_different_salts_do_not() -> None:
    cache = make_cache()
    a = cache.allocator
    blocks = run(cache, PROMPT, "tenant-a")
    assert shared(cache, [*PROMPT, 7], "tenant-a") == blocks[:3]
    hits = a.hits
    assert shared(cache, [*PROMPT, 7], "tenant-b") == []
    assert shared(cache, [*PROMPT, 7], "") == []  # no salt is a salt of its own
    assert a.hits == hits
    # The other tenant's blocks are its own: computed again, registered apart, then shared among it.
    other = run(cache, PROMPT, "tenant-b")
    assert not set(other[:3]) & set(blocks[:3])  # (the partial fourth block was freed and reused)
    assert shared(cache, [*PROMPT, 7], "tenant-b") == other[:3]
    assert shared(cache, [*PROMPT, 7], "tenant-a") == blocks[:3]
    assert a.mismatches == 0  # SHA-256 digests of different salts never even met


def test_a_digest_collision_shares_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """With every digest equal (the worst hash there is), no block reaches a prompt it does not match."""
    monkeypatch.setattr(kv_cache, "block_hash", lambda parent, tokens, salt="": b"\0" * 32)
    cache = make_cache()
    a = cache.allocator
    victim = run(cache, PROMPT, "tenant-a")
    assert len(a.by_hash) == 1  # one digest: only the victim's first block is findable
    for tokens, salt in [
        ([1, 2, 3, 4, *PROMPT[4:]], "tenant-a"),  # another first block
        (list(reversed(PROMPT)), "tenant-a"),
        (PROMPT, "tenant-b"),  # the same tokens under another salt
        (PROMPT, ""),
    ]:
        before = a.mismatches
        assert shared(cache, tokens, salt) == []
        assert a.mismatches == before + 1
    # Equal tokens and salt still share the first block; the second (another parent) is refused.
    assert shared(cache, [*PROMPT[:4], 9, 9, 9, 9, 5], "tenant-a") == victim[:1]
    assert shared(cache, PROMPT, "tenant-a") == victim[:1]  # the digest names block 0, not block 1
    # Requests that miss get blocks of their own, never the victim's.
    seq = cache.open([1, 2, 3, 4, *PROMPT[4:]], use_prefix_cache=True, salt="tenant-a")
    cache.reserve(seq, len(seq.tokens))
    assert seq.computed == 0 and not set(seq.blocks) & set(victim[:1])
    cache.release(seq)


def test_a_lookup_checks_tokens_salt_and_parent() -> None:
    a = BlockAllocator(num_blocks=2, block_size=BS)
    block = a.allocate()
    parent = block_hash(None, (1, 2, 3, 4))
    key = (parent, "s", (5, 6, 7, 8))
    h = block_hash(parent, (5, 6, 7, 8))
    a.register(block, h, key)
    a.release(block)
    for wrong in [(parent, "s", (5, 6, 7, 9)), (parent, "t", (5, 6, 7, 8)), (h, "s", (5, 6, 7, 8))]:
        assert a.lookup(h, wrong) is None
    assert (a.queries, a.hits, a.mismatches) == (3, 0, 3)
    assert a.refs[block] == 0 and block in a.evictable  # a refused lookup holds nothing
    assert a.lookup(h, key) == block
    assert (a.queries, a.hits, a.mismatches, a.refs[block]) == (4, 1, 3, 1)


def test_eviction_forgets_digest_and_tokens_together() -> None:
    cache = make_cache(num_blocks=4)
    a = cache.allocator
    first = run(cache, PROMPT[:9], "s")  # two full blocks cached, one partial block freed
    assert len(a.evictable) == 2 and shared(cache, PROMPT[:9], "s") == first[:2]
    digests = [a.hash_of[block] for block in first[:2]]
    second = run(cache, list(range(1, 13)), "s")  # 3 blocks: 2 free ones, then the least recently used
    assert first[0] in second and first[1] not in second
    # The evicted block was the prompt's first (released first): its digest and key went with it, and
    # the block now holds the second prompt's tokens under the second prompt's name.
    assert digests[0] not in a.by_hash and a.by_hash[digests[1]] == first[1]
    assert len(a.by_hash) == len(a.hash_of) == len(a.key_of) == 4
    assert a.key_of[first[0]] == (a.hash_of[second[1]], "s", (9, 10, 11, 12))
    assert shared(cache, PROMPT[:9], "s") == []  # the chain starts with the evicted block: a miss
    assert a.num_free == 4  # everything cached is evictable, nothing leaked


def test_fork_keeps_the_salt() -> None:
    cache = make_cache()
    seq = cache.open(PROMPT[:6], use_prefix_cache=True, salt="s")
    cache.reserve(seq, 6)
    seq.computed = 6
    cache.seal(seq)
    child = cache.fork(seq)
    assert child.salt == "s" and child.hashes == seq.hashes
    child.tokens += [7, 7]  # the child completes its second block, which it owns
    cache.reserve(child, 8)
    child.computed = 8
    cache.seal(child)
    cache.release(seq)
    cache.release(child)
    assert len(shared(cache, [*PROMPT[:6], 7, 7, 1], "s")) == 2
    assert shared(cache, [*PROMPT[:6], 7, 7, 1], "") == []


@pytest.fixture()
def paged(tiny_model_dir: Path) -> PagedBackend:
    return PagedBackend(tiny_model_dir, CPU, kv_cache_bytes=2 * 2**20, block_size=BS)


def prompt_logits(backend: PagedBackend, prompt: list[int], salt: str) -> tuple[int, torch.Tensor]:
    """Runs a prompt through the backend under ``salt``: (tokens taken from the cache, last logits)."""
    seq = backend.open(prompt, False, salt)
    computed = seq.computed
    _, logits = backend.step(None, None, [Chunk(seq, len(prompt) - seq.computed)])
    backend.cache.release(seq)
    return computed, logits[0][-1]


def test_the_paged_backend_passes_the_salt_on(paged: PagedBackend) -> None:
    prompt = list(range(3, 20))  # 17 tokens: four full blocks
    computed, cold = prompt_logits(paged, prompt, "tenant-a")
    assert computed == 0
    computed, warm = prompt_logits(paged, prompt, "tenant-a")
    assert computed == 16 and torch.allclose(warm, cold, atol=1e-5)
    computed, other = prompt_logits(paged, prompt, "tenant-b")
    assert computed == 0 and torch.allclose(other, cold, atol=1e-5)
    assert paged.open(prompt, True, "tenant-a").computed == 0  # prompt logits: the cache is not used
