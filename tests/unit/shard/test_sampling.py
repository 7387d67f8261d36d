"""shard/sampling.py: batched next-token choice with per-row parameters and counter-based seeds.

The processed distribution of a row is read back through ``top_n = vocab`` (every token, sorted), so
these tests only use the public API. References are transformers' own logits processors and OpenAI's
definition of the frequency and presence penalties.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from shard.sampling import Choice, Sampler, TokenHistory, uniform
from shard.types import SamplingParams

pytestmark = pytest.mark.timeout(60)

CPU = torch.device("cpu")
VOCAB = 48
NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------- helpers


def make_logits(rows: int, vocab: int = VOCAB, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((rows, vocab), generator=g) * scale


def make_history(
    prompts: list[list[int]], generated: list[list[int]] | None = None, reserve: int = 4
) -> TokenHistory:
    """A history holding each row's prompt, then its generated ids appended step by step."""
    history = TokenHistory.from_prompts(prompts, [reserve] * len(prompts), CPU)
    if generated:
        steps = len(generated[0])
        assert all(len(g) == steps for g in generated)
        for t in range(steps):
            history.append(torch.tensor([g[t] for g in generated], dtype=torch.long))
    return history


def full_logprobs(choice: Choice, vocab: int) -> torch.Tensor:
    """The whole processed log-distribution of every row, rebuilt from top_n = vocab."""
    assert choice.top_ids.shape[1] == vocab
    out = torch.full((choice.top_ids.shape[0], vocab), NEG_INF)
    return out.scatter(1, choice.top_ids.long(), choice.top_logprobs.float())


def choose(
    params: list[SamplingParams], logits: torch.Tensor, history: TokenHistory, top_n: int | None = None
) -> Choice:
    n = logits.shape[1] if top_n is None else top_n
    return Sampler(params, [n] * len(params), CPU).choose(logits, history)


def reference_logprobs(
    logits: torch.Tensor, params: SamplingParams, prompt: list[int], generated: list[int]
) -> torch.Tensor:
    """transformers' processors (and OpenAI's penalties) on one row, in TGI's order; log-softmax."""
    scores = logits.clone().float().unsqueeze(0)
    ids = torch.tensor([prompt + generated], dtype=torch.long)
    if params.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(ids, scores)
    if params.frequency_penalty or params.presence_penalty:
        counts = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=scores.shape[1]).float()
        scores = scores - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).float()
    if params.temperature != 1.0:
        scores = TemperatureLogitsWarper(params.temperature)(ids, scores)
    if params.top_k > 0:
        scores = TopKLogitsWarper(params.top_k)(ids, scores)
    if params.top_p < 1.0:
        scores = TopPLogitsWarper(params.top_p)(ids, scores)
    if params.typical_p < 1.0:
        scores = TypicalLogitsWarper(params.typical_p)(ids, scores)
    return torch.log_softmax(scores, dim=-1)[0]


def assert_same_distribution(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5) -> None:
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), finite), (
        f"kept tokens differ: {torch.isfinite(actual).nonzero().flatten().tolist()} "
        f"vs {finite.nonzero().flatten().tolist()}"
    )
    torch.testing.assert_close(actual[finite], expected[finite], atol=atol, rtol=1e-5)


PARAMS: dict[str, SamplingParams] = {
    "greedy": SamplingParams(),
    "do_sample": SamplingParams(do_sample=True, seed=11),
    "temperature_0.7": SamplingParams(temperature=0.7, seed=1),
    "temperature_1.6_top_k_5": SamplingParams(temperature=1.6, top_k=5, seed=2),
    "top_k_1": SamplingParams(top_k=1, seed=3),
    "top_k_12": SamplingParams(top_k=12, seed=4),
    "top_p_0.8": SamplingParams(top_p=0.8, seed=5),
    "top_p_0.3_temperature_0.5": SamplingParams(top_p=0.3, temperature=0.5, seed=6),
    "typical_0.6": SamplingParams(typical_p=0.6, seed=7),
    "typical_0.9_top_k_10": SamplingParams(typical_p=0.9, top_k=10, seed=8),
    "all_warpers": SamplingParams(temperature=0.9, top_k=20, top_p=0.85, typical_p=0.8, seed=9),
    "repetition_1.3": SamplingParams(repetition_penalty=1.3),
    "repetition_0.6_sampled": SamplingParams(repetition_penalty=0.6, do_sample=True, seed=10),
    "frequency_presence": SamplingParams(frequency_penalty=0.5, presence_penalty=0.3),
    "negative_frequency_presence": SamplingParams(frequency_penalty=-1.0, presence_penalty=-0.5),
    "everything": SamplingParams(
        temperature=0.8,
        top_k=25,
        top_p=0.9,
        typical_p=0.95,
        repetition_penalty=1.2,
        frequency_penalty=0.4,
        presence_penalty=0.2,
        do_sample=True,
        seed=12345,
    ),
}

