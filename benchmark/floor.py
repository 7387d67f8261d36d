"""``text-generation-benchmark floor``: what this machine allows at best, to judge measured figures against.

It measures the memory read bandwidth (GB/s: ``torch.sum`` over a large tensor, best of several runs; a
copy's bandwidth is reported beside it) and the matrix-multiply rate (GFLOP/s of ``x @ W.T`` at M rows, the
weight K x N taken from the model's hidden and intermediate sizes), then for a model directory (parameters
and bytes counted from ``config.json`` and the safetensors headers, no weights loaded):

- the decode floor: weight bytes read per decode step / read bandwidth = the most steps/s one stream can
  make (every weight is read once per step, whatever the batch);
- the compute ceiling: 2 x parameters FLOPs per token / the matmul rate at the largest M = the most
  tokens/s any batch can reach; with ``--ceilings float32,bfloat16,int8`` one ceiling per arithmetic (the
  bfloat16 products run on AMX or AVX512-BF16 where the CPU has them, the int8 ones, ``torch._int_mm``, on
  AMX-INT8 or VNNI), so that each serving mode's multi-stream figure is judged against the ceiling of the
  arithmetic it uses (``versus_floor(..., arithmetic=...)``).

``fraction_of_floor(measured, floor)`` turns a measured rate into a fraction of such a bound.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import struct
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

DEFAULT_K, DEFAULT_N = 576, 1536  # SmolLM2-135M's hidden and intermediate sizes
DEFAULT_M = (1, 32, 256)
WEIGHT_BITS = (32, 16, 8, 4)
# The arithmetics a ceiling can be measured for: the float dtypes (F.linear) and int8 x int8 -> int32
# (torch._int_mm), the products of --dtype float32/bfloat16 and of --quantize int8/int4's integer kernels.
ARITHMETICS = ("float32", "bfloat16", "float16", "int8")

# Input embeddings are gathered (one row per token), not read whole at each step, unless the token
# embeddings double as the LM head (tied).
TOKEN_EMBEDDING_SUFFIXES = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "tok_embeddings.weight",
    "embed_in.weight",
)
POSITION_EMBEDDING_SUFFIXES = ("wpe.weight", "embed_positions.weight", "position_embeddings.weight")
LM_HEAD_SUFFIXES = ("lm_head.weight", "embed_out.weight", "output.weight")

SAFETENSORS_DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Arithmetic


def decode_floor_steps_per_s(bytes_per_step: float, bandwidth_gbps: float) -> float:
    """The most decode steps per second when each step reads ``bytes_per_step`` at ``bandwidth_gbps``
    (1 GB = 1e9 bytes): e.g. 538e6 bytes at 21 GB/s -> 39.0 steps/s."""
    if bytes_per_step <= 0 or bandwidth_gbps <= 0:
        raise ValueError("bytes per step and bandwidth must be > 0")
    return bandwidth_gbps * 1e9 / bytes_per_step


def compute_ceiling_tokens_per_s(params: float, gflops: float) -> float:
    """The most tokens per second when each token costs ``2 * params`` FLOPs at ``gflops`` GFLOP/s."""
    if params <= 0 or gflops <= 0:
        raise ValueError("params and GFLOP/s must be > 0")
    return gflops * 1e9 / (2 * params)


def fraction_of_floor(measured_per_s: float, floor_per_s: float) -> float:
    """A measured rate (steps/s, tokens/s) as a fraction of the bound for it (1.0 = at the floor).

    For times, pass their inverses: ``fraction_of_floor(1 / measured_s, 1 / floor_s)``."""
    if floor_per_s <= 0:
        raise ValueError("the floor must be > 0")
    return measured_per_s / floor_per_s


# ---------------------------------------------------------------------------------------------------------
# The model: parameters and bytes from the safetensors headers


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of one .safetensors file (tensor name -> dtype, shape, data_offsets)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > 100 * 1024 * 1024:
            raise ValueError(f"{path}: implausible safetensors header length {length}")
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header


@dataclass(frozen=True)
class ModelStats:
    """Counted from the checkpoint. ``*_per_token`` leave out the input embeddings (gathered, not read
    whole), unless the LM head is tied to them and so reads them at every step."""

    model_dir: str
    model_type: str | None
    hidden_size: int | None
    intermediate_size: int | None
    params_total: int
    bytes_total: int
    params_per_token: int
    bytes_per_token: int
    tied_embeddings: bool
    dtypes: dict[str, int] = field(default_factory=dict)  # safetensors dtype -> parameters

    def bytes_per_step(self, weight_bits: int | None) -> float:
        """Weight bytes read per decode step: as stored (None) or at ``weight_bits`` per parameter."""
        if weight_bits is None:
            return float(self.bytes_per_token)
        return self.params_per_token * weight_bits / 8


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    text = config.get("text_config")
    return {**config, **text} if isinstance(text, dict) else config


def _first(config: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def model_stats(model_dir: str | Path) -> ModelStats:
    """Parameters and bytes of the checkpoint in ``model_dir`` (config.json + *.safetensors)."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json")
    config = _text_config(json.loads(config_path.read_text()))
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors files")
    tensors: dict[str, tuple[int, int, str]] = {}  # name -> (params, bytes, dtype)
    for path in files:
        for name, meta in read_safetensors_header(path).items():
            params = math.prod(meta["shape"])
            start, end = meta["data_offsets"]
            tensors[name] = (params, end - start, meta["dtype"])
    has_lm_head = any(name.endswith(LM_HEAD_SUFFIXES) for name in tensors)
    tied = bool(config.get("tie_word_embeddings", True)) and not has_lm_head
    params_total = sum(p for p, _, _ in tensors.values())
    bytes_total = sum(b for _, b, _ in tensors.values())
    skipped_params = skipped_bytes = 0
    for name, (params, nbytes, _) in tensors.items():
        gathered = name.endswith(POSITION_EMBEDDING_SUFFIXES) or (
            name.endswith(TOKEN_EMBEDDING_SUFFIXES) and not tied
        )
        if gathered:
            skipped_params += params
            skipped_bytes += nbytes
    dtypes: dict[str, int] = defaultdict(int)
    for params, _, dtype in tensors.values():
        dtypes[dtype] += params
    return ModelStats(
        model_dir=str(model_dir),
        model_type=config.get("model_type"),
        hidden_size=_first(config, "hidden_size", "n_embd", "d_model"),
        intermediate_size=_first(config, "intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size"),
        params_total=params_total,
        bytes_total=bytes_total,
        params_per_token=params_total - skipped_params,
        bytes_per_token=bytes_total - skipped_bytes,
        tied_embeddings=tied,
        dtypes=dict(dtypes),
    )


