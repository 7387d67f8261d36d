"""``text-generation-benchmark router``: the router's own overhead, measured against a fake shard.

For each concurrency level C it starts, on loopback, the fake shard of the test utilities
(``tests/fake_shard.py``: a real gRPC server of the shard service that steps without a model, with fixed
tokens, so it needs a source checkout) and the real router (``python -m router``) with limits that admit C
streams, runs the ``serve`` load generator in this process (closed loop, C streams, ``--max-new-tokens``
each, end of sequence ignored), then stops the router and the fake shard. A fresh pair per level keeps each
level's figures its own.

The router and the shard share one long-lived Generate stream and the shard decides when to step: nothing
tells it when the router has taken a step. So the fake shard runs like a model of a given speed: one step of
every live request each C / ``tokens_per_s`` seconds (``--tokens-per-s``, the rate offered to the router),
the next as soon as that time is up. While the router keeps up, every step carries about C tokens (the
requests of a closed loop are all live) and the clients get the offered rate; a router that falls behind
gets its steps late (gRPC buffers them), its streams end later, fewer requests are live on the shard and
the steps shrink. ``--tokens-per-s 0`` steps as fast as the fake shard can: in a closed loop of C requests
of N tokens the stream never holds enough to make gRPC's flow control wait, so the shard runs each new
request's tokens off in a burst of small steps, unlike any model (the figures then measure the router on
small steps). Per level it reports:

- the serve metrics (streamed tokens/s, TTFT, TPOT, ITL, E2E): what C clients of the router alone see;
- the router process's CPU time (user + system, all threads; psutil) per 1,000 streamed tokens and per
  shard step, and its share of a core over the level (its CPU seconds per wall second);
- the shard's steps: how many, how many tokens each carried on average, how many at each batch size, and
  the time from one step at batch C to the next (``shard_step_period_ms``: the pace the router got) and
  the fake shard's own time to build one (``shard_step_ms``);
- the load generator's CPU time and the load average: the load generator and anything else on the machine
  share the router's cores, which the wall-clock figures feel; the CPU time per token is the steadier one.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from benchmark._version import __version__
from benchmark.config import REQUESTS_PER_CONCURRENCY

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

REPO = Path(__file__).resolve().parent.parent
FAKE_SHARD = REPO / "tests" / "fake_shard.py"
# The fake shard's tokens: ordinary words of the tokenizer (any vocabulary has them).
TOKEN_TEXT = " The capital of France is Paris and the capital of Germany is Berlin"
MAX_INPUT_LENGTH = 256
MIN_REQUESTS = 1024
# The rate the fake shard offers by default: 2.5 times the router's target of 20,000 streamed tokens/s.
DEFAULT_TOKENS_PER_S = 50_000.0
STARTUP_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 60.0
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class RouterBenchConfig:
    tokenizer: str
    concurrency: tuple[int, ...] = (64, 256, 1024)
    max_new_tokens: int = 256
    # Tokens per second the fake shard offers (a step of C tokens each C / tokens_per_s s); 0: no pace.
    tokens_per_s: float = DEFAULT_TOKENS_PER_S
    # None: max(MIN_REQUESTS, 4 x concurrency) (see requests_for)
    requests_per_level: int | None = None
    # Every level this many times (the rounds interleave, so a busy spell on the machine hits one round).
    repeat: int = 1
    api: str = "tgi"
    output: str | None = None
    raw_dir: str | None = None
    request_timeout_s: float = 300.0
    level_timeout_s: float = 900.0

    def requests_for(self, concurrency: int) -> int:
        """Requests of one level: at least MIN_REQUESTS, so that a small level lasts long enough for the
        steady state to dominate, and 4 per stream."""
        if self.requests_per_level is not None:
            return self.requests_per_level
        return max(MIN_REQUESTS, REQUESTS_PER_CONCURRENCY * concurrency)

    def step_s(self, concurrency: int) -> float:
        """The fake shard's least time per step at ``concurrency`` streams (0: as fast as it can)."""
        return concurrency / self.tokens_per_s if self.tokens_per_s else 0.0

    def router_limits(self) -> dict[str, int]:
        """Router flags that admit the largest level whole: every stream in one running batch."""
        most = max(self.concurrency)
        total = MAX_INPUT_LENGTH + self.max_new_tokens
        return {
            "max-concurrent-requests": 2 * most,
            "max-input-length": MAX_INPUT_LENGTH,
            "max-total-tokens": total,
            "max-batch-prefill-tokens": most * total,
            "max-batch-total-tokens": most * total,
        }


