"""The paged backend: the paged runner (shard/paged/, its architectures in shard/paged/arch/) behind the
Backend protocol.

A batch's state is just its list of sequences: joining batches concatenates lists, leaving drops list
entries and returns their blocks to the pool. Nobody's KV cache is copied, and no token is padded.
A prompt whose leading blocks are in the prefix cache runs only its remaining tokens.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from common.lora import adapter_sources

from ..config import ConfigError, ShardConfig
from ..dist import Parallel
from ..dtypes import DTYPES, default_dtype
from ..paged.arch import model_spec
from ..paged.attention import PrefillChunk, StepMeta, decode_meta
from ..paged.graphs import DEFAULT_BATCH_SIZES, DecodeGraphs
from ..paged.kv_cache import PagedKVCache, Sequence
from ..paged.layers import LONG_ROPE_SALT, rotates_long
from ..paged.lora import Adapter, AdapterError, AdapterNotLoaded, LoraStep, Resident, Stacks, load_adapter
from ..paged.model import PagedModel, Weights, quantize_model, use_cpu_kernels
from .base import BackendInfo, PrefillOutput

log = logging.getLogger(__name__)

BLOCK_SIZE = 16
# KV memory when the device cannot tell what is free: a share of the host's available memory, capped.
CPU_KV_SHARE = 0.2
CPU_KV_CAP_BYTES = 2 * 2**30
CUDA_KV_SHARE = 0.85
# More tokens than any batch could hold (128 requests x 2,048 tokens): a small model's pool stops here.
MAX_POOL_TOKENS = 2**18


@dataclass
class PagedState:
    seqs: list[Sequence]


@dataclass
class Chunk:
    """The next ``length`` tokens of ``seq`` to run in a step (``want_all``: every row's logits). A prompt's,
    or a running sequence's next token and its drafts (``seal`` False: the drafts the model does not
    accept are cut off after the step, so none of their blocks may enter the prefix cache)."""

    seq: Sequence
    length: int
    want_all: bool = False
    seal: bool = True


def open_sequence(
    cache: PagedKVCache, tokens: list[int], use_prefix_cache: bool, salt: str, long_rope_from: int | None
) -> Sequence:
    """``cache.open`` for a sequence that runs ``tokens`` (a prompt, or every token a preempted request had
    fed). Under LongRoPE (``long_rope_from``: the switch) more tokens than the switch rotate long
    throughout (``Sequence.long_rope``), as transformers' cache holds them, and their blocks are cached
    apart from those of the same tokens rotated short (the salt carries ``LONG_ROPE_SALT``)."""
    long = rotates_long(len(tokens), long_rope_from)
    seq = cache.open(tokens, use_prefix_cache, salt + LONG_ROPE_SALT if long else salt)
    seq.long_rope = long
    return seq


def kv_budget_bytes(
    device: torch.device, world_size: int = 1, memory_fraction: float = 1.0, sized: bool = False
) -> int:
    """Bytes for the KV pool: most of the free GPU memory within ``memory_fraction`` of the device's
    (--cuda-memory-fraction), or a share of the host's available memory. ``sized``: the most a pool of a
    given size (--max-batch-total-tokens) may take: on the CPU, all of the host's available memory."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        # What this process may still take: free memory, within its fraction of the whole device.
        usable = min(free, int(total * memory_fraction) - torch.cuda.memory_reserved(device))
        return max(int(usable * CUDA_KV_SHARE), 0)
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    # The ranks of a CPU server share the host's memory.
    return int(available if sized else min(available * CPU_KV_SHARE, CPU_KV_CAP_BYTES)) // world_size