# ---------------------------------------------------------------------------------------------------------
# Measurements


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_bandwidth(device: str = "cpu", size_mib: int = 512, repeats: int = 5) -> dict[str, float]:
    """Best-of-``repeats`` read bandwidth (``torch.sum`` of a float32 tensor of ``size_mib`` MiB) and
    copy bandwidth (read + write bytes of a copy), in GB/s (1e9 bytes)."""
    import torch

    dev = torch.device(device)
    numel = size_mib * 1024 * 1024 // 4
    src = torch.ones(numel, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    nbytes = numel * 4
    src.sum()
    dst.copy_(src)
    _sync(dev)
    best_read = best_copy = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        src.sum()
        _sync(dev)
        best_read = min(best_read, time.perf_counter() - start)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(dev)
        best_copy = min(best_copy, time.perf_counter() - start)
    return {"read_gbps": nbytes / best_read / 1e9, "copy_gbps": 2 * nbytes / best_copy / 1e9, "bytes": nbytes}


def measure_matmul(
    m: int, k: int, n: int, *, device: str = "cpu", dtype: str = "float32", repeats: int = 3,
    min_time_s: float = 0.1,
) -> float:  # fmt: skip
    """Best-of-``repeats`` GFLOP/s of ``F.linear(x[m, k], w[n, k])`` (2 m k n FLOPs), each repeat timing
    as many calls as fill ``min_time_s``. ``dtype`` int8: ``torch._int_mm`` of int8 x int8 into int32
    (GOP/s; RuntimeError where torch has no such product for these sizes)."""
    import torch
    import torch.nn.functional as F

    dev = torch.device(device)
    if dtype == "int8":
        xi = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=dev)
        wi = torch.randint(-128, 128, (k, n), dtype=torch.int8, device=dev)

        def product() -> object:
            return torch._int_mm(xi, wi)
    else:
        torch_dtype = getattr(torch, dtype)
        x = torch.randn(m, k, device=dev).to(torch_dtype)
        w = torch.randn(n, k, device=dev).to(torch_dtype)

        def product() -> object:
            return F.linear(x, w)

    product()
    _sync(dev)
    best = math.inf
    for _ in range(repeats):
        calls = 0
        start = time.perf_counter()
        while True:
            product()
            calls += 1
            if calls % 8 == 0 or calls < 8:
                _sync(dev)
                elapsed = time.perf_counter() - start
                if elapsed >= min_time_s:
                    break
        best = min(best, elapsed / calls)
    return 2 * m * k * n / best / 1e9


