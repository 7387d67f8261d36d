"""Mixture-of-experts MLPs (Mixtral, Qwen2-MoE, Qwen3-MoE) for the shared decoder (shard/paged/model.py).

A router picks ``top_k`` experts for each token (``MoESpec``: softmax over its logits, the top-k
probabilities, renormalized or not); each expert is a SwiGLU MLP (``layers.MLP``). The experts run
grouped: the step's (token, expert) pairs are sorted by expert, each expert's tokens gathered into one
matrix and run through it in one product per projection, and only the experts that got tokens run. The
outputs, scaled by their routing weights, are summed back into their tokens' rows in the experts' order
(as transformers does). A shared expert (Qwen2-MoE) runs on every token besides: its output, scaled by
the sigmoid of its gate (a [1, hidden] product), is added to the routed experts' sum. A step costs one
host read of the experts' token counts per layer (to slice the sorted rows), which is also why a CUDA
graph cannot hold an MoE step (shard/paged/graphs.py runs them eagerly).

Tensor parallelism splits every expert's inner (intermediate) dimension, as the dense MLP's: each rank
holds its slice of every expert's gate/up rows and down columns, routes every token alike (the router is
whole on every rank), and sums its partial outputs over the ranks once for the whole layer, after the
weighting (the experts' ``RowLinear``s hold a single-rank ``Parallel``: no all-reduce per expert). The
shared expert is split the same way; its gate is whole on every rank (it scales each rank's partial sum
alike).

Quantized (``--quantize int8|int4``), each expert's two products (the shared expert's too) become
quantized layers like the dense ones (``quantize_model``); the router and the shared expert's gate stay in
the model's dtype (they are [experts, hidden] and [1, hidden]: tiny, and the routing decisions are what a
quantization error would flip).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
from torch import nn

from ..dist import Parallel
from .layers import MLP, ColumnLinear, RowLinear
from .spec import MoESpec

# The experts' down products are partial sums over the ranks that the MoE layer reduces once.
LOCAL = Parallel()


# Where the layer's tensors come from (model.Weights.get): a tensor by name, or its [start, end) along a
# dimension.
TensorSource = Callable[[str, int | None, tuple[int, int] | None], torch.Tensor]


class MoE(nn.Module):
    """A mixture-of-experts MLP over flat tokens [tokens, hidden]: route, run each expert on its own
    tokens in one product, weight, sum into the tokens, add the gated shared expert's output (when there
    is one), reduce over the ranks."""

    def __init__(
        self,
        router: torch.Tensor,
        experts: list[MLP],
        spec: MoESpec,
        parallel: Parallel,
        shared: tuple[MLP, torch.Tensor] | None = None,
    ) -> None:
        """``shared``: the shared expert and its gate's weight [1, hidden] (``MoESpec.shared_*``)."""
        super().__init__()
        if len(experts) != spec.num_experts or not 0 < spec.top_k <= spec.num_experts:
            raise ValueError(f"{len(experts)} experts, top {spec.top_k} of {spec.num_experts}")
        if (shared is None) != (spec.shared_intermediate_size == 0):
            raise ValueError("a shared expert is needed exactly when the spec has one")
        self.router = nn.Parameter(router, requires_grad=False)  # [experts, hidden]
        self.experts = nn.ModuleList(experts)
        self.shared = None if shared is None else shared[0]
        self.shared_gate = None if shared is None else nn.Parameter(shared[1], requires_grad=False)
        self.spec = spec
        self.parallel = parallel

    @property
    def expert_mlps(self) -> list[MLP]:
        return cast(list[MLP], list(self.experts))

    def linears(self) -> list[tuple[nn.Module, str]]:
        """Each expert's products as (owner, attribute), the shared expert's last, for quantize_model to
        replace."""
        mlps = self.expert_mlps + ([] if self.shared is None else [self.shared])
        return [(mlp, name) for mlp in mlps for name in ("gate_up", "down")]

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The routing weights and the chosen experts, both [tokens, top_k] (see ``MoESpec``)."""
        logits = torch.nn.functional.linear(x, self.router)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, chosen = torch.topk(probs, self.spec.top_k, dim=-1)
        if self.spec.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.spec.weights_in_model_dtype:
            weights = weights.to(x.dtype)
        return weights, chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.routed(x)
        if self.shared is not None and self.shared_gate is not None:
            gate = torch.sigmoid(torch.nn.functional.linear(x, self.shared_gate))
            y = y + gate * self.shared(x)
        return self.parallel.all_reduce(y)

    def routed(self, x: torch.Tensor) -> torch.Tensor:
        """The routed experts' weighted sum for each token (this rank's partial sum)."""
        weights, chosen = self.route(x)
        pairs = chosen.flatten()  # token t's i-th choice at t * top_k + i
        order = torch.argsort(pairs, stable=True)  # the pairs grouped by expert, in token order within one
        counts = torch.bincount(pairs, minlength=self.spec.num_experts).tolist()
        tokens = torch.div(order, self.spec.top_k, rounding_mode="floor")
        grouped = x.index_select(0, tokens)
        outputs = []
        start = 0
        for expert, n in zip(self.expert_mlps, counts, strict=True):
            if n:
                outputs.append(expert(grouped[start : start + n]))
                start += n
        if not outputs:  # a step without tokens: nothing to sum (every rank still joins the all-reduce)
            return torch.zeros_like(x)
        out = torch.cat(outputs) * weights.flatten().index_select(0, order).unsqueeze(1)
        return torch.zeros_like(x).index_add_(0, tokens, out.to(x.dtype))


def load_moe(
    spec: MoESpec, prefix: str, get: TensorSource, parallel: Parallel, activation: str = "silu"
) -> MoE:
    """The MoE MLP of the decoder layer under ``prefix`` (``model.layers.{i}``): this rank's slice of each
    expert's inner dimension (refused when the ranks do not divide it), the whole router; the shared
    expert's slice and its whole gate when the spec has one."""
    block = f"{prefix}.{spec.block}"
    gate, up, down = spec.projections

    def expert(name: str, width: int, what: str) -> MLP:
        ff = parallel.split(width, what)
        gate_up = torch.cat([get(f"{name}.{gate}.weight", 0, ff), get(f"{name}.{up}.weight", 0, ff)])
        return MLP(ColumnLinear(gate_up), RowLinear(get(f"{name}.{down}.weight", 1, ff), LOCAL), activation)

    width = "expert MLP width (moe_intermediate_size)"
    experts = [
        expert(f"{block}.{spec.experts}.{e}", spec.intermediate_size, width) for e in range(spec.num_experts)
    ]
    shared = None
    if spec.shared_intermediate_size:
        mlp = expert(
            f"{block}.{spec.shared_expert}",
            spec.shared_intermediate_size,
            "shared expert width (shared_expert_intermediate_size)",
        )
        shared = mlp, get(f"{block}.{spec.shared_gate}.weight", None, None)
    return MoE(get(f"{block}.{spec.router}.weight", None, None), experts, spec, parallel, shared)
