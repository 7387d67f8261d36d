"""``text-generation-benchmark``: command-line entry point (subcommands; ``serve`` is the first)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from benchmark._version import __version__
from benchmark.clients import CLIENTS
from benchmark.config import MIN_REQUESTS_PER_LEVEL, REQUESTS_PER_CONCURRENCY, GenerationParams, ServeConfig
from benchmark.runner import WarmupError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def concurrency_list(text: str) -> tuple[int, ...]:
    """``"1,8,32"`` -> ``(1, 8, 32)``; every level a positive integer."""
    try:
        levels = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not levels or any(level < 1 for level in levels):
        raise argparse.ArgumentTypeError(f"every concurrency level must be >= 1, got {text!r}")
    return levels


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="text-generation-benchmark",
        description="Benchmarks a text-generation server the way its users see it.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="closed-loop load over concurrency levels against a running server",
        description=(
            "Closed-loop load generator: at each concurrency level C, C workers each send their next "
            "streaming request as soon as the previous one ends. Reports TTFT, TPOT, ITL and E2E latency "
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
        help="API to call; tgi: TGI-native /generate_stream (default: %(default)s)",
    )
    serve.add_argument(
        "--concurrency",
        metavar="C1,C2,...",
        type=concurrency_list,
        default=(1, 8, 32),
        help="comma-separated concurrency levels (default: 1,8,32)",
    )
    serve.add_argument(
        "--requests-per-level",
        metavar="N",
        type=positive_int,
        default=None,
        help=f"requests per level (default: max({MIN_REQUESTS_PER_LEVEL}, "
        f"{REQUESTS_PER_CONCURRENCY} x concurrency))",
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
        help="use a synthetic prompt of about N tokens",
    )
    serve.add_argument(
        "--warmup",
        metavar="N",
        type=non_negative_int,
        default=1,
        help="unmeasured requests sent one by one before the sweep (default: %(default)s)",
    )
    serve.add_argument(
        "--ignore-eos", action="store_true", help="send ignore_eos=true (generate exactly max-new-tokens)"
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
    return parser


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """ServeConfig from parsed ``serve`` arguments."""
    return ServeConfig(
        url=args.url,
        api=args.api,
        concurrency=args.concurrency,
        requests_per_level=args.requests_per_level,
        params=GenerationParams(max_new_tokens=args.max_new_tokens, ignore_eos=args.ignore_eos),
        prompt=args.prompt,
        input_tokens=args.input_tokens,
        warmup=args.warmup,
        request_timeout_s=args.timeout,
        level_timeout_s=args.level_timeout,
        output=args.output,
    )


def run_serve_command(config: ServeConfig, *, progress_enabled: bool = True) -> int:
    """Runs ``serve``, prints the summary on stdout, writes the JSON; returns the exit status."""
    from benchmark.report import Progress, format_summary, write_json
    from benchmark.serve import run_serve

    progress = Progress(sys.stderr, enabled=progress_enabled)
    try:
        result = asyncio.run(run_serve(config, progress=progress))
    except WarmupError as e:
        print(f"error: {e} (is the server at {config.url} up?)", file=sys.stderr)
        return EXIT_FAILED
    print(format_summary(result))
    if config.output:
        path = write_json(result, config.output)
        print(f"results written to {path}", file=sys.stderr)
    if result.num_ok == 0:
        print("error: no request succeeded", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (0 ok, 1 the run failed, 2 usage error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors: return the status rather than exit
        return e.code if isinstance(e.code, int) else EXIT_USAGE
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
