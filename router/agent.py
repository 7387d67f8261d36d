"""The assistant turn, API-neutral: tools offered, how a conversation with tools is rendered, the grammar
that forces a call, and the generated text split into reasoning, content and tool calls.

Every chat-like route (OpenAI chat completions today; the Responses and Anthropic Messages routes reuse it)
translates its own request into these values and its own response out of them:

- ``ChatMessage``: one message (role ``system``, ``user``, ``assistant`` or ``tool``; an assistant's
  ``tool_calls``, a tool result's ``tool_call_id``);
- ``FunctionTool`` (checked by ``check_tools``), ``ToolChoice`` and ``Turn``: what one request asks of the
  model's turn (its tools, the choice, parallel calls, and the route's own output constraint, e.g.
  ``response_format``);
- ``Agent``: one per served model, built at start-up from its chat template, tokenizer and the
  ``--tool-call-parser`` / ``--reasoning-parser`` flags. ``agent.render(messages, turn, ...)`` makes the
  prompt; ``agent.plan(turn, prompt)`` says how to generate and read the answer: an ``OutputPlan``
  with the grammar to decode with (or None), the special tokens to keep in the text, and
  ``parse(text)`` / ``stream()`` over ``ReasoningDelta``, ``ContentDelta`` and ``ToolCallDelta``.

Rendering. A chat template that references ``tools`` renders the tools and the tool messages itself
(``tools=`` of ``apply_chat_template``; an assistant call's arguments are passed as an object, as
transformers' templates expect). Any other template (or TGICHAT_* wrapping) gets the generic rendering: a
system message (the first one, extended, or a new one) that lists the tools as JSON and asks for calls in
the parser's format (``CALL_EXAMPLES``: hermes' ``<tool_call>{"name": ..., "arguments": ...}</tool_call>``
by default); earlier calls are written in that format in the assistant's text, and tool results become a
user message of ``<tool_response>`` blocks. With ``tool_choice: none`` a tool-aware template still gets
the tools (OpenAI's behaviour: the model must not call), the generic rendering leaves them out, and the
answer is not parsed for calls.

Decoding (the grammars are router/call_grammar.py's). ``required`` (calls to any of the tools: one when
``parallel_tool_calls`` is false, else one or more) and a named function (one call to it) are forced by a
Lark grammar (llguidance): the call's markup in the parser's format (hermes, llama3_json, mistral,
pythonic; plugins' formats, and pythonic calls of a tool whose name is not an identifier or of a ``strict``
tool the pythonic grammar cannot hold exactly, are forced in hermes' format and read with the hermes
parser), the name, and arguments that follow the tool's JSON schema (pythonic: Python literals,
router/pythonic_grammar.py). ``auto`` uses a lazy grammar where the shards run the grammar processor
(``Agent(lazy_calls=...)``) for the same four formats: the text is free until the model starts a call
(the format's opener anywhere; Llama 3's bare ``{"name": ...`` or the pythonic ``[f(`` at the start of the
answer), then its calls are forced the same way. Plugins' formats and models whose reasoning a grammar
cannot follow (gpt_oss) stay free under ``auto``: their calls are parsed as written. Every grammar allows
at most ``Turn.call_limit`` calls (``MAX_CALLS`` unless the request bounds them). The route's own
constraint (``response_format``) applies to the content: with tools under ``auto`` the grammar allows
calls (forced as above) or that content. With a ``think`` reasoning parser every grammar first allows the
reasoning (``<think>`` ... ``</think>``, or just its end when the prompt opened it), so constraints apply
after the reasoning ends; with another reasoning parser a constraint is refused (400 naming the field).

Reading. The reasoning parser (if any) splits the text first; the tool-call parser then reads the content
(except under ``none``). With ``parallel_tool_calls`` false only the first call is kept. Plain requests
(no tools, no reasoning parser) need no parsing: ``OutputPlan.parses`` is False and the text is the
content, so their per-token cost does not change.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from common import grammar

from .call_grammar import (
    GRAMMAR_FORMATS,
    MAX_CALLS,
    OPENERS,
    THINK_PARSERS,
    CallSyntax,
    Tool,
    constraint_rules,
    reasoning_rules,
)
from .chat import ChatPrompter
from .errors import ValidationError
from .pythonic_grammar import python_literal
from .reasoning import ReasoningParser, ReasoningStream, detect_reasoning_parser, get_reasoning_parser
from .tokenizer import Tokenizer
from .toolcalls import (
    ContentDelta,
    ParsedOutput,
    ToolCall,
    ToolCallDelta,
    ToolCallParser,
    ToolCallStream,
    detect_tool_parser,
    get_tool_parser,
)

log = logging.getLogger(__name__)

# OpenAI's rule for function names.
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_REFERENCES_TOOLS = re.compile(r"\btools\b")

# How each built-in format writes one call; the generic rendering shows it to the model and writes earlier
# calls with ``render_calls``. Plugins' formats get hermes'.
CALL_EXAMPLES = {
    "hermes": '<tool_call>{"name": "<function name>", "arguments": <arguments as a JSON object>}</tool_call>',
    "llama3_json": '{"name": "<function name>", "parameters": <arguments as a JSON object>}',
    "mistral": '[TOOL_CALLS][{"name": "<function name>", "arguments": <arguments as a JSON object>}]',
    "pythonic": "[function_name(argument=value, ...)]",
}
# The strings each parser needs in the text: special tokens among them are not skipped when detokenizing.
PARSER_MARKERS = {
    "hermes": ("<tool_call>", "</tool_call>"),
    "llama3_json": ("<|python_tag|>",),
    "mistral": ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"),
    "pythonic": ("<|python_start|>", "<|python_end|>"),
    "think": ("<think>", "</think>"),
    "deepseek_r1": ("<think>", "</think>"),
    "qwen3": ("<think>", "</think>"),
}


# -- values -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FunctionTool:
    """A function the model may call; ``parameters`` is the JSON schema of its arguments object. ``strict``:
    the client asked for arguments that always follow it (refused where no grammar constrains the call)."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool = False

    def to_template(self) -> dict[str, Any]:
        """The tool as chat templates take it (``tools=`` of ``apply_chat_template``)."""
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolChoice:
    """``none``, ``auto``, ``required``, or ``function`` with the name of the one tool to call."""

    mode: Literal["none", "auto", "required", "function"] = "auto"
    function: str | None = None

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "function")