# ---------------------------------------------------------------------------------------------------------
# Child processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child, before exec
    """Linux: the child gets SIGTERM if this process dies without stopping it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@contextlib.contextmanager
def child(argv: list[str], log: Path) -> Iterator[subprocess.Popen]:
    """Runs ``argv`` (from the repository root, output to ``log``) for the block; then SIGTERM, and
    SIGKILL if it has not exited within STOP_TIMEOUT_S."""
    with open(log, "wb") as out:
        process = subprocess.Popen(
            argv,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        try:
            yield process
        finally:
            stop(process)


def stop(process: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def cpu_seconds(process: Any) -> float:
    """User + system CPU seconds of a ``psutil.Process``, all its threads (0 once it is gone)."""
    import psutil

    try:
        times = process.cpu_times()
    except psutil.Error:
        return 0.0
    return times.user + times.system


def load_average() -> list[float] | None:
    with contextlib.suppress(OSError, AttributeError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


def wait_healthy(url: str, processes: Sequence[tuple[str, subprocess.Popen, Path]], timeout: float) -> None:
    """Polls ``url`` until it answers 200; raises RuntimeError (with the log's tail) if a process exits or
    the time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        for name, process, log in processes:
            if process.poll() is not None:
                raise RuntimeError(f"the {name} exited with {process.returncode}:\n{tail(log)}")
        with contextlib.suppress(urllib.error.URLError, OSError), urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer 200 within {timeout:g} s:\n{tail(processes[-1][2])}")
        time.sleep(0.2)


def tail(log: Path, lines: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    return ""


def shard_tokens(tokenizer: str) -> list[int] | None:
    """Token ids of TOKEN_TEXT in the model's tokenizer (``tokenizer.json``); None: the fake shard's own."""
    path = Path(tokenizer) / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(path)).encode(TOKEN_TEXT, add_special_tokens=False).ids
    return ids or None


# ---------------------------------------------------------------------------------------------------------
# One level


def run_level(
    config: RouterBenchConfig, concurrency: int, workdir: Path, progress: Callable[[str], None]
) -> dict[str, Any]:
    """Fake shard + router for one level, the serve run against them; returns the level's JSON."""
    import psutil

    from benchmark.config import GenerationParams, ServeConfig
    from benchmark.runner import run_async
    from benchmark.serve import run_serve

    uds = str(workdir / f"shard-{concurrency}")
    stats_path = workdir / f"stats-{concurrency}.json"
    port = free_port()
    step_s = config.step_s(concurrency)
    shard_argv = [
        sys.executable, "-m", "tests.fake_shard", "--uds-path", uds, "--stats", str(stats_path),
        "--step-ms", repr(1000 * step_s),
    ]  # fmt: skip
    tokens = shard_tokens(config.tokenizer)
    if tokens:
        shard_argv += ["--tokens", ",".join(map(str, tokens))]
    router_argv = [
        sys.executable, "-m", "router", "--tokenizer-name", config.tokenizer, "--shard-uds-path", uds,
        "--hostname", "127.0.0.1", "--port", str(port), "--logger-level", "WARNING",
    ]  # fmt: skip
    for flag, value in config.router_limits().items():
        router_argv += [f"--{flag}", str(value)]
    serve_config = ServeConfig(
        url=f"http://127.0.0.1:{port}",
        api=config.api,
        concurrency=(concurrency,),
        requests_per_level=config.requests_for(concurrency),
        params=GenerationParams(max_new_tokens=config.max_new_tokens, ignore_eos=True),
        request_timeout_s=config.request_timeout_s,
        level_timeout_s=config.level_timeout_s,
        label=f"router vs fake shard, {concurrency} streams",
    )
    shard_log, router_log = workdir / f"shard-{concurrency}.log", workdir / f"router-{concurrency}.log"
    with child(shard_argv, shard_log) as shard, child(router_argv, router_log) as router:
        wait_healthy(
            f"{serve_config.url}/health",
            [("fake shard", shard, shard_log), ("router", router, router_log)],
            STARTUP_TIMEOUT_S,
        )
        progress(f"concurrency {concurrency}: {serve_config.requests_for(concurrency)} requests")
        router_process = psutil.Process(router.pid)
        load_before = load_average()
        router_cpu = cpu_seconds(router_process)
        own_cpu = time.process_time()
        started = time.perf_counter()
        result = run_async(run_serve(serve_config))
        wall_s = time.perf_counter() - started
        own_cpu = time.process_time() - own_cpu
        router_cpu = cpu_seconds(router_process) - router_cpu
        load_after = load_average()
        stop(router)
        if router.returncode not in (0, -signal.SIGTERM):
            raise RuntimeError(f"the router exited with {router.returncode}:\n{tail(router_log)}")
        stop(shard)
    try:
        stats = json.loads(stats_path.read_text())
    except (OSError, ValueError) as e:
        raise RuntimeError(f"the fake shard left no stats ({e}):\n{tail(shard_log)}") from None
    if config.raw_dir:
        from benchmark.report import write_json

        write_json(result, str(Path(config.raw_dir) / f"router-serve-{concurrency}.json"))
    (level,) = result.levels
    metrics = level.metrics
    # Every step and token of the shard went through the router while its CPU time was counted: the
    # serve run's, its warm-up requests' included (the router's own warm-up is a unary call).
    steps, tokens_out = stats["steps"], stats["tokens"]
    return {
        "concurrency": concurrency,
        "offered_tokens_per_s": config.tokens_per_s or None,
        "shard_step_s": step_s,
        "metrics": asdict(metrics),
        "router_cpu_s": router_cpu,
        "router_cpu_s_per_1k_tokens": 1000 * router_cpu / tokens_out if tokens_out else None,
        "router_cpu_us_per_token": 1e6 * router_cpu / tokens_out if tokens_out else None,
        "router_cpu_ms_per_step": 1000 * router_cpu / steps if steps else None,
        "router_cpu_share": router_cpu / wall_s if wall_s > 0 else None,
        "wall_s": wall_s,
        "steps": steps,
        "shard_tokens": tokens_out,
        "tokens_per_step": stats["tokens"] / steps if steps else None,
        "steps_by_batch": stats["steps_by_batch"],
        "shard_step_period_ms": stats["step_period_ms"].get(str(concurrency)),
        "shard_step_ms": stats["step_build_ms"].get(str(concurrency)),
        "shard_requests": stats["requests"],
        "shard_aborts": stats["aborts"],
        "load_generator_cpu_s": own_cpu,
        "load_average": {"before": load_before, "after": load_after},
    }


# ---------------------------------------------------------------------------------------------------------
# The command


def run_router_benchmark(
    config: RouterBenchConfig, progress: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    """Every level in order, ``repeat`` rounds; the results as JSON (raises RuntimeError when a level
    cannot run). The summary gives, per level, the median and the best over the rounds."""
    if not FAKE_SHARD.is_file():
        raise RuntimeError(f"the fake shard ({FAKE_SHARD}) is not here: this command needs a source checkout")
    started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    levels = []
    with tempfile.TemporaryDirectory(prefix="tgi-router-bench-") as workdir:
        for round_ in range(1, config.repeat + 1):
            if config.repeat > 1:
                progress(f"round {round_}/{config.repeat}")
            for concurrency in config.concurrency:
                levels.append({"round": round_, **run_level(config, concurrency, Path(workdir), progress)})
    return {
        "tool": "text-generation-benchmark",
        "version": __version__,
        "command": "router",
        "started_at": started_at,
        "machine": {
            "cpus": os.cpu_count(),
            "processor": _processor(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "config": {**asdict(config), "router_flags": config.router_limits()},
        "summary": summarize(levels),
        "levels": levels,
    }


def summarize(levels: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per concurrency: streamed tokens/s, the router's CPU seconds per 1,000 tokens and CPU milliseconds
    per step, and the tokens per step, each as every round's value, their median and their best."""
    figures: dict[str, Callable[[dict[str, Any]], float | None]] = {
        "output_tokens_per_s": lambda lv: lv["metrics"]["output_tokens_per_s"],
        "router_cpu_s_per_1k_tokens": lambda lv: lv["router_cpu_s_per_1k_tokens"],
        "router_cpu_ms_per_step": lambda lv: lv["router_cpu_ms_per_step"],
        "tokens_per_step": lambda lv: lv["tokens_per_step"],
    }
    higher_is_better = {"output_tokens_per_s", "tokens_per_step"}
    summary: dict[str, dict[str, Any]] = {}
    for concurrency in dict.fromkeys(lv["concurrency"] for lv in levels):
        rounds = [lv for lv in levels if lv["concurrency"] == concurrency]
        summary[str(concurrency)] = {}
        for name, get in figures.items():
            values = [v for v in map(get, rounds) if v is not None]
            best = (max if name in higher_is_better else min)(values) if values else None
            summary[str(concurrency)][name] = {
                "runs": values,
                "median": statistics.median(values) if values else None,
                "best": best,
            }
    return summary


def _processor() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def format_summary(data: dict[str, Any]) -> str:
    """One line per level (and, over several rounds, the medians)."""
    head = ("round", "streams", "requests", "errors", "offered/s", "tokens/s", "tokens/step",
            "CPU s/1k tok", "CPU ms/step", "CPU share", "TPOT ms p50", "ITL ms p99")  # fmt: skip
    rows = [head]
    for lv in data["levels"]:
        m = lv["metrics"]
        offered = lv["offered_tokens_per_s"]
        rows.append((
            str(lv["round"]), str(lv["concurrency"]), str(m["num_requests"]), str(m["num_errors"]),
            "-" if offered is None else f"{offered:.0f}", f"{m['output_tokens_per_s']:.0f}",
            _num(lv["tokens_per_step"]), _num(lv["router_cpu_s_per_1k_tokens"], 4),
            _num(lv["router_cpu_ms_per_step"]), _num(lv["router_cpu_share"]),
            _num(_ms(m["tpot_s"]["p50"])), _num(_ms(m["itl_s"]["p99"])),
        ))  # fmt: skip
    if len({lv["round"] for lv in data["levels"]}) > 1:
        for concurrency, figures in data["summary"].items():
            rows.append((
                "median", concurrency, "", "", "", f"{figures['output_tokens_per_s']['median']:.0f}",
                _num(figures["tokens_per_step"]["median"]), _num(figures["router_cpu_s_per_1k_tokens"]["median"], 4),
                _num(figures["router_cpu_ms_per_step"]["median"]), "", "", "",
            ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000 * seconds


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if value < 100 else f"{value:.0f}"


def default_tokenizer() -> str:
    """The default model's converted directory (converted on first use, as the launcher does)."""
    from launcher.weights import WeightsConfig, resolve

    return str(resolve(WeightsConfig()).path)


def offered_rate(text: str) -> float:
    """``--tokens-per-s``: a finite rate >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be >= 0 and finite, got {text}")
    return value


def register(commands: Any) -> None:
    """Adds the ``router`` subcommand to ``text-generation-benchmark``'s subparsers."""
    from benchmark.args import concurrency_list, positive_float, positive_int
    from benchmark.clients import CLIENTS

    p = commands.add_parser(
        "router",
        help="the router's own overhead: real router + fake shard on loopback, serve at each level",
        description=(
            "Needs a source checkout. For each concurrency level: starts the test utilities' fake shard "
            "(steps without a model, at the offered rate) and the real router on loopback, runs the serve "
            "load generator (closed loop, streaming, fixed length), stops both. Reports streamed tokens/s, "
            "the router's CPU time per 1,000 tokens and per shard step, and the tokens per step."
        ),
    )
    p.add_argument(
        "--tokenizer",
        metavar="DIR",
        default=None,
        help="the router's tokenizer: a model directory (default: the default model's, converted if needed)",
    )
    p.add_argument(
        "--concurrency",
        metavar="C1,C2,...",
        type=concurrency_list,
        default=RouterBenchConfig.concurrency,
        help="concurrent streams per level (default: 64,256,1024)",
    )
    p.add_argument(
        "--max-new-tokens",
        metavar="N",
        type=positive_int,
        default=RouterBenchConfig.max_new_tokens,
        help="tokens per request (default: %(default)s)",
    )
    p.add_argument(
        "--tokens-per-s",
        metavar="R",
        type=offered_rate,
        default=DEFAULT_TOKENS_PER_S,
        help="tokens per second the fake shard offers: a step of the C streams every C / R seconds; 0: "
        "steps as fast as it can, in bursts of small steps (default: %(default).0f)",
    )
    p.add_argument(
        "--requests-per-level",
        metavar="N",
        type=positive_int,
        default=None,
        help=f"requests per level (default: max({MIN_REQUESTS}, {REQUESTS_PER_CONCURRENCY} x concurrency))",
    )
    p.add_argument(
        "--repeat",
        metavar="N",
        type=positive_int,
        default=1,
        help="rounds over all levels; the summary gives each figure's median and best (default: 1)",
    )
    p.add_argument(
        "--api", default="tgi", choices=sorted(CLIENTS), help="API the clients call (default: %(default)s)"
    )
    p.add_argument("--timeout", metavar="SECONDS", type=positive_float, default=300.0, help="per request")
    p.add_argument("--level-timeout", metavar="SECONDS", type=positive_float, default=900.0, help="per level")
    p.add_argument("--output", metavar="PATH", default=None, help="write the results as JSON here")
    p.add_argument(
        "--raw-dir", metavar="DIR", default=None, help="also write each level's full serve results here"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    p.set_defaults(handler=run_command)


def run_command(args: argparse.Namespace, *, stdout: TextIO | None = None) -> int:
    out = stdout or sys.stdout

    def progress(text: str) -> None:
        if not args.no_progress:
            print(text, file=sys.stderr, flush=True)

    try:
        config = RouterBenchConfig(
            tokenizer=args.tokenizer or default_tokenizer(),
            concurrency=args.concurrency,
            max_new_tokens=args.max_new_tokens,
            tokens_per_s=args.tokens_per_s,
            requests_per_level=args.requests_per_level,
            repeat=args.repeat,
            api=args.api,
            output=args.output,
            raw_dir=args.raw_dir,
            request_timeout_s=args.timeout,
            level_timeout_s=args.level_timeout,
        )
        data = run_router_benchmark(config, progress)
    except RuntimeError as e:
        print(f"text-generation-benchmark router: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(format_summary(data), file=out)
    if config.output:
        path = Path(config.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n")
        print(f"results written to {path}", file=sys.stderr)
    failed = sum(lv["metrics"]["num_errors"] for lv in data["levels"])
    return EXIT_FAILED if failed else EXIT_OK
