"""What a level sends and when: per-request prompts and lengths, and open-loop Poisson arrival times.

Everything random is drawn from ``random.Random`` streams seeded from the run's seed, one stream per
purpose, so that a run is reproducible and two servers measured with the same seed get the same requests:

- ``{seed}/requests``: the prompts and lengths; every level draws from a fresh copy, so a level's
  requests are the first requests of any longer level and levels differ only in load;
- ``{seed}/warmup``: the warmup requests (their prompts are not reused by the measured requests);
- ``{seed}/arrivals``: the exponential gaps of a rate level, as multiples of the mean gap 1/R.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from benchmark.config import ServeConfig
from benchmark.prompts import synthetic_prompt


@dataclass(frozen=True)
class RequestSpec:
    """One request to send: its prompt and how many tokens it asks for.

    ``max_new_tokens`` None means the client's default (GenerationParams); ``input_tokens`` is the
    synthetic prompt's target length in tokens (None for a user-given prompt); ``model`` the model (LoRA
    adapter) it names (None: the client's, see ``ServeConfig.models``).
    """

    prompt: str
    max_new_tokens: int | None = None
    input_tokens: int | None = None
    model: str | None = None


def length_range(n: int, ratio: float) -> tuple[int, int]:
    """The integer lengths drawn for length ``n`` and range ratio ``ratio``: [ceil(n(1 - ratio)), n],
    never below 1."""
    if n < 1 or not 0 <= ratio <= 1:
        raise ValueError(f"length_range needs n >= 1 and 0 <= ratio <= 1, got {n}, {ratio}")
    return max(1, math.ceil(n * (1 - ratio) - 1e-9)), n


def draw_length(n: int, ratio: float, rng: random.Random) -> int:
    """A length drawn uniformly among the integers of ``length_range(n, ratio)`` (exactly ``n`` for 0)."""
    low, high = length_range(n, ratio)
    return high if low == high else rng.randint(low, high)


def make_requests(config: ServeConfig, count: int, stream: str = "requests") -> list[RequestSpec]:
    """``count`` requests from the config, drawn from the ``{seed}/{stream}`` random stream.

    Without ``input_tokens`` every request sends ``config.prompt``. With it, each request gets its own
    synthetic prompt (random words: no shared prefix for a prefix cache to reuse) of a length drawn in
    [N(1 - r), N], r the input range ratio. ``max_new_tokens`` is drawn likewise with the output ratio.
    With ``config.models``, request i names ``models[i % len(models)]`` (it draws nothing: the prompts and
    lengths are those of a run without it).
    """
    rng = random.Random(f"{config.seed}/{stream}")
    n_out = config.params.max_new_tokens
    specs = []
    for i in range(count):
        input_tokens = prompt = None
        if config.input_tokens is not None:
            input_tokens = draw_length(config.input_tokens, config.random_input_range_ratio, rng)
            prompt = synthetic_prompt(input_tokens, rng)
        max_new_tokens = draw_length(n_out, config.random_output_range_ratio, rng)
        specs.append(
            RequestSpec(
                prompt=prompt if prompt is not None else config.prompt,
                max_new_tokens=max_new_tokens,
                input_tokens=input_tokens,
                model=config.models[i % len(config.models)] if config.models else None,
            )
        )
    return specs


def poisson_arrivals(rate: float, count: int, rng: random.Random) -> list[float]:
    """Send times (seconds from the level's start) of ``count`` requests of a Poisson process of ``rate``
    requests/s: the first at 0, then exponential gaps of mean 1/rate."""
    if not (0 < rate < math.inf) or count < 0:
        raise ValueError(f"poisson_arrivals needs 0 < rate < inf and count >= 0, got {rate}, {count}")
    times, t = [], 0.0
    for i in range(count):
        if i:
            t += rng.expovariate(1.0) / rate
        times.append(t)
    return times


def arrival_schedule(config: ServeConfig, rate: float, count: int) -> list[float]:
    """The seeded arrival times of a rate level (the same unit gaps for every rate, scaled by 1/rate)."""
    return poisson_arrivals(rate, count, random.Random(f"{config.seed}/arrivals"))
