"""``text-generation-benchmark step``: the paged backend's decode step in process, without gRPC or router.

It builds the backend on a model directory (``--dtype``, ``--quantize int8|int4``, or ``--torch-only``
for the backend without its CPU kernels), prefills B copies of a prompt and times greedy decode steps at
each batch size B: milliseconds per step (median and best) and tokens/s. This is the figure the model's
kernels change directly; ``shard`` adds the gRPC round trip and the engine's sampling, ``serve`` the
router and HTTP. docs/benchmarks.md ("The decode step on the CPU") reports it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class StepConfig:
    model_dir: str
    batch_sizes: tuple[int, ...] = (1, 32)
    prompt_length: int = 100
    steps: int = 40
    warmups: int = 5
    dtype: str | None = None
    quantize: str | None = None
    cpu_kernels: bool = True
    kv_cache_bytes: int = 512 * 2**20


@dataclass
class StepFigures:
    batch_size: int
    median_ms: float
    best_ms: float
    tokens_per_s: float  # batch size / median step
    step_ms: list[float] = field(default_factory=list)


def measure(config: StepConfig) -> list[StepFigures]:
    """Times ``config.steps`` decode steps (after ``config.warmups``) at each batch size."""
    import torch

    from shard.backends.paged import PagedBackend

    backend = PagedBackend(
        config.model_dir, torch.device("cpu"), config.dtype, kv_cache_bytes=config.kv_cache_bytes,
        quantize=config.quantize, cpu_kernels=config.cpu_kernels,
    )  # fmt: skip
    vocab = backend.spec.vocab_size
    prompt = [(7 * i + 11) % vocab for i in range(config.prompt_length)]
    results = []
    for batch in config.batch_sizes:
        out = backend.prefill([prompt] * batch, [False] * batch)
        ids = out.logits.argmax(-1)
        times = []
        try:
            for step in range(config.warmups + config.steps):
                started = time.perf_counter()
                ids = backend.decode(out.state, ids).argmax(-1)
                if step >= config.warmups:
                    times.append((time.perf_counter() - started) * 1000)
        finally:
            backend.release(out.state)
        median = statistics.median(times)
        results.append(StepFigures(batch, median, min(times), batch / median * 1000, times))
    return results


def format_table(results: list[StepFigures]) -> str:
    lines = [f"{'batch':>6}  {'ms/step p50':>11}  {'best':>8}  {'tokens/s':>9}"]
    for r in results:
        lines.append(f"{r.batch_size:>6}  {r.median_ms:>11.2f}  {r.best_ms:>8.2f}  {r.tokens_per_s:>9.1f}")
    return "\n".join(lines)


def run_command(args: argparse.Namespace) -> int:
    config = StepConfig(
        model_dir=args.model_dir, batch_sizes=tuple(args.batch_sizes), prompt_length=args.prompt_length,
        steps=args.steps, warmups=args.warmups, dtype=args.dtype, quantize=args.quantize,
        cpu_kernels=not args.torch_only,
    )  # fmt: skip
    try:
        results = measure(config)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"text-generation-benchmark step: error: {e}", file=sys.stderr)
        return 1
    print(format_table(results))
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"benchmark": "step", "config": asdict(config), "results": [asdict(r) for r in results]},
                      f, indent=1)  # fmt: skip
            f.write("\n")
        print(f"results written to {args.output}")
    return 0


def register(commands: Any) -> None:
    """Adds the ``step`` subcommand to ``text-generation-benchmark``'s subparsers."""
    from benchmark.args import int_list, non_negative_int, positive_int

    p = commands.add_parser(
        "step",
        help="the paged backend's decode step in process (no gRPC, no router)",
        description="Times greedy decode steps of the paged backend in this process, per batch size.",
    )
    p.add_argument("--model-dir", required=True, help="local model directory (config, safetensors)")
    p.add_argument("--batch-sizes", metavar="B1,B2,...", type=int_list, default=StepConfig.batch_sizes,
                   help="comma-separated batch sizes (default: 1,32)")  # fmt: skip
    p.add_argument("--prompt-length", type=positive_int, default=100, help="prompt tokens (default: 100)")
    p.add_argument("--steps", type=positive_int, default=40, help="timed steps per batch size (default: 40)")
    p.add_argument("--warmups", type=non_negative_int, default=5, help="untimed steps first (default: 5)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    p.add_argument("--quantize", default=None, choices=("int8", "int4"))
    p.add_argument("--torch-only", action="store_true", help="without the backend's CPU kernels")
    p.add_argument("--output", metavar="PATH", default=None, help="write the figures as JSON here")
    p.set_defaults(handler=run_command)