@dataclass(frozen=True)
class Turn:
    """What one request asks of the model's turn. ``constraint`` is the route's own output constraint
    (a canonical grammar argument, common/grammar.py) and ``constraint_field`` the request field that
    asked for it (errors name it)."""

    tools: tuple[FunctionTool, ...] = ()
    choice: ToolChoice = ToolChoice()
    parallel_tool_calls: bool = True
    constraint: str | None = None
    constraint_field: str = "response_format"
    #: The most calls the answer may hold (Responses' ``max_tool_calls``); None: no bound asked.
    max_calls: int | None = None

    @property
    def calls_allowed(self) -> bool:
        return bool(self.tools) and self.choice.mode != "none"

    @property
    def kept_calls(self) -> int | None:
        """The calls read from the answer (the later ones are dropped); None: all."""
        if self.choice.mode == "function" or not self.parallel_tool_calls:
            return 1
        return self.max_calls

    @property
    def call_limit(self) -> int:
        """The most calls a grammar allows: the calls kept, ``MAX_CALLS`` when the request sets no bound."""
        kept = self.kept_calls
        return MAX_CALLS if kept is None else kept


@dataclass(frozen=True)
class ChatMessage:
    """One message of a conversation, whatever API it came from. ``content`` is text; an assistant's
    ``tool_calls`` carry their arguments as JSON text; a ``tool`` message answers ``tool_call_id``."""

    role: str
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None

    def to_template(self) -> dict[str, Any]:
        """The message as chat templates take it (arguments as objects, as transformers' templates
        expect)."""
        message: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": _arguments_object(call.arguments)},
                }
                for call in self.tool_calls
            ]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        return message


