"""The decode step's CPU kernels (shard/paged/step_cpu.cpp) against plain torch, and the paged model with
them against the model without them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from shard.backends.paged import PagedBackend
from shard.paged.layers import Rotary
from tests.kernels import require_kernels

pytestmark = [pytest.mark.timeout(300)]

CPU = torch.device("cpu")
DTYPES = [torch.float32, torch.bfloat16]
# bfloat16 outputs are rounded once (8 bits of mantissa); float32 ones agree to the last bits.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module", autouse=True)
def kernels() -> None:
    require_kernels()


def reference_attention(q, k_pool, v_pool, table, lengths, block_size):
    """Gathers each sequence's context and runs scaled_dot_product_attention in float32."""
    kv, d = k_pool.shape[1:]
    out = []
    for s, length in enumerate(lengths.tolist()):
        t = torch.arange(length)
        slots = table[s, t // block_size] * block_size + t % block_size
        keys = k_pool[slots].float().transpose(0, 1)  # [kv, len, d]
        values = v_pool[slots].float().transpose(0, 1)
        query = q[s].float().view(kv, -1, d)  # the query heads of KV head h are rows h * group...
        out.append(F.scaled_dot_product_attention(query, keys, values).reshape(-1))
    return torch.stack(out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("heads", "kv_heads", "d"), [(9, 3, 64), (4, 4, 16), (8, 1, 32), (10, 2, 128), (6, 2, 48)]
)
def test_decode_attention_matches_gathered_sdpa(dtype, heads, kv_heads, d) -> None:
    torch.manual_seed(0)
    block_size, num_blocks = 16, 40
    k_pool = torch.randn(num_blocks * block_size, kv_heads, d).to(dtype)
    v_pool = torch.randn(num_blocks * block_size, kv_heads, d).to(dtype)
    lengths = torch.tensor([1, 16, 17, 100, 33, 128])
    table = torch.stack([torch.randperm(num_blocks)[:8] for _ in lengths])
    # q is a strided slice of a fused q/k/v product, as in the model.
    qkv = torch.randn(len(lengths), (heads + 2 * kv_heads) * d).to(dtype)
    q = qkv[:, : heads * d]
    out = torch.ops.paged_step.decode_attention(q, k_pool, v_pool, table, lengths, block_size)
    assert out.dtype == dtype and out.shape == (len(lengths), heads * d)
    want = reference_attention(q, k_pool, v_pool, table, lengths, block_size)
    torch.testing.assert_close(out.float(), want, atol=TOL[dtype], rtol=TOL[dtype])


def test_decode_attention_threads_alike() -> None:
    """One sequence splits its KV heads over the threads; many split by sequence: same numbers."""
    torch.manual_seed(1)
    k_pool, v_pool = torch.randn(2, 64, 4, 32).unbind(0)
    q = torch.randn(3, 8 * 32)
    table = torch.tensor([[0, 1], [2, 3], [1, 0]])
    lengths = torch.tensor([30, 5, 17])
    together = torch.ops.paged_step.decode_attention(q, k_pool, v_pool, table, lengths, 16)
    for s in range(3):
        alone = torch.ops.paged_step.decode_attention(q[s : s + 1], k_pool, v_pool, table[s : s + 1],
                                                      lengths[s : s + 1], 16)  # fmt: skip
        torch.testing.assert_close(alone, together[s : s + 1], atol=1e-6, rtol=1e-6)


def test_decode_attention_refuses_bad_arguments() -> None:
    k_pool = torch.zeros(32, 2, 16)
    q = torch.zeros(1, 4 * 16)
    table = torch.tensor([[0, 1]])
    with pytest.raises(RuntimeError, match="length outside the block table"):
        torch.ops.paged_step.decode_attention(q, k_pool, k_pool, table, torch.tensor([33]), 16)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        torch.ops.paged_step.decode_attention(torch.zeros(1, 24), *torch.zeros(2, 32, 2, 12), table,
                                              torch.tensor([3]), 16)  # fmt: skip
    with pytest.raises(RuntimeError, match="share a dtype"):
        torch.ops.paged_step.decode_attention(q.double(), k_pool, k_pool, table, torch.tensor([3]), 16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_transformers_formula(dtype) -> None:
    torch.manual_seed(2)
    x, w = torch.randn(7, 576).to(dtype), torch.randn(576).to(dtype)
    xf = x.float()
    want = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    got = torch.ops.paged_step.rms_norm(x, w, 1e-5)
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_in_place_matches_the_torch_path(dtype) -> None:
    torch.manual_seed(3)
    heads, kv_heads, d = 6, 2, 32
    rotary = Rotary(1.0 / 10000 ** (torch.arange(0, d, 2).float() / d), 1.0, 256, dtype)
    positions = torch.tensor([0, 1, 5, 255, 17])
    qkv = torch.randn(5, (heads + 2 * kv_heads) * d).to(dtype)
    want = rotary.step(positions).qkv(qkv.clone(), heads, kv_heads, d)
    rotary.fused = True
    got = rotary.step(positions).qkv(qkv, heads, kv_heads, d)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.equal(got[2], want[2])  # values are not rotated
    with pytest.raises(RuntimeError, match="position outside the table"):
        rotary.step(torch.tensor([0, 1, 2, 3, 256])).qkv(qkv, heads, kv_heads, d)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_store_rotates_and_writes_the_cache(dtype) -> None:
    torch.manual_seed(5)
    heads, kv_heads, d = 6, 2, 32
    rotary = Rotary(1.0 / 10000 ** (torch.arange(0, d, 2).float() / d), 1.0, 64, dtype)
    positions = torch.tensor([3, 0, 63])
    qkv = torch.randn(3, (heads + 2 * kv_heads) * d).to(dtype)
    q, k, v = rotary.step(positions).qkv(qkv.clone(), heads, kv_heads, d)
    k_pool, v_pool = torch.zeros(10, kv_heads, d, dtype=dtype), torch.zeros(10, kv_heads, d, dtype=dtype)
    slots = torch.tensor([7, 2, 9])
    torch.ops.paged_step.rotary_store_(
        qkv, positions, rotary.cos32, rotary.sin32, heads, kv_heads, d, k_pool, v_pool, slots
    )
    got_q = qkv[:, : heads * d].view(3, heads, d)
    torch.testing.assert_close(got_q.float(), q.float(), atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(k_pool[slots].float(), k.float(), atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.equal(v_pool[slots], v)
    untouched = torch.ones(10, dtype=torch.bool)
    untouched[slots] = False
    assert not k_pool[untouched].any() and not v_pool[untouched].any()
    with pytest.raises(RuntimeError, match="slot outside the pool"):
        torch.ops.paged_step.rotary_store_(
            qkv,
            positions,
            rotary.cos32,
            rotary.sin32,
            heads,
            kv_heads,
            d,
            k_pool,
            v_pool,
            torch.tensor([1, 2, 10]),
        )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [1536, 40, 7])  # whole vectors, then scalar tails
def test_silu_mul_matches_torch(dtype, width: int) -> None:
    torch.manual_seed(6)
    x = (torch.randn(5, 2 * width) * 6).to(dtype)
    x[0, :4] = torch.tensor([100.0, -100.0, 0.0, -0.0])  # the exponential's extremes and zero
    gate, up = x.float().chunk(2, dim=-1)
    want = F.silu(gate) * up
    got = torch.ops.paged_step.silu_mul(x)
    assert got.shape == (5, width) and got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_adds_in_place_then_normalizes(dtype) -> None:
    torch.manual_seed(7)
    h, delta, w = torch.randn(4, 576).to(dtype), torch.randn(4, 576).to(dtype), torch.randn(576).to(dtype)
    want_h = h + delta
    want = torch.ops.paged_step.rms_norm(want_h, w, 1e-6)
    got = torch.ops.paged_step.add_rms_norm_(h, delta, w, 1e-6)
    assert torch.equal(h, want_h)  # the residual stream, updated in place, rounded as torch's add
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="must share a dtype"):
        torch.ops.paged_step.add_rms_norm_(h, delta.double(), w, 1e-6)


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], list(range(20, 39))]


