"""``text-generation-benchmark quantize``: every --quantize mode on one model, through the real server.

Per mode (none = full precision, bitsandbytes, bitsandbytes-nf4, bitsandbytes-fp4, ct2, and the paged
backend's int8 and int4) it starts the launcher twice on a hub cache of its own (the mode's conversion
removed before the first start), and measures:

- weight memory (the library's own figure: transformers' ``get_memory_footprint`` for bitsandbytes, the
  parameters' bytes for full precision, the size of the converted model for CTranslate2; for int8/int4 the
  shard's own figure, its "Weights on rank" log line);
- the first and the cached start: seconds from the launcher's start to ``/health`` 200 (the first start of
  ct2 converts the model; bitsandbytes quantizes at every load);
- perplexity on the first N tokens of a fixed text the project ships (the Apache-2.0 licence): through the
  server (TGI's ``decoder_input_details``, the prompt log-probabilities of the serving path), and through
  the library alone on the same token ids (transformers, with bitsandbytes for its modes; ctranslate2's
  ``score_batch``); they must agree within 1%. int8 and int4 are the paged backend's own kernels, which
  no library outside the server runs: they have the server's figure only;
- single-stream decode tokens/s and output tokens/s at 32 concurrent streams (``serve``'s client and
  metrics, greedy, EOS ignored);
- for the modes in ``--positions-modes``: the time per output token around positions 50 and 500 of one
  stream (median gap over a window, best of ``--repeats`` runs: the machine may be shared).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import itertools
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
DEFAULT_TEXT = DATA / "apache-2.0.txt"
MODES = ("none", "bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4", "ct2", "int8", "int4")
# The paged backend's own quantization (shard/paged/quant.py): served only, no library to compare with.
PAGED_MODES = ("int8", "int4")
EXIT_OK, EXIT_FAILED = 0, 1
START_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class QuantizeConfig:
    modes: tuple[str, ...] = MODES
    model_id: str | None = None  # None: the launcher's embedded default model
    text: Path = DEFAULT_TEXT
    tokens: int = 1024
    hub_cache: Path = REPO / ".cache" / "bench-quantize" / "hub"
    new_tokens: int = 32
    streams: int = 32
    positions: tuple[int, int] = (50, 500)
    positions_modes: tuple[str, ...] = ("ct2",)
    window: int = 20
    repeats: int = 3
    output: str | None = None


@dataclass
class ModeResult:
    mode: str
    weight_mib: float | None = None
    first_start_s: float | None = None
    cached_start_s: float | None = None
    conversion_s: float | None = None
    shard_load_s: list[float] = field(default_factory=list)
    ppl_server: float | None = None
    ppl_library: float | None = None
    ppl_tokens: int = 0
    single_stream_tokens_per_s: float | None = None
    concurrent_output_tokens_per_s: float | None = None
    concurrent_streams: int = 0
    ms_per_token: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def ppl_gap(self) -> float | None:
        if self.ppl_server is None or self.ppl_library is None:
            return None
        return self.ppl_server / self.ppl_library - 1.0


# -- the server ------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


@contextlib.contextmanager
def launched(config: QuantizeConfig, mode: str, log: Path) -> Iterator[tuple[str, float]]:
    """The launcher serving ``mode``; yields its URL and the seconds it took to answer /health 200."""
    import requests

    port = _free_port()
    argv = [
        sys.executable, "-m", "launcher", "--hostname", "127.0.0.1", "--port", str(port),
        "--shard-uds-path", f"/tmp/tgi-bench-quantize-{uuid.uuid4().hex[:8]}",
        "--huggingface-hub-cache", str(config.hub_cache), "--max-concurrent-requests", "128",
        "--max-batch-prefill-tokens", str(max(4096, config.tokens + 8)),
    ]  # fmt: skip
    if config.model_id:
        argv += ["--model-id", config.model_id]
    if mode != "none":
        argv += ["--quantize", mode]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        started = time.monotonic()
        process = subprocess.Popen(
            argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )  # fmt: skip
        try:
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"the launcher exited with {process.returncode}:\n{_tail(log)}")
                with contextlib.suppress(requests.RequestException):
                    if requests.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                if time.monotonic() - started > START_TIMEOUT_S:
                    raise RuntimeError(f"{url} not healthy after {START_TIMEOUT_S:g} s:\n{_tail(log)}")
                time.sleep(0.2)
            yield url, time.monotonic() - started
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def _tail(log: Path, lines: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    return ""


def _logged(log: Path, pattern: str) -> float | None:
    """The number ``pattern``'s group captures at its first match in the log, or None."""
    import re

    match = re.search(pattern, log.read_text(errors="replace"))
    return float(match.group(1)) if match else None


