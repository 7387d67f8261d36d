"""Weight-only int8 / int4 matrix-product kernels on this CPU, against float32 ``F.linear``.

``python -m benchmark.quant_kernels [--threads 2,1] [--output docs/benchmarks/quant-kernels.json]``

y = x W^T for the default model's shapes (SmolLM2-135M: fused q/k/v 576 -> 960, o 576 -> 576, fused
gate/up 576 -> 3072, down 1536 -> 576, LM head 576 -> 49152) and m = 1, 8, 32, 64 rows of x. Every
candidate gets enough copies of its weight to read at least ``--stream-mb`` MB (default 96, three times
this machine's 32 MB L3) and cycles through them, so that, as in a real decode step, the weights come
from memory and not from the cache. Each figure is ms per call: the best and the median of ``--repeats``
timed loops.

Candidates (each skipped, with the reason recorded, when it cannot run here):

- ``f32``: float32 ``F.linear`` (MKL / oneDNN sgemm).
- ``deq_f32``: int8 -> float32 conversion times the scales, then ``F.linear`` (reads the int8 weight but
  writes and reads a float copy: a baseline, not a candidate).
- ``torch_int8pack``: ``torch._weight_int8pack_mm`` (int8 per channel).
- ``torch_int4pack``: ``torch._weight_int4pack_mm_for_cpu`` (int4, groups of 32).
- ``compile_int8`` / ``compile_int8_autotune``: ``torch.compile`` of dequantize-then-matmul (inductor's
  C++ code; the second with ``mode="max-autotune-no-cudagraphs"``).
- ``ort_int8`` / ``ort_int4`` (and ``_q8``: ``accuracy_level=4``, int8 activations): ONNX Runtime's
  ``MatMulNBits`` (blocks of 32), when ``onnxruntime`` and ``onnx`` import.
- ``ours_int8`` / ``ours_int4``: ``shard/paged/quant_cpu.cpp`` (what ``--quantize int8|int4`` runs);
  ``ours_int8`` quantizes x to int8 in blocks of 32 and uses AVX512-VNNI where the CPU has it;
  ``ours_int8_f32act`` keeps x in float32 and dequantizes the weights in registers; ``ours_int4`` quantizes x
  to int8 (blocks of 32) and runs integer dot products.
- ``deq4_f32``: int4 blocks dequantized to float32, then ``F.linear`` (what ``--quantize int4`` does
  from ``LARGE_M`` rows on).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

SHAPES = {  # name: (k, n), the default model's matrices (y[m, n] = x[m, k] W[n, k]^T)
    "qkv": (576, 960),
    "o": (576, 576),
    "gate_up": (576, 3072),
    "down": (1536, 576),
    "lm_head": (576, 49152),
}
ROWS = (1, 8, 32, 64)
GROUP = 32
# Bytes per weight each candidate reads (int4: nibbles plus its scales).
BYTES = {"f32": 4.0, "int8": 1.0, "int4": 0.625}


def timed(calls: list[Callable[[], object]], repeats: int, budget_s: float) -> tuple[float, float]:
    """(best, median) ms per call over ``repeats`` loops cycling through ``calls``."""
    for call in calls[: min(3, len(calls))]:
        call()
    start = time.perf_counter()
    calls[0]()
    one = max(time.perf_counter() - start, 1e-6)
    per_loop = max(3, min(2000, math.ceil(budget_s / one)))
    samples = []
    i = 0  # goes on across loops, so that every loop reads other copies than the last one left in cache
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(per_loop):
            calls[i % len(calls)]()
            i += 1
        samples.append((time.perf_counter() - start) / per_loop * 1e3)
    return min(samples), statistics.median(samples)


def copies(k: int, n: int, bytes_per_weight: float, stream_mb: float) -> int:
    return max(1, math.ceil(stream_mb * 1e6 / (k * n * bytes_per_weight)))


# -- candidates: each returns (weight bytes per weight, factory(k, n) -> list of fn(x) -> y), or raises --


def cand_f32(torch, F):
    def make(k, n, c):
        return [lambda x, w=w: F.linear(x, w) for w in [torch.randn(n, k) * 0.05 for _ in range(c)]]

    return "f32", make


def int8_weights(torch, k, n, c):
    from shard.paged.quant import quantize_int8

    return [quantize_int8(torch.randn(n, k)) for _ in range(c)]


def cand_deq(torch, F):
    def make(k, n, c):
        return [
            lambda x, qs=qs: F.linear(x, qs[0].float() * qs[1][:, None])
            for qs in int8_weights(torch, k, n, c)
        ]

    return "int8", make


def cand_deq4(torch, F):
    from shard.paged.quant import dequantize_int4, quantize_int4

    def make(k, n, c):
        packed = [quantize_int4(torch.randn(n, k)) for _ in range(c)]
        return [lambda x, p=p, k=k: F.linear(x, dequantize_int4(*p, k)) for p in packed]

    return "int4", make


def cand_int8pack(torch, F):
    def make(k, n, c):
        return [
            lambda x, qs=qs: torch._weight_int8pack_mm(x, qs[0], qs[1]) for qs in int8_weights(torch, k, n, c)
        ]

    return "int8", make


def cand_int4pack(torch, F):
    def make(k, n, c):
        out = []
        for _ in range(c):
            packed = torch._convert_weight_to_int4pack_for_cpu(
                torch.randint(0, 16, (n, k), dtype=torch.int32), 1
            )
            scales_zeros = torch.rand(k // GROUP, n, 2) * 0.01
            out.append(
                lambda x, p=packed, sz=scales_zeros: torch._weight_int4pack_mm_for_cpu(x, p, GROUP, sz)
            )
        return out

    return "int4", make


def cand_compile(torch, F, mode=None):
    def dequant_mm(x, q, scale):
        return (x @ q.to(x.dtype).t()) * scale

    fn = torch.compile(dequant_mm, dynamic=False, mode=mode)

    def make(k, n, c):
        return [lambda x, qs=qs: fn(x, qs[0], qs[1]) for qs in int8_weights(torch, k, n, c)]

    return "int8", make


def cand_ours(torch, F, mode, vnni=True):
    from shard.paged.quant import load_kernels, quantize_int4

    if not load_kernels():
        raise RuntimeError("the kernels did not build")
    if torch.ops.paged_quant.set_int8_vnni(vnni) != vnni:
        raise RuntimeError("this CPU has no AVX512-VNNI")
    if mode == "int8":

        def make(k, n, c):
            return [
                lambda x, qs=qs: torch.ops.paged_quant.int8_linear(x, qs[0], qs[1])
                for qs in int8_weights(torch, k, n, c)
            ]

    else:

        def make(k, n, c):
            packed = [quantize_int4(torch.randn(n, k)) for _ in range(c)]
            return [lambda x, p=p, k=k: torch.ops.paged_quant.int4_linear(x, *p, k) for p in packed]

    return mode, make


def cand_ort(torch, F, bits, accuracy_level, threads):
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    def session(k, n):
        blocks = k // GROUP
        blob = GROUP * bits // 8
        rng = np.random.default_rng(0)
        b = rng.integers(0, 256, (n, blocks, blob), dtype=np.uint8)
        scales = (rng.random(n * blocks, dtype=np.float32) * 0.01).astype(np.float32)
        node = helper.make_node(
            "MatMulNBits", ["X", "B", "S"], ["Y"], domain="com.microsoft",
            K=k, N=n, bits=bits, block_size=GROUP, accuracy_level=accuracy_level,
        )  # fmt: skip
        graph = helper.make_graph(
            [node], "g",
            [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["M", k])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
            initializer=[helper.make_tensor("B", TensorProto.UINT8, b.shape, b.tobytes(), raw=True),
                         helper.make_tensor("S", TensorProto.FLOAT, scales.shape, scales.tobytes(), raw=True)],
        )  # fmt: skip
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
        )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry(
            "session.intra_op.allow_spinning", "0"
        )  # torch's threads share the cores
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    def make(k, n, c):
        out = []
        for _ in range(c):
            s = session(k, n)
            out.append(lambda x, s=s: torch.from_numpy(s.run(None, {"X": x.numpy()})[0]))
        return out

    return ("int8" if bits == 8 else "int4"), make


def candidates(torch, F, threads: int, wanted: set[str] | None):
    table = {
        "f32": lambda: cand_f32(torch, F),
        "deq_f32": lambda: cand_deq(torch, F),
        "deq4_f32": lambda: cand_deq4(torch, F),
        "torch_int8pack": lambda: cand_int8pack(torch, F),
        "torch_int4pack": lambda: cand_int4pack(torch, F),
        "compile_int8": lambda: cand_compile(torch, F),
        "compile_int8_autotune": lambda: cand_compile(torch, F, "max-autotune-no-cudagraphs"),
        "ort_int8": lambda: cand_ort(torch, F, 8, 0, threads),
        "ort_int8_q8": lambda: cand_ort(torch, F, 8, 4, threads),
        "ort_int4": lambda: cand_ort(torch, F, 4, 0, threads),
        "ort_int4_q8": lambda: cand_ort(torch, F, 4, 4, threads),
        "ours_int8": lambda: cand_ours(torch, F, "int8"),
        "ours_int8_f32act": lambda: cand_ours(torch, F, "int8", vnni=False),
        "ours_int4": lambda: cand_ours(torch, F, "int4"),
    }
    for name, build in table.items():
        if wanted is None or name in wanted:
            yield name, build


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def run(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    wanted = set(args.candidates.split(",")) if args.candidates else None
    shapes = {name: SHAPES[name] for name in args.shapes.split(",")}
    results: list[dict] = []
    skipped: dict[str, str] = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name, build in candidates(torch, F, threads, wanted):
            try:
                fmt, make = build()
            except Exception as e:  # not installed, did not build...
                skipped[name] = f"{type(e).__name__}: {e}"[:300]
                print(f"skip {name}: {skipped[name]}", file=sys.stderr)
                continue
            for shape, (k, n) in shapes.items():
                if name.startswith(("torch_", "deq")) and shape == "lm_head" and not args.slow_lm_head:
                    continue  # seconds per call: nothing to learn from the LM head
                try:
                    calls = make(k, n, copies(k, n, BYTES[fmt], args.stream_mb))
                    for m in args.rows:
                        x = torch.randn(m, k)
                        fns = [lambda f=f, x=x: f(x) for f in calls]
                        best, median = timed(fns, args.repeats, args.budget_s)
                        gbs = k * n * BYTES[fmt] / (best * 1e-3) / 1e9
                        row = dict(threads=threads, candidate=name, shape=shape, k=k, n=n, m=m,
                                   best_ms=round(best, 4), median_ms=round(median, 4),
                                   weight_gb_s=round(gbs, 2))  # fmt: skip
                        results.append(row)
                        print(json.dumps(row), file=sys.stderr, flush=True)
                    del calls
                except Exception as e:
                    skipped[f"{name}/{shape}"] = f"{type(e).__name__}: {e}"[:300]
                    print(f"skip {name}/{shape}: {e}", file=sys.stderr)
    return {
        "benchmark": "quant_kernels",
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "load_average": os.getloadavg(),
        },
        "config": {
            "threads": args.threads,
            "rows": args.rows,
            "shapes": shapes,
            "stream_mb": args.stream_mb,
            "repeats": args.repeats,
            "budget_s": args.budget_s,
            "group": GROUP,
        },
        "skipped": skipped,
        "results": results,
    }


def int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmark.quant_kernels", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--threads", type=int_list, default=[2, 1], help="torch threads, one pass each")
    parser.add_argument("--rows", type=int_list, default=list(ROWS), help="rows of x (m)")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"among {', '.join(SHAPES)}")
    parser.add_argument("--candidates", default=None, help="comma-separated names (default: all)")
    parser.add_argument("--stream-mb", type=float, default=96.0, help="weight bytes to cycle through")
    parser.add_argument("--repeats", type=int, default=7, help="timed loops per figure")
    parser.add_argument("--budget-s", type=float, default=0.05, help="about how long one timed loop runs")
    parser.add_argument(
        "--slow-lm-head", action="store_true", help="time torch's packed kernels on the LM head"
    )
    parser.add_argument("--output", type=Path, default=None, help="write the JSON here (default: stdout)")
    args = parser.parse_args(argv)
    report = run(args)
    text = json.dumps(report, indent=1)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
