"""The decoder's building blocks, written for a flat token layout and for tensor parallelism.

Tokens of every sequence in a step are concatenated into one ``[tokens, hidden]`` tensor: no padding.
Linear layers come in the two Megatron flavours so that a tensor-parallel group can split them without a
rewrite: ``ColumnLinear`` holds a slice of the output features (q/k/v, gate/up), ``RowLinear`` a slice
of the input features and sums the partial products across ranks (o, down). With one rank both are
plain linear layers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..dist import Parallel
from .spec import RopeTable


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """A CPU float32/bfloat16 weight [n, k] in oneDNN's blocked layout, for ``linear``'s ``packed``; None
    where torch has no oneDNN or for any other dtype or device."""
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        return None
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, None)
    except (RuntimeError, AttributeError):
        return None


def linear(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    dense: bool = False,
    packed: torch.Tensor | None = None,
) -> torch.Tensor:
    """x W^T (+ b). A single row with ``dense`` (float32 CPU weights) goes through quant_cpu.cpp's
    ``dense_linear``, which streams W at close to the memory bandwidth; other products through oneDNN on
    the prepacked weight when there is one (``packed``: 1.3 to 4x ``F.linear`` on this CPU, which
    reorders the weight on every call), else ``F.linear``."""
    if dense and x.shape[0] == 1 and weight is not None:
        y = torch.ops.paged_quant.dense_linear(x.contiguous(), weight)
        return y if bias is None else y + bias
    if packed is not None:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    if weight is None:
        raise ValueError("linear needs the weight, or its prepacked form")
    return F.linear(x, weight, bias)


class ColumnLinear(nn.Module):
    """y = x W^T (+ b) for this rank's slice of the output features."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        # None once the prepacked copy serves every product (model.use_cpu_kernels).
        self.weight: nn.Parameter | None = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.dense = False
        self.packed: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.dense, self.packed)