# ---------------------------------------------------------------------------------------------------------
# The report


@dataclass(frozen=True)
class FloorConfig:
    device: str = "cpu"
    dtype: str = "float32"
    model_dir: str | None = None
    weight_bits: int | None = None  # None: as stored in the checkpoint
    m_values: tuple[int, ...] = DEFAULT_M
    bandwidth_mib: int = 512
    repeats: int = 5
    matmul_min_time_s: float = 0.1
    # CPU thread counts to measure at, the best kept (None: torch's default and 1, since on a busy machine
    # one thread can beat several that wait for each other)
    threads: tuple[int, ...] | None = None
    output: str | None = None
    # Arithmetics whose matmul rates give a compute ceiling each (ARITHMETICS), besides ``dtype``'s.
    ceilings: tuple[str, ...] = ()


@dataclass(frozen=True)
class FloorRow:
    """One weight format's bounds."""

    weight_bits: int | None  # None: as stored
    bytes_per_step: float
    max_steps_per_s: float
    min_ms_per_step: float


@dataclass
class FloorReport:
    config: FloorConfig
    device_name: str
    bandwidth: dict[str, float]
    matmul: list[dict[str, float]]  # m, k, n, gflops
    model: ModelStats | None = None
    floors: list[FloorRow] = field(default_factory=list)
    flops_per_token: float | None = None
    max_tokens_per_s: float | None = None
    # --ceilings: arithmetic -> its matmul rows ("gflops" None and "error" where torch refused the product)
    ceiling_matmul: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # arithmetic -> {"m", "gflops", "max_tokens_per_s"}: its rate at the largest M it measured
    compute_ceilings: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def floor(self) -> FloorRow | None:
        """The row of the chosen weight format."""
        return next((r for r in self.floors if r.weight_bits == self.config.weight_bits), None)

    def to_json(self) -> dict[str, Any]:
        chosen = self.floor
        return {
            "benchmark": "floor",
            "config": asdict(self.config),
            "device_name": self.device_name,
            "bandwidth": self.bandwidth,
            "matmul": self.matmul,
            "model": asdict(self.model) if self.model else None,
            "decode_floor": asdict(chosen) if chosen else None,
            "decode_floors": [asdict(r) for r in self.floors],
            "compute_ceiling": (
                {"flops_per_token": self.flops_per_token, "max_tokens_per_s": self.max_tokens_per_s}
                if self.max_tokens_per_s is not None
                else None
            ),
            "ceiling_matmul": self.ceiling_matmul,
            "compute_ceilings": self.compute_ceilings,
        }


def device_name(device: str) -> str:
    import platform

    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def build_report(
    config: FloorConfig,
    bandwidth: dict[str, float],
    matmul: list[dict[str, float]],
    model: ModelStats | None,
    ceiling_matmul: dict[str, list[dict[str, Any]]] | None = None,
) -> FloorReport:
    """The bounds from measured figures (no measuring here, so the arithmetic can be checked alone).
    ``ceiling_matmul``: each --ceilings arithmetic's matmul rows, a ceiling each from its largest M."""
    report = FloorReport(config, "", bandwidth, matmul, model, ceiling_matmul=dict(ceiling_matmul or {}))
    if model is None:
        return report
    for arithmetic, rows in report.ceiling_matmul.items():
        measured = [r for r in rows if r.get("gflops")]
        if measured:
            large = max(measured, key=lambda r: r["m"])
            report.compute_ceilings[arithmetic] = {
                "m": large["m"],
                "gflops": large["gflops"],
                "max_tokens_per_s": compute_ceiling_tokens_per_s(model.params_per_token, large["gflops"]),
            }
    formats: list[int | None] = [None, *WEIGHT_BITS]
    if config.weight_bits is not None and config.weight_bits not in WEIGHT_BITS:
        formats.append(config.weight_bits)
    for bits in formats:
        nbytes = model.bytes_per_step(bits)
        steps = decode_floor_steps_per_s(nbytes, bandwidth["read_gbps"])
        report.floors.append(FloorRow(bits, nbytes, steps, 1000 / steps))
    if matmul:
        large = max(matmul, key=lambda r: r["m"])
        report.flops_per_token = 2.0 * model.params_per_token
        report.max_tokens_per_s = compute_ceiling_tokens_per_s(model.params_per_token, large["gflops"])
    return report


