"""Batch invariance of the paged engine: does a row get the same tokens whatever else runs in its steps?

``python -m benchmark.invariance --model-dir DIR --dtype bfloat16`` runs chat questions through the paged
engine (``shard.engines.make_engine``, as the server does) in process and compares each question's tokens
with the ones it gets alone, without speculation:

- ``together``: all questions at once (one batch of N rows from the first step);
- ``staggered``: one question joins every few steps (batches grow, prompt chunks beside decodes);
- ``drafted``: alone, with n-gram speculation forced on every step (a drafted step verifies k+1 rows of
  one sequence);
- ``drafted, policy``: alone, with the engine's own drafting policy (it drafts where its measured timings
  say drafting pays: what one user gets from the default ``--speculate``);
- ``drafted together``: all at once, speculation forced.

Greedy and seeded sampling (each question its own seed) are both checked. A row "differs" from its first
token that is not the alone run's; the report gives, per scenario, the rows that differ and where they
first do. This is what the README's reproducibility promise and the ``--speculate`` default rest on
(docs/benchmarks.md, "Batch invariance").
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, replace
from typing import Any

QUESTIONS = [
    "What is the capital of France?",
    # Input-grounded (the text offers n-gram drafts from the first steps on).
    "Rewrite the following sentence word for word: The old lighthouse keeper climbed the spiral stairs "
    "every evening to light the lamp that guided the fishing boats home through the fog.",
    "Write a haiku about the sea.",
    "Repeat this list exactly: apples, bread, cheese, dates, eggs, flour, grapes, honey, ice cream, jam.",
    "Explain photosynthesis in two sentences.",
    "Copy this paragraph: Continuous batching lets many users share one model. New requests join while "
    "others decode, and finished ones leave at once, so the device is never idle while work waits.",
    "Give me three tips for learning a new language.",
    "Rewrite word for word: To be, or not to be, that is the question: whether 'tis nobler in the mind to "
    "suffer the slings and arrows of outrageous fortune.",
    "What is the difference between a list and a tuple in Python?",
    "Summarize the plot of Romeo and Juliet.",
    "How do vaccines work?",
    "Write a short story about a robot who learns to paint.",
    "What causes the seasons on Earth?",
    "List five healthy breakfast ideas.",
    "Why is the sky blue?",
    "Describe how a bill becomes a law in the United States.",
    "What are the main causes of climate change?",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "Explain recursion to a ten-year-old.",
    "What should I pack for a weekend hiking trip?",
]


@dataclass(frozen=True)
class ScenarioResult:
    """One scenario against the alone runs: rows whose tokens differ, and each one's first differing index."""

    scenario: str
    sampling: str  # "greedy" or "seeded"
    rows: int
    rows_differing: int
    first_differences: list[int]
    drafted: int  # draft tokens fed (speculation scenarios)
    accepted: int


def _engine(backend: Any, speculate: int, forced: bool) -> Any:
    from shard.chunked import ChunkedEngine, StepCosts
    from shard.engines import make_engine

    engine = make_engine(backend, speculate=speculate)
    assert isinstance(engine, ChunkedEngine)
    if forced:

        class Forced(StepCosts):
            """A step's decodes cost as much as 64 prompt tokens, whatever the timings: drafting always
            pays, so every step drafts where the text offers drafts."""

            def __init__(self) -> None:
                super().__init__(free_tokens=16)
                self.decode_s, self.token_s = 64e-3, 1e-3

            def observe(self, seconds: float, decoding: int, prompt_tokens: int) -> None:
                pass

        engine.costs = Forced()
    return engine


def _run(engine: Any, arrivals: dict[int, list[Any]]) -> dict[int, list[int]]:
    """Each request's tokens; ``arrivals[k]`` join before step ``k``, a request leaves once it has all its
    tokens."""
    out: dict[int, list[int]] = {}
    held: dict[int, Any] = {}
    for k in range(100_000):
        done = [rid for rid, r in held.items() if len(out.get(rid, [])) >= r.max_new_tokens]
        if done:
            engine.remove(done)
            for rid in done:
                del held[rid]
        if arrivals.get(k):
            refused = engine.add(arrivals[k])
            if refused:
                raise RuntimeError(f"the engine refused {refused}")
            held.update((r.id, r) for r in arrivals[k])
        if not held and all(step <= k for step in arrivals):
            return out
        result = engine.step()
        if result.failures:
            raise RuntimeError(f"step failures: {result.failures}")
        for rid, token in zip(result.request_ids, result.token_ids, strict=True):
            out.setdefault(rid, []).append(token)
    raise RuntimeError("the engine did not finish")