PROMPT = [3, 7, 7, 11, 20, 31]
GENERATED = [7, 5, 5, 5, 40, 3]


# --------------------------------------------------------------------------------------------- uniform


def test_uniform_is_a_pure_function_in_unit_interval() -> None:
    n = 20000
    seed_lo = torch.arange(n, dtype=torch.long)
    seed_hi = torch.zeros(n, dtype=torch.long)
    step = torch.zeros(n, dtype=torch.long)
    u = uniform(seed_lo, seed_hi, step)
    assert u.dtype == torch.float64
    assert u.shape == (n,)
    assert bool((u >= 0).all()) and bool((u < 1).all())
    assert torch.equal(u, uniform(seed_lo.clone(), seed_hi.clone(), step.clone()))
    # Roughly uniform: mean, variance and decile counts.
    assert abs(float(u.mean()) - 0.5) < 0.01
    assert abs(float(u.var()) - 1 / 12) < 0.005
    counts = torch.histc(u.float(), bins=10, min=0.0, max=1.0)
    assert bool((counts > n / 10 * 0.9).all()) and bool((counts < n / 10 * 1.1).all())
    # All distinct (48 bits of resolution).
    assert len(set(u.tolist())) == n


def test_uniform_depends_on_every_input() -> None:
    zeros = torch.zeros(64, dtype=torch.long)
    base = uniform(zeros + 5, zeros + 9, torch.arange(64))
    assert len(set(base.tolist())) == 64  # step changes the draw
    assert not torch.equal(base, uniform(zeros + 6, zeros + 9, torch.arange(64)))  # low word
    assert not torch.equal(base, uniform(zeros + 5, zeros + 10, torch.arange(64)))  # high word
    # Element-wise: one row's value only depends on its own inputs.
    mixed = uniform(torch.tensor([5, 1, 5]), torch.tensor([9, 2, 9]), torch.tensor([3, 0, 3]))
    assert mixed[0] == mixed[2] == base[3]


def test_uniform_handles_full_32_bit_words() -> None:
    top = torch.tensor([0xFFFFFFFF, 0xFFFFFFFF, 0, 0x80000000], dtype=torch.long)
    u = uniform(top, top.flip(0), torch.tensor([0xFFFFFFFF, 0, 2**40, 7]))
    assert bool(torch.isfinite(u).all()) and bool((u >= 0).all()) and bool((u < 1).all())


# --------------------------------------------------------------------------------------------- greedy


def test_sampling_property_follows_tgi_rule() -> None:
    assert not SamplingParams().sampling
    assert SamplingParams(do_sample=True).sampling
    assert SamplingParams(temperature=0.5).sampling
    assert SamplingParams(top_k=3).sampling
    assert SamplingParams(top_p=0.9).sampling
    assert SamplingParams(typical_p=0.9).sampling
    # Penalties alone do not make a row sample.
    assert not SamplingParams(repetition_penalty=1.5, frequency_penalty=1.0, presence_penalty=1.0).sampling


