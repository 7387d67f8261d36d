"""Reasoning in generated text: the model's thinking apart from its answer.

A reasoning parser splits a response into ``reasoning`` (OpenAI-compatible servers return it as
``reasoning_content``) and ``content``:

- ``parser.parse(text, in_reasoning=...) -> ReasoningOutput(reasoning, content)`` for a whole response;
- ``stream = parser.stream(in_reasoning=...)``, ``stream.feed(delta) -> ReasoningOutput`` for each
  detokenized piece (split anywhere, inside a tag too) and ``stream.finish() -> ReasoningOutput``.

``in_reasoning`` says that the prompt already opened the reasoning, so the response starts inside it:
pass ``parser.prompt_opens_reasoning(prompt)`` (the rendered chat prompt). As with tool calls
(``router.toolcalls.base``), streaming equals whole-text parsing whatever the split (the pieces
concatenate to ``parse``'s fields), text that may be the start of a tag is held back until it is known,
and nothing raises on model output. Tool calls are parsed afterwards, from the content.

Formats:

- ``think`` (aliases ``deepseek_r1``, ``qwen3``): ``<think>reasoning</think>content``, as DeepSeek-R1,
  QwQ, Qwen3 and SmolLM3 emit. ``<think>`` opens reasoning only at the start of the response; with
  ``in_reasoning`` (templates that end the prompt with ``<think>``, e.g. DeepSeek-R1's) the response
  starts in it and only ``</think>`` comes. Reasoning still open when the text ends is all reasoning (a
  truncated thought); a response that does not start with ``<think>`` is all content. Whitespace right
  inside the tags and right after ``</think>`` is dropped.
- ``gpt_oss``: the harmony format of gpt-oss, ``<|channel|>analysis<|message|>...<|end|><|start|>assistant
  <|channel|>final<|message|>...<|return|>``. ``analysis`` messages are reasoning; the bodies of other
  messages are content, their headers and end tokens dropped, except messages addressed to a recipient
  (``to=functions.get_weather`` ... ``<|call|>``, tool calls), which pass through verbatim as content for a
  tool-call parser. The text must be detokenized with special tokens kept.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from common.plugins import NamedPlugins

from .toolcalls.scan import StepStream, skip_space

REASONING_PARSERS_GROUP = "text_generation.reasoning_parsers"


@dataclass(frozen=True)
class ReasoningOutput:
    """Reasoning and content: a whole response's, or what one stream step released."""

    reasoning: str = ""
    content: str = ""

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content)

    def __add__(self, other: ReasoningOutput) -> ReasoningOutput:
        return ReasoningOutput(self.reasoning + other.reasoning, self.content + other.content)


@runtime_checkable
class ReasoningStream(Protocol):
    def feed(self, delta: str) -> ReasoningOutput: ...

    def finish(self) -> ReasoningOutput: ...


@runtime_checkable
class ReasoningParser(Protocol):
    """A reasoning format. Instances are stateless; each response gets its own ``stream()``."""

    name: str

    def prompt_opens_reasoning(self, prompt: str) -> bool:
        """Whether a response to ``prompt`` starts inside reasoning (the prompt opened it)."""
        ...

    def parse(self, text: str, in_reasoning: bool = False) -> ReasoningOutput: ...

    def stream(self, in_reasoning: bool = False) -> ReasoningStream: ...


class _BufferedStream(StepStream[ReasoningOutput]):
    """A reasoning stream on ``StepStream``: ``step`` puts what it reads in ``_reasoning`` and
    ``_content``."""

    def __init__(self) -> None:
        super().__init__()
        self._reasoning: list[str] = []
        self._content: list[str] = []

    def take(self) -> ReasoningOutput:
        out = ReasoningOutput("".join(self._reasoning), "".join(self._content))
        self._reasoning, self._content = [], []
        return out

    def flush(self) -> None:
        if self.buf:
            self._content.append(self.buf)
            self.buf = ""


class _Parser:
    name = ""

    def prompt_opens_reasoning(self, prompt: str) -> bool:
        return False

    def stream(self, in_reasoning: bool = False) -> _BufferedStream:
        raise NotImplementedError

    def parse(self, text: str, in_reasoning: bool = False) -> ReasoningOutput:
        stream = self.stream(in_reasoning)
        return stream.feed(text) + stream.finish()


# ---- <think> ... </think> ---------------------------------------------------------------------------

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


class ThinkStream(_BufferedStream):
    def __init__(self, in_reasoning: bool = False) -> None:
        super().__init__()
        self._state = "start"  # start | reasoning | content
        self._in_reasoning = in_reasoning
        self._reasoning_started = False  # leading whitespace of the reasoning is dropped
        self._held_space = ""  # trailing whitespace of the reasoning: dropped before </think>
        self._content_started = False  # leading whitespace of the content after </think> is dropped

    def step(self, final: bool) -> bool:
        buf = self.buf
        if self._state == "start":
            p = skip_space(buf, 0)
            rest = buf[p:]
            if not final and THINK_OPEN.startswith(rest):
                return False  # empty so far, or maybe the start of <think>
            if rest.startswith(THINK_OPEN):
                self.buf = buf[p + len(THINK_OPEN) :]
                self._state = "reasoning"
            elif self._in_reasoning:
                self.buf = rest
                self._state = "reasoning"
            else:
                self._state = "content"
                self._content_started = True  # a response without reasoning comes back unchanged
            return True
        if self._state == "reasoning":
            if self.emit_until((THINK_CLOSE,), final, self._add_reasoning) is None:
                return False
            self._held_space = ""
            self.buf = self.buf[len(THINK_CLOSE) :]
            self._state = "content"
            return True
        if not self._content_started:
            buf = buf.lstrip()
            if not buf:
                self.buf = ""
                return False
            self._content_started = True
        self._content.append(buf)
        self.buf = ""
        return False

    def _add_reasoning(self, text: str) -> None:
        if not self._reasoning_started:
            text = text.lstrip()
            if not text:
                return
            self._reasoning_started = True
        body = text.rstrip()
        if body:
            self._reasoning.append(self._held_space + body)
            self._held_space = text[len(body) :]
        else:
            self._held_space += text

    def flush(self) -> None:
        if self._state == "reasoning":
            self._add_reasoning(self.buf)
            self.buf = ""
            if self._held_space:  # reasoning cut off: keep it whole
                self._reasoning.append(self._held_space)
                self._held_space = ""
        else:
            super().flush()