def measure(
    model_dir: str,
    dtype: str,
    questions: int,
    new_tokens: int,
    stagger: int,
    samplings: tuple[str, ...] = ("greedy", "seeded"),
) -> list[ScenarioResult]:
    import torch
    from transformers import AutoTokenizer

    from shard.backends.paged import PagedBackend
    from shard.types import RequestSpec, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = []
    for question in (QUESTIONS * (questions // len(QUESTIONS) + 1))[:questions]:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        prompts.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    backend = PagedBackend(model_dir, torch.device("cpu"), dtype, kv_cache_bytes=256 * 2**20)
    results = []
    for sampling in samplings:

        def spec(i: int, prompt: list[int], sampling: str = sampling) -> RequestSpec:
            params = (
                SamplingParams()
                if sampling == "greedy"
                else SamplingParams(do_sample=True, temperature=0.8, top_k=40, seed=1000 + i)
            )
            return RequestSpec(i + 1, prompt, params, new_tokens, ignore_eos=True)

        def salted(scenario: str, sampling: str = sampling) -> list[RequestSpec]:
            """Every row of every scenario its own prefix-cache salt: no row reuses another's (or an
            earlier scenario's) KV blocks, so only the batch differs."""
            return [
                replace(spec(i, p), cache_salt=f"{sampling}-{scenario}-{i}") for i, p in enumerate(prompts)
            ]

        alone: dict[int, list[int]] = {}
        for s in salted("alone"):
            alone.update(_run(_engine(backend, 0, False), {0: [s]}))
        staggered = salted("staggered")
        scenarios: dict[str, tuple[int, bool, dict[int, list[Any]]]] = {
            "together": (0, False, {0: salted("together")}),
            "staggered": (0, False, {i * stagger: [s] for i, s in enumerate(staggered)}),
            "drafted": (8, True, {}),
            "drafted, policy": (8, False, {}),
            "drafted together": (8, True, {0: salted("drafted together")}),
        }
        for name, (speculate, forced, arrivals) in scenarios.items():
            if name.startswith("drafted") and not arrivals:  # one row at a time
                out: dict[int, list[int]] = {}
                drafted = accepted = 0
                for s in salted(name):
                    engine = _engine(backend, speculate, forced)
                    out.update(_run(engine, {0: [s]}))
                    drafted, accepted = drafted + engine.drafted, accepted + engine.accepted
            else:
                engine = _engine(backend, speculate, forced)
                out = _run(engine, arrivals)
                drafted, accepted = engine.drafted, engine.accepted
            firsts = []
            for rid, tokens in alone.items():
                got = out[rid]
                if got != tokens:
                    firsts.append(next(i for i, (a, b) in enumerate(zip(tokens, got, strict=True)) if a != b))
            result = ScenarioResult(
                name, sampling, len(prompts), len(firsts), sorted(firsts), drafted, accepted
            )
            print(
                f"{dtype:>8} {sampling:>6} {name:>16}: {result.rows_differing}/{result.rows} rows differ "
                f"(first at {result.first_differences}); drafted {drafted}, accepted {accepted}",
                flush=True,
            )
            results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmark.invariance", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model-dir", required=True, help="local model directory (config, safetensors)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--questions", type=int, default=20, help="rows (default: 20)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per row (default: 64)")
    parser.add_argument("--stagger", type=int, default=4, help="steps between arrivals in 'staggered'")
    parser.add_argument(
        "--sampling", default="greedy,seeded", help="greedy, seeded or both (default: greedy,seeded)"
    )
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    samplings = tuple(name.strip() for name in args.sampling.split(",") if name.strip())
    if not samplings or set(samplings) - {"greedy", "seeded"}:
        parser.error(f"--sampling: greedy, seeded or both, not {args.sampling!r}")
    results = measure(args.model_dir, args.dtype, args.questions, args.new_tokens, args.stagger, samplings)
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"benchmark": "invariance", "config": vars(args), "results": [asdict(r) for r in results]},
                      f, indent=1)  # fmt: skip
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
