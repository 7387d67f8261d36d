"""The router's tokenizer: a fast Hugging Face tokenizer loaded from the model directory."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path


class Tokenizer:
    """Thread-safe encode/decode plus the token facts the API reports (special ids, token strings)."""

    def __init__(self, name_or_path: str | Path, revision: str | None = None) -> None:
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(str(name_or_path), revision=revision)
        # The Rust tokenizer behind a fast tokenizer decodes without transformers' per-call Python work.
        self._rust = getattr(self.hf, "backend_tokenizer", None)
        self.special_ids = frozenset(int(i) for i in self.hf.all_special_ids)
        self.eos_token_id = self.hf.eos_token_id
        # token id -> piece() (filled as tokens are seen); None for every token when the decoder is not
        # plain byte-level.
        self._pieces: dict[int, str | None] = {}
        decoder = getattr(self._rust, "decoder", None)
        self._byte_level = decoder is not None and type(decoder).__name__ == "ByteLevel"
        self._added_ids = frozenset(int(i) for i in getattr(self.hf, "added_tokens_decoder", {}))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self._rust is not None:  # the same ids, without transformers' per-call Python work
            return self._rust.encode(text, add_special_tokens=add_special_tokens).ids
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = False, **kwargs: object) -> str:
        """Text of ``ids``, without transformers' clean-up of spaces (so pieces concatenate exactly)."""
        if self._rust is not None and not kwargs.get("clean_up_tokenization_spaces"):
            return self._rust.decode(ids, skip_special_tokens=skip_special_tokens)
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        return _text(self.hf.decode(ids, skip_special_tokens=skip_special_tokens, **kwargs))

    def decode_batch(self, sequences: list[list[int]]) -> list[str]:
        """Many ``decode`` calls in one (the Rust tokenizer decodes them in parallel, outside the GIL)."""
        if self._rust is not None:
            return self._rust.decode_batch(sequences, skip_special_tokens=False)
        return [self.decode(ids) for ids in sequences]

    def piece(self, token_id: int) -> str | None:
        """The text this token adds after any text that ends on a character boundary, when that is
        simply its own bytes: a byte-level BPE vocabulary token whose bytes are complete UTF-8. None
        otherwise (added and special tokens, partial characters, other decoders): decode in context.

        It lets incremental detokenization skip decoding for almost every generated token."""
        try:
            return self._pieces[token_id]
        except KeyError:
            pass
        text = None
        if self._byte_level and token_id not in self._added_ids:
            piece = self.hf.convert_ids_to_tokens(token_id)
            byte_decoder = self._byte_decoder
            if isinstance(piece, str) and piece and byte_decoder and all(ch in byte_decoder for ch in piece):
                with contextlib.suppress(UnicodeDecodeError):
                    text = bytes(byte_decoder[ch] for ch in piece).decode("utf-8")
        if len(self._pieces) < 1 << 20:  # a bound far above any vocabulary
            self._pieces[token_id] = text
        return text

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one tokenizer per process, bounded cache
    def token_text(self, token_id: int) -> str:
        """A single token decoded on its own (TGI's text for prefill and top tokens)."""
        return _text(
            self.hf.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        )

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_ids

    @functools.lru_cache(maxsize=65536)  # noqa: B019
    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for, even when they are only part of a UTF-8 character
        (byte-level BPE pieces and SentencePiece ``<0xNN>`` byte tokens); else its text as UTF-8."""
        piece = self.hf.convert_ids_to_tokens(token_id)
        if isinstance(piece, str):
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                with contextlib.suppress(ValueError):
                    return bytes([int(piece[3:5], 16)])
            if self._byte_decoder is not None and all(ch in self._byte_decoder for ch in piece):
                return bytes(self._byte_decoder[ch] for ch in piece)
        return self.token_text(token_id).encode()

    @functools.cached_property
    def _byte_decoder(self) -> dict[str, int] | None:
        """GPT-2's printable-character alphabet for bytes, when the tokenizer decodes byte-level."""
        decoder = getattr(getattr(self.hf, "backend_tokenizer", None), "decoder", None)
        if decoder is None or "ByteLevel" not in type(decoder).__name__ + repr(decoder):
            return None
        return byte_level_alphabet()


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character that stands for each byte -> the byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, codes, strict=True)}


def _text(decoded: str | list[str]) -> str:
    """transformers' ``decode`` of one sequence: a string (its signature also covers batches)."""
    if not isinstance(decoded, str):
        raise TypeError(f"the tokenizer decoded one sequence into {type(decoded).__name__}")
    return decoded
