"""``text-generation-benchmark random-lora``: a LoRA adapter with random weights, in PEFT's format; and
``lora-compare``: the table of benchmark/lora.sh's alternating runs, base model against adapters.

The LoRA benchmark (benchmark/lora.sh: 32 streams spread over 4 adapters against the base model alone)
needs adapters of a given rank and shape, not of a given quality, for whatever model it serves. This
writes what PEFT's ``save_pretrained`` writes for a Llama-shaped causal LM (``adapter_config.json`` and
``adapter_model.safetensors`` with ``base_model.model.model.layers.{i}.{self_attn|mlp}.{x}_proj.lora_{A|B}
.weight``), reading the shapes from the model's ``config.json``; PEFT and the server both load it
(tests/unit/benchmark/test_lora_bench.py). A is drawn with the variance of PEFT's own initialization
(1/in), B (which PEFT starts at zero, an adapter that changes nothing) with standard deviation ``B_STD``,
so that the adapter changes the output the way a trained one does, without swamping the base model.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The projections an adapter may target, with the module of the layer that holds each.
MODULES = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}  # fmt: skip
B_STD = 0.02


def projection_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(out, in) of each projection of a Llama-shaped model's ``config.json``."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    q, kv = heads * head_dim, config.get("num_key_value_heads", heads) * head_dim
    ff = config["intermediate_size"]
    return {
        "q_proj": (q, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, q),
        "gate_proj": (ff, hidden), "up_proj": (ff, hidden), "down_proj": (hidden, ff),
    }  # fmt: skip


def write_adapter(
    model_dir: Path, output: Path, rank: int, alpha: float, targets: list[str], seed: int = 0
) -> Path:
    """Writes a random LoRA adapter of ``rank`` (scale ``alpha / rank``) for the model in ``model_dir``,
    targeting ``targets`` in every decoder layer, into ``output`` (created if needed); returns it.
    ValueError for a rank below 1, no target, or a target that is not a projection of ``MODULES``."""
    import torch
    from safetensors.torch import save_file

    if rank < 1:
        raise ValueError(f"the rank must be >= 1, got {rank}")
    unknown = sorted(set(targets) - set(MODULES))
    if not targets or unknown:
        raise ValueError(f"targets must be among {', '.join(MODULES)}; got {targets}")
    config = json.loads((model_dir / "config.json").read_text())
    shapes = projection_shapes(config)
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(config["num_hidden_layers"]):
        for target in targets:
            out, inp = shapes[target]
            prefix = f"base_model.model.model.layers.{layer}.{MODULES[target]}.{target}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, inp, generator=g) / inp**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out, rank, generator=g) * B_STD
    output.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(output / "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(model_dir),
        "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": list(targets), "bias": "none",
        "use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "inference_mode": True,
    }  # fmt: skip
    (output / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    return output


def run_command(args: argparse.Namespace) -> int:
    try:
        write_adapter(Path(args.model_dir), Path(args.output), args.rank, args.alpha or 2 * args.rank,
                      args.targets, args.seed)  # fmt: skip
    except (OSError, ValueError, KeyError) as e:
        print(f"text-generation-benchmark random-lora: error: {e}", file=sys.stderr)
        return 1
    print(f"rank-{args.rank} LoRA adapter ({', '.join(args.targets)}) written to {args.output}")
    return 0


# The target: requests spread over adapters keep at least this share of the base model's rate.
TARGET = 0.8


@dataclass(frozen=True)
class Run:
    """One ``serve --output`` file of a one-level run: its output tokens/s, requests and failures."""

    path: Path
    tokens_per_s: float
    requests: int
    errors: int
    models: tuple[str, ...]

    @staticmethod
    def read(path: Path) -> Run:
        """ValueError for a file that is not a one-level ``serve`` result."""
        data = json.loads(path.read_text())
        if data.get("command") != "serve" or len(data.get("levels", ())) != 1:
            raise ValueError(f"{path}: not the results of a one-level `serve` run")
        metrics = data["levels"][0]["metrics"]
        return Run(path, float(metrics["output_tokens_per_s"]), int(metrics["num_requests"]),
                   int(metrics["num_errors"]), tuple(data["config"].get("models") or ()))  # fmt: skip


def compare(base: list[Run], adapters: list[Run]) -> tuple[str, float]:
    """The table of the alternating runs (round, base tok/s, adapters tok/s, ratio), the means, and the
    verdict against ``TARGET``; returns it with the ratio of the means. ValueError when the rounds do not
    pair up, a base run spread its requests or an adapters run did not."""
    if not base or len(base) != len(adapters):
        raise ValueError(f"{len(base)} base run(s) and {len(adapters)} adapter run(s): give them in pairs")
    if any(run.models for run in base) or not all(run.models for run in adapters):
        raise ValueError("the base runs must name no model list, the adapter runs one (serve --models)")
    lines = ["round  base tok/s  adapters tok/s  adapters / base"]
    for i, (b, a) in enumerate(zip(base, adapters, strict=True), 1):
        lines.append(
            f"{i:>5}  {b.tokens_per_s:>10.1f}  {a.tokens_per_s:>14.1f}  {a.tokens_per_s / b.tokens_per_s:>15.2f}"
        )
    mean_base = sum(r.tokens_per_s for r in base) / len(base)
    mean_adapters = sum(r.tokens_per_s for r in adapters) / len(adapters)
    ratio = mean_adapters / mean_base
    lines.append(f" mean  {mean_base:>10.1f}  {mean_adapters:>14.1f}  {ratio:>15.2f}")
    errors = sum(r.errors for r in (*base, *adapters))
    requests = sum(r.requests for r in (*base, *adapters))
    lines.append(
        f"adapters: {', '.join(adapters[0].models)}; {requests} requests, {errors} failed; "
        f"target >= {TARGET:.0%} of the base rate: {'met' if ratio >= TARGET else 'NOT met'}"
    )
    return "\n".join(lines), ratio


def run_compare(args: argparse.Namespace) -> int:
    try:
        table, _ = compare([Run.read(Path(p)) for p in args.base], [Run.read(Path(p)) for p in args.adapters])
    except (OSError, ValueError, KeyError) as e:
        print(f"text-generation-benchmark lora-compare: error: {e}", file=sys.stderr)
        return 1
    print(table)
    return 0


def register(commands: Any) -> None:
    """Adds the ``random-lora`` and ``lora-compare`` subcommands to ``text-generation-benchmark``'s
    subparsers."""
    from benchmark.args import label_list, non_negative_int, positive_float, positive_int

    p = commands.add_parser(
        "random-lora",
        help="write a LoRA adapter with random weights in PEFT's format (for the LoRA benchmark)",
        description="Writes adapter_config.json and adapter_model.safetensors for a Llama-shaped model.",
    )
    p.add_argument("--model-dir", metavar="DIR", required=True, help="the base model's directory")
    p.add_argument("--output", metavar="DIR", required=True, help="adapter directory to write")
    p.add_argument("--rank", type=positive_int, default=8, help="LoRA rank r (default: %(default)s)")
    p.add_argument("--alpha", type=positive_float, default=None, help="lora_alpha (default: 2 x rank)")
    p.add_argument("--targets", metavar="P1,P2,...", type=label_list, default=list(MODULES),
                   help="projections to adapt (default: all seven)")  # fmt: skip
    p.add_argument("--seed", type=non_negative_int, default=0, help="(default: %(default)s)")
    p.set_defaults(handler=run_command)
    c = commands.add_parser(
        "lora-compare",
        help="compare serve runs spread over LoRA adapters with runs of the base model (benchmark/lora.sh)",
        description="Reads one-level `serve --output` files, base and adapter runs in round order.",
    )
    c.add_argument("--base", metavar="RESULT.json", nargs="+", required=True, help="the base model's runs")
    c.add_argument("--adapters", metavar="RESULT.json", nargs="+", required=True,
                   help="the runs spread over adapters (serve --models), one per base run")  # fmt: skip
    c.set_defaults(handler=run_compare)
