"""Constrained-decoding libraries compared on this machine's CPU: ``python -m benchmark.grammar_bench``.

For each library installed among xgrammar, llguidance and outlines-core, with the served model's tokenizer:

- compile time of each grammar (several JSON schemas, a regex, any JSON), from a cold compiler;
- per-token cost while the model generates under the grammar: computing the next-token bitmask, and
  accepting the chosen token (the model's own time is not counted);
- correctness: each generation (greedy and sampled) must end in an accepting state, allow the
  end-of-sequence token there, and its text must parse and validate against its schema (or match its
  regex) -- ``jsonschema`` checks the schemas when it is installed.

The model runs once per (library, grammar, seed) with transformers on the CPU; masks are applied as a
bitmask unpacked with plain torch ops (the same for every library). Prints a table and writes the figures
as JSON with ``--output``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from router.tokenizer import byte_level_alphabet

SCHEMAS: dict[str, dict[str, Any]] = {
    "person": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "order": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 1},
            "status": {"enum": ["pending", "shipped", "delivered"]},
            "items": {
                "type": "array",
                "minItems": 1,
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {
                        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                        "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                        "price": {"type": "number"},
                    },
                    "required": ["sku", "quantity", "price"],
                    "additionalProperties": False,
                },
            },
            "gift": {"type": "boolean"},
        },
        "required": ["id", "status", "items", "gift"],
        "additionalProperties": False,
    },
    "event": {
        "type": "object",
        "$defs": {
            "place": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 30},
                    "country": {"type": "string", "maxLength": 30},
                },
                "required": ["city", "country"],
                "additionalProperties": False,
            }
        },
        "properties": {
            "title": {"type": "string", "maxLength": 60},
            "where": {"$ref": "#/$defs/place"},
            "attendees": {"type": ["integer", "null"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 4},
            "kind": {"anyOf": [{"const": "online"}, {"const": "in person"}]},
        },
        "required": ["title", "where", "attendees", "tags", "kind"],
        "additionalProperties": False,
    },
    "weather_call": {
        "type": "object",
        "properties": {
            "function": {"const": "get_weather"},
            "arguments": {
                "type": "object",
                "properties": {
                    "location": {"type": "string", "maxLength": 40},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                    "days": {"type": "integer", "minimum": 1, "maximum": 14},
                },
                "required": ["location", "unit", "days"],
                "additionalProperties": False,
            },
        },
        "required": ["function", "arguments"],
        "additionalProperties": False,
    },
}
REGEX = r"\(\d{3}\) \d{3}-\d{4}"
PROMPTS = {
    "person": "Describe a famous scientist as JSON with their name and age.",
    "order": "Write a JSON order for two books, with SKUs and prices.",
    "event": "Describe a music festival in France as JSON.",
    "weather_call": "Call the weather function for Paris for the next 3 days, as JSON.",
    "regex": "What is the phone number of the White House?",
    "json_object": "Give me a JSON object describing a cat.",
}


def grammars() -> list[tuple[str, str, Any]]:
    """(name, kind, value): the benchmark's grammars."""
    out: list[tuple[str, str, Any]] = [(name, "json", schema) for name, schema in SCHEMAS.items()]
    out.append(("regex", "regex", REGEX))
    out.append(("json_object", "json_object", None))
    return out


class Unsupported(Exception):
    """The library cannot express this grammar."""


# ---------------------------------------------------------------------------------------------------------
# Libraries: one adapter each


class Library:
    name = ""

    def __init__(self, tokenizer_json: str, eos: int, vocab: int) -> None:
        self.vocab = vocab
        self.eos = eos

    def compile(self, kind: str, value: Any) -> Any: ...

    def matcher(self, compiled: Any) -> Any: ...

    def fill(self, matcher: Any, bitmask: torch.Tensor, row: int) -> None: ...

    def accept(self, matcher: Any, token: int) -> bool: ...

    def accepting(self, matcher: Any) -> bool: ...


