"""Phi-3's LongRoPE and Phi-4-mini's partial rotary embedding on the paged backend (shard/paged/arch/phi3.py,
layers.Rotary, backends/paged.py), on a tiny random Phi-3 whose switch (``original_max_position_embeddings``)
is 24 positions: the rotary rows against transformers' own rotary embedding per forward call; greedy ids
against transformers' ``generate`` (which drops a short sequence's cache at its 25th token and runs it
whole, long) for prompts on both sides of the switch, one after another so that prompts meet each other's
cached blocks: those of the same tokens rotated the other way are not shared, those rotated alike are.
test_architectures.py runs the same model and a Phi-4-mini-shaped one in its CONFIGS (chunked prompts,
with and without the CPU kernels)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from shard.backends.paged import PagedBackend, open_sequence
from shard.engines import make_engine
from shard.paged.layers import LONG_ROPE_SALT, Rotary
from shard.types import RequestSpec
from tests.engine_run import run_engine
from tests.unit.shard.paged.test_architectures import (
    CPU,
    build,
    phi3_longrope_config,
    phi4_mini_config,
    prompts,
    reference,
)

pytestmark = pytest.mark.timeout(300)

SWITCH = 24


def backend(path: Path, cpu_kernels: bool = True) -> PagedBackend:
    return PagedBackend(path, CPU, kv_cache_bytes=4 * 2**20, block_size=4, cpu_kernels=cpu_kernels)


def test_rows_are_transformers_rotation_per_forward_call(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A call's cos/sin, as transformers' Phi3RotaryEmbedding computes them for the call's positions: a
    prompt within the switch (short), a longer prompt (long throughout), a short sequence's new token
    before the switch, and a long sequence's new tokens, flagged or found long by their positions alone
    (a decode step in a CUDA graph passes no flags)."""
    from transformers import AutoConfig
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    path = build(tmp_path / "m", tiny_model_dir, phi3_longrope_config)
    rotary = backend(path, cpu_kernels=False).model.rotaries[""]
    assert rotary.long_from == SWITCH
    theirs = Phi3RotaryEmbedding(AutoConfig.from_pretrained(path))
    x = torch.zeros(1, dtype=torch.float32)
    calls = [
        (torch.arange(SWITCH), False),  # a prompt of 24: short
        (torch.arange(SWITCH + 6), True),  # a prompt of 30: long throughout
        (torch.tensor([SWITCH - 1]), False),  # the 24th token: short
        (torch.tensor([SWITCH + 9]), True),  # a long sequence's new token
        (torch.tensor([SWITCH]), False),  # the same, unflagged
    ]
    for positions, long in calls:
        cos, sin = theirs(x, positions.unsqueeze(0))
        step = rotary.step(positions, torch.full_like(positions, long, dtype=torch.bool))
        assert step.cos is not None and step.sin is not None
        half = cos.shape[-1] // 2
        assert torch.equal(step.cos[:, 0], cos[0, :, :half]), (positions, long)
        assert torch.equal(step.sin[:, 0], sin[0, :, :half]), (positions, long)
    short = rotary.step(torch.arange(SWITCH)).cos
    long_rows = rotary.step(torch.arange(SWITCH), torch.ones(SWITCH, dtype=torch.bool)).cos
    assert short is not None and long_rows is not None and not torch.allclose(short, long_rows)


def test_the_long_factors_change_transformers_tokens(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The greedy tests can fail: with long factors equal to the short ones transformers gives other
    tokens, for a long prompt and for a short one that generates past the switch."""
    asked = prompts()[:2]
    path = build(tmp_path / "a", tiny_model_dir, phi3_longrope_config)
    flat = build(tmp_path / "b", tiny_model_dir, functools.partial(phi3_longrope_config, long_factor=0.1))
    for mine, other in zip(reference(path, asked), reference(flat, asked), strict=True):
        assert mine != other


@pytest.mark.parametrize("cpu_kernels", [True, False])
def test_each_rotation_shares_only_its_own_blocks(
    tiny_model_dir: Path, tmp_path: Path, cpu_kernels: bool
) -> None:
    """One request after another: 20 tokens generating 3 (short throughout); the same 20 and 25 more (long:
    the short blocks of its first 20 tokens are not shared); 40 of those and 3 others (long: 10 blocks
    shared); 22 of them generating 3 (short: the first request's 5 blocks shared); the first 20 again,
    generating 40 (short, then run whole long at its 25th token, sharing the long prompt's first 5
    blocks). Each gives transformers' greedy ids for it alone; the engine drafts (n-gram speculation)."""
    path = build(tmp_path / "m", tiny_model_dir, phi3_longrope_config)
    long_prompt = prompts()[1]
    asked = [
        (long_prompt[:20], 3),
        (long_prompt, 40),
        ([*long_prompt[:40], 17, 23, 99], 40),
        (long_prompt[:22], 3),
        (long_prompt[:20], 40),
    ]
    b = backend(path, cpu_kernels)
    engine = make_engine(b, prefill_tokens=16, speculate=4)
    allocator = b.cache.allocator
    got, hits = [], []
    for i, (prompt, new) in enumerate(asked):
        before = allocator.hits
        request = RequestSpec(i, prompt, max_new_tokens=new, ignore_eos=True)
        got.append(run_engine(engine, {0: [request]})[i])
        hits.append(allocator.hits - before)
    assert got == [reference(path, [prompt], new)[0] for prompt, new in asked]
    assert hits[1] == 0 and hits[2] >= 10 and hits[3] >= 5 and hits[4] >= 4 + 5
    assert allocator.num_free == allocator.num_blocks


def test_a_sequence_opens_long_when_it_holds_more_than_the_switch(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A prompt, or a preempted request reopening with every token it had fed: more tokens than the
    switch open long (transformers' cache holds them so), in their own prefix-cache namespace."""
    path = build(tmp_path / "m", tiny_model_dir, phi3_longrope_config)
    b = backend(path)
    short = open_sequence(b.cache, list(range(3, 3 + SWITCH)), True, "tenant", b.long_rope_from)
    long = open_sequence(b.cache, list(range(3, 4 + SWITCH)), True, "tenant", b.long_rope_from)
    assert (short.long_rope, short.salt) == (False, "tenant")
    assert (long.long_rope, long.salt) == (True, "tenant" + LONG_ROPE_SALT)
    assert b.draft_room(short) == 0 and b.draft_room(long) > 100
    for seq in (short, long):
        b.cache.release(seq)


def test_phi4_mini_rotates_half_of_each_head_on_the_torch_path(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A partial rotary embedding (Phi-4-mini's shape: CONFIGS' phi4-mini gives transformers' tokens): the
    first 8 of each head's 16 dimensions rotate, the others pass; the CPU kernels rotate whole heads, so
    its layers attend on the torch path."""
    path = build(tmp_path / "m", tiny_model_dir, phi4_mini_config)
    b = backend(path)
    assert b.spec.rotary_dim == 8 and not b.model.fused
    x = torch.randn(5, 4, 16, generator=torch.Generator().manual_seed(0))
    step = b.model.rotaries[""].step(torch.arange(5))
    assert step.cos is not None and step.sin is not None and step.cos.shape[-1] == 4
    y = Rotary.apply(x, step.cos, step.sin)
    assert torch.equal(y[..., 8:], x[..., 8:]) and not torch.allclose(y[..., :8], x[..., :8])