class PagedBackend:
    """Implements ``shard.backends.base.Backend`` for the model types of shard/paged/arch/ (Llama, Mistral,
    Qwen2, Qwen3, Gemma 2, Gemma 3 text, Phi-3, Mixtral, Qwen2-MoE, Qwen3-MoE)."""

    def __init__(
        self,
        model_path: Path | str,
        device: torch.device,
        dtype: str | None = None,
        parallel: Parallel | None = None,
        kv_cache_bytes: int | None = None,
        block_size: int = BLOCK_SIZE,
        quantize: str | None = None,
        cpu_kernels: bool = True,
        cuda_graphs: tuple[int, ...] | None = None,
        kv_cache_tokens: int | None = None,
        memory_fraction: float = 1.0,
        lora_adapters: tuple[str, ...] = (),
        max_lora_rank: int | None = None,
        max_loras: int | None = None,
    ) -> None:
        """``cuda_graphs``: batch sizes whose decode steps run as CUDA graphs on a GPU with one rank
        (shard/paged/graphs.py); None for the default ladder, () for none.

        The KV pool holds ``kv_cache_tokens`` (--max-batch-total-tokens) rounded up to whole blocks, or
        raises ``ConfigError`` when more than the memory it may take (``kv_cache_bytes``, else what
        ``kv_budget_bytes`` allows); without it, as many tokens as ``kv_cache_bytes`` (else the budget)
        holds. ``memory_fraction``: --cuda-memory-fraction. ``lora_adapters``: ``name=directory`` entries
        (--lora-adapters, resolved to local directories), PEFT LoRA adapters a request may name
        (shard/paged/lora.py); ``AdapterError`` for one that cannot be loaded."""
        from transformers import AutoConfig, GenerationConfig

        self.device = device
        self.parallel = parallel or Parallel()
        torch_dtype = DTYPES[dtype] if dtype else default_dtype(device, model_path, quantize)
        path = Path(model_path)
        config = AutoConfig.from_pretrained(path)
        self.spec = spec = model_spec(config)
        self.model = PagedModel(config, spec, Weights(path, torch_dtype, device), self.parallel,
                                spec.max_position_embeddings)  # fmt: skip
        # LongRoPE's switch (``Rotary.long_from``; None without LongRoPE): see ``open_sequence``.
        self.long_rope_from = next(
            (r.long_from for r in self.model.rotaries.values() if r.long_from is not None), None
        )
        # int8 / int4 weights (their products round activations to int8), or None.
        self.quantize = quantize
        if quantize:
            quantize_model(self.model, quantize)
        if device.type == "cpu" and cpu_kernels:
            use_cpu_kernels(self.model, unquantized=not quantize)
        self.dtype, self.max_lora_rank = torch_dtype, max_lora_rank
        # --max-loras: every adapter's weights on the host, at most max_loras of them on the device at once.
        self.max_loras = max_loras
        self.resident = None if max_loras is None else Resident(max_loras, device)
        self.lora_stacks = Stacks()
        self.adapters = self._load_adapters(lora_adapters, torch_dtype, max_lora_rank)
        layer = self.model.decoder_layers[0]
        per_token = 2 * spec.num_layers * layer.num_kv_heads * spec.head_dim * torch_dtype.itemsize
        sized = kv_cache_tokens is not None
        budget = (
            kv_cache_bytes
            if kv_cache_bytes is not None
            else kv_budget_bytes(device, self.parallel.world_size, memory_fraction, sized)
        )
        if kv_cache_tokens is not None:
            if kv_cache_tokens < 1:
                raise ConfigError(f"`max_batch_total_tokens` must be > 0. Given: {kv_cache_tokens}")
            num_blocks = -(-kv_cache_tokens // block_size)
            if num_blocks * block_size * per_token > budget:
                fits = budget // per_token // block_size * block_size
                raise ConfigError(
                    f"`max_batch_total_tokens` ({kv_cache_tokens}) is more than the {fits} tokens the KV cache "
                    f"can hold on {device.type}: {kv_cache_tokens} tokens take "
                    f"{num_blocks * block_size * per_token / 2**30:.2f} GiB ({per_token} bytes each), and "
                    f"{budget / 2**30:.2f} GiB is free for it"
                )
        else:
            num_blocks = max(min(budget // per_token, MAX_POOL_TOKENS) // block_size, 1)
        # Every rank must evict and refuse alike: the pool is the smallest any rank can hold.
        num_blocks = self.parallel.agree(num_blocks)
        self.cache = PagedKVCache(spec.num_layers, num_blocks, block_size, layer.num_kv_heads, spec.head_dim,
                                  torch_dtype, device, spec.kv_window)  # fmt: skip
        self.graphs: DecodeGraphs | None = None
        if device.type == "cuda" and self.parallel.world_size == 1 and cuda_graphs != ():
            self.graphs = DecodeGraphs(self.model, self.cache, cuda_graphs or DEFAULT_BATCH_SIZES)
        try:
            eos = GenerationConfig.from_pretrained(path).eos_token_id
        except OSError:
            eos = None
        if eos is None:
            eos = getattr(config, "eos_token_id", None)
        eos_ids = (
            [] if eos is None else [int(e) for e in eos] if isinstance(eos, list | tuple) else [int(eos)]
        )
        self.info = BackendInfo(
            name="paged",
            dtype=str(torch_dtype).removeprefix("torch."),
            device_type=device.type,
            requires_padding=False,
            eos_token_ids=eos_ids,
            vocab_size=spec.vocab_size,
            max_position_embeddings=spec.max_position_embeddings,
            lora_adapters=tuple(self.adapters),
            max_loras=max_loras or 0,
        )
        log.info(
            "Paged KV cache: %d blocks of %d tokens (%d tokens, %.2f GiB)",
            num_blocks, block_size, self.cache.num_tokens, num_blocks * block_size * per_token / 2**30,
        )  # fmt: skip
        weight_bytes = self.model.weight_bytes()
        log.info(
            "Weights on rank %d/%d: %.1f MB", self.parallel.rank, self.parallel.world_size, weight_bytes / 1e6
        )

    def _load_adapters(
        self, entries: tuple[str, ...], dtype: torch.dtype, max_rank: int | None
    ) -> dict[str, Adapter]:
        """The adapters of ``entries`` (``name=directory``), by name; with several ranks, each rank's part
        (``load_adapter``)."""
        adapters = {
            s.name: load_adapter(
                s.name, Path(s.source), self.spec, dtype, self.adapter_home, self.parallel, max_rank
            )
            for s in adapter_sources(entries)
        }
        for adapter in adapters.values():
            log.info("LoRA adapter %s: rank %d, %s, %.1f MB", adapter.name, adapter.config.r,
                     ", ".join(sorted(adapter.config.targets)), adapter.nbytes() / 1e6)  # fmt: skip
        return adapters

    @property
    def adapter_home(self) -> torch.device:
        """Where adapters are loaded: the host under --max-loras (copied to the device when a step needs
        them), else the device."""
        return torch.device("cpu") if self.resident is not None else self.device

    def add_adapter(self, name: str, directory: Path) -> None:
        """Loads one more adapter (runtime updates); ``AdapterError`` for a name taken or bad files (nothing
        changes then)."""
        if name in self.adapters:
            raise AdapterError(f"adapter {name!r} is loaded already")
        adapter = load_adapter(
            name, directory, self.spec, self.dtype, self.adapter_home, self.parallel, self.max_lora_rank
        )
        self.adapters[name] = adapter
        self.info = replace(self.info, lora_adapters=tuple(self.adapters))

    def remove_adapter(self, name: str) -> None:
        """Unloads an adapter no live request uses (the caller checks): its weights are freed."""
        if name not in self.adapters:
            raise AdapterNotLoaded(f"adapter {name!r} is not loaded")
        del self.adapters[name]
        if self.resident is not None:
            self.resident.drop(name)
        self.info = replace(self.info, lora_adapters=tuple(self.adapters))

    # -- steps ------------------------------------------------------------------------------------
    def open(self, prompt: list[int], want_prompt_logits: bool, salt: str = "") -> Sequence:
        """A sequence for a prompt, with blocks for all of it; a cached prefix is already computed. Only
        blocks cached under the same ``salt`` (the request's cache_salt) are shared."""
        seq = open_sequence(self.cache, prompt, not want_prompt_logits, salt, self.long_rope_from)
        try:
            self.cache.reserve(seq, len(prompt))
        except BaseException:
            self.cache.release(seq)
            raise
        return seq

    def prefill(self, prompts: list[list[int]], want_prompt_logits: list[bool]) -> PrefillOutput:
        seqs: list[Sequence] = []
        try:
            for prompt, want in zip(prompts, want_prompt_logits, strict=True):
                seqs.append(self.open(prompt, want))
            chunks = [
                Chunk(seq, len(seq.tokens) - seq.computed, want)
                for seq, want in zip(seqs, want_prompt_logits, strict=True)
            ]
            _, logits = self.step(None, None, chunks)
        except BaseException:
            for seq in seqs:
                self.cache.release(seq)
            raise
        return PrefillOutput(
            PagedState(seqs),
            torch.stack([rows[-1] for rows in logits]),
            [rows if want else None for rows, want in zip(logits, want_prompt_logits, strict=True)],
        )

    def decode(self, state: PagedState, input_ids: torch.Tensor) -> torch.Tensor:
        logits, _ = self.step(state, input_ids, [])
        if logits is None:
            raise ValueError("decode needs a running batch")
        return logits

    def step(
        self, state: PagedState | None, input_ids: torch.Tensor | None, chunks: list[Chunk]
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """One forward over the running sequences' next tokens and the given prompt chunks together.

        Returns the decode logits [rows, vocab] (None without a running batch) and, per chunk, its logits:
        every chunk row when it asked for prompt logits, else its last row only once the prompt is
        complete (an empty tensor while it is not)."""
        seqs = state.seqs if state is not None else []
        if seqs and input_ids is not None and self.long_rope_from is not None:
            switch = self.long_rope_from
            switching = [r for r, s in enumerate(seqs) if not s.long_rope and len(s.tokens) >= switch]
            if switching:
                return self._switch_long_rope(seqs, input_ids, chunks, switching)
        bs = self.cache.block_size
        dev = self.device
        meta = StepMeta(torch.empty(0, dtype=torch.long), len(seqs), [], bs)
        parts_ids: list[torch.Tensor] = []
        parts_pos: list[torch.Tensor] = []
        parts_write: list[torch.Tensor] = []
        logit_rows: list[int] = list(range(len(seqs)))
        if seqs:
            if input_ids is None:
                raise ValueError("the running sequences' next tokens are missing")
            for seq, token in zip(seqs, input_ids.tolist(), strict=True):
                seq.tokens.append(token)
                self.cache.reserve(seq, len(seq.tokens))
            lengths = [len(s.tokens) for s in seqs]
            longest = max(lengths)
            width = -(-longest // bs)
            null = self.cache.null_block
            # A decode-only step: a CUDA graph, if one fits (steps with adapters' rows run eagerly). Its
            # tables start at position 0 (blocks a window passed are the null block there, masked).
            if not chunks and self.graphs is not None and not any(s.adapter for s in seqs):
                table = [(s.blocks + [null] * width)[:width] for s in seqs]
                logits = self.graphs.run(input_ids, table, lengths)
                if logits is not None:
                    self._advance(seqs, [])
                    return logits, []
            # Each row's table from its first kept block (sliding windows: ``PagedKVCache.slide``).
            drops = [s.dropped for s in seqs]
            width = max(-(-n // bs) - d for n, d in zip(lengths, drops, strict=True))
            table = [(s.blocks[d:] + [null] * width)[:width] for s, d in zip(seqs, drops, strict=True)]
            span = max(n - d * bs for n, d in zip(lengths, drops, strict=True))
            positions, meta = decode_meta(
                torch.tensor(table, device=dev),
                torch.tensor(lengths, device=dev),
                bs,
                None if self.model.fused else span,
                torch.tensor(drops, device=dev) * bs if any(drops) else None,
            )
            parts_ids.append(input_ids.to(dev))
            parts_pos.append(positions)
            parts_write.append(meta.write_slots)
        row = len(seqs)
        spans: list[tuple[int, int]] = []
        for chunk in chunks:
            seq = chunk.seq
            start, end = seq.computed, seq.computed + chunk.length
            parts_ids.append(torch.tensor(seq.tokens[start:end], device=dev))
            parts_pos.append(torch.arange(start, end, device=dev))
            # Its context from its first kept block (positions in the mask count from there).
            kept = seq.dropped * bs
            context = torch.tensor(self.cache.slots(seq, kept, end), device=dev)
            parts_write.append(context[start - kept :])
            mask = None
            if start > kept:
                queries = torch.arange(start - kept, end - kept, device=dev).unsqueeze(1)
                mask = torch.arange(end - kept, device=dev).unsqueeze(0) <= queries
            meta.prefills.append(PrefillChunk(row, chunk.length, context, mask))
            first = len(logit_rows)
            if chunk.want_all:
                logit_rows.extend(range(row, row + chunk.length))
            elif end == len(seq.tokens):
                logit_rows.append(row + chunk.length - 1)
            spans.append((first, len(logit_rows)))
            row += chunk.length
        meta.write_slots = torch.cat(parts_write)
        long_rope = None
        if self.long_rope_from is not None:  # LongRoPE: which tokens rotate long throughout
            flags = [s.long_rope for s in seqs] + [f for c in chunks for f in [c.seq.long_rope] * c.length]
            long_rope = torch.tensor(flags, dtype=torch.bool, device=dev)
        if self.adapters:
            used = dict.fromkeys([*(s.adapter for s in seqs), *(c.seq.adapter for c in chunks)])
            step = [self.adapters[name] for name in used if name]
            live = {a.name: a for a in step} if self.resident is None else self.resident.use(step)
            runs = [(live.get(s.adapter), 1) for s in seqs]
            runs += [(live.get(c.seq.adapter), c.length) for c in chunks]
            meta.lora = LoraStep.of(runs, dev, self.lora_stacks)
        logits = self.model(
            torch.cat(parts_ids),
            torch.cat(parts_pos),
            meta,
            self.cache,
            torch.tensor(logit_rows, dtype=torch.long, device=dev),
            long_rope,
        )
        self._advance(seqs, chunks)
        decode_logits = logits[: len(seqs)] if seqs else None
        return decode_logits, [logits[a:b] for a, b in spans]

    def _switch_long_rope(
        self, seqs: list[Sequence], input_ids: torch.Tensor, chunks: list[Chunk], rows: list[int]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``step`` for a batch whose ``rows`` feed their first token past LongRoPE's switch: at that token
        transformers' ``generate`` drops a short sequence's cache and runs it whole with the long factors
        (``Phi3ForCausalLM.prepare_inputs_for_generation``), so every key and value it holds from then on
        is the long rotation's. So do these rows: each gives its blocks back, reopens long with its new
        token (sharing the long blocks of its prefix already cached) and runs whole as a chunk of this
        step, whose last row gives its decode logits."""
        ids = input_ids.tolist()
        for row in rows:
            seq = seqs[row]
            tokens = [*seq.tokens, ids[row]]
            self.cache.release(seq)
            fresh = open_sequence(self.cache, tokens, True, seq.salt, self.long_rope_from)
            fresh.adapter = seq.adapter
            for f in fields(Sequence):  # the same object: the engine's batch holds it
                setattr(seq, f.name, getattr(fresh, f.name))
            self.cache.reserve(seq, len(tokens))
        keep = [row for row in range(len(seqs)) if row not in rows]
        index = torch.tensor(keep, dtype=torch.long, device=input_ids.device)
        decode, logits = self.step(
            PagedState([seqs[row] for row in keep]) if keep else None,
            input_ids[index] if keep else None,
            [Chunk(seqs[row], len(seqs[row].tokens) - seqs[row].computed) for row in rows] + chunks,
        )
        out: dict[int, torch.Tensor] = {row: logits[i][-1] for i, row in enumerate(rows)}
        if decode is not None:
            out.update((row, decode[i]) for i, row in enumerate(keep))
        return torch.stack([out[row] for row in range(len(seqs))]), logits[len(rows) :]

    def draft_room(self, seq: Sequence) -> int:
        """The most draft tokens ``seq`` may feed after its next token. A short sequence under LongRoPE is
        run whole again at its first token past the switch (``_switch_long_rope``), which a step of drafts
        cannot do: its drafts stop before the switch."""
        if self.long_rope_from is None or seq.long_rope:
            return 1 << 30
        return max(self.long_rope_from - 1 - len(seq.tokens), 0)

    def _advance(self, seqs: list[Sequence], chunks: list[Chunk]) -> None:
        """After a step: its tokens' K/V are in the cache; full blocks are sealed (prefix caching)."""
        for seq in seqs:
            seq.computed += 1
            if seq.computed % self.cache.block_size == 0:
                self.cache.seal(seq)
        for chunk in chunks:
            chunk.seq.computed += chunk.length
            if chunk.seal:
                self.cache.seal(chunk.seq)

    # -- batch bookkeeping ------------------------------------------------------------------------
    def select(self, state: PagedState, index: torch.Tensor) -> PagedState:
        rows = index.tolist()
        counts = Counter(rows)
        for row, seq in enumerate(state.seqs):
            if row not in counts:
                self.cache.release(seq)
        seen: set[int] = set()
        out = []
        for row in rows:
            seq = state.seqs[row]
            out.append(seq if row not in seen else self.cache.fork(seq))
            seen.add(row)
        return PagedState(out)

    def concatenate(self, states: list[PagedState]) -> PagedState:
        return PagedState([seq for state in states for seq in state.seqs])

    def release(self, state: PagedState) -> None:
        for seq in state.seqs:
            self.cache.release(seq)

    def max_supported_total_tokens(self) -> int | None:
        return self.cache.num_tokens

    def stats(self) -> dict[str, int]:
        """The KV cache's size and use, and the prefix cache's lookups (proto CacheStats fields)."""
        a = self.cache.allocator
        return {
            "tokens_total": self.cache.num_tokens,
            "tokens_used": self.cache.tokens_in_use(),
            "prefix_queries": a.queries,
            "prefix_hits": a.hits,
            "lora_loads": 0 if self.resident is None else self.resident.loads,
            "lora_evictions": 0 if self.resident is None else self.resident.evictions,
        }


def load(config: ShardConfig, device: torch.device, parallel: Parallel) -> PagedBackend:
    """The ``paged`` entry point of ``text_generation.backends``."""
    quantize = config.quantize if config.quantize in ("int8", "int4") else None
    return PagedBackend(
        config.model_path, device, config.dtype, parallel, quantize=quantize,
        cuda_graphs=() if config.disable_custom_kernels else config.cuda_graphs,
        kv_cache_tokens=config.max_batch_total_tokens, memory_fraction=config.cuda_memory_fraction,
        lora_adapters=config.lora_adapters, max_lora_rank=config.max_lora_rank,
        max_loras=config.max_loras,
    )  # fmt: skip
