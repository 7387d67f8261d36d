"""Next-token choice for a whole batch at once, each row with its own parameters.

Order of the logits processors follows TGI and transformers: logit bias, end-of-sequence masking while a
row is under its ``min_tokens``, penalties (repetition, then OpenAI frequency and presence), the plugin
processors a row uses (shard/processors/: watermark, grammar, ...), temperature, top-k, top-p, min-p,
typical-p. A row samples when it asks for it (``do_sample``) or
sets any warper; otherwise it is greedy. Random draws come from a counter-based hash of (seed, step), so a
request with a seed produces the same tokens whatever else shares its batch, and no per-row generator
objects are needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .paged.kernels import kernels_loaded
from .processors import Processors, RowStates
from .types import SamplingParams

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2**32 for int64 tensors holding 32-bit values, without int64 overflow."""
    lo, hi = constant & 0xFFFF, constant >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with good avalanche (Wellons' lowbias32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform(seed_lo: torch.Tensor, seed_hi: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """One float64 uniform in [0, 1) per row, a pure function of the 64-bit seed and the step."""
    h = mix32(seed_lo ^ mix32(seed_hi ^ 0x9E3779B9))
    h1 = mix32(h ^ mix32(step & _MASK32))
    h2 = mix32(h1 ^ 0x85EBCA6B)
    return ((h1 >> 8).double() * float(1 << 24) + (h2 >> 8).double()) / float(1 << 48)


@dataclass
class Choice:
    """The chosen token of every row, its log-probability, and the top alternatives (width = max top_n)."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    top_ids: torch.Tensor
    top_logprobs: torch.Tensor


class TokenHistory:
    """Every row's tokens so far (prompt, then generated), right-padded, for the penalties."""

    def __init__(self, ids: torch.Tensor, lengths: torch.Tensor, prompt_lengths: torch.Tensor) -> None:
        self.ids = ids
        self.lengths = lengths
        self.prompt_lengths = prompt_lengths

    @classmethod
    def from_prompts(cls, prompts: list[list[int]], reserve: list[int], device: torch.device) -> TokenHistory:
        width = max(len(p) + r for p, r in zip(prompts, reserve, strict=True))
        ids = torch.zeros((len(prompts), max(width, 1)), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
        return cls(ids.to(device), lengths.to(device), lengths.clone().to(device))

    def append(self, new_ids: torch.Tensor) -> None:
        self.append_rows(torch.arange(self.ids.shape[0], device=self.ids.device), new_ids)

    def append_rows(self, rows: torch.Tensor, new_ids: torch.Tensor) -> None:
        """Appends ``new_ids[i]`` to row ``rows[i]`` (the other rows keep their length)."""
        if not len(rows):
            return
        if int(self.lengths[rows].max()) >= self.ids.shape[1]:
            grow = torch.zeros_like(self.ids[:, : max(16, self.ids.shape[1] // 2)])
            self.ids = torch.cat([self.ids, grow], dim=1)
        self.ids[rows, self.lengths[rows]] = new_ids
        self.lengths[rows] += 1

    def select(self, indices: torch.Tensor) -> TokenHistory:
        lengths = self.lengths[indices]
        width = max(int(lengths.max()), 1) if len(lengths) else 1
        return TokenHistory(self.ids[indices, :width], lengths, self.prompt_lengths[indices])

    @staticmethod
    def concatenate(histories: list[TokenHistory]) -> TokenHistory:
        width = max(h.ids.shape[1] for h in histories)
        ids = torch.cat([torch.nn.functional.pad(h.ids, (0, width - h.ids.shape[1])) for h in histories])
        return TokenHistory(
            ids,
            torch.cat([h.lengths for h in histories]),
            torch.cat([h.prompt_lengths for h in histories]),
        )


class Sampler:
    """The sampling parameters of a batch's rows as tensors; ``choose`` picks every row's next token."""

    def __init__(
        self,
        params: list[SamplingParams],
        top_n: list[int],
        device: torch.device,
        min_tokens: list[int] | None = None,
        end_ids: list[tuple[int, ...]] | None = None,
        processors: Processors | None = None,
        states: list[RowStates] | None = None,
    ) -> None:
        """``min_tokens[i]``: steps during which row i may not pick any of ``end_ids[i]``; ``states[i]``:
        row i's logits-processor states (``processors.new_states``)."""
        self.params = params
        self.top_n = top_n
        self.device = device
        self.min_tokens = min_tokens or [0] * len(params)
        self.end_ids = end_ids or [()] * len(params)
        self.processors = processors
        self.states = states or [{} for _ in params]
        self.steps = torch.zeros(len(params), dtype=torch.long, device=device)
        self._build()

    def _build(self) -> None:
        p, dev = self.params, self.device

        def col(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=dev)

        self.temperature = col([x.temperature for x in p], torch.float32)
        self.top_k = col([x.top_k for x in p], torch.long)
        self.top_p = col([x.top_p for x in p], torch.float32)
        self.typical_p = col([x.typical_p for x in p], torch.float32)
        self.repetition_penalty = col([x.repetition_penalty for x in p], torch.float32)
        self.frequency_penalty = col([x.frequency_penalty for x in p], torch.float32)
        self.presence_penalty = col([x.presence_penalty for x in p], torch.float32)
        self.sample = col([x.sampling for x in p], torch.bool)
        self.seed_lo = col([x.seed & _MASK32 for x in p], torch.long)
        self.seed_hi = col([(x.seed >> 32) & _MASK32 for x in p], torch.long)
        self.any_sample = any(x.sampling for x in p)
        self.any_temperature = any(x.temperature != 1.0 for x in p)
        self.any_top_k = any(x.top_k > 0 for x in p)
        self.any_top_p = any(x.top_p < 1.0 for x in p)
        self.any_typical = any(x.typical_p < 1.0 for x in p)
        self.any_repetition = any(x.repetition_penalty != 1.0 for x in p)
        self.any_frequency = any(x.frequency_penalty != 0.0 or x.presence_penalty != 0.0 for x in p)
        self.any_min_p = any(x.min_p > 0.0 for x in p)
        self.min_p = col([x.min_p for x in p], torch.float32)
        bias = [(row, token, value) for row, x in enumerate(p) for token, value in x.logit_bias]
        self.bias_rows = col([b[0] for b in bias], torch.long)
        self.bias_ids = col([b[1] for b in bias], torch.long)
        self.bias_values = col([b[2] for b in bias], torch.float32)
        self.any_min_tokens = any(self.min_tokens)
        if self.any_min_tokens:
            width = max(1, max(len(ids) for ids in self.end_ids))
            self.end_table = col([list(ids) + [-1] * (width - len(ids)) for ids in self.end_ids], torch.long)
            self.min_tokens_t = col(self.min_tokens, torch.long)
            self._minus_inf = torch.tensor(float("-inf"), device=dev)
        self.max_top_n = max(self.top_n, default=0)
        self.uses = self.processors.uses(self.states, dev) if self.processors else []

    def select(self, indices: list[int]) -> Sampler:
        out = Sampler(
            [self.params[i] for i in indices],
            [self.top_n[i] for i in indices],
            self.device,
            [self.min_tokens[i] for i in indices],
            [self.end_ids[i] for i in indices],
            self.processors,
            [self.states[i] for i in indices],
        )
        out.steps = self.steps[torch.tensor(indices, dtype=torch.long, device=self.device)]
        return out

    @staticmethod
    def concatenate(samplers: list[Sampler]) -> Sampler:
        out = Sampler(
            [p for s in samplers for p in s.params],
            [n for s in samplers for n in s.top_n],
            samplers[0].device,
            [m for s in samplers for m in s.min_tokens],
            [e for s in samplers for e in s.end_ids],
            next((s.processors for s in samplers if s.processors), None),
            [state for s in samplers for state in s.states],
        )
        out.steps = torch.cat([s.steps for s in samplers])
        return out

    def choose(self, logits: torch.Tensor, history: TokenHistory) -> Choice:
        """Processes ``logits`` [batch, vocab] and picks one token per row; advances every row's step."""
        scores = logits.float()
        if len(self.bias_rows):
            scores = scores.index_put((self.bias_rows, self.bias_ids), self.bias_values, accumulate=True)
        if self.any_min_tokens:
            scores = self._mask_end(scores)
        if self.any_repetition or self.any_frequency:
            scores = self._penalize(scores, history)
        if self.uses:
            last_ids = history.ids.gather(1, (history.lengths - 1).unsqueeze(1)).squeeze(1)
            scores = Processors.apply(self.uses, scores, self.states, last_ids)
        if self.any_temperature:
            scores = scores / self.temperature.unsqueeze(1)
        if self.any_top_k or self.any_top_p:
            scores = self._top_k_top_p(scores)
        if self.any_min_p:
            probs = scores.softmax(dim=-1)
            floor = self.min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
            scores = scores.masked_fill(probs < floor, float("-inf"))
        if self.any_typical:
            scores = self._typical(scores)
        if not self.any_sample and not self.max_top_n and scores.device.type == "cpu" and kernels_loaded():
            # All greedy, no alternatives asked: one kernel call instead of log_softmax + argmax + gather.
            ids, chosen = torch.ops.paged_step.greedy(scores.contiguous())
            top_logprobs = top_ids = scores.new_empty((scores.shape[0], 0))
        else:
            logprobs = torch.log_softmax(scores, dim=-1)
            ids = torch.argmax(scores, dim=-1)
            if self.any_sample:
                ids = torch.where(self.sample, self._draw(logprobs), ids)
            chosen = logprobs.gather(1, ids.unsqueeze(1)).squeeze(1)
            if self.max_top_n > 0:
                top_logprobs, top_ids = logprobs.topk(self.max_top_n, dim=-1)
            else:
                top_logprobs = top_ids = logprobs.new_empty((logprobs.shape[0], 0))
        if self.uses:
            Processors.advance(self.uses, self.states, ids.tolist())
        self.steps += 1
        return Choice(ids, chosen, top_ids, top_logprobs)

    def _mask_end(self, scores: torch.Tensor) -> torch.Tensor:
        """Rows still under their min_tokens cannot pick an end-of-sequence id: a copy of scores with -inf
        at those (row, id) pairs (one copy of the scores, where a mask as wide as them took four passes)."""
        active = (self.steps < self.min_tokens_t).unsqueeze(1) & (self.end_table >= 0)
        rows = torch.arange(active.shape[0], device=active.device).unsqueeze(1).expand_as(active)
        return scores.index_put((rows[active], self.end_table[active]), self._minus_inf)

    def _penalize(self, scores: torch.Tensor, history: TokenHistory) -> torch.Tensor:
        ids = history.ids
        columns = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        valid = columns < history.lengths.unsqueeze(1)
        if self.any_repetition:
            seen = torch.zeros_like(scores).scatter_add_(1, ids, valid.float()) > 0
            penalty = self.repetition_penalty.unsqueeze(1)
            penalized = torch.where(scores > 0, scores / penalty, scores * penalty)
            scores = torch.where(seen, penalized, scores)
        if self.any_frequency:
            generated = valid & (columns >= history.prompt_lengths.unsqueeze(1))
            counts = torch.zeros_like(scores).scatter_add_(1, ids, generated.float())
            scores = (
                scores
                - self.frequency_penalty.unsqueeze(1) * counts
                - self.presence_penalty.unsqueeze(1) * (counts > 0).float()
            )
        return scores

    def _top_k_top_p(self, scores: torch.Tensor) -> torch.Tensor:
        vocab = scores.shape[-1]
        sorted_scores, sorted_idx = scores.sort(dim=-1, descending=True)
        if self.any_top_k:
            rank = torch.arange(vocab, device=scores.device).unsqueeze(0)
            k = self.top_k.unsqueeze(1)
            sorted_scores = sorted_scores.masked_fill((k > 0) & (rank >= k), float("-inf"))
        if self.any_top_p:
            probs = sorted_scores.softmax(dim=-1)
            before = probs.cumsum(dim=-1) - probs
            cut = (before >= self.top_p.unsqueeze(1)) & (self.top_p < 1.0).unsqueeze(1)
            sorted_scores = sorted_scores.masked_fill(cut, float("-inf"))
        return torch.empty_like(scores).scatter_(1, sorted_idx, sorted_scores)

    def _typical(self, scores: torch.Tensor) -> torch.Tensor:
        """Locally typical sampling (Meister et al.), as transformers' TypicalLogitsWarper, per-row mass."""
        normalized = torch.log_softmax(scores, dim=-1)
        p = normalized.exp()
        entropy = -(normalized * p).nansum(-1, keepdim=True)
        shifted = (-normalized - entropy).abs()
        sorted_shifted, sorted_idx = shifted.sort(dim=-1)
        cumulative = scores.gather(-1, sorted_idx).softmax(dim=-1).cumsum(dim=-1)
        last = (cumulative < self.typical_p.unsqueeze(1)).sum(dim=1).clamp(max=scores.shape[-1] - 1)
        remove_sorted = sorted_shifted > sorted_shifted.gather(1, last.unsqueeze(1))
        remove_sorted[:, 0] = False
        remove_sorted &= (self.typical_p < 1.0).unsqueeze(1)
        remove = remove_sorted.scatter(1, sorted_idx, remove_sorted)
        return scores.masked_fill(remove, float("-inf"))

    def _draw(self, logprobs: torch.Tensor) -> torch.Tensor:
        """Inverse-CDF sampling with each row's own (seed, step) uniform."""
        cdf = logprobs.double().exp().cumsum(dim=-1)
        target = uniform(self.seed_lo, self.seed_hi, self.steps) * cdf[:, -1]
        ids = torch.searchsorted(cdf, target.unsqueeze(1), right=True).squeeze(1)
        return ids.clamp(max=logprobs.shape[-1] - 1)