class RowLinear(nn.Module):
    """y = sum over ranks of x_r W_r^T (+ b): this rank holds a slice of the input features; the bias
    (whole on every rank) is added once, after the sum."""

    def __init__(self, weight: torch.Tensor, parallel: Parallel, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight: nn.Parameter | None = nn.Parameter(weight, requires_grad=False)  # as ColumnLinear's
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.parallel = parallel
        self.dense = False
        self.packed: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.parallel.all_reduce(linear(x, self.weight, None, self.dense, self.packed))
        return y if self.bias is None else y + self.bias


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps
        self.fused = False  # step_cpu.cpp's rms_norm: one pass instead of torch's chain of operations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return torch.ops.paged_step.rms_norm(x, self.weight, self.eps)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Rotary:
    """Rotary position embedding from a precomputed cos/sin table (any of transformers' rope types).

    A token's row of the table is its position, except with LongRoPE (``long_inv_freq`` from
    ``long_from``), whose table holds the short rotation of positions [0, long_from) and after it the long
    rotation of every position: a token of a sequence that rotates long (``step``'s ``long``) takes its
    long row, ``long_from`` + position, and so does any token at ``long_from`` or later (only long
    sequences have those: backends/paged.py switches a short one to long there, as transformers does), so
    a decode step's rows follow from its positions alone (a CUDA graph passes no flags)."""

    def __init__(
        self,
        inv_freq: torch.Tensor,
        scaling: float,
        max_positions: int,
        dtype: torch.dtype,
        long_inv_freq: torch.Tensor | None = None,
        long_from: int | None = None,
    ) -> None:
        positions = torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device)
        freqs = torch.outer(positions, inv_freq.float())
        # None: no long rotation (none given, or no position reaches its switch).
        self.long_from: int | None = None
        if long_inv_freq is not None and long_from is not None and long_from < max_positions:
            long = torch.outer(positions, long_inv_freq.float().to(inv_freq.device))
            freqs = torch.cat([freqs[:long_from], long])
            self.long_from = long_from
        self.cos32 = freqs.cos() * scaling  # [rows, head_dim / 2]
        self.sin32 = freqs.sin() * scaling
        self.cos = self.cos32.to(dtype)
        self.sin = self.sin32.to(dtype)
        self.fused = False  # step_cpu.cpp's rotary_ on the fused q/k/v product, in place

    @classmethod
    def of(cls, table: RopeTable, max_positions: int, dtype: torch.dtype) -> Rotary:
        """The rotary of an architecture's table (``Architecture.rotary``)."""
        return cls(table.inv_freq, table.scaling, max_positions, dtype, table.long_inv_freq, table.long_from)

    def to(self, device: torch.device) -> None:
        for name in ("cos32", "sin32", "cos", "sin"):
            setattr(self, name, getattr(self, name).to(device))

    def rows(self, positions: torch.Tensor, long: torch.Tensor | None = None) -> torch.Tensor:
        """The table rows of a step's tokens [tokens] (see the class): their positions, shifted to the long
        rotation with LongRoPE where a position is past the switch or ``long`` (bool [tokens]) is set.
        Tensor operations only (a CUDA graph can hold them)."""
        if self.long_from is None:
            return positions
        switched = positions >= self.long_from
        if long is not None:
            switched = switched | long
        return positions + switched.long() * self.long_from

    def step(self, positions: torch.Tensor, long: torch.Tensor | None = None) -> RotaryStep:
        """What every layer of a step needs to rotate its queries and keys (one table lookup per step);
        ``long``: which tokens' sequences rotate long throughout (LongRoPE; ``rows``)."""
        rows = self.rows(positions, long)
        if self.fused:
            return RotaryStep(rows, None, None, self)
        cos = self.cos.index_select(0, rows).unsqueeze(1)  # [tokens, 1, head_dim / 2]
        sin = self.sin.index_select(0, rows).unsqueeze(1)
        return RotaryStep(rows, cos, sin, self)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotates [tokens, heads, head_dim] (the half-split layout of Hugging Face checkpoints); with tables
        narrower than half a head (partial rotary embeddings), its first 2 x cos.shape[-1] dimensions only,
        the others passing as they are (transformers' ``apply_rotary_pos_emb``)."""
        width = 2 * cos.shape[-1]
        if width < x.shape[-1]:
            return torch.cat((Rotary.apply(x[..., :width], cos, sin), x[..., width:]), dim=-1)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@dataclass
class RotaryStep:
    """One step's rotary embedding: its tokens' rows of the tables (their positions, or LongRoPE's rows:
    ``Rotary.rows``), and their cos/sin on the torch path."""

    positions: torch.Tensor
    cos: torch.Tensor | None
    sin: torch.Tensor | None
    rotary: Rotary

    def qkv(
        self, qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Splits a fused product [tokens, (heads + 2 kv_heads) head_dim] into q, k, v shaped
        [tokens, heads, head_dim], q and k rotated (in place in ``qkv`` on the fused path)."""
        tokens = qkv.shape[0]
        cos, sin = self.cos, self.sin
        if cos is None or sin is None:
            r = self.rotary
            torch.ops.paged_step.rotary_(qkv, self.positions, r.cos32, r.sin32, heads + kv_heads, head_dim)
        q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        q = q.view(tokens, heads, head_dim)
        k = k.view(tokens, kv_heads, head_dim)
        if cos is not None and sin is not None:
            q = Rotary.apply(q, cos, sin)
            k = Rotary.apply(k, cos, sin)
        return q, k, v.view(tokens, kv_heads, head_dim)


# LongRoPE: folded into the prefix-cache salt of a sequence that rotates long throughout, so that its blocks
# are never shared with those of the same tokens rotated short.
LONG_ROPE_SALT = "\x00long-rope"


def rotates_long(length: int, long_from: int | None) -> bool:
    """Whether a sequence of ``length`` tokens rotates long throughout under LongRoPE (``long_from``:
    ``Rotary.long_from``, None without LongRoPE): when it holds more tokens than the switch, as transformers'
    cache then holds them."""
    return long_from is not None and length > long_from


class MLP(nn.Module):
    """A gated MLP, down(act(gate(x)) * up(x)), gate and up one fused column-parallel matrix: SwiGLU
    (``silu``) or GeGLU with tanh-approximated GELU (``gelu_tanh``, Gemma)."""

    def __init__(self, gate_up: ColumnLinear, down: RowLinear, activation: str = "silu") -> None:
        super().__init__()
        if activation not in ("silu", "gelu_tanh"):
            raise ValueError(f"unknown activation {activation!r}")
        self.gate_up = gate_up
        self.down = down
        self.activation = activation
        # step_cpu.cpp's silu_mul (SwiGLU only): one call instead of a split, silu and product
        self.fused = False

    def forward(self, x: torch.Tensor, delta: Delta | None = None) -> torch.Tensor:
        """``delta`` (LoRA adapters' rows): adds to each product's output, ``delta(name, input, output)``
        with name ``gate_up`` or ``down``."""
        gate_up = self.gate_up(x) if delta is None else delta("gate_up", x, self.gate_up(x))
        if self.fused:
            h = torch.ops.paged_step.silu_mul(gate_up)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            h = (F.silu(gate) if self.activation == "silu" else F.gelu(gate, approximate="tanh")) * up
        return self.down(h) if delta is None else delta("down", h, self.down(h))


# What adds adapters' low-rank products to a product's output: (product name, its input, its output) ->
# the output.
Delta = Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]


class VocabEmbedding(nn.Module):
    """Token embeddings split over ranks by vocabulary range; each rank looks up its own ids and the
    partial rows are summed (ids outside the range contribute zeros)."""

    def __init__(self, weight: torch.Tensor, start: int, parallel: Parallel) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.start = start
        self.parallel = parallel

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.parallel.world_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        inside = (local >= 0) & (local < self.weight.shape[0])
        out = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)
        return self.parallel.all_reduce(out * inside.unsqueeze(-1).to(out.dtype))
