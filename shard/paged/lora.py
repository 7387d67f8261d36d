"""LoRA adapters in PEFT's format on the paged decoder, many per step (issue 21).

An adapter is a directory with ``adapter_config.json`` (``r``, ``lora_alpha``, ``target_modules`` among
q/k/v/o/gate/up/down projections) and ``adapter_model.safetensors`` (``...layers.{i}.{self_attn|mlp}.
{x}_proj.lora_A.weight`` [r, in] and ``lora_B.weight`` [out, r]). At load each layer's pairs are fused to
match the decoder's fused products: q/k/v's A matrices stacked into one [3r, hidden] and their B matrices
block-diagonal [q + 2 kv, 3r] (gate/up alike), the scale ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA)
folded into B. A projection the adapter does not target has no block.

In a step the base products run once for every row; ``LoraStep.add`` then adds, for each adapter present,
``(x[rows] @ A^T) @ B^T`` to its own rows only: one pair of products per fused projection however many
rows the step holds (segmented), for one adapter its own, for several all their pairs side by side with
each row masked to its adapter's rank columns; nothing changes for rows of the base model.
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..config import ConfigError
from ..dist import AllReduce, Parallel
from .spec import ModelSpec

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# The decoder's fused products and the checkpoint projections each is made of, in order.
FUSED: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
PROJECTIONS = tuple(p for group in FUSED.values() for p in group)
_TENSOR = re.compile(
    r"base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight"
)
# adapter_config.json keys whose non-default value changes what the adapter computes, and which this
# module does not implement: refused by name rather than ignored.
_REFUSED: dict[str, Any] = {
    "use_dora": False,
    "modules_to_save": None,
    "fan_in_fan_out": False,
    "layers_to_transform": None,
    "layers_pattern": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "bias": "none",
    "lora_bias": False,
    "trainable_token_indices": None,
    "target_parameters": None,
    "use_qalora": False,
    "layer_replication": None,
    "alora_invocation_tokens": None,
}


class AdapterError(ConfigError):
    """An adapter this server cannot load, with what is wrong and where (the shard exits 1 with it at
    start; at runtime the load is refused and nothing else changes)."""


class AdapterNotLoaded(AdapterError):
    """An unload of an adapter that is not loaded."""


@dataclass(frozen=True)
class LoraConfig:
    """What of adapter_config.json the computation uses: the rank, the scale on B A and the targets."""

    r: int
    scale: float
    targets: frozenset[str]


@dataclass(frozen=True)
class LowRank:
    """One fused product's adapter: ``a`` [R, in], ``b`` [out, R] (scaled); the delta is x A^T B^T. A
    row-parallel product over several ranks has ``reduce``: x A^T is this rank's partial sum, summed over
    the ranks before B."""

    a: torch.Tensor
    b: torch.Tensor
    reduce: AllReduce | None = None


@dataclass
class Adapter:
    """A loaded adapter: its name (requests' ``model``/``adapter_id``), its config, and per decoder layer
    the low-rank pairs of the fused products it targets."""

    name: str
    config: LoraConfig
    layers: list[dict[str, LowRank]] = field(default_factory=list)

    def to(self, device: torch.device) -> Adapter:
        """A copy on ``device`` (the same tensors where they are there already)."""
        layers = [
            {
                k: LowRank(p.a.to(device, non_blocking=True), p.b.to(device, non_blocking=True), p.reduce)
                for k, p in layer.items()
            }
            for layer in self.layers
        ]
        return Adapter(self.name, self.config, layers)

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for layer in self.layers for p in layer.values() for t in (p.a, p.b)
        )


def read_config(directory: Path, name: str) -> LoraConfig:
    """adapter_config.json's rank, scale and targets; ``AdapterError`` naming what is missing, not a LoRA
    adapter, or a feature not implemented here (DoRA, modules_to_save, per-module ranks, ...)."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(
            f"adapter {name!r}: {path} not found (a PEFT LoRA adapter directory has {CONFIG_FILE})"
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"adapter {name!r}: {path} is not JSON: {e}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"adapter {name!r}: {path} must hold a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterError(f"adapter {name!r}: `peft_type` {peft_type!r} is not supported (LORA only)")
    for key, default in _REFUSED.items():
        value = config.get(key, default)
        if (
            value != default
            and not (default is None and value in ([], {}))
            and not (default == {} and value is None)
        ):
            raise AdapterError(f"adapter {name!r}: `{key}` = {value!r} is not supported")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise AdapterError(f"adapter {name!r}: `r` must be a positive integer. Given: {r!r}")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise AdapterError(f"adapter {name!r}: `lora_alpha` must be a number. Given: {alpha!r}")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        raise AdapterError(
            f"adapter {name!r}: `target_modules` {targets!r} (a pattern) is not supported; list the projections"
        )
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise AdapterError(f"adapter {name!r}: `target_modules` must be a non-empty list of module names")
    unknown = sorted(set(targets) - set(PROJECTIONS))
    if unknown:
        raise AdapterError(
            f"adapter {name!r}: `target_modules` {unknown} are not supported (only {', '.join(PROJECTIONS)})"
        )
    scale = alpha / (math.sqrt(r) if config.get("use_rslora", False) else r)
    return LoraConfig(r, float(scale), frozenset(targets))


def load_adapter(
    name: str,
    directory: Path,
    spec: ModelSpec,
    dtype: torch.dtype,
    device: torch.device,
    parallel: Parallel | None = None,
    max_rank: int | None = None,
) -> Adapter:
    """Reads a PEFT LoRA adapter for a model of ``spec``: every tensor must be a lora_A/lora_B of a
    targeted projection of an existing layer, with the base layer's widths (else ``AdapterError``: an
    adapter of another base model is refused here).

    With several ranks (``parallel``) each rank keeps the part matching its slice of the base layer: a
    column-parallel projection's B its output rows (q/k/v by heads, gate/up by MLP width), a row-parallel
    one's A its input columns (o, down), whose ``x A^T`` is then summed over the ranks before B. An adapter
    of a rank above ``max_rank`` (--max-lora-rank) is refused."""
    from safetensors import safe_open

    config = read_config(directory, name)
    if max_rank is not None and config.r > max_rank:
        raise AdapterError(f"adapter {name!r}: rank `r` = {config.r} is above --max-lora-rank {max_rank}")
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise AdapterError(f"adapter {name!r}: {path} not found (.bin adapters are not supported)")
    d, ff, hidden = spec.head_dim, spec.intermediate_size, spec.hidden_size
    q, kv = spec.num_heads * d, spec.num_kv_heads * d
    shapes = {  # (out, in) of each projection
        "q_proj": (q, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, q),
        "gate_proj": (ff, hidden), "up_proj": (ff, hidden), "down_proj": (hidden, ff),
    }  # fmt: skip
    parallel = parallel or Parallel()
    q_part = [i * d for i in parallel.split(spec.num_heads, "attention heads")]
    kv_part = [i * d for i in parallel.split(spec.num_kv_heads, "key/value heads")]
    ff_part = list(parallel.split(ff, "MLP width"))
    # This rank's [start, end) of each projection's output (B's rows) or, row-parallel, input (A's columns).
    parts = {
        "q_proj": q_part, "k_proj": kv_part, "v_proj": kv_part, "o_proj": q_part,
        "gate_proj": ff_part, "up_proj": ff_part, "down_proj": ff_part,
    }  # fmt: skip
    row_parallel = {"o_proj", "down_proj"}
    if any(layer.moe is not None for layer in spec.layers) and config.targets & {
        "gate_proj",
        "up_proj",
        "down_proj",
    }:
        raise AdapterError(
            f"adapter {name!r}: adapters of a mixture-of-experts model's MLP are not supported"
        )
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        with safe_open(path, "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is no mapping)
                m = _TENSOR.fullmatch(key.replace(".default.", "."))
                if m is None:
                    raise AdapterError(
                        f"adapter {name!r}: tensor {key!r} is not supported (LoRA A/B of a decoder projection only)"
                    )
                index, proj, which = int(m[1]), m[2], m[3]
                if proj not in config.targets or index >= spec.num_layers:
                    raise AdapterError(
                        f"adapter {name!r}: tensor {key!r} names no targeted projection of this model ({spec.num_layers} layers)"
                    )
                out, inp = shapes[proj]
                want = (config.r, inp) if which == "A" else (out, config.r)
                tensor = f.get_tensor(key)
                if tuple(tensor.shape) != want:
                    raise AdapterError(
                        f"adapter {name!r}: {key} has shape {list(tensor.shape)}, this model needs {list(want)} "
                        "(an adapter of another base model?)"
                    )
                pairs.setdefault((index, proj), {})[which] = tensor.float()
    except AdapterError:
        raise
    except Exception as e:  # safetensors' own errors: a truncated or foreign file
        raise AdapterError(f"adapter {name!r}: cannot read {path}: {e}") from None
    if not pairs:
        raise AdapterError(f"adapter {name!r}: {path} holds no LoRA tensors")
    for (index, proj), pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise AdapterError(
                f"adapter {name!r}: layer {index} {proj} has lora_{next(iter(pair))} without its pair"
            )
    adapter = Adapter(name, config)
    for index in range(spec.num_layers):
        layer: dict[str, LowRank] = {}
        for fused, projections in FUSED.items():
            present = [p for p in projections if (index, p) in pairs]
            if not present:
                continue
            a_parts, b_parts = [], []
            for p in present:
                lo, hi = parts[p]
                a, b = pairs[index, p]["A"], pairs[index, p]["B"]
                a_parts.append(a[:, lo:hi] if p in row_parallel else a)
                b_parts.append(b if p in row_parallel else b[lo:hi])
            widths = [shapes[p][0] if p in row_parallel else parts[p][1] - parts[p][0] for p in projections]
            b = torch.zeros(sum(widths), len(present) * config.r)
            row, col = 0, 0
            for p, width in zip(projections, widths, strict=True):
                if p in present:
                    b[row : row + width, col : col + config.r] = b_parts[present.index(p)] * config.scale
                    col += config.r
                row += width
            reduce = (
                parallel.all_reduce if projections[0] in row_parallel and parallel.world_size > 1 else None
            )
            a = torch.cat(a_parts)
            layer[fused] = LowRank(a.to(dtype=dtype, device=device), b.to(dtype=dtype, device=device), reduce)
        adapter.layers.append(layer)
    return adapter


class Resident:
    """--max-loras: at most ``capacity`` adapters' weights on the device, the least recently used evicted
    (their weights stay on the host, where every adapter is loaded); loads and evictions are counted. The
    scheduler (``Scheduler.max_adapters``) never plans a step with more adapters than fit."""

    def __init__(self, capacity: int, device: torch.device) -> None:
        self.capacity = capacity
        self.device = device
        self.on_device: OrderedDict[str, Adapter] = OrderedDict()
        self.loads = 0
        self.evictions = 0

    def use(self, adapters: list[Adapter]) -> dict[str, Adapter]:
        """The device copies of one step's adapters, by name: resident ones are reused (and become the
        most recently used), others are copied in, evicting the least recently used that this step does
        not need."""
        if len(adapters) > self.capacity:
            raise ValueError(f"a step uses {len(adapters)} adapters, more than --max-loras {self.capacity}")
        names = {a.name for a in adapters}
        out = {}
        for adapter in adapters:
            resident = self.on_device.get(adapter.name)
            if resident is None:
                while len(self.on_device) >= self.capacity:
                    victim = next(name for name in self.on_device if name not in names)
                    del self.on_device[victim]
                    self.evictions += 1
                resident = adapter.to(self.device)
                self.on_device[adapter.name] = resident
                self.loads += 1
            self.on_device.move_to_end(adapter.name)
            out[adapter.name] = resident
        return out

    def drop(self, name: str) -> None:
        """An unloaded adapter leaves the device."""
        self.on_device.pop(name, None)


def adapter_salt(cache_salt: str, adapter: str) -> str:
    """The prefix-cache salt of a request: its cache_salt, with its adapter folded in, so that requests of
    different adapters (or of an adapter and the base model) never share a prefix's K/V."""
    return cache_salt if not adapter else f"{cache_salt}\x00lora:{adapter}"


@dataclass(frozen=True)
class Stacked:
    """One product's pairs of every adapter in a step, side by side: ``a`` [sum R, in], ``b`` [out, sum R],
    and ``owner`` [sum R], the place in the step's adapters of the adapter each rank column belongs to."""

    a: torch.Tensor
    b: torch.Tensor
    owner: torch.Tensor
    layout: tuple[tuple[int, int], ...]
    reduce: AllReduce | None


class Stacks:
    """The stacked pairs of the last set of adapters a step used, built on first use of each product and
    kept while the next steps use the same set (under steady load every step holds the same adapters); a
    new set, or an adapter copied in again, starts afresh, so nothing evicted stays referenced for long."""

    def __init__(self) -> None:
        self.adapters: tuple[Adapter, ...] = ()
        self.products: dict[tuple[int, str], Stacked | None] = {}

    def of(self, adapters: tuple[Adapter, ...]) -> dict[tuple[int, str], Stacked | None]:
        if len(adapters) != len(self.adapters) or any(
            x is not y for x, y in zip(adapters, self.adapters, strict=True)
        ):
            self.adapters, self.products = adapters, {}
        return self.products


@dataclass(frozen=True)
class LoraStep:
    """A step's adapter rows: for each adapter present, the rows of the step's flat token layout that use
    it (a slice when they are contiguous, else an index tensor).

    With one adapter its rows run their own pair of products. With several, every product runs once for
    all rows over the adapters' pairs side by side (``Stacked``), each row keeping only its own adapter's
    rank columns (a 0/1 mask): two products per fused projection whatever the number of adapters, instead
    of two per adapter (32 streams over 4 adapters: 55 % of the base model's tokens/s with a pair per
    adapter, 75 % stacked; docs/benchmarks.md)."""

    groups: tuple[tuple[Adapter, slice | torch.Tensor], ...]
    # Several adapters: each row's adapter (its place in ``groups``, -1 for the base model) and the stacks.
    row_owner: torch.Tensor | None = None
    stacks: dict[tuple[int, str], Stacked | None] = field(default_factory=dict)
    masks: dict[tuple[tuple[int, int], ...], torch.Tensor] = field(default_factory=dict)

    @staticmethod
    def of(
        runs: list[tuple[Adapter | None, int]], device: torch.device, stacks: Stacks | None = None
    ) -> LoraStep | None:
        """From the step's rows in order, as (adapter or None for the base model, rows) runs; None when no
        row uses an adapter (the step runs as without adapters). ``stacks``: where several adapters'
        stacked pairs are kept between steps (else built for this step)."""
        rows: dict[str, list[int]] = {}
        by_name: dict[str, Adapter] = {}
        start = 0
        for adapter, n in runs:
            if adapter is not None and n:
                rows.setdefault(adapter.name, []).extend(range(start, start + n))
                by_name[adapter.name] = adapter
            start += n
        if not rows:
            return None
        groups: list[tuple[Adapter, slice | torch.Tensor]] = []
        for name, ids in rows.items():
            contiguous = ids[-1] - ids[0] + 1 == len(ids)
            index = slice(ids[0], ids[-1] + 1) if contiguous else torch.tensor(ids, device=device)
            groups.append((by_name[name], index))
        if len(groups) == 1:
            return LoraStep(tuple(groups))
        owner = [-1] * start
        for place, ids in enumerate(rows.values()):
            for i in ids:
                owner[i] = place
        adapters = tuple(adapter for adapter, _ in groups)
        kept = (stacks or Stacks()).of(adapters)
        return LoraStep(tuple(groups), torch.tensor(owner, device=device), kept)

    def add(self, layer: int, product: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y`` (the base product of ``x`` for every row) plus each adapter's delta on its own rows."""
        if self.row_owner is not None:
            return self._add_stacked(layer, product, x, y)
        for adapter, rows in self.groups:
            pair = adapter.layers[layer].get(product)
            if pair is None:
                continue
            xs = x[rows] if isinstance(rows, slice) else x.index_select(0, rows)
            low = F.linear(xs, pair.a)
            if pair.reduce is not None:
                low = pair.reduce(low)
            if isinstance(rows, slice):
                y[rows] += F.linear(low, pair.b)
            else:
                y.index_add_(0, rows, F.linear(low, pair.b))
        return y

    def _add_stacked(self, layer: int, product: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        key = (layer, product)
        if key not in self.stacks:
            self.stacks[key] = self._stack(layer, product)
        stacked = self.stacks[key]
        if stacked is None:
            return y
        low = F.linear(x, stacked.a)
        if stacked.reduce is not None:
            low = stacked.reduce(low)
        mask = self.masks.get(stacked.layout)
        if mask is None:
            assert self.row_owner is not None
            mask = (self.row_owner[:, None] == stacked.owner[None, :]).to(low.dtype)
            self.masks[stacked.layout] = mask
        return y.addmm_(low.mul_(mask), stacked.b.t())

    def _stack(self, layer: int, product: str) -> Stacked | None:
        pairs = [
            (place, adapter.layers[layer].get(product)) for place, (adapter, _) in enumerate(self.groups)
        ]
        present = [(place, pair) for place, pair in pairs if pair is not None]
        if not present:
            return None
        a = torch.cat([pair.a for _, pair in present])
        owner = torch.cat([torch.full((pair.a.shape[0],), place, device=a.device) for place, pair in present])
        return Stacked(
            a=a,
            b=torch.cat([pair.b for _, pair in present], dim=1),
            owner=owner,
            layout=tuple((place, pair.a.shape[0]) for place, pair in present),
            reduce=present[0][1].reduce,
        )