def test_greedy_is_argmax_with_raw_logprobs() -> None:
    logits = make_logits(8, seed=1)
    history = make_history([[1, 2]] * 8)
    choice = choose([SamplingParams()] * 8, logits, history, top_n=3)
    assert torch.equal(choice.ids, logits.argmax(-1))
    expected = torch.log_softmax(logits, -1).gather(1, choice.ids.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(choice.logprobs, expected)
    assert torch.equal(choice.top_ids[:, 0].long(), choice.ids)


def test_greedy_is_argmax_of_penalized_scores() -> None:
    logits = torch.zeros((1, 8))
    logits[0, 4] = 2.0
    logits[0, 6] = 1.9
    history = make_history([[4]])
    choice = choose([SamplingParams(repetition_penalty=1.5)], logits, history)
    assert int(choice.ids[0]) == 6  # 2.0 / 1.5 < 1.9
    choice = choose([SamplingParams(frequency_penalty=1.0)], logits, history)
    assert int(choice.ids[0]) == 4  # the prompt is not counted by the frequency penalty
    history = make_history([[1]], [[4]])
    choice = choose([SamplingParams(frequency_penalty=1.0)], logits, history)
    assert int(choice.ids[0]) == 6


def test_greedy_rows_stay_greedy_next_to_sampling_rows() -> None:
    params = [
        SamplingParams(),
        SamplingParams(temperature=5.0, seed=3),
        SamplingParams(),
        SamplingParams(do_sample=True),
    ]
    sampler = Sampler(params, [0] * 4, CPU)
    history = make_history([[1]] * 4, reserve=40)
    for step in range(30):
        logits = make_logits(4, seed=100 + step, scale=1.0)
        choice = sampler.choose(logits, history)
        assert int(choice.ids[0]) == int(logits[0].argmax())
        assert int(choice.ids[2]) == int(logits[2].argmax())
        history.append(choice.ids)
    assert sampler.steps.tolist() == [30] * 4


# --------------------------------------------------------------------------------------------- processors


@pytest.mark.parametrize("name", list(PARAMS))
def test_row_matches_transformers_processors(name: str) -> None:
    params = PARAMS[name]
    logits = make_logits(1, seed=list(PARAMS).index(name))
    history = make_history([PROMPT], [GENERATED])
    choice = choose([params], logits, history)
    actual = full_logprobs(choice, VOCAB)[0]
    expected = reference_logprobs(logits[0], params, PROMPT, GENERATED)
    assert_same_distribution(actual, expected)
    # The chosen token's logprob is read from the same processed distribution, and it was allowed.
    token = int(choice.ids[0])
    assert math.isfinite(float(expected[token]))
    assert float(choice.logprobs[0]) == pytest.approx(float(expected[token]), abs=1e-5)
    if not params.sampling:
        assert token == int(expected.argmax())


@pytest.mark.parametrize("seed", range(6))
def test_mixed_batch_matches_transformers_per_row(seed: int) -> None:
    names = list(PARAMS)
    logits = make_logits(len(names), seed=seed)
    g = torch.Generator().manual_seed(seed)
    prompts = [
        torch.randint(0, VOCAB, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
        for _ in names
    ]
    generated = [torch.randint(0, VOCAB, (5,), generator=g).tolist() for _ in names]
    history = make_history(prompts, generated)
    choice = choose([PARAMS[n] for n in names], logits, history)
    actual = full_logprobs(choice, VOCAB)
    for row, name in enumerate(names):
        expected = reference_logprobs(logits[row], PARAMS[name], prompts[row], generated[row])
        assert_same_distribution(actual[row], expected)


def test_mixed_batch_rows_behave_as_if_alone() -> None:
    """Every row of a heterogeneous batch gets exactly what a batch of one would give it."""
    names = list(PARAMS)
    params = [PARAMS[n] for n in names]
    logits = make_logits(len(names), seed=42)
    prompts = [[(row * 5 + j) % VOCAB for j in range(1 + row % 6)] for row in range(len(names))]
    generated = [[(row * 3 + j * j) % VOCAB for j in range(4)] for row in range(len(names))]
    history = make_history(prompts, generated)
    batch = choose(params, logits, history)
    batch_full = full_logprobs(batch, VOCAB)
    for row, name in enumerate(names):
        alone_history = history.select(torch.tensor([row]))
        alone = choose([params[row]], logits[row : row + 1], alone_history)
        assert int(batch.ids[row]) == int(alone.ids[0]), name
        assert float(batch.logprobs[row]) == pytest.approx(float(alone.logprobs[0]), abs=1e-6), name
        assert_same_distribution(batch_full[row], full_logprobs(alone, VOCAB)[0], atol=1e-6)


def test_top_k_keeps_exactly_the_k_best() -> None:
    logits = make_logits(4, seed=7)
    history = make_history([[0]] * 4)
    for k in (1, 2, 5, 17, VOCAB - 1, VOCAB, VOCAB + 10):
        choice = choose([SamplingParams(top_k=k, seed=k)] * 4, logits, history)
        kept = torch.isfinite(full_logprobs(choice, VOCAB))
        for row in range(4):
            expected = set(logits[row].topk(min(k, VOCAB)).indices.tolist())
            assert set(kept[row].nonzero().flatten().tolist()) == expected
            assert int(choice.ids[row]) in expected


def test_top_k_one_is_greedy_even_when_sampling() -> None:
    logits = make_logits(16, seed=8)
    history = make_history([[0]] * 16)
    params = [SamplingParams(top_k=1, temperature=3.0, seed=s) for s in range(16)]
    choice = choose(params, logits, history, top_n=0)
    assert torch.equal(choice.ids, logits.argmax(-1))
    torch.testing.assert_close(choice.logprobs, torch.zeros(16), atol=1e-6, rtol=0)


@pytest.mark.parametrize("top_p", [0.05, 0.2, 0.5, 0.75, 0.9, 0.99])
def test_top_p_keeps_smallest_set_reaching_mass(top_p: float) -> None:
    logits = make_logits(6, seed=9, scale=1.5)
    history = make_history([[0]] * 6)
    choice = choose([SamplingParams(top_p=top_p, seed=1)] * 6, logits, history)
    kept = torch.isfinite(full_logprobs(choice, VOCAB))
    checked = 0
    for row in range(6):
        probs = torch.softmax(logits[row].double(), -1)
        order = probs.argsort(descending=True)
        cumulative = probs[order].cumsum(0)
        if (cumulative - top_p).abs().min() < 1e-5:
            continue  # too close to the boundary for float32 to decide
        checked += 1
        size = int((cumulative < top_p).sum()) + 1
        assert set(kept[row].nonzero().flatten().tolist()) == set(order[:size].tolist())
        # Renormalised over the kept set.
        lp = full_logprobs(choice, VOCAB)[row]
        expected = torch.log(probs[order[:size]] / probs[order[:size]].sum()).float()
        torch.testing.assert_close(lp[order[:size]], expected, atol=1e-5, rtol=1e-5)
    assert checked >= 5


@pytest.mark.parametrize(
    ("probs", "top_p", "kept"),
    [
        ([0.5, 0.25, 0.25], 0.5, 1),
        ([0.5, 0.25, 0.125, 0.125], 0.75, 2),
        ([0.25, 0.25, 0.25, 0.25], 0.5, 2),
    ],
)
def test_top_p_exact_boundary_matches_transformers(probs: list[float], top_p: float, kept: int) -> None:
    """When the k best tokens hold exactly ``top_p`` of the mass, they already reach it: keep k, not k+1.

    transformers' TopPLogitsWarper and TGI's HeterogeneousTopPLogitsWarper both drop a token whose
    ascending cumulative mass is <= 1 - top_p. The probabilities here are exact in float32.
    """
    logits = torch.log(torch.tensor([probs]))
    history = make_history([[0]])
    choice = choose([SamplingParams(top_p=top_p)], logits, history, top_n=len(probs))
    actual = full_logprobs(choice, len(probs))[0]
    expected = torch.log_softmax(TopPLogitsWarper(top_p)(None, logits.clone()), -1)[0]
    assert int(torch.isfinite(expected).sum()) == kept  # the reference itself
    assert int(torch.isfinite(actual).sum()) == kept, f"kept {actual.tolist()}"
    if len(set(probs)) == len(probs) - 1:  # no tie inside the kept set: the same tokens
        assert_same_distribution(actual, expected)


def test_typical_p_keeps_at_least_one_token() -> None:
    logits = make_logits(3, seed=10)
    logits[1] = 0.0  # flat row: every token equally typical
    history = make_history([[0]] * 3)
    for mass in (0.001, 0.2, 0.999):
        choice = choose([SamplingParams(typical_p=mass, seed=2)] * 3, logits, history)
        kept = torch.isfinite(full_logprobs(choice, VOCAB))
        assert bool((kept.sum(-1) >= 1).all())
        for row in range(3):
            expected = reference_logprobs(logits[row], SamplingParams(typical_p=mass), [0], [])
            assert_same_distribution(full_logprobs(choice, VOCAB)[row], expected)


def test_temperature_scales_logits() -> None:
    logits = make_logits(2, seed=11)
    history = make_history([[0]] * 2)
    for t in (0.1, 0.5, 2.0, 10.0):
        choice = choose([SamplingParams(temperature=t, seed=1)] * 2, logits, history)
        torch.testing.assert_close(full_logprobs(choice, VOCAB), torch.log_softmax(logits / t, -1))


# --------------------------------------------------------------------------------------------- penalties


@pytest.mark.parametrize("penalty", [0.5, 1.2, 2.0])
def test_repetition_penalty_matches_transformers_over_prompt_and_generated(penalty: float) -> None:
    logits = make_logits(1, seed=12)
    logits[0, 0] = 0.0  # a zero score stays zero either way
    prompt = [0, 1, 2, 2, 30]
    generated = [5, 30, 44]
    history = make_history([prompt], [generated])
    choice = choose([SamplingParams(repetition_penalty=penalty)], logits, history)
    actual = full_logprobs(choice, VOCAB)[0]
    ids = torch.tensor([prompt + generated])
    expected = torch.log_softmax(RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone()), -1)[0]
    assert_same_distribution(actual, expected)
    # Each seen token penalised once, whatever its count; unseen tokens untouched.
    raw = torch.log_softmax(logits, -1)[0]
    unseen = [i for i in range(VOCAB) if i not in prompt + generated]
    shift = actual[unseen] - raw[unseen]
    torch.testing.assert_close(shift, torch.full_like(shift, float(shift[0])), atol=1e-5, rtol=0)


def test_frequency_and_presence_penalties_follow_openai() -> None:
    """score -= frequency * count + presence * (count > 0), counting generated tokens only."""
    vocab = 8
    logits = torch.zeros((1, vocab))
    prompt = [1, 1, 2, 3]
    generated = [3, 3, 3, 4, 6, 6]
    history = make_history([prompt], [generated])
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    choice = choose([params], logits, history, top_n=vocab)
    expected_scores = torch.zeros(vocab)
    expected_scores[3] -= 3 * 0.5 + 0.25
    expected_scores[4] -= 1 * 0.5 + 0.25
    expected_scores[6] -= 2 * 0.5 + 0.25
    torch.testing.assert_close(full_logprobs(choice, vocab)[0], torch.log_softmax(expected_scores, -1))
    # Greedy choice avoids penalised tokens: a tie among 0, 1, 2, 5, 7 -> the prompt-only 1 and 2 are fine.
    assert int(choice.ids[0]) in {0, 1, 2, 5, 7}


def test_presence_penalty_alone_ignores_counts() -> None:
    vocab = 6
    logits = torch.zeros((1, vocab))
    history = make_history([[0]], [[2, 2, 2, 2, 3]])
    choice = choose([SamplingParams(presence_penalty=1.0)], logits, history, top_n=vocab)
    lp = full_logprobs(choice, vocab)[0]
    assert float(lp[2]) == pytest.approx(float(lp[3]), abs=1e-6)
    assert float(lp[0] - lp[2]) == pytest.approx(1.0, abs=1e-5)


def test_penalties_ignore_history_padding() -> None:
    """Rows of different lengths: the zero padding past each row's length is not a token 0 occurrence."""
    vocab = 8
    logits = torch.ones((2, vocab))
    history = make_history([[5], [5, 6, 7, 5, 6, 7]], reserve=10)
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0, presence_penalty=1.0)
    choice = choose([params] * 2, logits, history, top_n=vocab)
    lp = full_logprobs(choice, vocab)
    # Token 0 never appeared: it keeps the unpenalised score in both rows.
    assert float(lp[0, 0]) == pytest.approx(float(lp[0, 1]), abs=1e-6)
    assert float(lp[1, 0]) == pytest.approx(float(lp[1, 1]), abs=1e-6)
    assert float(lp[0, 5]) < float(lp[0, 0])