def _arguments_object(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def check_tools(tools: tuple[FunctionTool, ...], field: str = "tools") -> None:
    """Names (OpenAI's rule, unique) and argument schemas (objects that llguidance compiles): a 400 naming
    ``field`` otherwise."""
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        if not _TOOL_NAME.fullmatch(tool.name):
            raise ValidationError(
                f"`{field}[{i}]` name must be 1 to 64 letters, digits, underscores or dashes. "
                f"Given: {json.dumps(tool.name)[:80]}",
                field,
            )
        if tool.name in seen:
            raise ValidationError(f"`{field}` names the function {tool.name!r} twice", field)
        seen.add(tool.name)
        schema = tool.parameters
        if not isinstance(schema, dict) or schema.get("type", "object") != "object":
            raise ValidationError(f"`{field}[{i}]` parameters must be a JSON schema of an object", field)
        problem = grammar.check(grammar.canonical("json", schema))
        if problem:
            raise ValidationError(f"`{field}[{i}]` parameters are not a valid JSON schema: {problem}", field)


# -- output ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReasoningDelta:
    """A piece of the model's reasoning."""

    text: str


OutputDelta = ReasoningDelta | ContentDelta | ToolCallDelta


@dataclass
class AssistantOutput:
    """A whole answer: reasoning (``""`` when none), content (``""`` when none) and tool calls."""

    reasoning: str
    content: str
    calls: list[ToolCall]


class OutputStream:
    """One answer's text, piece by piece -> reasoning, content and tool-call deltas, in order."""

    def __init__(self, plan: OutputPlan) -> None:
        reasoning = plan.reasoning_parser
        self._reasoning: ReasoningStream | None = (
            reasoning.stream(plan.in_reasoning) if reasoning is not None else None
        )
        self._tools: ToolCallStream | None = (
            plan.tool_parser.stream() if plan.tool_parser is not None else None
        )
        self._max_calls = plan.max_calls
        self.calls = 0

    def feed(self, delta: str) -> list[OutputDelta]:
        if self._reasoning is None:
            return self._content(delta, False)
        split = self._reasoning.feed(delta)
        out: list[OutputDelta] = [ReasoningDelta(split.reasoning)] if split.reasoning else []
        return out + self._content(split.content, False)

    def finish(self) -> list[OutputDelta]:
        out: list[OutputDelta] = []
        content = ""
        if self._reasoning is not None:
            split = self._reasoning.finish()
            if split.reasoning:
                out.append(ReasoningDelta(split.reasoning))
            content = split.content
        return out + self._content(content, True)

    def read(self, text: str, final: bool) -> list[OutputDelta]:
        """``feed(text)`` (when there is text), then ``finish()`` when the answer ends with it."""
        deltas = self.feed(text) if text else []
        if final:
            deltas += self.finish()
        return deltas

    def _content(self, text: str, final: bool) -> list[OutputDelta]:
        if self._tools is None:
            return [ContentDelta(text)] if text else []
        deltas = self._tools.feed(text) if text else []
        if final:
            deltas += self._tools.finish()
        out: list[OutputDelta] = []
        for delta in deltas:
            if isinstance(delta, ToolCallDelta):
                if self._max_calls is not None and delta.index >= self._max_calls:
                    continue  # parallel_tool_calls: false keeps the first call only
                self.calls = max(self.calls, delta.index + 1)
            out.append(delta)
        return out


@dataclass(frozen=True)
class OutputPlan:
    """How one request's answer is generated and read: the grammar to decode with (a canonical argument,
    or None) and the request field it enforces (errors name it), the special tokens to keep in the text,
    and the parsers."""

    grammar: str | None = None
    grammar_field: str = "response_format"
    keep_special_ids: frozenset[int] = frozenset()
    tool_parser: ToolCallParser | None = None
    reasoning_parser: ReasoningParser | None = None
    in_reasoning: bool = False
    max_calls: int | None = None

    @property
    def parses(self) -> bool:
        """Whether the text needs reading at all (else it is all content)."""
        return self.tool_parser is not None or self.reasoning_parser is not None

    def stream(self) -> OutputStream:
        """A stream for one answer (one choice)."""
        return OutputStream(self)

    def parse(self, text: str) -> AssistantOutput:
        """A whole answer: the stream run over the text (so both always agree)."""
        stream = self.stream()
        reasoning: list[str] = []
        deltas: list[ContentDelta | ToolCallDelta] = []
        for delta in stream.feed(text) + stream.finish():
            if isinstance(delta, ReasoningDelta):
                reasoning.append(delta.text)
            else:
                deltas.append(delta)
        parsed = ParsedOutput.from_deltas(list(deltas))
        return AssistantOutput("".join(reasoning), parsed.content, parsed.calls)


# -- the model's side ---------------------------------------------------------------------------------------
class Agent:
    """One model's tool calling and reasoning: its parsers, how its conversations render, and the plan of
    each request's answer. Built once at start-up; ``render`` and ``plan`` are thread-safe."""

    def __init__(
        self,
        prompter: ChatPrompter,
        tokenizer: Tokenizer,
        tool_call_parser: str = "auto",
        reasoning_parser: str = "auto",
        lazy_calls: bool = False,
    ) -> None:
        """``lazy_calls``: whether ``auto`` may decode with a lazy grammar (the shards run the grammar
        processor)."""
        self.prompter = prompter
        self.tokenizer = tokenizer
        template = prompter.template if prompter.wrapping is None else None
        #: The chat template renders tools and tool messages itself.
        self.template_tools = bool(template and _REFERENCES_TOOLS.search(template))
        added_tokens = getattr(tokenizer.hf, "added_tokens_decoder", {})
        added = [str(t) for t in added_tokens.values()]
        name = tool_call_parser
        if name == "auto":
            detected = detect_tool_parser(template, added) if self.template_tools else None
            name = detected or "hermes"
        self.tool_parser_name = name
        self.tool_parser = get_tool_parser(name)
        if reasoning_parser == "auto":
            self.reasoning_parser_name = detect_reasoning_parser(template)
        else:
            self.reasoning_parser_name = None if reasoning_parser == "none" else reasoning_parser
        self.reasoning_parser = (
            get_reasoning_parser(self.reasoning_parser_name) if self.reasoning_parser_name else None
        )
        forced_name = name if name in GRAMMAR_FORMATS else "hermes"
        self.forced_parser = self.tool_parser if forced_name == name else get_tool_parser("hermes")
        special = {tokenizer.hf.convert_ids_to_tokens(i): i for i in tokenizer.special_ids}
        special.update({str(t): int(i) for i, t in added_tokens.items()})
        unspellable = {str(t): int(i) for i, t in added_tokens.items() if getattr(t, "special", False)}
        thinks = self.reasoning_parser_name in (None, *THINK_PARSERS)  # a grammar can follow the reasoning
        #: How grammars write calls: forced ones in ``forced_name``'s format, lazy ones (``auto``) in the
        #: parser's own; None: ``auto`` stays free.
        self.forced_syntax = CallSyntax(forced_name, unspellable)
        self.lazy_syntax = (
            CallSyntax(name, unspellable) if lazy_calls and thinks and name in OPENERS else None
        )
        #: Forced calls the pythonic format cannot write (a name that is not an identifier) or not exactly (a
        #: ``strict`` tool whose values it writes as JSON) are forced in hermes' format, and read so.
        self._hermes = (CallSyntax("hermes", unspellable), get_tool_parser("hermes"))

        def keep(parser_name: str | None) -> frozenset[int]:
            if parser_name == "gpt_oss":  # harmony's headers are special tokens: keep them all
                return frozenset(tokenizer.special_ids)
            markers = PARSER_MARKERS.get(parser_name or "", ())
            return frozenset(special[m] for m in markers if m in special)

        self._keep_tools = keep(name) | keep(forced_name) | keep("hermes" if name == "pythonic" else None)
        self._keep_reasoning = keep(self.reasoning_parser_name)
        log.info(
            "Tool calls: %s parser (%s rendering; auto %s); reasoning: %s",
            name,
            "the chat template's" if self.template_tools else "generic",
            "by lazy grammar" if self.lazy_syntax is not None else "free",
            self.reasoning_parser_name or "none",
        )

    # -- rendering --
    def render(
        self,
        messages: list[ChatMessage],
        turn: Turn,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        template_kwargs: dict[str, Any] | None = None,
    ) -> tuple[str, bool]:
        """The prompt text, and whether tokenizing it should add the tokenizer's special tokens."""
        tools: list[dict[str, Any]] | None = None
        if self.template_tools:
            rendered = [m.to_template() for m in messages]
            if turn.tools:
                tools = [t.to_template() for t in turn.tools]
        else:
            rendered = self._generic(messages, turn.tools if turn.calls_allowed else ())
        return self.prompter.render(
            rendered, add_generation_prompt, continue_final_message, template_kwargs, tools=tools
        )

    def _generic(self, messages: list[ChatMessage], tools: tuple[FunctionTool, ...]) -> list[dict[str, Any]]:
        """Messages for a template without tool support: tools in a system message, calls in the
        assistant's text, tool results as a user message of <tool_response> blocks."""
        out: list[dict[str, Any]] = []
        for message in messages:
            if message.role == "tool":
                block = f"<tool_response>\n{message.content}\n</tool_response>"
                if out and out[-1].get("tool_results"):
                    out[-1]["content"] += "\n" + block
                else:
                    out.append({"role": "user", "content": block, "tool_results": True})
                continue
            content = message.content
            if message.tool_calls:
                calls = render_calls(self.tool_parser_name, message.tool_calls)
                content = f"{content}\n{calls}" if content else calls
            out.append({"role": message.role, "content": content})
        for rendered in out:
            rendered.pop("tool_results", None)
        if tools:
            preamble = tools_preamble(self.tool_parser_name, tools)
            if out and out[0]["role"] == "system":
                out[0]["content"] = f"{out[0]['content']}\n\n{preamble}" if out[0]["content"] else preamble
            else:
                out.insert(0, {"role": "system", "content": preamble})
        return out

    # -- planning --
    def plan(self, turn: Turn, prompt: str) -> OutputPlan:
        """How to generate and read the answer to ``prompt`` (the rendered text). Raises ValidationError
        naming the field when a constraint cannot be enforced."""
        reasoning = self.reasoning_parser
        in_reasoning = reasoning.prompt_opens_reasoning(prompt) if reasoning is not None else False
        keep = self._keep_reasoning
        tool_parser: ToolCallParser | None = None
        answer: list[str] = []  # the Lark rules of the answer after any reasoning (rule ``answer``)
        field = turn.constraint_field
        if turn.calls_allowed:
            keep = keep | self._keep_tools
            tools = turn.tools
            if turn.choice.mode == "function":
                tools = tuple(t for t in tools if t.name == turn.choice.function)
            limit = turn.call_limit
            if turn.choice.forced:
                syntax, tool_parser = self.forced_syntax, self.forced_parser
                writable = syntax.writable(tools)
                if len(writable) < len(tools) or any(t.strict and not syntax.exact(t) for t in tools):
                    syntax, tool_parser = self._hermes
                answer = syntax.forced_rules(tools, "answer", limit)
                field = "tool_choice"
            else:
                tool_parser = self.tool_parser
                if turn.constraint is not None:
                    syntax = self.forced_syntax
                    writable = syntax.writable(tools)
                    calls = syntax.forced_rules(writable, "calls", limit) if writable else []
                    answer = [
                        "answer: calls | content" if calls else "answer: content",
                        *calls,
                        *constraint_rules(turn.constraint, "content", field),
                    ]
                    _check_exact(turn.tools, writable, syntax)
                elif self.lazy_syntax is not None and self.lazy_syntax.writable(tools):
                    writable = self.lazy_syntax.writable(tools)
                    answer = self.lazy_syntax.lazy_rules(writable, "answer", limit)
                    field = "tools"
                    _check_exact(turn.tools, writable, self.lazy_syntax)
        elif turn.constraint is not None and reasoning is not None:
            answer = constraint_rules(turn.constraint, "answer", field)
        if turn.calls_allowed and not answer:
            _check_unconstrained(turn.tools)
        argument = turn.constraint
        if answer:
            lark = "\n".join([*reasoning_rules(reasoning, in_reasoning, field), *answer])
            argument = grammar.canonical("lark", lark)
            problem = grammar.check(argument)
            if problem:
                raise ValidationError(f"`{field}` cannot be enforced: {problem}", field)
        return OutputPlan(
            grammar=argument,
            grammar_field=field,
            keep_special_ids=keep,
            tool_parser=tool_parser,
            reasoning_parser=reasoning,
            in_reasoning=in_reasoning,
            max_calls=turn.kept_calls if turn.calls_allowed else None,
        )


def _check_exact(tools: tuple[FunctionTool, ...], constrained: tuple[Tool, ...], syntax: CallSyntax) -> None:
    """Calls under ``auto`` decoded in the model's format: a ``strict`` tool whose arguments that format's
    grammar cannot hold to the schema exactly (router/pythonic_grammar.py) is refused (400)."""
    for i, tool in enumerate(tools):
        if tool.strict and tool in constrained and not syntax.exact(tool):
            raise ValidationError(
                f"`tools[{i}].strict`: the {syntax.fmt} format's grammar writes some of this function's argument "
                "values as JSON (their schema uses a keyword its Python literals do not follow), so they may not "
                "validate exactly; force the call (tool_choice required or a named function) or leave strict out",
                "tools",
            )


def _check_unconstrained(tools: tuple[FunctionTool, ...]) -> None:
    """Calls decoded without a grammar: a tool that asks for ``strict`` arguments is refused (400)."""
    strict = [i for i, tool in enumerate(tools) if tool.strict]
    if strict:
        raise ValidationError(
            f"`tools[{strict[0]}].strict`: arguments are guaranteed to follow the schema only under constrained "
            "decoding, which this server applies to `tool_choice: auto` only for the hermes, llama3_json, "
            "mistral and pythonic formats, on backends with the grammar processor, without gpt_oss reasoning; "
            "force the call (tool_choice required or a named function) or leave strict out",
            "tools",
        )


def render_calls(parser: str, calls: tuple[ToolCall, ...]) -> str:
    """Earlier calls as the model would have written them in ``parser``'s format (the generic rendering)."""
    objs = [{"name": c.name, "arguments": _arguments_object(c.arguments)} for c in calls]
    if parser == "llama3_json":
        return "; ".join(json.dumps({"name": o["name"], "parameters": o["arguments"]}) for o in objs)
    if parser == "mistral":
        return "[TOOL_CALLS]" + json.dumps(objs)
    if parser == "pythonic":
        parts = []
        for o in objs:
            args = o["arguments"] if isinstance(o["arguments"], dict) else {}
            parts.append(f"{o['name']}({', '.join(f'{k}={python_literal(v)}' for k, v in args.items())})")
        return f"[{', '.join(parts)}]"
    return "\n".join(f"<tool_call>{json.dumps(o)}</tool_call>" for o in objs)


def tools_preamble(parser: str, tools: tuple[FunctionTool, ...]) -> str:
    """The generic rendering's instruction: the tools as JSON (one a line) and the call format."""
    listed = "\n".join(json.dumps(t.to_template(), ensure_ascii=False) for t in tools)
    example = CALL_EXAMPLES.get(parser, CALL_EXAMPLES["hermes"])
    return (
        "You can call the following functions. To call one, reply with\n"
        f"{example}\n"
        "for each call, and nothing else; otherwise answer normally.\n"
        f"Functions:\n{listed}"
    )