class LLGuidance(Library):
    name = "llguidance"

    def __init__(self, tokenizer_json: str, eos: int, vocab: int) -> None:
        super().__init__(tokenizer_json, eos, vocab)
        import llguidance
        import llguidance.torch

        self.ll = llguidance
        self.lt = llguidance.torch
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab, eos_token=eos)

    def compile(self, kind: str, value: Any) -> Any:
        m = self.ll.LLMatcher
        if kind == "json":
            grammar = m.grammar_from_json_schema(json.dumps(value), defaults={"whitespace_flexible": False})
        elif kind == "json_object":
            grammar = m.grammar_from_json_schema(
                json.dumps({"type": "object"}), defaults={"whitespace_flexible": False}
            )
        else:
            grammar = m.grammar_from_regex(value)
        matcher = m(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return grammar

    def matcher(self, compiled: Any) -> Any:
        return self.ll.LLMatcher(self.tokenizer, compiled, log_level=0)

    def fill(self, matcher: Any, bitmask: torch.Tensor, row: int) -> None:
        self.lt.fill_next_token_bitmask(matcher, bitmask, row)

    def accept(self, matcher: Any, token: int) -> bool:
        return matcher.consume_token(token)

    def accepting(self, matcher: Any) -> bool:
        return matcher.is_accepting()


class XGrammar(Library):
    name = "xgrammar"

    def __init__(self, tokenizer_json: str, eos: int, vocab: int) -> None:
        super().__init__(tokenizer_json, eos, vocab)
        import xgrammar
        from transformers import PreTrainedTokenizerFast

        self.xgr = xgrammar
        hf = PreTrainedTokenizerFast(tokenizer_object=_tokenizers().Tokenizer.from_str(tokenizer_json))
        self.info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=[eos])

    def compile(self, kind: str, value: Any) -> Any:
        compiler = self.xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        if kind == "json":
            return compiler.compile_json_schema(json.dumps(value), any_whitespace=False)
        if kind == "json_object":
            return compiler.compile_builtin_json_grammar()
        return compiler.compile_regex(value)

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher: Any, bitmask: torch.Tensor, row: int) -> None:
        matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, matcher: Any, token: int) -> bool:
        return matcher.accept_token(token)

    def accepting(self, matcher: Any) -> bool:
        return matcher.is_completed()


class OutlinesCore(Library):
    name = "outlines-core"

    def __init__(self, tokenizer_json: str, eos: int, vocab: int) -> None:
        super().__init__(tokenizer_json, eos, vocab)
        import outlines_core

        self.oc = outlines_core
        data = json.loads(tokenizer_json)
        decoder = byte_level_alphabet()
        special = {t["id"] for t in data.get("added_tokens", []) if t.get("special")}
        tokens: dict[bytes, list[int]] = {}
        for text, token_id in data["model"]["vocab"].items():
            if token_id in special or token_id == eos:
                continue
            tokens.setdefault(bytes(decoder[c] for c in text), []).append(token_id)
        self.vocabulary = outlines_core.Vocabulary(eos, tokens)

    def compile(self, kind: str, value: Any) -> Any:
        if kind == "json_object":
            raise Unsupported("regular expressions only: no recursive JSON")
        if kind == "json":
            regex = self.oc.json_schema.build_regex_from_schema(json.dumps(value), r"")
        else:
            regex = value
        return self.oc.Index(regex, self.vocabulary)

    def matcher(self, compiled: Any) -> Any:
        return self.oc.Guide(compiled)

    def fill(self, matcher: Any, bitmask: torch.Tensor, row: int) -> None:
        v = bitmask[row]
        matcher.write_mask_into(v.data_ptr(), v.numel(), v.element_size())

    def accept(self, matcher: Any, token: int) -> bool:
        try:
            matcher.advance(token)
        except ValueError:
            return False
        return True

    def accepting(self, matcher: Any) -> bool:
        return matcher.is_finished()


def _tokenizers() -> Any:
    import tokenizers

    return tokenizers


LIBRARIES: dict[str, type[Library]] = {
    "llguidance": LLGuidance,
    "xgrammar": XGrammar,
    "outlines-core": OutlinesCore,
}


def unpack_bitmask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """[rows, words] int32 bitmask -> [rows, vocab] bool (True = allowed)."""
    shifts = torch.arange(32, dtype=torch.int32)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.view(bitmask.shape[0], -1)[:, :vocab].bool()


# ---------------------------------------------------------------------------------------------------------
# The run


@dataclass
class GrammarResult:
    library: str
    grammar: str
    compile_ms: float | None = None
    error: str = ""
    generations: list[dict[str, Any]] = field(default_factory=list)


def check_output(kind: str, value: Any, text: str) -> str:
    """'' when ``text`` satisfies the grammar, else why not."""
    if kind == "regex":
        return "" if re.fullmatch(value, text) else f"does not match the regex: {text!r}"
    try:
        parsed = json.loads(text)
    except ValueError as e:
        return f"not JSON ({e}): {text!r}"
    if kind == "json_object":
        return "" if isinstance(parsed, dict) else f"not an object: {text!r}"
    try:
        import jsonschema
    except ImportError:
        return ""
    try:
        jsonschema.validate(parsed, value)
    except jsonschema.ValidationError as e:
        return f"invalid: {e.message}: {text!r}"
    return ""