def thread_counts(config: FloorConfig) -> list[int | None]:
    """The CPU thread counts to measure at (``[None]``: leave torch's setting, e.g. on CUDA)."""
    import torch

    if torch.device(config.device).type != "cpu":
        return [None]
    if config.threads:
        return list(config.threads)
    return sorted({torch.get_num_threads(), 1}, reverse=True)


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_floor(config: FloorConfig, *, progress: Any = None) -> FloorReport:
    """Measures bandwidth and matmul rates (best over ``thread_counts``), then builds the report."""
    say = progress or (lambda _text: None)
    model = model_stats(config.model_dir) if config.model_dir else None
    k = (model.hidden_size if model else None) or DEFAULT_K
    n = (model.intermediate_size if model else None) or DEFAULT_N
    counts = thread_counts(config)
    bandwidth: dict[str, Any] = {}
    for count in counts:
        say(f"bandwidth: {config.bandwidth_mib} MiB x {config.repeats} on {config.device}, threads {count}")
        with torch_threads(count):
            measured = measure_bandwidth(config.device, config.bandwidth_mib, config.repeats)
        if measured["read_gbps"] > bandwidth.get("read_gbps", 0):
            bandwidth = {**measured, "threads": count}
    matmul = measure_matmuls(config, config.dtype, k, n, counts, say)
    ceiling_matmul = {}
    for arithmetic in config.ceilings:
        rows = (
            matmul if arithmetic == config.dtype else measure_matmuls(config, arithmetic, k, n, counts, say)
        )
        ceiling_matmul[arithmetic] = rows
    report = build_report(config, bandwidth, matmul, model, ceiling_matmul)
    report.device_name = device_name(config.device)
    return report


def measure_matmuls(
    config: FloorConfig, arithmetic: str, k: int, n: int, counts: list[int | None], say: Any
) -> list[dict[str, Any]]:
    """One row per M of ``config.m_values``: the best rate over the thread ``counts``. An int8 product
    torch refuses (``torch._int_mm``'s size rules) gives a row with ``gflops`` None and the error."""
    rows: list[dict[str, Any]] = []
    for m in config.m_values:
        by_threads: dict[int | None, float] = {}
        try:
            for count in counts:
                say(f"matmul: {m} x {k} x {n} {arithmetic}, threads {count}")
                with torch_threads(count):
                    by_threads[count] = measure_matmul(
                        m, k, n, device=config.device, dtype=arithmetic, repeats=min(config.repeats, 3),
                        min_time_s=config.matmul_min_time_s,
                    )  # fmt: skip
        except RuntimeError as e:
            if arithmetic != "int8":
                raise
            say(f"matmul: {m} x {k} x {n} int8 refused: {e}")
            rows.append({"m": m, "k": k, "n": n, "gflops": None, "error": str(e).splitlines()[0]})
            continue
        best = max(by_threads, key=by_threads.__getitem__)
        rows.append(
            {
                "m": m,
                "k": k,
                "n": n,
                "gflops": by_threads[best],
                "threads": best,
                "gflops_by_threads": {str(c): g for c, g in by_threads.items()},
            }
        )
    return rows


def _threads_note(figure: dict[str, Any]) -> str:
    count = figure.get("threads")
    return "" if count is None else f" ({count} thread{'s' if count != 1 else ''})"


def _bits_label(bits: int | None) -> str:
    return "as stored" if bits is None else f"{bits}-bit"