def test_frequency_penalty_counts_each_step() -> None:
    """Appending to the history between steps is what the penalties see."""
    logits = torch.tensor([[3.0, 2.9, 2.8, 2.7]])
    sampler = Sampler([SamplingParams(frequency_penalty=0.5)], [0], CPU)
    history = make_history([[0, 0, 0]], reserve=1)
    seen = []
    for _ in range(8):
        ids = sampler.choose(logits, history).ids
        seen.append(int(ids[0]))
        history.append(ids)
    # Greedy with a growing penalty rotates through the tokens; the prompt's three 0s do not count.
    assert seen[:5] == [0, 1, 2, 3, 0]
    assert history.lengths.tolist() == [11]


# --------------------------------------------------------------------------------------------- seeds


def run_steps(
    sampler: Sampler, history: TokenHistory, rows_logits: list[Callable[[int], torch.Tensor]], steps: int
) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in rows_logits]
    for _ in range(steps):
        step = int(sampler.steps[0])
        logits = torch.stack([f(step) for f in rows_logits])
        ids = sampler.choose(logits, history).ids
        history.append(ids)
        for row, token in enumerate(ids.tolist()):
            out[row].append(token)
    return out


def step_logits(key: int) -> Callable[[int], torch.Tensor]:
    def f(step: int) -> torch.Tensor:
        return make_logits(1, seed=key * 1000 + step, scale=1.0)[0]

    return f