class Model:
    def __init__(self, path: Path) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    @torch.inference_mode()
    def generate(
        self,
        prompt: list[int],
        mask: Callable[[torch.Tensor], torch.Tensor],
        choose: Callable[[list[int], torch.Tensor], int],
        stop: Callable[[int], bool],
        max_tokens: int,
    ) -> list[int]:
        out = self.model(torch.tensor([prompt]), use_cache=True)
        past, logits = out.past_key_values, out.logits[0, -1]
        ids: list[int] = []
        for _ in range(max_tokens):
            token = choose(ids, mask(logits.float().clone()))
            ids.append(token)
            if stop(token):
                break
            out = self.model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[0, -1]
        return ids


def run_library(
    lib: Library, model: Model, tokenizer: Any, eos: int, seeds: list[int], max_tokens: int
) -> list[GrammarResult]:
    results = []
    vocab = lib.vocab
    for name, kind, value in grammars():
        result = GrammarResult(lib.name, name)
        results.append(result)
        try:
            t0 = time.perf_counter()
            compiled = lib.compile(kind, value)
            result.compile_ms = (time.perf_counter() - t0) * 1e3
        except Unsupported as e:
            result.error = f"unsupported: {e}"
            continue
        except Exception as e:
            result.error = f"{type(e).__name__}: {e}"
            continue
        text = f"<|im_start|>user\n{PROMPTS[name]}<|im_end|>\n<|im_start|>assistant\n"
        prompt = tokenizer.encode(text).ids
        for seed in seeds:
            matcher = lib.matcher(compiled)
            bitmask = torch.full((1, (vocab + 31) // 32), -1, dtype=torch.int32)
            fills: list[float] = []
            accepts: list[float] = []
            failure = ""
            generator = torch.Generator().manual_seed(seed)

            def mask(scores: torch.Tensor, matcher=matcher, bitmask=bitmask, fills=fills) -> torch.Tensor:
                t = time.perf_counter()
                lib.fill(matcher, bitmask, 0)
                fills.append(time.perf_counter() - t)
                return scores.masked_fill(~unpack_bitmask(bitmask, vocab)[0], float("-inf"))

            def choose(ids: list[int], scores: torch.Tensor, seed=seed, generator=generator) -> int:
                if seed < 0:
                    return int(scores.argmax())
                probs = torch.softmax(scores / 0.8, dim=-1)
                return int(torch.multinomial(probs, 1, generator=generator))

            def stop(token: int, matcher=matcher, accepts=accepts) -> bool:
                nonlocal failure
                if token == eos:
                    if not lib.accepting(matcher):
                        failure = "EOS before the grammar accepts"
                    return True
                t = time.perf_counter()
                ok = lib.accept(matcher, token)
                accepts.append(time.perf_counter() - t)
                if not ok:
                    failure = f"token {token} refused after being allowed"
                    return True
                return False

            ids = model.generate(prompt, mask, choose, stop, max_tokens)
            finished = bool(ids) and ids[-1] == eos
            out_text = tokenizer.decode([t for t in ids if t != eos], skip_special_tokens=False)
            if not failure:
                failure = check_output(kind, value, out_text) if finished else "no EOS within max tokens"
            result.generations.append(
                {
                    "seed": seed,
                    "tokens": len(ids),
                    "ok": not failure,
                    "failure": failure,
                    "text": out_text,
                    "mask_us": [round(x * 1e6, 1) for x in fills],
                    "accept_us": [round(x * 1e6, 1) for x in accepts],
                }
            )
    return results


def _stats(values: list[float]) -> str:
    if not values:
        return "-"
    values = sorted(values)
    p99 = values[min(len(values) - 1, int(0.99 * len(values)))]
    return f"{statistics.mean(values):.0f} / {statistics.median(values):.0f} / {p99:.0f}"


def summarize(results: list[GrammarResult]) -> str:
    lines = [
        "| library | grammar | compile ms | mask us (mean / p50 / p99) | accept us (mean / p50 / p99) | valid |",
        "|---|---|---:|---|---|---|",
    ]
    for r in results:
        if r.error:
            lines.append(f"| {r.library} | {r.grammar} | - | - | - | {r.error} |")
            continue
        masks = [x for g in r.generations for x in g["mask_us"]]
        accepts = [x for g in r.generations for x in g["accept_us"]]
        ok = sum(g["ok"] for g in r.generations)
        lines.append(
            f"| {r.library} | {r.grammar} | {r.compile_ms:.1f} | {_stats(masks)} | {_stats(accepts)} "
            f"| {ok}/{len(r.generations)} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# The shard's per-step cost: the real engine and the `grammar` processor on the model

STEP_PROMPTS = [
    "The three primary colors are",
    "Once upon a time, in a small village,",
    "The best way to learn a language is",
    "Paris is the capital of France. Berlin is",
    "Here is a recipe for pancakes:",
    "The history of computing began",
    "In the morning, I like to",
    "Ten facts about the ocean:",
]


def step_cost(path: Path, plain_rows: int, constrained_rows: int, steps: int, repeats: int) -> dict[str, Any]:
    """Decode-step time of ``plain_rows`` unconstrained requests alone, with ``constrained_rows`` more
    unconstrained ones, and with those same rows constrained (JSON schemas and a regex): the last two
    differ only by the grammar. Also the grammar processor's own time per step (mask + advance). Steps
    are counted while every constrained row is still generating; rows never leave on EOS here. With one
    torch thread (``--threads 1``) times are the thread's CPU time, so that a busy machine does not skew
    them."""
    from common import grammar
    from shard.backends.paged import PagedBackend
    from shard.engines import make_engine
    from shard.processors import ProcessorContext, Processors
    from shard.processors.grammar import Grammar
    from shard.types import RequestSpec, SamplingParams

    # On one torch thread, the step runs on this thread: its CPU time is immune to other processes' load.
    single = torch.get_num_threads() == 1
    clock = time.thread_time if single else time.perf_counter

    backend = PagedBackend(path, torch.device("cpu"), kv_cache_bytes=256 * 2**20)
    processor = Grammar()
    eos = tuple(backend.info.eos_token_ids)
    processor.setup(ProcessorContext(path, backend.info.vocab_size, eos, torch.device("cpu")))
    spent: list[float] = []
    apply, advance = processor.apply, processor.advance

    def timed(fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            t = clock()
            out = fn(*args)
            spent.append(clock() - t)
            return out

        return run

    processor.apply, processor.advance = timed(apply), timed(advance)  # type: ignore[method-assign]
    engine = make_engine(backend, processors=Processors([processor]))
    tokenizer = _tokenizers().Tokenizer.from_file(str(path / "tokenizer.json"))
    constraints = [grammar.canonical("json", schema) for schema in SCHEMAS.values()]
    constraints.append(grammar.canonical("regex", r"[A-Z][a-z]+( [a-z]+){8,12}\."))
    asks = list(PROMPTS.values())

    def specs(constrained: int, extra: int) -> list[RequestSpec]:
        out = [
            RequestSpec(
                i, tokenizer.encode(STEP_PROMPTS[i % len(STEP_PROMPTS)]).ids, SamplingParams(), steps + 1
            )
            for i in range(plain_rows)
        ]
        for j in range(extra):
            text = f"<|im_start|>user\n{asks[j % len(asks)]}<|im_end|>\n<|im_start|>assistant\n"
            params = SamplingParams(
                processors=(("grammar", constraints[j % len(constraints)]),) if j < constrained else ()
            )
            out.append(RequestSpec(plain_rows + j, tokenizer.encode(text).ids, params, steps + 1))
        return out

    def run(batch: list[RequestSpec]) -> tuple[list[float], list[float], int]:
        engine.clear()
        spent.clear()
        constrained = {s.id for s in batch if s.params.processors}
        if engine.add(batch):
            raise RuntimeError("the engine refused a request")
        first: dict[int, int] = {}  # each request's first token (prompts run in chunks, maybe over steps)
        while len(first) < len(batch):
            result = engine.step()
            if result.failures:
                raise RuntimeError(f"requests failed: {result.failures}")
            for r, t in zip(result.request_ids, result.token_ids, strict=True):
                first.setdefault(r, t)
        live = steps if not constrained or all(first[r] not in eos for r in constrained) else 0
        times, grammar_times = [], []
        for step in range(steps):
            spent.clear()
            t = clock()
            result = engine.step()
            times.append(clock() - t)
            grammar_times.append(sum(spent))
            done = [r for r, tok in zip(result.request_ids, result.token_ids, strict=True) if tok in eos]
            if live == steps and constrained & set(done):
                live = step + 1
        engine.clear()
        return times, grammar_times, live

    cases = {
        "unconstrained alone": (0, 0),
        "with unconstrained extra rows": (0, constrained_rows),
        "with constrained extra rows": (constrained_rows, constrained_rows),
    }
    samples: dict[str, list[float]] = {name: [] for name in cases}
    grammar_samples: list[float] = []
    live_steps = steps
    run(specs(constrained_rows, constrained_rows))  # warm-up (and the grammars' compilation)
    for _ in range(repeats):
        for name, (constrained, extra) in cases.items():
            times, grammar_times, live = run(specs(constrained, extra))
            if constrained:
                live_steps = min(live_steps, live)
                grammar_samples += grammar_times[:live]
            samples[name] += times
    counted = max(live_steps, 1)
    out: dict[str, Any] = {
        "plain_rows": plain_rows,
        "constrained_rows": constrained_rows,
        "steps_counted": counted,
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        "clock": "thread CPU time" if single else "wall time",
    }
    for name, values in samples.items():
        per_run = [values[i * steps : i * steps + counted] for i in range(repeats)]
        flat = [x for run_values in per_run for x in run_values]
        out[name] = {"median_ms": statistics.median(flat) * 1e3, "mean_ms": statistics.mean(flat) * 1e3}
    out["grammar_ms_per_step"] = {
        "median": statistics.median(grammar_samples) * 1e3,
        "mean": statistics.mean(grammar_samples) * 1e3,
        "p99": sorted(grammar_samples)[int(0.99 * (len(grammar_samples) - 1))] * 1e3,
    }
    base = out["with unconstrained extra rows"]["median_ms"]
    out["slowdown_vs_same_batch_unconstrained"] = out["with constrained extra rows"]["median_ms"] / base - 1
    return out


def default_model_path() -> Path | None:
    root = Path(__file__).resolve().parent.parent
    found = sorted((root / ".cache").glob("**/converted/SmolLM2-135M-Instruct*/tokenizer.json"))
    return found[0].parent if found else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmark.grammar_bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--model-path", type=Path, default=None, help="model directory (tokenizer.json, weights)"
    )
    parser.add_argument(
        "--libraries", default=",".join(LIBRARIES), help="comma-separated, of " + ", ".join(LIBRARIES)
    )
    parser.add_argument("--seeds", default="-1,1,2", help="-1 = greedy; others sample at temperature 0.8")
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--output", type=Path, default=None, help="write every figure as JSON here")
    parser.add_argument(
        "--step-cost",
        action="store_true",
        help="measure the shard's decode step with and without constrained rows instead (llguidance)",
    )
    parser.add_argument("--plain-rows", type=int, default=8)
    parser.add_argument("--constrained-rows", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    path = args.model_path or default_model_path()
    if path is None:
        parser.error("no --model-path given and the default model is not in .cache/")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.step_cost:
        figures = step_cost(path, args.plain_rows, args.constrained_rows, args.steps, args.repeats)
        print(json.dumps(figures, indent=1))
        if args.output:
            args.output.write_text(json.dumps(figures, indent=1))
        return 0
    tokenizer_json = (path / "tokenizer.json").read_text()
    tokenizer = _tokenizers().Tokenizer.from_str(tokenizer_json)
    config = json.loads((path / "config.json").read_text())
    eos = config["eos_token_id"] if isinstance(config["eos_token_id"], int) else config["eos_token_id"][0]
    vocab = config["vocab_size"]
    model = Model(path)
    seeds = [int(s) for s in args.seeds.split(",")]
    results: list[GrammarResult] = []
    for name in args.libraries.split(","):
        try:
            t0 = time.perf_counter()
            lib = LIBRARIES[name](tokenizer_json, eos, vocab)
            setup_ms = (time.perf_counter() - t0) * 1e3
        except ImportError as e:
            print(f"{name}: not installed ({e})", file=sys.stderr)
            continue
        version = _version(name)
        print(f"{name} {version}: tokenizer set-up {setup_ms:.0f} ms", file=sys.stderr)
        results += run_library(lib, model, tokenizer, eos, seeds, args.max_tokens)
    print(summarize(results))
    for r in results:
        for g in r.generations:
            if not g["ok"]:
                print(f"FAILED {r.library} {r.grammar} seed {g['seed']}: {g['failure']}", file=sys.stderr)
    if args.output:
        args.output.write_text(json.dumps([r.__dict__ for r in results], indent=1))
    return 0


def _version(name: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