def format_summary(report: FloorReport) -> str:
    c = report.config
    lines = [
        f"floor on {c.device} ({report.device_name}), matmul dtype {c.dtype}",
        f"memory bandwidth: read {report.bandwidth['read_gbps']:.1f} GB/s, "
        f"copy {report.bandwidth['copy_gbps']:.1f} GB/s{_threads_note(report.bandwidth)}",
        "matmul: "
        + ", ".join(f"M={r['m']}: {r['gflops']:.1f} GFLOP/s{_threads_note(r)}" for r in report.matmul)
        + (f" (K={report.matmul[0]['k']}, N={report.matmul[0]['n']})" if report.matmul else ""),
    ]
    model = report.model
    if model is None:
        return "\n".join(lines)
    lines += [
        "",
        f"model {model.model_dir} ({model.model_type}): {model.params_total / 1e6:.1f} M parameters, "
        f"{model.bytes_total / 1e6:.1f} MB; read per token: {model.params_per_token / 1e6:.1f} M parameters"
        f"{' (tied embeddings count as the LM head)' if model.tied_embeddings else ''}",
        "",
        f"{'weights':<10} {'MB/step':>10} {'max steps/s':>12} {'min ms/step':>12}",
    ]
    for row in report.floors:
        mark = "  <-" if row.weight_bits == c.weight_bits else ""
        lines.append(
            f"{_bits_label(row.weight_bits):<10} {row.bytes_per_step / 1e6:>10.1f} "
            f"{row.max_steps_per_s:>12.1f} {row.min_ms_per_step:>12.3f}{mark}"
        )
    if report.max_tokens_per_s is not None:
        large = max(report.matmul, key=lambda r: r["m"])
        lines += [
            "",
            f"compute ceiling: {report.flops_per_token / 1e9:.3f} GFLOP/token "
            f"at {large['gflops']:.1f} GFLOP/s "
            f"(M={large['m']}) -> {report.max_tokens_per_s:.0f} tokens/s at most",
        ]
    for arithmetic, rows in report.ceiling_matmul.items():
        unit = "GOP/s" if arithmetic == "int8" else "GFLOP/s"
        rates = ", ".join(
            f"M={r['m']}: {r['gflops']:.1f}" if r.get("gflops") else f"M={r['m']}: refused ({r.get('error')})"
            for r in rows
        )
        ceiling = report.compute_ceilings.get(arithmetic)
        bound = f" -> {ceiling['max_tokens_per_s']:.0f} tokens/s at most" if ceiling else ""
        lines.append(f"{arithmetic} products: {rates} {unit}{bound}")
    return "\n".join(lines)


