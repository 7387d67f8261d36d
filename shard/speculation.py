"""Speculative decoding by n-gram prompt lookup: draft tokens copied from the text so far, verified by
the model in one step.

A running sequence whose last tokens occurred earlier in its prompt or output (an edit, a summary that
quotes, code that repeats a name) is likely to go on as it went on then. ``NgramIndex`` finds the latest
earlier occurrence of its last ``n`` tokens (longest ``n`` first) and proposes the tokens that followed.
The paged engine feeds the row's next token and its drafts in one step, with logits at every position,
and ``accept`` then picks tokens position by position exactly as plain decoding would (the same
processors, the same seeded draw for the same step), stopping at the first position whose pick differs
from the draft. Every token it emits is what decoding without speculation picks from the same logits,
so greedy output is unchanged and sampled output keeps its exact distribution (a seeded request its
exact tokens); a drafted token is accepted with the probability the model gives it.

Whether drafting pays is decided per step from what steps cost (``StepCosts``): a drafted token costs
about what one prompt token adds to a step, and saves a whole step for its row when accepted. With many
rows a step's cost is spread over all of them, so drafting turns itself off at large batches, and for
rows whose drafts are rarely accepted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .sampling import Choice, Sampler, TokenHistory

# Lengths of the suffix looked up, longest first: one-token matches guess too badly to pay.
NGRAM_MAX = 4
NGRAM_MIN = 2
# A row's acceptance estimate before it has drafted (optimistic: drafting is how it learns), and how fast
# the estimate follows each step's outcome.
PRIOR_ACCEPTANCE = 0.5
ACCEPTANCE_EWMA = 0.3
# How fast a row that stopped drafting drifts back towards the prior (per step): ~30 steps to half way.
RECOVERY = 0.02


class NgramIndex:
    """A sequence's tokens and, for each n-gram of ``NGRAM_MIN``..``NGRAM_MAX`` tokens, where it last
    ended (kept up to date as tokens are added: a lookup is one dictionary read per length)."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens: list[int] = []
        self._ends: dict[tuple[int, ...], int] = {}
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            self.tokens.append(token)
            end = len(self.tokens)
            # Index the n-grams that end just before the new token: the one ending at the new token must
            # not be found by the lookup of the suffix it is (its continuation is not known yet).
            for n in range(NGRAM_MIN, NGRAM_MAX + 1):
                if end - 1 >= n:
                    self._ends[tuple(self.tokens[end - 1 - n : end - 1])] = end - 1

    def propose(self, k: int) -> list[int]:
        """Up to ``k`` tokens that followed the latest earlier occurrence of the longest suffix found."""
        tokens = self.tokens
        for n in range(NGRAM_MAX, NGRAM_MIN - 1, -1):
            if len(tokens) <= n:
                continue
            end = self._ends.get(tuple(tokens[-n:]))
            if end is not None:
                return tokens[end : min(end + k, len(tokens))]
        return []


@dataclass
class Acceptance:
    """One row's estimate of the share of its drafted tokens that get accepted."""

    rate: float = PRIOR_ACCEPTANCE

    def observe(self, drafted: int, accepted: int) -> None:
        if drafted:
            self.rate = (1 - ACCEPTANCE_EWMA) * self.rate + ACCEPTANCE_EWMA * accepted / drafted

    def rest(self) -> None:
        """A step without drafting for want of acceptance: the estimate drifts back towards the prior, so
        a row whose text turns repetitive later tries again."""
        self.rate += RECOVERY * (PRIOR_ACCEPTANCE - self.rate)


def pays(acceptance: float, rows: int, step_tokens: int) -> bool:
    """Whether drafting pays for a row of a batch of ``rows``: an accepted draft saves the row a step,
    whose cost per row is ``step_tokens / rows`` prompt tokens' worth (``StepCosts.step_tokens``: the
    prompt tokens that cost what the step's decodes do); each drafted token costs one."""
    return step_tokens > 0 and acceptance * step_tokens > rows


@dataclass
class Verified:
    """What verification emitted: per batch row, its tokens in order (the accepted drafts, then the
    model's own pick), with their log-probabilities and top alternatives, and how many drafts it took."""

    ids: list[list[int]] = field(default_factory=list)
    logprobs: list[list[float]] = field(default_factory=list)
    top_ids: list[list[list[int]]] = field(default_factory=list)
    top_logprobs: list[list[list[float]]] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)


def accept(
    sampler: Sampler, history: TokenHistory, logits: list[torch.Tensor], drafts: list[list[int]]
) -> Verified:
    """Picks each row's tokens from its logits ``[1 + len(drafts[row]), vocab]``, position by position,
    as plain decoding would (``sampler.choose``, which advances the row's step and processor states, and
    ``history``), until a pick differs from the row's draft or the drafts run out.

    Position 0 is every row's ordinary decode; later positions run only for the rows still matching."""
    rows = len(drafts)
    out = Verified(
        [[] for _ in range(rows)], [[] for _ in range(rows)], [[] for _ in range(rows)],
        [[] for _ in range(rows)], [0] * rows,
    )  # fmt: skip
    first = torch.cat([row_logits[:1] for row_logits in logits])
    choice = sampler.choose(first, history)
    history.append(choice.ids)
    alive = _record(out, list(range(rows)), choice, drafts, 0)
    position = 1
    while alive:
        index = torch.tensor(alive, dtype=torch.long, device=sampler.device)
        sub_sampler = sampler.select(alive)
        sub_history = history.select(index)
        choice = sub_sampler.choose(torch.cat([logits[row][position : position + 1] for row in alive]),
                                    sub_history)  # fmt: skip
        sampler.steps[index] = sub_sampler.steps
        history.append_rows(index, choice.ids)
        for row in alive:
            out.accepted[row] += 1
        alive = _record(out, alive, choice, drafts, position)
        position += 1
    return out


def _record(
    out: Verified, rows: list[int], choice: Choice, drafts: list[list[int]], position: int
) -> list[int]:
    """Appends ``choice`` (one pick per row of ``rows``) to the rows' output; returns the rows whose
    pick equals their draft at ``position``: the model saw that token, so their logits at the next
    position are theirs, and they go on."""
    ids = choice.ids.tolist()
    logprobs = choice.logprobs.tolist()
    top_ids = choice.top_ids.tolist()
    top_logprobs = choice.top_logprobs.tolist()
    alive = []
    for i, row in enumerate(rows):
        out.ids[row].append(ids[i])
        out.logprobs[row].append(logprobs[i])
        out.top_ids[row].append(top_ids[i])
        out.top_logprobs[row].append(top_logprobs[i])
        draft = drafts[row]
        if position < len(draft) and ids[i] == draft[position]:
            alive.append(row)
    return alive