def _shard_load_s(log: Path) -> float | None:
    return _logged(log, r"Model ready in ([0-9.]+) s")


def _shard_weights_mib(log: Path) -> float | None:
    """The weights the shard holds, as it logs them (``Weights on rank 0/1: 70.2 MB``), in MiB."""
    mb = _logged(log, r"Weights on rank 0/\d+: ([0-9.]+) MB")
    return None if mb is None else mb * 1e6 / 2**20


# -- perplexity --------------------------------------------------------------------------------------------
def perplexity(logprobs: list[float]) -> float:
    values = [v for v in logprobs if v is not None and not math.isnan(v)]
    return math.exp(-sum(values) / len(values))


def server_prompt_logprobs(url: str, text: str) -> tuple[list[int], list[float]]:
    """The prompt's token ids and log-probabilities (the first has none) as the server computes them."""
    import requests

    body = {
        "inputs": text,
        "parameters": {"max_new_tokens": 1, "details": True, "decoder_input_details": True},
    }
    response = requests.post(f"{url}/generate", json=body, timeout=1800)
    response.raise_for_status()
    prefill = response.json()["details"]["prefill"]
    return [t["id"] for t in prefill], [t["logprob"] for t in prefill[1:]]


def library_logprobs(
    mode: str, model_dir: Path, ct2_dir: Path | None, ids: list[int]
) -> tuple[list[float], float]:
    """The same prompt's log-probabilities from the library alone, and the weights' memory in MiB."""
    if mode == "ct2":
        import ctranslate2

        from common.quantize import ct2_compute_type, ct2_device

        assert ct2_dir is not None
        device = ct2_device()
        generator = ctranslate2.Generator(
            str(ct2_dir / "ct2"), device=device, compute_type=ct2_compute_type(None, device)
        )
        vocabulary = json.loads((ct2_dir / "ct2" / "vocabulary.json").read_text())
        result = generator.score_batch([[vocabulary[i] for i in ids]], max_input_length=0)[0]
        size = sum(p.stat().st_size for p in (ct2_dir / "ct2").iterdir() if p.name == "model.bin")
        return [float(v) for v in result.log_probs][: len(ids) - 1], size / 2**20
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    if mode != "none":
        from shard.backends.hf import bnb_config

        kwargs = {"quantization_config": bnb_config(mode, torch.float32), "device_map": {"": "cpu"}}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs).eval()
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    logprobs = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
    memory = model.get_memory_footprint() / 2**20
    del model
    return logprobs.tolist(), memory


# -- speed -------------------------------------------------------------------------------------------------
def serve_rates(url: str, new_tokens: int, streams: int) -> tuple[float | None, float | None]:
    """Single-stream decode tokens/s (1 / median TPOT) and output tokens/s at ``streams`` streams."""
    from benchmark.config import GenerationParams, ServeConfig
    from benchmark.metrics import single_stream_decode_tokens_per_s
    from benchmark.runner import run_async
    from benchmark.serve import run_serve

    params = GenerationParams(max_new_tokens=new_tokens, ignore_eos=True)
    single = run_async(
        run_serve(ServeConfig(url=url, concurrency=(1,), requests_per_level=2, params=params, warmup=1))
    )
    many = run_async(
        run_serve(
            ServeConfig(url=url, concurrency=(streams,), requests_per_level=streams, params=params, warmup=0)
        )
    )
    level = many.levels[0].metrics
    return single_stream_decode_tokens_per_s([single.levels[0].metrics]), level.output_tokens_per_s


