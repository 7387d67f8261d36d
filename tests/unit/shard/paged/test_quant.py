"""Weight-only int8 / int4 linear layers of the paged backend (shard/paged/quant.py, --quantize int8|int4)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from launcher.config import ArgumentError, LauncherConfig
from shard.backends import load_backend
from shard.backends.paged import PagedBackend
from shard.config import ShardConfig
from shard.dist import Parallel
from shard.engines import make_engine
from shard.paged import quant
from shard.paged.quant import QuantColumnLinear, QuantLinear, QuantRowLinear
from shard.types import RequestSpec, SamplingParams
from tests.engine_run import run_engine
from tests.kernels import require_kernels

pytestmark = pytest.mark.timeout(300)

CPU = torch.device("cpu")
# Relative error bounds, ||y - y_f32|| / ||y_f32||, on Gaussian weights (measured: about 0.011 for int8
# and 0.12 for int4; Gaussian weights are the hard case for 16 levels).
INT8_REL = 0.02
INT4_REL = 0.16
ACT_REL = 0.01  # what int8 activations (VNNI kernel) add on their own: about 0.005


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def kernels() -> bool:
    return require_kernels(optional=True)


def test_int8_round_trip_is_within_half_a_step() -> None:
    w = torch.randn(40, 96)
    q, scale = quant.quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (40,)
    assert ((quant.dequantize_int8(q, scale) - w).abs() <= scale[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("k", [64, 96])
def test_int4_round_trip_and_layout(k: int) -> None:
    w = torch.randn(8, k)
    nibbles, scales = quant.quantize_int4(w)
    kp = -(-k // 64) * 64  # whole chunks of 64; 96 pads a block of zeros
    assert nibbles.dtype == torch.uint8 and nibbles.shape == (8, kp // 2)
    assert scales.dtype == torch.float16 and scales.shape == (8, kp // 32 + 16)
    back = quant.dequantize_int4(nibbles, scales, k)
    blocks = k // 32
    step = (w.reshape(8, blocks, 32).amax(-1) - w.reshape(8, blocks, 32).amin(-1)) / 15
    assert ((back - w).abs().reshape(8, blocks, 32) <= step[..., None] * 0.51 + 1e-3).all()
    # Weights with 16 levels per block (a Q4_1 checkpoint's, such as the default model's) come back exactly.
    levels = torch.randint(0, 16, (8, blocks, 32))
    levels[..., 0], levels[..., 1] = 0, 15  # Q4_1 maps each block's minimum to 0 and its maximum to 15
    levels = levels.reshape(8, k).float() * 0.0625 - 0.5
    assert torch.equal(quant.dequantize_int4(*quant.quantize_int4(levels), k), levels)
    with pytest.raises(ValueError, match="divisible by 32"):
        quant.quantize_int4(torch.randn(4, 48))


def test_int4_chunk_order_alternates_blocks_by_lane() -> None:
    """Byte positions 4l..4l+3 of a chunk hold weights of its first block for even lanes l, of its second
    for odd ones, and every weight appears once."""
    order = quant.CHUNK_ORDER.tolist()
    assert sorted(order) == list(range(64))
    for lane in range(16):
        assert {order[p] // 32 for p in range(4 * lane, 4 * lane + 4)} == {lane % 2}


@pytest.mark.parametrize("mode, bound", [("int8", INT8_REL), ("int4", INT4_REL)])
@pytest.mark.parametrize("m", [1, 3, 4, 7, 64, 200])
@pytest.mark.parametrize("k", [192, 160])  # 160: int4 pads the last chunk of 64
def test_quantized_linear_is_close_to_float32(kernels: bool, mode: str, bound: float, m: int, k: int) -> None:
    torch.manual_seed(m)
    n = 70  # four 16-channel tiles and a tail of 6
    w, b, x = torch.randn(n, k), torch.randn(n), torch.randn(2, m, k)
    layer = QuantLinear(w, b, mode)
    y = layer(x)
    assert y.shape == (2, m, n)
    assert rel(y, F.linear(x, w, b)) < bound
    # Against the dequantized weight: exact up to float rounding, except where a kernel rounds x to int8
    # in blocks of 32 (about 0.5%): int4's always, int8's on VNNI.
    rounds_x = layer.fast and m < layer.large_m and (mode == "int4" or quant.int8_vnni())
    assert rel(y, F.linear(x, layer.dequantized(), b)) < (ACT_REL if rounds_x else 1e-5)
    if kernels:
        assert layer.fast


def test_kernels_match_the_reference_path(kernels: bool) -> None:
    if not kernels:
        pytest.skip("no C++ compiler here: the CPU kernels cannot be built")
    torch.manual_seed(0)
    try:
        for vnni in (False, True):
            torch.ops.paged_quant.set_int8_vnni(vnni)
            for mode in quant.MODES:
                for m in (1, 5, 70):
                    layer = QuantLinear(torch.randn(33, 128), None, mode)
                    x = torch.randn(m, 128)
                    fast = layer(x)
                    layer.fast = False
                    exact = (mode == "int8" and not vnni) or m >= layer.large_m
                    assert rel(fast, layer(x)) < (1e-5 if exact else ACT_REL), (vnni, mode, m)
    finally:
        torch.ops.paged_quant.set_int8_vnni(True)


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [16, 70, 1000])
def test_dense_kernel_matches_matmul(kernels: bool, m: int, n: int) -> None:
    """The float32 decode product: whole 16-channel tiles, a tail of fewer, split over threads."""
    if not kernels:
        pytest.skip("no C++ compiler here: the CPU kernels cannot be built")
    torch.manual_seed(n + m)
    w, x = torch.randn(n, 96), torch.randn(m, 96)
    torch.testing.assert_close(torch.ops.paged_quant.dense_linear(x, w), x @ w.T, atol=1e-4, rtol=1e-5)


def test_row_linear_all_reduces_and_ranks_quantize_their_own_slice() -> None:
    torch.manual_seed(1)
    w, x = torch.randn(24, 128), torch.randn(3, 128)
    # Two ranks, each holding half of the input features; the "all-reduce" sums the two ranks' outputs.
    partial: list[torch.Tensor] = []
    layers = [
        QuantRowLinear(
            w[:, r * 64 : (r + 1) * 64].clone(), "int8", Parallel(r, 2, lambda t: partial.append(t) or t)
        )
        for r in range(2)
    ]
    for r, layer in enumerate(layers):
        layer(x[:, r * 64 : (r + 1) * 64])
    assert rel(partial[0] + partial[1], x @ w.T) < INT8_REL
    col = QuantColumnLinear(w[:12].clone(), None, "int4")
    assert col(x).shape == (3, 12)


def greedy(backend: PagedBackend, prompt: list[int], steps: int) -> list[int]:
    engine = make_engine(backend)
    tokens = run_engine(engine, {0: [RequestSpec(1, prompt, SamplingParams(), max_new_tokens=steps)]})[1]
    engine.clear()
    return tokens


def test_paged_backend_int8_and_int4_follow_float32(tiny_model_dir: Path) -> None:
    prompt = list(range(5, 25))
    reference = greedy(PagedBackend(tiny_model_dir, CPU, kv_cache_bytes=2**20), prompt, 8)
    int8 = PagedBackend(tiny_model_dir, CPU, kv_cache_bytes=2**20, quantize="int8")
    layer = int8.model.layers[0]
    assert isinstance(layer.qkv, QuantColumnLinear) and isinstance(layer.o, QuantRowLinear)
    assert isinstance(layer.mlp.gate_up, QuantColumnLinear) and isinstance(layer.mlp.down, QuantRowLinear)
    assert int8.model.head is not None and int8.model.lm_head is None  # untied head: the float copy is gone
    assert greedy(int8, prompt, 8)[:4] == reference[:4]
    int4 = PagedBackend(tiny_model_dir, CPU, kv_cache_bytes=2**20, quantize="int4")
    assert len(greedy(int4, prompt, 8)) == 8


def test_load_backend_routes_int8_to_paged_and_refuses_transformers(tiny_model_dir: Path) -> None:
    backend = load_backend(ShardConfig(model_path=str(tiny_model_dir), quantize="int8"), CPU)
    assert isinstance(backend, PagedBackend)
    with pytest.raises(ValueError, match="needs the paged backend"):
        load_backend(
            ShardConfig(model_path=str(tiny_model_dir), quantize="int4", backend="transformers"), CPU
        )


def test_load_backend_refuses_int8_for_a_model_the_paged_backend_cannot_run(tmp_path: Path) -> None:
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="paged backend cannot run this model"):
        load_backend(ShardConfig(model_path=str(tmp_path), quantize="int8"), CPU)


def test_launcher_accepts_the_int_modes() -> None:
    for mode in ("int8", "int4"):
        LauncherConfig(quantize=mode).validate()
    with pytest.raises(ArgumentError, match="needs the paged backend"):
        LauncherConfig(quantize="int8", backend="transformers").validate()
    with pytest.raises(ArgumentError, match="must be one of"):
        LauncherConfig(quantize="int3").validate()
