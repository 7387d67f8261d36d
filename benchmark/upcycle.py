"""``text-generation-benchmark upcycle-moe``: a Mixtral-shaped model upcycled from a dense Llama.

A mixture-of-experts model whose perplexity means something, without a download: every layer's MLP
becomes ``--experts`` experts that are each a copy of it (``block_sparse_moe.experts.{e}.w1/w3/w2`` from
``mlp.gate/up/down_proj``), behind a random router picking ``--top-k`` of them. Mixtral renormalizes the
chosen experts' probabilities to sum to 1, so the layer computes ``sum_k w_k MLP(x) = MLP(x)``: the same
function as the dense model (to float32 rounding), whatever the router picks, while every step still
routes, groups tokens by expert and runs the expert products. Its perplexity on a text is the dense
model's; under ``--quantize int4`` each expert is quantized on its own, so the MoE path's int4 error is
measured against a float32 figure known in advance (``quantize --model-id DIR --modes none,int4``).

The source is the launcher's default model unless ``--model-id`` names another Llama-shaped one
(``launcher.weights.resolve``); the attention, norms, embeddings and tokenizer files are copied as they
are.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

# The dense config's keys that a Mixtral config does not have (or that name the source).
DROPPED_KEYS = ("_model_name_or_path", "attention_bias", "mlp_bias", "pretraining_tp", "architectures")
# gate, up, down as Mixtral's experts name them.
EXPERT_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
SIDE_FILES = ("*.json", "*.jinja", "*.txt", "*.model")
# Side files of the source not copied: the config (rewritten) and a weights index (one file written).
NOT_COPIED = ("config.json", "model.safetensors.index.json")


def moe_config(dense: dict[str, Any], experts: int, top_k: int) -> dict[str, Any]:
    """The Mixtral config.json of a dense Llama config.json: the same sizes, ``experts`` experts of the
    dense MLP's width, ``top_k`` per token, no sliding window."""
    if dense.get("model_type") != "llama":
        raise ValueError(f"upcycling needs a Llama model, not {dense.get('model_type')!r}")
    if dense.get("attention_bias") or dense.get("mlp_bias"):
        raise ValueError("Mixtral has no attention or MLP biases: this Llama cannot be upcycled")
    if not 0 < top_k <= experts:
        raise ValueError(f"top {top_k} of {experts} experts")
    config = {k: v for k, v in dense.items() if k not in DROPPED_KEYS}
    return config | {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "num_local_experts": experts,
        "num_experts_per_tok": top_k,
        "sliding_window": None,
        "dtype": "float32",
    }


def upcycle(source: Path, output: Path, experts: int, top_k: int, seed: int = 0) -> Path:
    """Writes the upcycled model of the dense model directory ``source`` to ``output`` (float32)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    dense = json.loads((source / "config.json").read_text())
    config = moe_config(dense, experts, top_k)
    output.mkdir(parents=True, exist_ok=True)
    for pattern in SIDE_FILES:
        for side in source.glob(pattern):
            if not side.name.startswith(".") and side.name not in NOT_COPIED:
                shutil.copy(side, output / side.name)
    (output / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    g = torch.Generator().manual_seed(seed)
    hidden = int(config["hidden_size"])
    out: dict[str, torch.Tensor] = {}
    for file in sorted(source.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensor = f.get_tensor(name).float()
                prefix, dot, projection = name.removesuffix(".weight").rpartition(".mlp.")
                if not dot:
                    out[name] = tensor
                    continue
                block = f"{prefix}.block_sparse_moe"
                for e in range(experts):
                    out[f"{block}.experts.{e}.{EXPERT_NAMES[projection]}.weight"] = tensor.clone()
                if projection == "gate_proj":  # one router per layer
                    out[f"{block}.gate.weight"] = torch.randn(experts, hidden, generator=g) * hidden**-0.5
    save_file(out, str(output / "model.safetensors"), metadata={"format": "pt"})
    return output


def run_command(args: argparse.Namespace) -> int:
    from launcher.weights import WeightsConfig, WeightsError, resolve

    started = time.perf_counter()
    try:
        source = resolve(WeightsConfig(model_id=args.model_id), progress=False)
        upcycle(source.path, Path(args.output), args.experts, args.top_k, args.seed)
    except (OSError, ValueError, WeightsError) as e:
        print(f"text-generation-benchmark upcycle-moe: error: {e}", file=sys.stderr)
        return 1
    print(
        f"{source.model_id} upcycled to {args.experts} experts (top {args.top_k}) in {args.output} in "
        f"{time.perf_counter() - started:.1f} s"
    )
    return 0


def register(commands: Any) -> None:
    """Adds the ``upcycle-moe`` subcommand to ``text-generation-benchmark``'s subparsers."""
    from benchmark.args import non_negative_int, positive_int

    p = commands.add_parser(
        "upcycle-moe",
        help="write a Mixtral-shaped model whose experts are copies of a dense Llama's MLPs",
        description=(
            "Upcycles a dense Llama (default: the launcher's default model) into a Mixtral whose experts "
            "are copies of each layer's MLP behind a random router: the same function as the dense model, "
            "so its perplexity is the dense model's."
        ),
    )
    p.add_argument("--model-id", default=None, help="the dense model (default: the embedded default model)")
    p.add_argument("--experts", type=positive_int, default=4, help="experts per layer (default: %(default)s)")
    p.add_argument("--top-k", type=positive_int, default=2, help="experts per token (default: %(default)s)")
    p.add_argument(
        "--seed", type=non_negative_int, default=0, help="the routers' seed (default: %(default)s)"
    )
    p.add_argument("--output", metavar="DIR", required=True, help="model directory to write")
    p.set_defaults(handler=run_command)
