"""``text-generation-benchmark``: command-line entry point (subcommands; ``serve`` is the first)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from benchmark._version import __version__
from benchmark.args import (
    concurrency_list,
    json_object,
    label_list,
    name_list,
    non_negative_int,
    positive_float,
    positive_int,
    range_ratio,
    rate_list,
)
from benchmark.clients import CLIENTS
from benchmark.config import (
    MIN_REQUESTS_PER_LEVEL,
    REQUESTS_PER_CONCURRENCY,
    SECONDS_PER_RATE_LEVEL,
    GenerationParams,
    ServeConfig,
)
from benchmark.runner import WarmupError, run_async

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="text-generation-benchmark",
        description="Benchmarks a text-generation server the way its users see it.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="load over concurrency levels or request rates against a running server",
        description=(
            "Load generator for a server speaking the TGI-native or the OpenAI API. Closed loop (default): "
            "at each concurrency level C, C workers each send their next streaming request as soon as the "
            "previous one ends. Open loop (--request-rate): requests arrive at Poisson times of rate R "
            "whether or not earlier ones have finished. Reports TTFT, TPOT, ITL and E2E latency "
            "(p50/p90/p99), output tokens/s, requests/s and errors per level."
        ),
    )
    serve.add_argument(
        "--url", default="http://127.0.0.1:3000", help="server base URL (default: %(default)s)"
    )
    serve.add_argument(
        "--api",
        default="tgi",
        choices=sorted(CLIENTS),
        help="API to call; tgi: TGI-native /generate_stream; openai-chat: /v1/chat/completions; "
        "openai-completions: /v1/completions (default: %(default)s)",
    )
    load = serve.add_mutually_exclusive_group()
    load.add_argument(
        "--concurrency",
        metavar="C1,C2,...",
        type=concurrency_list,
        default=None,
        help="comma-separated closed-loop concurrency levels (default: 1,8,32)",
    )
    load.add_argument(
        "--request-rate",
        metavar="R1,R2,...",
        type=rate_list,
        default=None,
        help="comma-separated open-loop request rates (requests/s, Poisson arrivals) instead of "
        "concurrency levels",
    )
    serve.add_argument(
        "--requests-per-level",
        metavar="N",
        type=positive_int,
        default=None,
        help=f"requests per level (default: max({MIN_REQUESTS_PER_LEVEL}, "
        f"{REQUESTS_PER_CONCURRENCY} x concurrency), or max({MIN_REQUESTS_PER_LEVEL}, "
        f"{SECONDS_PER_RATE_LEVEL:g} x rate) for a request rate)",
    )
    serve.add_argument(
        "--max-new-tokens",
        metavar="N",
        type=positive_int,
        default=64,
        help="tokens to generate per request (default: %(default)s)",
    )
    prompt = serve.add_mutually_exclusive_group()
    prompt.add_argument(
        "--prompt",
        metavar="TEXT",
        default=ServeConfig.prompt,
        help="prompt text sent by every request (default: %(default)r)",
    )
    prompt.add_argument(
        "--input-tokens",
        metavar="N",
        type=positive_int,
        default=None,
        help="use synthetic prompts of about N tokens (random words drawn with --seed, one per request)",
    )
    serve.add_argument(
        "--random-input-range-ratio",
        metavar="R",
        type=range_ratio,
        default=0.0,
        help="draw each prompt length uniformly in [N(1-R), N], N = --input-tokens (default: %(default)g)",
    )
    serve.add_argument(
        "--random-output-range-ratio",
        metavar="R",
        type=range_ratio,
        default=0.0,
        help="draw each request's max new tokens uniformly in [N(1-R), N], N = --max-new-tokens "
        "(default: %(default)g)",
    )
    serve.add_argument(
        "--seed",
        metavar="N",
        type=int,
        default=0,
        help="seed of the synthetic prompts, random lengths and Poisson arrivals (default: %(default)s)",
    )
    serve.add_argument(
        "--warmup",
        metavar="N",
        type=non_negative_int,
        default=1,
        help="unmeasured requests sent one by one before the sweep (default: %(default)s)",
    )
    serve.add_argument(
        "--ignore-eos",
        action="store_true",
        help="generate exactly max-new-tokens: sends ignore_eos=true (and min_tokens=max_tokens on the "
        "OpenAI APIs)",
    )
    serve.add_argument(
        "--model",
        metavar="NAME",
        default=None,
        help="OpenAI APIs: the model to name (default: the first id of GET /v1/models)",
    )
    serve.add_argument(
        "--models",
        metavar="NAME1,NAME2,...",
        type=name_list,
        default=(),
        help="spread the requests over these models, request i naming the (i mod N)-th: OpenAI's `model`, "
        "TGI's `parameters.adapter_id` (e.g. a server's LoRA adapters; not with --model)",
    )
    serve.add_argument(
        "--api-key", metavar="KEY", default=None, help="send 'Authorization: Bearer KEY' with every request"
    )
    serve.add_argument(
        "--no-stream-usage",
        action="store_true",
        help="OpenAI APIs: do not send stream_options.include_usage (count one token per chunk with text)",
    )
    serve.add_argument(
        "--extra-body",
        metavar="JSON",
        type=json_object,
        default=None,
        help="JSON object merged into every request body (into 'parameters' for tgi), e.g. "
        "'{\"n_predict\": 64}' for llama-server",
    )
    serve.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=positive_float,
        default=120.0,
        help="per-request timeout in seconds (default: %(default)g)",
    )
    serve.add_argument(
        "--level-timeout",
        metavar="SECONDS",
        type=positive_float,
        default=600.0,
        help="per-level timeout in seconds (default: %(default)g)",
    )
    serve.add_argument(
        "--output", metavar="PATH", default=None, help="write config, metrics and raw records as JSON here"
    )
    serve.add_argument("--no-progress", action="store_true", help="no progress output on stderr")
    serve.add_argument(
        "--label", metavar="NAME", default=None, help="name of this run in the JSON and plot legends"
    )
    serve.add_argument(
        "--plot-dir", metavar="DIR", default=None, help="draw PNG plots of this run into DIR (matplotlib)"
    )

    plot = commands.add_parser(
        "plot",
        help="draw serve results files on the same plots (compare servers)",
        description=(
            "Draws one or several `serve --output` files on the same PNG plots: output tokens/s vs "
            "concurrency (or request rate), and TPOT p50 / TTFT p50 vs output tokens/s."
        ),
    )
    plot.add_argument("results", metavar="RESULT.json", nargs="+", help="serve results files")
    plot.add_argument(
        "--labels",
        metavar="L1,L2,...",
        type=label_list,
        default=None,
        help="comma-separated legend names, one per file (default: each file's label, else its name)",
    )
    plot.add_argument(
        "--output-dir", metavar="DIR", default="plots", help="folder of the PNG files (default: %(default)s)"
    )
    from benchmark import (
        baseline,
        floor,
        lora,
        quantize,
        random_model,
        router_bench,
        scenarios,
        shard_bench,
        step_bench,
        upcycle,
    )

    for module in (
        shard_bench,
        step_bench,
        floor,
        baseline,
        router_bench,
        scenarios,
        quantize,
        random_model,
        upcycle,
        lora,
    ):  # subcommands
        module.register(commands)
    return parser


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """ServeConfig from parsed ``serve`` arguments."""
    rates = args.request_rate or ()
    return ServeConfig(
        url=args.url,
        api=args.api,
        concurrency=() if rates else args.concurrency or ServeConfig.concurrency,
        request_rates=rates,
        requests_per_level=args.requests_per_level,
        params=GenerationParams(max_new_tokens=args.max_new_tokens, ignore_eos=args.ignore_eos),
        prompt=args.prompt,
        input_tokens=args.input_tokens,
        random_input_range_ratio=args.random_input_range_ratio,
        random_output_range_ratio=args.random_output_range_ratio,
        seed=args.seed,
        warmup=args.warmup,
        request_timeout_s=args.timeout,
        level_timeout_s=args.level_timeout,
        output=args.output,
        label=args.label,
        model=args.model,
        models=args.models,
        api_key=args.api_key,
        stream_usage=not args.no_stream_usage,
        extra_body=args.extra_body,
        plot_dir=args.plot_dir,
    )


def run_serve_command(config: ServeConfig, *, progress_enabled: bool = True) -> int:
    """Runs ``serve``, prints the summary on stdout, writes the JSON; returns the exit status."""
    from benchmark.progress import Progress
    from benchmark.report import format_summary, write_json
    from benchmark.serve import run_serve

    progress = Progress(sys.stderr, enabled=progress_enabled)
    try:
        result = run_async(run_serve(config, progress=progress))
    except WarmupError as e:
        print(f"error: {e} (is the server at {config.url} up?)", file=sys.stderr)
        return EXIT_FAILED
    print(format_summary(result))
    if config.output:
        path = write_json(result, config.output)
        print(f"results written to {path}", file=sys.stderr)
    if config.plot_dir:
        from benchmark.plots import PlotError, plot_results

        try:
            paths = plot_results([result.to_json()], config.plot_dir)
        except PlotError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_FAILED
        print(f"plots written: {', '.join(str(p) for p in paths)}", file=sys.stderr)
    if result.num_ok == 0:
        print("error: no request succeeded", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def run_plot_command(args: argparse.Namespace) -> int:
    """Runs ``plot``: draws the results files; returns the exit status."""
    from benchmark.plots import PlotError, plot_files

    try:
        paths = plot_files(args.results, args.output_dir, args.labels)
    except PlotError as e:
        print(f"text-generation-benchmark plot: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    for path in paths:
        print(path)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (0 ok, 1 the run failed, 2 usage error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors: return the status rather than exit
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    handler = getattr(args, "handler", None)
    if handler is not None:  # shard, floor, baseline
        return handler(args)
    if args.command == "plot":
        return run_plot_command(args)
    if args.command != "serve":  # argparse only lets known commands through
        raise AssertionError(f"unhandled command {args.command!r}")
    try:
        config = serve_config(args)
    except ValueError as e:
        print(f"{parser.prog} serve: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return run_serve_command(config, progress_enabled=not args.no_progress)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