def greedy_logits(backend: PagedBackend, prompts: list[list[int]], steps: int = 6) -> torch.Tensor:
    """The logits of a prefill and ``steps`` greedy decode steps of ``prompts``, stacked."""
    out = backend.prefill(prompts, [False] * len(prompts))
    logits = [out.logits]
    ids = out.logits.argmax(-1)
    for _ in range(steps):
        step = backend.decode(out.state, ids)
        logits.append(step)
        ids = step.argmax(-1)
    return torch.stack(logits)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_with_kernels_matches_model_without(tiny_model_dir: Path, dtype: str) -> None:
    """Prefill and several decode steps of a batch: the same logits with the kernels and without."""
    runs = []
    for cpu_kernels in (True, False):
        backend = PagedBackend(tiny_model_dir, CPU, dtype, kv_cache_bytes=2**20, block_size=4,
                               cpu_kernels=cpu_kernels)  # fmt: skip
        assert backend.model.fused is cpu_kernels
        runs.append(greedy_logits(backend, PROMPTS))
    tol = 1e-4 if dtype == "float32" else 0.1
    torch.testing.assert_close(runs[0], runs[1], atol=tol, rtol=tol)


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_decode_layers_matches_the_python_path(
    tiny_model_dir: Path, quantize: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decode steps through decode_layers (one call for every layer) give the logits of the fused Python
    path: float32 weights at one stream (the dense kernel's single row), quantized ones at three."""
    calls = []
    one_call = torch.ops.paged_step.decode_layers
    monkeypatch.setattr(torch.ops.paged_step, "decode_layers", lambda *a: calls.append(1) or one_call(*a))
    batch = 1 if quantize is None else 3
    runs = []
    for plan in (True, False):
        backend = PagedBackend(tiny_model_dir, CPU, "float32", kv_cache_bytes=2**20, block_size=4,
                               quantize=quantize)  # fmt: skip
        made = backend.model.decode_plan()
        assert made is not None and made.max_rows >= batch
        if not plan:
            backend.model._decode_plan = None
        runs.append(greedy_logits(backend, PROMPTS[:batch]))
    assert len(calls) == 6  # every decode step of the first run, none of its prefill or of the second run
    torch.testing.assert_close(runs[0], runs[1], atol=1e-5, rtol=1e-5)


def test_decode_plan_needs_a_kernel_for_every_product(tiny_model_dir: Path) -> None:
    bf16 = PagedBackend(tiny_model_dir, CPU, "bfloat16", kv_cache_bytes=2**20, block_size=4)
    assert bf16.model.fused and bf16.model.decode_plan() is None  # bfloat16 products run on oneDNN
    torch_only = PagedBackend(tiny_model_dir, CPU, "float32", kv_cache_bytes=2**20, cpu_kernels=False)
    assert torch_only.model.decode_plan() is None


def test_greedy_matches_log_softmax_and_argmax() -> None:
    torch.manual_seed(4)
    scores = torch.randn(6, 1001) * 4  # a vocabulary that is not a multiple of the vector width
    scores[1, 10] = scores[1, 700] = scores[1].max() + 1  # a tie: the first maximum wins, as argmax's
    scores[2, ::2] = float("-inf")  # masked by a processor
    scores[3, 5] = float("nan")
    scores[4, 1000] = 50.0  # the maximum in the scalar tail
    ids, logprobs = torch.ops.paged_step.greedy(scores)
    want = torch.log_softmax(scores, dim=-1).gather(1, scores.argmax(-1, keepdim=True)).squeeze(1)
    ok = [0, 1, 2, 4, 5]
    assert torch.equal(ids[ok], scores.argmax(-1)[ok]) and ids[1] == 10 and ids[4] == 1000
    torch.testing.assert_close(logprobs[ok], want[ok], atol=1e-5, rtol=1e-5)
    assert logprobs[3].isnan()  # a NaN row is a failed row, whichever id it names


def test_sampler_greedy_rows_are_the_same_with_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    from shard import sampling
    from shard.sampling import Sampler, TokenHistory
    from shard.types import SamplingParams

    torch.manual_seed(5)
    logits = torch.randn(3, 300)
    history = TokenHistory.from_prompts([[1, 2], [3], [4, 5, 6]], [4, 4, 4], CPU)
    params = [SamplingParams(repetition_penalty=1.3), SamplingParams(), SamplingParams(temperature=0.5)]
    choices = []
    for loaded in (True, False):
        monkeypatch.setattr(sampling, "kernels_loaded", lambda loaded=loaded: loaded)
        choices.append(Sampler(params, [0] * 3, CPU).choose(logits, history))
    assert torch.equal(choices[0].ids, choices[1].ids)
    torch.testing.assert_close(choices[0].logprobs, choices[1].logprobs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_linear_on_prepacked_weights_matches_f_linear(dtype, rows: int) -> None:
    from shard.paged.layers import linear, pack_weight

    torch.manual_seed(6)
    w, b, x = torch.randn(48, 64).to(dtype), torch.randn(48).to(dtype), torch.randn(rows, 64).to(dtype)
    packed = pack_weight(w)
    if packed is None:
        pytest.skip("this torch has no oneDNN")
    want = F.linear(x, w, b).float()
    torch.testing.assert_close(
        linear(x, None, b, packed=packed).float(), want, atol=TOL[dtype] * 8, rtol=TOL[dtype]
    )
    if dtype == torch.float32:  # one row with dense: the dense kernel, on the plain weight
        torch.testing.assert_close(linear(x, w, b, True, packed).float(), want, atol=1e-4, rtol=1e-5)