def ms_per_token_at(url: str, positions: tuple[int, ...], window: int, repeats: int) -> dict[str, float]:
    """Milliseconds between tokens around each position of one stream (median over ``window`` gaps, the
    best of ``repeats`` runs)."""
    import requests

    best: dict[str, float] = {}
    length = max(positions) + window
    for _ in range(repeats):
        body = {
            "inputs": "Once upon a time",
            "parameters": {"max_new_tokens": length, "ignore_eos_token": True},
        }
        times = []
        with requests.post(f"{url}/generate_stream", json=body, stream=True, timeout=1800) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if line.startswith(b"data:"):
                    times.append(time.perf_counter())
        gaps = [b - a for a, b in itertools.pairwise(times)]
        for position in positions:
            span = sorted(gaps[position - window // 2 : position + window // 2])
            value = 1000 * span[len(span) // 2]
            key = str(position)
            best[key] = min(best.get(key, math.inf), value)
    return best


# -- the run -------------------------------------------------------------------------------------------------
def _remove_conversion(config: QuantizeConfig, mode: str) -> None:
    """Removes the mode's own cached conversion (ct2), so that the first start converts."""
    if mode != "ct2":
        return
    root = config.hub_cache / "text-generation-server" / "converted"
    for entry in root.glob("*-ct2-*"):
        shutil.rmtree(entry, ignore_errors=True)


def _ct2_entry(log: Path) -> Path | None:
    import re

    match = re.search(r"Serving .* from (\S+-ct2-\S+)", log.read_text(errors="replace"))
    return Path(match.group(1)) if match else None


def run_mode(config: QuantizeConfig, mode: str, log_dir: Path, progress: Callable[[str], None]) -> ModeResult:
    from launcher.weights import WeightsConfig, resolve

    result = ModeResult(mode)
    source = resolve(WeightsConfig(model_id=config.model_id, hub_cache=config.hub_cache), progress=False)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.path)
    ids = tokenizer(config.text.read_text()).input_ids[: config.tokens]
    if len(ids) < config.tokens:
        raise ValueError(f"{config.text} has only {len(ids)} tokens; {config.tokens} asked for")
    prompt = tokenizer.decode(ids)
    _remove_conversion(config, mode)
    first_log, cached_log = log_dir / f"{mode}-first.log", log_dir / f"{mode}-cached.log"
    progress(f"{mode}: first start")
    with launched(config, mode, first_log) as (_, seconds):
        result.first_start_s = seconds
    progress(f"{mode}: cached start")
    with launched(config, mode, cached_log) as (url, seconds):
        result.cached_start_s = seconds
        result.shard_load_s = [s for s in (_shard_load_s(first_log), _shard_load_s(cached_log)) if s]
        progress(f"{mode}: perplexity through the server")
        server_ids, logprobs = server_prompt_logprobs(url, prompt)
        if server_ids != ids:
            result.errors.append(
                "the server tokenized the text differently; its ids are used for the library"
            )
            ids = server_ids
        result.ppl_server, result.ppl_tokens = perplexity(logprobs), len(logprobs)
        progress(f"{mode}: single stream and {config.streams} streams")
        result.single_stream_tokens_per_s, result.concurrent_output_tokens_per_s = serve_rates(
            url, config.new_tokens, config.streams
        )
        result.concurrent_streams = config.streams
        if mode in config.positions_modes:
            progress(f"{mode}: time per token at positions {config.positions}")
            result.ms_per_token = ms_per_token_at(url, config.positions, config.window, config.repeats)
    if mode in PAGED_MODES:
        result.weight_mib = _shard_weights_mib(cached_log)
        return result
    ct2_dir = _ct2_entry(cached_log) if mode == "ct2" else None
    if ct2_dir is not None:
        with contextlib.suppress(OSError, ValueError):
            result.conversion_s = json.loads((ct2_dir / ".complete.json").read_text()).get("seconds")
    progress(f"{mode}: perplexity through the library alone")
    library, result.weight_mib = library_logprobs(mode, source.path, ct2_dir, ids)
    result.ppl_library = perplexity(library)
    return result


def run_quantize(config: QuantizeConfig, progress: Callable[[str], None]) -> list[ModeResult]:
    log_dir = config.hub_cache.parent / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for mode in config.modes:
        try:
            results.append(run_mode(config, mode, log_dir, progress))
        except Exception as e:
            progress(f"{mode}: failed: {type(e).__name__}: {e}")
            results.append(ModeResult(mode, errors=[f"{type(e).__name__}: {e}"]))
        progress(format_row(results[-1]))
    return results


def _shown(path: Path) -> str:
    """A path as the report shows it: relative to the repository when inside it."""
    try:
        return str(path.absolute().relative_to(REPO))
    except ValueError:
        return str(path)


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


HEADER = (
    "| mode | weights (MiB) | first start (s) | cached start (s) | decode tok/s, 1 stream | "
    "output tok/s, {streams} streams | perplexity (server) | perplexity (library) | server vs library |"
)


def format_row(r: ModeResult) -> str:
    gap = "-" if r.ppl_gap is None else f"{100 * r.ppl_gap:+.2f}%"
    return (
        f"| {r.mode} | {_fmt(r.weight_mib, 0)} | {_fmt(r.first_start_s)} | {_fmt(r.cached_start_s)} | "
        f"{_fmt(r.single_stream_tokens_per_s)} | {_fmt(r.concurrent_output_tokens_per_s)} | "
        f"{_fmt(r.ppl_server, 2)} | {_fmt(r.ppl_library, 2)} | {gap} |"
    )


def format_table(results: list[ModeResult], streams: int) -> str:
    lines = [HEADER.format(streams=streams), "|" + "---|" * 9]
    lines += [format_row(r) for r in results]
    for r in results:
        if r.conversion_s is not None or r.shard_load_s:
            loads = " / ".join(f"{s:.1f} s" for s in r.shard_load_s)
            conversion = f"conversion {r.conversion_s:.1f} s; " if r.conversion_s is not None else ""
            lines.append(f"\n{r.mode} start: {conversion}shard load (first / cached start) {loads}")
        if r.ms_per_token:
            cells = ", ".join(f"position {k}: {v:.1f} ms" for k, v in r.ms_per_token.items())
            values = list(r.ms_per_token.values())
            ratio = values[-1] / values[0] if len(values) > 1 and values[0] else float("nan")
            lines.append(f"\n{r.mode} time per output token: {cells} (ratio {ratio:.2f})")
        for error in r.errors:
            lines.append(f"\n{r.mode}: {error}")
    return "\n".join(lines)


# -- the command ----------------------------------------------------------------------------------------------
def register(commands: Any) -> None:
    """Adds the ``quantize`` subcommand to ``text-generation-benchmark``'s subparsers."""
    from benchmark.args import positive_int

    p = commands.add_parser(
        "quantize",
        help="every --quantize mode through the server: memory, load, speed, perplexity",
        description=(
            "Starts the launcher once per quantization mode (twice: first and cached start) and measures "
            "weight memory, start times, single-stream and concurrent speed, and perplexity on a fixed text "
            "through the server and through the library alone."
        ),
    )
    p.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated modes (default: all; none = float)"
    )
    p.add_argument("--model-id", default=None, help="model to serve (default: the embedded default model)")
    p.add_argument(
        "--text", type=Path, default=DEFAULT_TEXT, help="perplexity text (default: the Apache-2.0 licence)"
    )
    p.add_argument(
        "--tokens", type=positive_int, default=1024, help="tokens of the text scored (default: 1024)"
    )
    p.add_argument(
        "--hub-cache",
        type=Path,
        default=QuantizeConfig.hub_cache,
        help="hub cache of the run (default: %(default)s)",
    )
    p.add_argument("--new-tokens", type=positive_int, default=32, help="tokens per request in the speed runs")
    p.add_argument("--streams", type=positive_int, default=32, help="concurrent streams (default: 32)")
    p.add_argument(
        "--positions-modes", default="ct2", help="modes timed at positions 50 and 500 (default: ct2)"
    )
    p.add_argument("--repeats", type=positive_int, default=3, help="runs of the position timing, best kept")
    p.add_argument("--output", metavar="PATH", default=None, help="write the figures as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    p.set_defaults(handler=run_command)


def run_command(args: argparse.Namespace, *, stdout: TextIO | None = None) -> int:
    out = stdout or sys.stdout
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        print(f"error: unknown modes {unknown}; known: {', '.join(MODES)}", file=sys.stderr)
        return EXIT_FAILED
    config = QuantizeConfig(
        modes=modes,
        model_id=args.model_id,
        text=args.text,
        tokens=args.tokens,
        hub_cache=args.hub_cache.absolute(),
        new_tokens=args.new_tokens,
        streams=args.streams,
        positions_modes=tuple(m.strip() for m in args.positions_modes.split(",") if m.strip()),
        repeats=args.repeats,
        output=args.output,
    )

    def progress(text: str) -> None:
        if not args.no_progress:
            print(text, file=sys.stderr, flush=True)

    results = run_quantize(config, progress)
    print(format_table(results, config.streams), file=out)
    if config.output:
        path = Path(config.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "config": {k: _shown(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "results": [{**asdict(r), "ppl_gap": r.ppl_gap} for r in results],
        }
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"results written to {path}", file=sys.stderr)
    return EXIT_OK if all(not r.errors or r.ppl_server for r in results) else EXIT_FAILED