SEEDED = SamplingParams(temperature=0.9, top_k=30, top_p=0.95, repetition_penalty=1.1, seed=987654321)


def test_seeded_row_is_independent_of_batch_mates_and_position() -> None:
    steps = 12
    alone = run_steps(
        Sampler([SEEDED], [0], CPU), make_history([[1, 2, 3]], reserve=steps), [step_logits(0)], steps
    )[0]
    assert len(set(alone)) > 3  # it does sample
    mates = [
        SamplingParams(),
        SamplingParams(do_sample=True, seed=1),
        SamplingParams(temperature=0.3, top_p=0.5, seed=2),
        SamplingParams(typical_p=0.5, frequency_penalty=1.0, seed=3),
    ]
    for position in range(len(mates) + 1):
        params = [*mates[:position], SEEDED, *mates[position:]]
        funcs = [step_logits(10 + i) for i in range(position)] + [step_logits(0)]
        funcs += [step_logits(20 + i) for i in range(len(mates) - position)]
        prompts = [[5, 6]] * position + [[1, 2, 3]] + [[7]] * (len(mates) - position)
        got = run_steps(
            Sampler(params, [0] * len(params), CPU), make_history(prompts, reserve=steps), funcs, steps
        )
        assert got[position] == alone, f"position {position}"


