"""``text-generation-benchmark baseline``: transformers' own ``generate`` on a model directory, as the peer
to compare the server with in the same run.

For each static batch size, every row holds the same short prompt and generates exactly ``max_new_tokens``
tokens greedily (``min_new_tokens`` equal, so EOS cannot end a row early). Each measured run times one
``generate`` call of ``max_new_tokens`` tokens and one of a single token (prefill and first token), so:

- output tokens/s = batch x max_new_tokens / generate time (prefill included);
- time per step = (generate time - one-token time) / (max_new_tokens - 1), the decode step alone, and
  decode tokens/s = batch / time per step (the shard benchmark's decode throughput).

The figures are the median over the measured runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

DEFAULT_PROMPT = "The capital of France is"


@dataclass(frozen=True)
class BaselineConfig:
    model_dir: str
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    max_new_tokens: int = 64
    prompt: str = DEFAULT_PROMPT
    device: str = "cpu"
    dtype: str | None = None  # None: float32 on CPU, the checkpoint's dtype elsewhere
    warmups: int = 1
    runs: int = 3
    output: str | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 2:
            raise ValueError("--max-new-tokens must be >= 2 (one decode step at least)")
        if self.runs < 1:
            raise ValueError("--runs must be >= 1")


@dataclass(frozen=True)
class BaselineRun:
    batch_size: int
    generate_s: float  # max_new_tokens tokens per row
    first_token_s: float  # one token per row (the prefill)
    generated_tokens: int  # counted from the outputs: batch x max_new_tokens when every row ran to the end


@dataclass(frozen=True)
class BaselineStats:
    """One batch size: medians over its runs."""

    batch_size: int
    runs: int
    max_new_tokens: int
    generate_s: float
    first_token_s: float
    output_tokens_per_s: float
    time_per_step_ms: float
    decode_tokens_per_s: float


def summarize(runs: list[BaselineRun], max_new_tokens: int) -> BaselineStats:
    """Medians of the per-run figures of one batch size."""
    if not runs:
        raise ValueError("no runs to summarize")
    batch = runs[0].batch_size
    step_s = [max(r.generate_s - r.first_token_s, 1e-9) / (max_new_tokens - 1) for r in runs]
    return BaselineStats(
        batch_size=batch,
        runs=len(runs),
        max_new_tokens=max_new_tokens,
        generate_s=statistics.median(r.generate_s for r in runs),
        first_token_s=statistics.median(r.first_token_s for r in runs),
        output_tokens_per_s=statistics.median(r.generated_tokens / r.generate_s for r in runs),
        time_per_step_ms=1000 * statistics.median(step_s),
        decode_tokens_per_s=statistics.median(batch / s for s in step_s),
    )


@dataclass
class BaselineResult:
    config: BaselineConfig
    environment: dict[str, Any]
    results: list[BaselineStats] = field(default_factory=list)
    runs: list[BaselineRun] = field(default_factory=list)
    floor: dict[str, Any] | None = None  # a `floor --output` file, to report fractions of its bounds

    def versus_floor(self) -> list[dict[str, Any]]:
        from benchmark.floor import versus_floor

        if self.floor is None:
            return []
        return [
            versus_floor(self.floor, r.batch_size, 1000 / r.time_per_step_ms, r.decode_tokens_per_s)
            for r in self.results
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "benchmark": "baseline",
            "config": asdict(self.config),
            "environment": self.environment,
            "results": [asdict(r) for r in self.results],
            "versus_floor": self.versus_floor() or None,
            "runs": [asdict(r) for r in self.runs],
        }


class Generator:
    """The model, the tokenizer and the prompt, loaded once."""

    def __init__(self, config: BaselineConfig) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.device = torch.device(config.device)
        dtype: Any = getattr(torch, config.dtype) if config.dtype else None
        if dtype is None:
            dtype = torch.float32 if self.device.type == "cpu" else "auto"
        self.tokenizer = AutoTokenizer.from_pretrained(config.model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(config.model_dir, dtype=dtype).to(self.device)
        self.model.eval()
        self.prompt_ids = self.tokenizer(config.prompt, return_tensors="pt").input_ids.to(self.device)
        if self.prompt_ids.shape[1] == 0:
            raise ValueError("the prompt encodes to no tokens")
        self.base_config = copy.deepcopy(self.model.generation_config)
        pad = self.base_config.pad_token_id
        if pad is None:
            pad = self.tokenizer.pad_token_id
        if pad is None:
            eos = self.base_config.eos_token_id
            pad = eos[0] if isinstance(eos, list) else eos
        self.pad_token_id = pad

    def generate(self, batch_size: int, new_tokens: int) -> tuple[float, int]:
        """One greedy ``generate`` of ``new_tokens`` per row; (seconds, tokens generated in all)."""
        torch = self.torch
        ids = self.prompt_ids.expand(batch_size, -1).contiguous()
        generation_config = copy.deepcopy(self.base_config)
        generation_config.update(
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            num_beams=1,
            temperature=None,
            top_k=None,
            top_p=None,
            pad_token_id=self.pad_token_id,
        )
        with torch.inference_mode():
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            start = time.perf_counter()
            out = self.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=generation_config
            )
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            elapsed = time.perf_counter() - start
        return elapsed, batch_size * (out.shape[1] - ids.shape[1])

    def run_once(self, batch_size: int, new_tokens: int) -> BaselineRun:
        generate_s, generated = self.generate(batch_size, new_tokens)
        first_token_s, _ = self.generate(batch_size, 1)
        if generated != batch_size * new_tokens:
            raise RuntimeError(
                f"batch {batch_size}: generated {generated} tokens, expected {batch_size * new_tokens}"
            )
        return BaselineRun(batch_size, generate_s, first_token_s, generated)


def run_baseline(config: BaselineConfig, *, progress: Any = None) -> BaselineResult:
    import platform

    import torch
    import transformers

    say = progress or (lambda _text: None)
    if not Path(config.model_dir).is_dir():
        raise FileNotFoundError(f"{config.model_dir}: not a model directory")
    say(f"loading {config.model_dir}")
    gen = Generator(config)
    result = BaselineResult(
        config=config,
        environment={
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "device": str(gen.device),
            "dtype": str(gen.model.dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "prompt_tokens": int(gen.prompt_ids.shape[1]),
        },
    )
    for size in config.batch_sizes:
        for _ in range(config.warmups):
            gen.run_once(size, min(config.max_new_tokens, 4))
        runs = [gen.run_once(size, config.max_new_tokens) for _ in range(config.runs)]
        result.runs.extend(runs)
        stats = summarize(runs, config.max_new_tokens)
        result.results.append(stats)
        say(f"batch {size}: {stats.output_tokens_per_s:.1f} tokens/s, {stats.time_per_step_ms:.2f} ms/step")
    return result


def format_summary(result: BaselineResult) -> str:
    c, env = result.config, result.environment
    lines = [
        f"transformers {env['transformers']} generate on {env['device']} ({env['dtype']}): {c.model_dir}",
        f"greedy, prompt {env['prompt_tokens']} tokens, {c.max_new_tokens} new tokens per row, "
        f"median of {c.runs} run(s)",
        "",
        f"{'batch':>5} {'generate s':>11} {'prefill ms':>11} {'ms/step':>9} {'out tok/s':>10} "
        f"{'decode tok/s':>13}",
    ]
    for r in result.results:
        lines.append(
            f"{r.batch_size:>5} {r.generate_s:>11.3f} {1000 * r.first_token_s:>11.2f} "
            f"{r.time_per_step_ms:>9.2f} {r.output_tokens_per_s:>10.1f} {r.decode_tokens_per_s:>13.1f}"
        )
    if result.floor is not None:
        from benchmark.floor import format_versus

        lines += ["", format_versus(result.floor, result.versus_floor())]
    return "\n".join(lines)


def write_json(result: BaselineResult, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return path


def register(commands: Any) -> None:
    """Adds the ``baseline`` subcommand to ``text-generation-benchmark``'s subparsers."""
    from benchmark.args import int_list, non_negative_int, positive_int

    p = commands.add_parser(
        "baseline",
        help="transformers' generate on a model directory, the reference peer",
        description=(
            "Runs transformers' own generate on static batches (greedy, every row exactly max-new-tokens "
            "tokens) and reports output tokens/s and time per decode step per batch size."
        ),
    )
    p.add_argument("--model-dir", required=True, help="local model directory (config, weights, tokenizer)")
    p.add_argument(
        "--batch-sizes",
        metavar="B1,B2,...",
        type=int_list,
        default=BaselineConfig.batch_sizes,
        help="comma-separated batch sizes (default: 1,8,32)",
    )
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens per row (default: 64)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt of every row (default: %(default)r)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    p.add_argument("--warmups", type=non_negative_int, default=1, help="unmeasured short runs (default: 1)")
    p.add_argument("--runs", type=positive_int, default=3, help="measured runs per batch size (default: 3)")
    p.add_argument("--output", metavar="PATH", default=None, help="write the figures as JSON here")
    p.add_argument(
        "--floor",
        metavar="FLOOR.json",
        default=None,
        help="a `floor --model-dir ... --output` file: report decode steps/s and tokens/s as fractions of it",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    p.set_defaults(handler=run_command)


def config_from_args(args: argparse.Namespace) -> BaselineConfig:
    return BaselineConfig(
        model_dir=args.model_dir,
        batch_sizes=args.batch_sizes,
        max_new_tokens=args.max_new_tokens,
        prompt=args.prompt,
        device=args.device,
        dtype=args.dtype,
        warmups=args.warmups,
        runs=args.runs,
        output=args.output,
    )


def run_command(args: argparse.Namespace, *, stdout: TextIO | None = None) -> int:
    out = stdout or sys.stdout
    try:
        config = config_from_args(args)
    except ValueError as e:
        print(f"text-generation-benchmark baseline: error: {e}", file=sys.stderr)
        return EXIT_USAGE

    from benchmark.floor import load_floor

    try:
        floor = load_floor(args.floor) if args.floor else None
    except (OSError, ValueError) as e:
        print(f"text-generation-benchmark baseline: error: --floor: {e}", file=sys.stderr)
        return EXIT_USAGE

    def progress(text: str) -> None:
        if not args.no_progress:
            print(text, file=sys.stderr, flush=True)

    try:
        result = run_baseline(config, progress=progress)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    result.floor = floor
    print(format_summary(result), file=out)
    if config.output:
        path = write_json(result, config.output)
        print(f"results written to {path}", file=sys.stderr)
    return EXIT_OK
