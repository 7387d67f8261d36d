"""Weight-only int8 and int4 linear layers for the paged backend (``--quantize int8`` / ``--quantize int4``).

The weights are quantized at load time from the float checkpoint; between layers the activations stay in
the model's dtype.

- ``int8``: one int8 per weight and one float32 scale per output channel (symmetric, max-abs / 127).
- ``int4``: blocks of 32 weights along the input dimension, each with an fp16 scale ``d`` and an fp16
  offset ``m``: ``w = q * d + m``, ``q`` in 0..15 (GGUF's Q4_1 layout; 5 bits a weight with the scales).
  The LM head stays int8 in this mode (its errors move every logit at once).

On the CPU the products run in kernels of our own (``quant_cpu.cpp``, built by ``kernels.py``). int8 on a
CPU with AVX512-VNNI quantizes the activations too, in blocks of 32, and multiplies int8 by int8 (about
0.5% more relative error, up to 3x float32's speed, most at 8 to 32 rows); elsewhere it dequantizes the
weights in registers and keeps the activations in float. int4 always quantizes the activations (blocks of
32, as llama.cpp pairs Q4_1 weights with Q8_1 activations) and runs integer dot products of 64 weights at
a time. Either way a decode step reads 4x (int8) or 6x (int4) fewer weight bytes than float32. These two
kernels serve every product, prefills too (dequantizing a weight per call costs more than the product:
docs/benchmarks.md), so that a token's arithmetic does not depend on how its prompt was chunked; from
``LARGE_M`` rows on, int8's float-activation kernel gives way to dequantize-then-float GEMM. The
measurements, and the alternatives that lost (torch's packed int8/int4 kernels, torch.compile, ONNX
Runtime's MatMulNBits), are in docs/benchmarks.md and benchmark/quant_kernels.py. Without the kernels
(no compiler, another device) every call dequantizes: correct, but slower than float32.

Tensor parallelism: each rank quantizes only its own slice (a column slice's rows, a row slice's
columns), so the per-channel scales and the blocks never cross ranks; RowLinear still sums across ranks.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..dist import Parallel
from .kernels import int8_vnni, load_kernels

log = logging.getLogger(__name__)

MODES = ("int8", "int4")
GROUP = 32  # int4 block size (weights along the input dimension); also the kernels' k granularity
CHUNK = 64  # int4 weights per integer dot product in the kernel: two blocks
# Weight CHUNK_ORDER[p] of a 64-weight chunk sits at byte position p of its unpacked form, so that the
# kernel's 16 lanes of 4 bytes alternate between the chunk's two blocks (quant_cpu.cpp's chunk_order).
CHUNK_ORDER = torch.tensor([(p // 4 % 2) * 32 + p // 8 * 4 + p % 4 for p in range(CHUNK)])
# From this many rows on (prefill), int8's float-activation kernel (no VNNI) gives way to
# dequantize-then-float-GEMM; int4's kernel and int8's VNNI one serve any m (docs/benchmarks.md).
LARGE_M = 64

# -- quantization --------------------------------------------------------------------------------------


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, k] float -> (int8 [n, k], float32 scales [n]): symmetric, one scale per output channel."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    q = (w / scale.unsqueeze(1)).round_().clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.unsqueeze(1)


def int4_widths(k: int) -> tuple[int, int]:
    """The kernel's padded widths for an input width k: k to a multiple of 64 (whole chunks), and the
    number of offsets per row to a multiple of 16 (whole vectors)."""
    return -(-k // CHUNK) * CHUNK, -(-(k // GROUP) // 16) * 16


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, k] float (k a multiple of 32) -> (nibbles uint8 [n, kp / 2], scales float16 [n, kp / 32 + mp]).

    Blocks of 32 along k: ``w = q * d + m`` with ``q`` in 0..15, ``d = (max - min) / 15``, ``m = min``. Each
    chunk of 64 weights (two blocks) is 32 bytes, byte j holding the chunk's weights CHUNK_ORDER[j] (low
    nibble) and CHUNK_ORDER[j + 32] (high); a row's scales are its d's, then its m's padded with zeros
    (``int4_widths``: kp, mp)."""
    n, k = weight.shape
    if k % GROUP:
        raise ValueError(f"int4 needs an input width divisible by {GROUP}, got {k}")
    kp, mp = int4_widths(k)
    g = F.pad(weight.float(), (0, kp - k)).reshape(n, kp // GROUP, GROUP)
    low, high = g.amin(-1), g.amax(-1)
    d = ((high - low) / 15).half()
    m = low.half()
    df, mf = d.float().unsqueeze(-1), m.float().unsqueeze(-1)
    q = torch.where(df > 0, (g - mf) / torch.where(df > 0, df, 1.0), 0.0).round_().clamp_(0, 15)
    q = q.to(torch.uint8).reshape(n, kp // CHUNK, CHUNK)[..., CHUNK_ORDER]
    nibbles = (q[..., : CHUNK // 2] | (q[..., CHUNK // 2 :] << 4)).reshape(n, kp // 2)
    offsets = F.pad(m[:, : k // GROUP], (0, mp - k // GROUP))
    return nibbles.contiguous(), torch.cat([d, offsets], dim=1).contiguous()


def dequantize_int4(nibbles: torch.Tensor, scales: torch.Tensor, k: int) -> torch.Tensor:
    n = nibbles.shape[0]
    kp, _ = int4_widths(k)
    blocks = kp // GROUP
    b = nibbles.reshape(n, kp // CHUNK, CHUNK // 2)
    ordered = torch.cat([b & 15, b >> 4], dim=-1)
    # Byte position p = 8a + 4b + c holds weight 32b + 4a + c (CHUNK_ORDER): swapping the a and b axes puts
    # the weights in order, with views and one copy only (no index tensor to move to the device).
    q = ordered.reshape(n, kp // CHUNK, CHUNK // 8, 2, 4).transpose(-3, -2)
    q = q.reshape(n, blocks, GROUP).float()
    d = scales[:, :blocks].float().unsqueeze(-1)
    m = scales[:, blocks : 2 * blocks].float().unsqueeze(-1)
    return (q * d + m).reshape(n, kp)[:, :k]


# -- the layer -----------------------------------------------------------------------------------------


class QuantLinear(nn.Module):
    """y = x W^T (+ b) with W held as int8 or int4; W is [n, k] as in ``F.linear``."""

    # Buffers (register_buffer): q and scale in int8, nibbles and scales in int4.
    q: torch.Tensor
    scale: torch.Tensor
    nibbles: torch.Tensor
    scales: torch.Tensor

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, mode: str) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown quantization {mode!r}; known: {', '.join(MODES)}")
        self.mode = mode
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        if mode == "int8":
            q, scale = quantize_int8(weight)
            self.register_buffer("q", q)
            self.register_buffer("scale", scale)
        else:
            nibbles, scales = quantize_int4(weight)
            self.register_buffer("nibbles", nibbles)
            self.register_buffer("scales", scales)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.fast = weight.device.type == "cpu" and self.in_features % GROUP == 0 and load_kernels()
        # Rows from which the float GEMM on the dequantized weight is faster than the kernel.
        vnni = mode == "int8" and int8_vnni() and self.in_features % 64 == 0
        self.large_m = 1 << 62 if mode == "int4" or vnni else LARGE_M

    def dequantized(self) -> torch.Tensor:
        if self.mode == "int8":
            w = dequantize_int8(self.q, self.scale)
        else:
            w = dequantize_int4(self.nibbles, self.scales, self.in_features)
        return w.to(self.dtype)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.product(x, self.bias)

    def product(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x W^T (+ ``bias``)."""
        if self.fast and x.dim() == 2 and x.dtype == torch.float32 and x.shape[0] < self.large_m:
            # The decode step's case (float32 rows), in as few operations as it takes.
            y = self._kernel(x.contiguous())
            return y if bias is None else y + bias
        shape = x.shape
        rows = x.reshape(-1, self.in_features)
        if self.fast and rows.shape[0] < self.large_m:
            y = self._kernel(rows.to(torch.float32).contiguous()).to(x.dtype)
            if bias is not None:
                y = y + bias
        else:
            y = F.linear(rows, self.dequantized(), bias)
        return y.view(*shape[:-1], self.out_features)

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        """quant_cpu.cpp's product of contiguous float32 rows x [m, in_features] -> float32 [m, out]."""
        if self.mode == "int8":
            return torch.ops.paged_quant.int8_linear(x, self.q, self.scale)
        return torch.ops.paged_quant.int4_linear(x, self.nibbles, self.scales, self.in_features)


class QuantColumnLinear(QuantLinear):
    """ColumnLinear with a quantized weight (this rank's output channels)."""


class QuantRowLinear(QuantLinear):
    """RowLinear with a quantized weight (this rank's input slice); sums the partial products across ranks,
    then adds the bias (whole on every rank) once."""

    def __init__(
        self, weight: torch.Tensor, mode: str, parallel: Parallel, bias: torch.Tensor | None = None
    ) -> None:
        super().__init__(weight, bias, mode)
        self.parallel = parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.parallel.all_reduce(self.product(x, None))
        return y if self.bias is None else y + self.bias