def test_seeded_row_survives_select_and_concatenate() -> None:
    """Filtering batch-mates out and concatenating newcomers keeps the row's step counter and tokens."""
    steps = 10
    alone = run_steps(
        Sampler([SEEDED], [0], CPU), make_history([[1, 2, 3]], reserve=1), [step_logits(0)], steps
    )[0]

    sampler = Sampler([SamplingParams(do_sample=True, seed=5), SEEDED], [0, 0], CPU)
    history = make_history([[9, 9], [1, 2, 3]], reserve=1)
    first = run_steps(sampler, history, [step_logits(50), step_logits(0)], 4)[1]
    # Drop row 0.
    sampler = sampler.select([1])
    history = history.select(torch.tensor([1]))
    assert sampler.steps.tolist() == [4]
    second = run_steps(sampler, history, [step_logits(0)], 3)[0]
    # A newcomer joins in front.
    newcomer = Sampler([SamplingParams(temperature=0.5, seed=77)], [0], CPU)
    sampler = Sampler.concatenate([newcomer, sampler])
    history = TokenHistory.concatenate([make_history([[4, 4, 4, 4, 4, 4, 4, 4, 4]]), history])
    assert sampler.steps.tolist() == [0, 7]

    def front(step: int) -> torch.Tensor:
        return make_logits(1, seed=999, scale=1.0)[0]

    out: list[int] = []
    for _ in range(steps - 7):
        own_step = int(sampler.steps[1])
        logits = torch.stack([front(0), step_logits(0)(own_step)])
        ids = sampler.choose(logits, history).ids
        history.append(ids)
        out.append(int(ids[1]))
    assert first + second + out == alone


def test_same_seed_same_tokens_different_seeds_differ() -> None:
    steps = 16
    params = [
        SamplingParams(do_sample=True, seed=1),
        SamplingParams(do_sample=True, seed=2),
        SamplingParams(do_sample=True, seed=1),
        SamplingParams(do_sample=True, seed=1 + 2**32),  # only the high word differs
        SamplingParams(do_sample=True, seed=2**64 - 1),
    ]
    flat = [lambda step: torch.zeros(VOCAB)] * len(params)
    rows = run_steps(
        Sampler(params, [0] * len(params), CPU), make_history([[0]] * len(params), reserve=steps), flat, steps
    )
    assert rows[0] == rows[2]
    assert rows[0] != rows[1]
    assert rows[0] != rows[3]
    assert rows[4] != rows[0]
    assert all(0 <= t < VOCAB for row in rows for t in row)
    # Successive steps of one row are not stuck on one token.
    assert len(set(rows[0])) > 8


# --------------------------------------------------------------------------------------------- frequencies


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = float(counts.sum())
    expected = probs.double() * n
    keep = expected > 0
    assert float(counts[~keep].sum()) == 0, "a token with zero probability was drawn"
    return float(((counts[keep].double() - expected[keep]) ** 2 / expected[keep]).sum())


def test_draws_across_seeds_follow_distribution() -> None:
    vocab, n = 6, 6000
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, -1.0, 0.2]]).repeat(n, 1)
    params = [SamplingParams(do_sample=True, seed=s) for s in range(n)]
    choice = choose(params, logits, make_history([[0]] * n), top_n=0)
    counts = torch.bincount(choice.ids, minlength=vocab)
    # df = 5; 30 is far in the tail (p ~ 1e-5) and the draws are deterministic anyway.
    assert chi_square(counts, torch.softmax(logits[0], -1)) < 30


def test_draws_across_steps_follow_warped_distribution() -> None:
    vocab, steps = 8, 3000
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.7, 0.3, 0.0, -1.0, -2.0]])
    params = SamplingParams(temperature=1.5, top_k=5, seed=2024)
    sampler = Sampler([params], [0], CPU)
    history = make_history([[0]], reserve=1)
    counts = torch.zeros(vocab, dtype=torch.long)
    for _ in range(steps):
        token = int(sampler.choose(logits, history).ids[0])
        counts[token] += 1
    warped = torch.softmax(TopKLogitsWarper(5)(None, logits / 1.5), -1)[0]
    assert int(counts[5:].sum()) == 0
    assert chi_square(counts, warped) < 30
    assert sampler.steps.tolist() == [steps]