class ThinkReasoningParser(_Parser):
    """``think`` / ``deepseek_r1`` / ``qwen3``: ``<think>...</think>`` before the answer."""

    name = "think"

    def prompt_opens_reasoning(self, prompt: str) -> bool:
        """The prompt's last ``<think>`` is not closed (it ends the generation prompt)."""
        opened = prompt.rfind(THINK_OPEN)
        return opened >= 0 and prompt.find(THINK_CLOSE, opened) < 0

    def stream(self, in_reasoning: bool = False) -> ThinkStream:
        return ThinkStream(in_reasoning)


# ---- gpt-oss harmony --------------------------------------------------------------------------------

START = "<|start|>"
CHANNEL = "<|channel|>"
MESSAGE = "<|message|>"
_ENDS = ("<|end|>", "<|return|>", "<|call|>")
_HEADS = (START, CHANNEL)
_CHANNEL_NAME = re.compile(r"<\|channel\|>\s*([A-Za-z_]+)")


class HarmonyStream(_BufferedStream):
    def __init__(self, in_reasoning: bool = False) -> None:
        super().__init__()
        # start | header | body; a body's channel: analysis | final | ... | raw (addressed messages)
        self._state = "start"
        self._channel = "analysis" if in_reasoning else "final"

    def _emit(self, text: str) -> None:
        if text:
            (self._reasoning if self._channel == "analysis" else self._content).append(text)

    def step(self, final: bool) -> bool:
        buf = self.buf
        if self._state == "start":
            p = skip_space(buf, 0)
            rest = buf[p:]
            if not final and any(h.startswith(rest) for h in _HEADS):
                return False
            self._state = "header" if rest.startswith(_HEADS) else "body"
            if self._state == "header":
                self.buf = rest
            return True
        if self._state == "header":
            i = buf.find(MESSAGE)
            if i < 0:
                return False  # at the end a header without its message stays content (flush)
            header = buf[:i]
            match = _CHANNEL_NAME.search(header)
            self._channel = match.group(1) if match else "final"
            if "to=" in header:
                self._channel = "raw"
                self._content.append(buf[: i + len(MESSAGE)])
            self.buf = buf[i + len(MESSAGE) :]
            self._state = "body"
            return True
        tag = self.emit_until(_ENDS + _HEADS, final, self._emit)
        if tag is None:
            return False
        if tag in _ENDS:
            if self._channel == "raw":
                self._content.append(tag)
            self.buf = self.buf[len(tag) :]
        self._state = "header"
        return True

    def flush(self) -> None:
        if self._state == "body":
            self._emit(self.buf)
            self.buf = ""
        else:
            super().flush()


class GptOssReasoningParser(_Parser):
    """``gpt_oss``: harmony channels; ``analysis`` is reasoning."""

    name = "gpt_oss"

    def prompt_opens_reasoning(self, prompt: str) -> bool:
        return prompt.rstrip().endswith(CHANNEL + "analysis" + MESSAGE)

    def stream(self, in_reasoning: bool = False) -> HarmonyStream:
        return HarmonyStream(in_reasoning)


# ---- registry ---------------------------------------------------------------------------------------

BUILTIN_REASONING_PARSERS: dict[str, Callable[[], ReasoningParser]] = {
    "think": ThinkReasoningParser,
    "deepseek_r1": ThinkReasoningParser,
    "qwen3": ThinkReasoningParser,
    "gpt_oss": GptOssReasoningParser,
}


_PLUGINS = NamedPlugins(
    REASONING_PARSERS_GROUP, "reasoning parser", BUILTIN_REASONING_PARSERS, ReasoningParser
)


def reasoning_parser_names() -> list[str]:
    """The built-in names, then those of installed plugins (entry point group
    ``text_generation.reasoning_parsers``: a callable without arguments returning a ReasoningParser)."""
    return _PLUGINS.names()


def get_reasoning_parser(name: str) -> ReasoningParser:
    """The parser called ``name``, a built-in or a plugin (a built-in wins); PluginError when there is
    none or it fails to load."""
    return _PLUGINS.get(name)


def detect_reasoning_parser(chat_template: str | None) -> str | None:
    """The built-in parser a chat template calls for: ``gpt_oss`` for harmony channels, ``think`` for
    ``<think>`` tags; None otherwise."""
    if not chat_template:
        return None
    if CHANNEL in chat_template and MESSAGE in chat_template:
        return "gpt_oss"
    if THINK_OPEN in chat_template or THINK_CLOSE in chat_template:
        return "think"
    return None