def write_json(report: FloorReport, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------------
# Measured figures against a floor file


def load_floor(path: str | Path) -> dict[str, Any]:
    """A ``floor --output`` file; it must hold a model's decode floor."""
    data = json.loads(Path(path).read_text())
    if data.get("benchmark") != "floor" or not data.get("decode_floor"):
        raise ValueError(f"{path}: not a `floor --model-dir ... --output` file")
    return data


def versus_floor(
    floor: dict[str, Any],
    batch_size: int,
    steps_per_s: float,
    tokens_per_s: float,
    arithmetic: str | None = None,
) -> dict[str, Any]:
    """One batch size's decode figures as fractions of the floor file's bounds: steps/s of the decode floor
    (weights read once per step), tokens/s of the compute ceiling (None without one): the ceiling of
    ``arithmetic`` where the file measured one (``--ceilings``), else that of its ``--dtype``."""
    ceiling = ceiling_of(floor, arithmetic)
    return {
        "batch_size": batch_size,
        "steps_per_s": steps_per_s,
        "tokens_per_s": tokens_per_s,
        "fraction_of_decode_floor": fraction_of_floor(steps_per_s, floor["decode_floor"]["max_steps_per_s"]),
        "fraction_of_compute_ceiling": fraction_of_floor(tokens_per_s, ceiling) if ceiling else None,
    }


def ceiling_of(floor: dict[str, Any], arithmetic: str | None = None) -> float | None:
    """A floor file's compute ceiling in tokens/s: ``arithmetic``'s (``--ceilings``) where it has one,
    else the one of its ``--dtype``; None without either."""
    measured = (floor.get("compute_ceilings") or {}).get(arithmetic or "")
    if measured:
        return measured["max_tokens_per_s"]
    return (floor.get("compute_ceiling") or {}).get("max_tokens_per_s")


def format_versus(floor: dict[str, Any], rows: list[dict[str, Any]], arithmetic: str | None = None) -> str:
    decode = floor["decode_floor"]
    ceiling = ceiling_of(floor, arithmetic)
    bits = decode["weight_bits"]
    lines = [
        f"versus the floor ({'as stored' if bits is None else f'{bits}-bit'} weights: "
        f"{decode['max_steps_per_s']:.1f} steps/s"
        + (f", compute ceiling {ceiling:.0f} tokens/s" if ceiling else "")
        + (f" ({arithmetic} products)" if (arithmetic or "") in (floor.get("compute_ceilings") or {}) else "")
        + ")",
        f"{'batch':>5} {'steps/s':>10} {'of floor':>9} {'tokens/s':>10} {'of ceiling':>11}",
    ]
    for r in rows:
        of_ceiling = r["fraction_of_compute_ceiling"]
        lines.append(
            f"{r['batch_size']:>5} {r['steps_per_s']:>10.1f} {r['fraction_of_decode_floor']:>9.1%} "
            f"{r['tokens_per_s']:>10.1f} {'-' if of_ceiling is None else f'{of_ceiling:.1%}':>11}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Command line


def register(commands: Any) -> None:
    """Adds the ``floor`` subcommand to ``text-generation-benchmark``'s subparsers."""
    from benchmark.args import int_list, positive_float, positive_int

    p = commands.add_parser(
        "floor",
        help="this machine's memory bandwidth and matmul rate, and a model's decode floor",
        description=(
            "Measures memory read bandwidth and matrix-multiply GFLOP/s, then prints a model's decode floor "
            "(weight bytes per step / bandwidth = max steps/s for one stream) and compute ceiling "
            "(2 x parameters FLOPs per token / matmul rate = max tokens/s)."
        ),
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--model-dir", default=None, help="model directory (config.json + *.safetensors)")
    p.add_argument(
        "--weight-bits",
        type=int,
        default=None,
        choices=WEIGHT_BITS,
        help="weight format for the decode floor (default: as stored in the checkpoint)",
    )
    p.add_argument(
        "--m-values",
        dest="m_values",
        metavar="M1,M2,...",
        type=int_list,
        default=DEFAULT_M,
        help="matmul row counts (default: 1,32,256); the largest gives the compute ceiling",
    )
    p.add_argument(
        "--bandwidth-mib", type=positive_int, default=512, help="tensor size for bandwidth (default: 512)"
    )
    p.add_argument("--repeats", type=positive_int, default=5, help="runs, best one kept (default: 5)")
    p.add_argument(
        "--matmul-min-time", type=positive_float, default=0.1, help="seconds per matmul timing (default: 0.1)"
    )
    p.add_argument(
        "--threads",
        metavar="T1,T2,...",
        type=int_list,
        default=None,
        help="CPU thread counts to measure at, the best kept (default: torch's default and 1)",
    )
    p.add_argument(
        "--ceilings",
        metavar="A1,A2,...",
        type=arithmetic_list,
        default=(),
        help=f"arithmetics to measure a compute ceiling each for, of {', '.join(ARITHMETICS)} (int8: "
        "torch._int_mm, int8 x int8 -> int32), e.g. float32,bfloat16,int8 (default: only --dtype's)",
    )
    p.add_argument("--output", metavar="PATH", default=None, help="write the figures as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    p.set_defaults(handler=run_command)


def arithmetic_list(text: str) -> tuple[str, ...]:
    """--ceilings' comma-separated names, each one of ARITHMETICS."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in ARITHMETICS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected names from {', '.join(ARITHMETICS)}, got {text!r}")
    return names


def config_from_args(args: argparse.Namespace) -> FloorConfig:
    return FloorConfig(
        device=args.device,
        dtype=args.dtype,
        model_dir=args.model_dir,
        weight_bits=args.weight_bits,
        m_values=args.m_values,
        bandwidth_mib=args.bandwidth_mib,
        repeats=args.repeats,
        matmul_min_time_s=args.matmul_min_time,
        threads=args.threads,
        output=args.output,
        ceilings=args.ceilings,
    )


def run_command(args: argparse.Namespace, *, stdout: TextIO | None = None) -> int:
    out = stdout or sys.stdout
    config = config_from_args(args)
    if config.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("error: --device cuda but CUDA is not available", file=sys.stderr)
            return EXIT_FAILED

    def progress(text: str) -> None:
        if not args.no_progress:
            print(text, file=sys.stderr, flush=True)

    try:
        report = run_floor(config, progress=progress)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(format_summary(report), file=out)
    if config.output:
        path = write_json(report, config.output)
        print(f"results written to {path}", file=sys.stderr)
    return EXIT_OK