def test_draws_follow_top_p_distribution() -> None:
    vocab, n = 10, 5000
    logits = torch.linspace(2.0, -2.0, vocab).unsqueeze(0).repeat(n, 1)
    params = [SamplingParams(top_p=0.7, seed=10**12 + s) for s in range(n)]
    choice = choose(params, logits, make_history([[0]] * n), top_n=0)
    counts = torch.bincount(choice.ids, minlength=vocab)
    warped = torch.softmax(TopPLogitsWarper(0.7)(None, logits[:1].clone()), -1)[0]
    assert chi_square(counts, warped) < 30


# --------------------------------------------------------------------------------------------- choice shape


def test_logprobs_are_log_softmax_of_processed_scores() -> None:
    logits = make_logits(len(PARAMS), seed=13)
    history = make_history([PROMPT] * len(PARAMS), [GENERATED] * len(PARAMS))
    choice = choose(list(PARAMS.values()), logits, history)
    full = full_logprobs(choice, VOCAB)
    torch.testing.assert_close(full.exp().sum(-1), torch.ones(len(PARAMS)), atol=1e-5, rtol=0)
    torch.testing.assert_close(choice.logprobs, full.gather(1, choice.ids.unsqueeze(1)).squeeze(1))
    assert bool(torch.isfinite(choice.logprobs).all())
    assert bool((choice.logprobs <= 0).all())


def test_top_n_sorted_and_led_by_greedy_token() -> None:
    params = [SamplingParams(), SamplingParams(temperature=2.0, seed=4), SamplingParams(top_k=3, seed=5)]
    logits = make_logits(3, seed=14)
    history = make_history([[0]] * 3)
    sampler = Sampler(params, [2, 5, 0], CPU)
    choice = sampler.choose(logits, history)
    assert choice.top_ids.shape == (3, 5)  # width is the largest top_n
    assert choice.top_logprobs.shape == (3, 5)
    assert bool((choice.top_logprobs[:, :-1] >= choice.top_logprobs[:, 1:]).all())
    # The first alternative is the argmax of the processed scores (the greedy token).
    assert torch.equal(choice.top_ids[:, 0].long(), logits.argmax(-1))
    assert int(choice.ids[0]) == int(choice.top_ids[0, 0])
    # The chosen token's logprob appears among the alternatives when it is in them.
    for row in range(3):
        ids = choice.top_ids[row].long().tolist()
        if int(choice.ids[row]) in ids:
            k = ids.index(int(choice.ids[row]))
            assert float(choice.top_logprobs[row, k]) == pytest.approx(float(choice.logprobs[row]))
    # top_k=3: beyond the third alternative nothing is possible.
    assert bool(torch.isneginf(choice.top_logprobs[2, 3:]).all())


def test_no_top_n_gives_empty_alternatives() -> None:
    choice = choose([SamplingParams()] * 2, make_logits(2), make_history([[0]] * 2), top_n=0)
    assert choice.top_ids.shape == (2, 0)
    assert choice.top_logprobs.shape == (2, 0)
    assert choice.ids.shape == (2,) and choice.logprobs.shape == (2,)


# --------------------------------------------------------------------------------------------- select / concat


def test_sampler_select_keeps_rows_aligned() -> None:
    params = [
        SamplingParams(temperature=0.5, seed=1),
        SamplingParams(top_k=3, seed=2),
        SamplingParams(top_p=0.5, repetition_penalty=1.3, seed=3),
        SamplingParams(),
    ]
    sampler = Sampler(params, [1, 2, 3, 4], CPU)
    sampler.steps = torch.tensor([5, 6, 7, 8])
    picked = sampler.select([2, 0])
    assert picked.params == [params[2], params[0]]
    assert picked.top_n == [3, 1]
    assert picked.steps.tolist() == [7, 5]
    assert picked.temperature.tolist() == pytest.approx([1.0, 0.5])
    assert picked.top_k.tolist() == [0, 0]
    assert picked.top_p.tolist() == pytest.approx([0.5, 1.0])
    assert picked.seed_lo.tolist() == [3, 1]
    assert picked.max_top_n == 3
    assert not picked.any_top_k and picked.any_top_p and picked.any_repetition
    empty = sampler.select([])
    assert empty.params == [] and empty.steps.tolist() == []


def test_sampler_select_and_concatenate_choose_like_the_original() -> None:
    names = list(PARAMS)
    params = [PARAMS[n] for n in names]
    logits = make_logits(len(names), seed=15)
    prompts = [[row % VOCAB, (row * 7) % VOCAB] for row in range(len(names))]
    history = make_history(prompts, [[row % 5, 3] for row in range(len(names))])

    def fresh() -> Sampler:
        s = Sampler(params, [VOCAB] * len(params), CPU)
        s.steps = torch.arange(len(params)) * 3
        return s

    reference = fresh().choose(logits, history)
    order = [5, 0, 13, 2]
    picked = fresh().select(order).choose(logits[order], history.select(torch.tensor(order)))
    assert picked.ids.tolist() == reference.ids[order].tolist()
    torch.testing.assert_close(picked.top_logprobs, reference.top_logprobs[order])

    a, b = fresh().select(list(range(0, 7))), fresh().select(list(range(7, len(params))))
    merged = Sampler.concatenate([a, b])
    assert merged.params == params
    assert merged.steps.tolist() == (torch.arange(len(params)) * 3).tolist()
    again = merged.choose(
        logits,
        TokenHistory.concatenate(
            [history.select(torch.arange(0, 7)), history.select(torch.arange(7, len(params)))]
        ),
    )
    assert again.ids.tolist() == reference.ids.tolist()
    torch.testing.assert_close(again.top_logprobs, reference.top_logprobs)
    assert merged.steps.tolist() == (torch.arange(len(params)) * 3 + 1).tolist()


# --------------------------------------------------------------------------------------------- history


def test_history_from_prompts_and_append_grows() -> None:
    history = TokenHistory.from_prompts([[1, 2, 3], [4]], [2, 2], CPU)
    assert history.ids.shape == (2, 5)
    assert history.lengths.tolist() == [3, 1]
    assert history.prompt_lengths.tolist() == [3, 1]
    assert history.ids[0, :3].tolist() == [1, 2, 3] and history.ids[1, :1].tolist() == [4]
    for step in range(20):  # well past the reserve
        history.append(torch.tensor([10 + step, 30 + step]))
    assert history.lengths.tolist() == [23, 21]
    assert history.prompt_lengths.tolist() == [3, 1]
    assert history.ids.shape[1] >= 23
    assert history.ids[0, :23].tolist() == [1, 2, 3] + [10 + s for s in range(20)]
    assert history.ids[1, :21].tolist() == [4] + [30 + s for s in range(20)]


def test_history_from_empty_prompt_list_entry() -> None:
    history = TokenHistory.from_prompts([[]], [0], CPU)
    assert history.ids.shape == (1, 1)
    assert history.lengths.tolist() == [0]
    history.append(torch.tensor([7]))
    assert history.ids[0, :1].tolist() == [7] and history.lengths.tolist() == [1]


def test_history_select_and_concatenate() -> None:
    history = make_history([[1, 2, 3, 4, 5, 6], [7], [8, 9]], [[11, 12], [13, 14], [15, 16]])
    picked = history.select(torch.tensor([2, 1]))
    assert picked.lengths.tolist() == [4, 3]
    assert picked.prompt_lengths.tolist() == [2, 1]
    assert picked.ids.shape[1] == 4  # trimmed to the longest kept row
    assert picked.ids[0, :4].tolist() == [8, 9, 15, 16]
    assert picked.ids[1, :3].tolist() == [7, 13, 14]
    picked.append(torch.tensor([20, 21]))  # grows after the trim
    assert picked.ids[0, :5].tolist() == [8, 9, 15, 16, 20]
    assert picked.ids[1, :4].tolist() == [7, 13, 14, 21]
    assert history.lengths.tolist() == [8, 3, 4]  # the original is untouched

    merged = TokenHistory.concatenate([picked, history.select(torch.tensor([0]))])
    assert merged.lengths.tolist() == [5, 4, 8]
    assert merged.prompt_lengths.tolist() == [2, 1, 6]
    assert merged.ids.shape[1] >= 8
    assert merged.ids[2, :8].tolist() == [1, 2, 3, 4, 5, 6, 11, 12]
    assert merged.ids[0, :5].tolist() == [8, 9, 15, 16, 20]
    merged.append(torch.tensor([1, 2, 3]))
    assert merged.lengths.tolist() == [6, 5, 9]
    assert merged.ids[2, 8] == 3


def test_history_select_empty() -> None:
    history = make_history([[1, 2]])
    empty = history.select(torch.tensor([], dtype=torch.long))
    assert empty.ids.shape[0] == 0 and empty.lengths.tolist() == []
