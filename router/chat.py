"""Chat prompts: messages (chat templates' dicts: ``role``, ``content``, and an assistant's ``tool_calls``
or a tool result's ``tool_call_id``) -> one prompt string, by the model's chat template or TGICHAT_*
wrapping. Routes build the messages through ``router.agent`` (tools, generic rendering).

Templates render exactly as transformers renders them (its own ``apply_chat_template``: sandboxed jinja2,
``raise_exception``, ``tojson``, ``add_generation_prompt``); the rendered text already holds the
template's special tokens, so it is tokenized without adding a second BOS. When any ``TGICHAT_*``
variable is set, messages are wrapped instead: PRE + content + POST for their role, and the prompt ends
with the assistant's PRE so the model answers (the Preemo fork's scheme, with the generation prompt it
lacked).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ValidationError
from .tokenizer import Tokenizer

WRAPPING_VARIABLES = tuple(f"TGICHAT_{r}_{p}" for r in ("USER", "ASS", "SYS") for p in ("PRE", "POST"))


class ChatError(ValidationError):
    """A conversation the server cannot turn into a prompt (bad messages, template failure)."""


@dataclass(frozen=True)
class ChatWrapping:
    """The ``TGICHAT_(USER|ASS|SYS)_(PRE|POST)`` strings."""

    user_pre: str = ""
    user_post: str = ""
    ass_pre: str = ""
    ass_post: str = ""
    sys_pre: str = ""
    sys_post: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ChatWrapping | None:
        """The wrapping when any TGICHAT_* variable is set, else None (use the chat template)."""
        if not any(name in env for name in WRAPPING_VARIABLES):
            return None
        return cls(
            user_pre=env.get("TGICHAT_USER_PRE", ""),
            user_post=env.get("TGICHAT_USER_POST", ""),
            ass_pre=env.get("TGICHAT_ASS_PRE", ""),
            ass_post=env.get("TGICHAT_ASS_POST", ""),
            sys_pre=env.get("TGICHAT_SYS_PRE", ""),
            sys_post=env.get("TGICHAT_SYS_POST", ""),
        )

    def render(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool, continue_final: bool
    ) -> str:
        parts = []
        for i, message in enumerate(messages):
            role, content = message["role"], message["content"]
            if role == "system":
                pre, post = self.sys_pre, self.sys_post
            elif role == "assistant":
                pre, post = self.ass_pre, self.ass_post
                if continue_final and i == len(messages) - 1:
                    post = ""
            else:  # user, and tool results, which the model reads as the user's turn
                pre, post = self.user_pre, self.user_post
            parts.append(pre + content + post)
        if add_generation_prompt and not continue_final:
            parts.append(self.ass_pre)
        return "".join(parts)


def load_chat_template(value: str | None) -> str | None:
    """``--chat-template``: a file's path, or the template itself."""
    if not value:
        return None
    path = Path(value)
    if len(value) < 4096 and "{" not in value and path.is_file():
        return path.read_text()
    return value


class ChatPrompter:
    """Renders conversations for one model: its template (or --chat-template), or TGICHAT_* wrapping."""

    def __init__(self, tokenizer: Tokenizer, template: str | None, wrapping: ChatWrapping | None) -> None:
        self.tokenizer = tokenizer
        self.wrapping = wrapping
        self.template = template or getattr(tokenizer.hf, "chat_template", None)

    @property
    def available(self) -> bool:
        return self.wrapping is not None or bool(self.template)

    def render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        template_kwargs: dict[str, Any] | None = None,
        tools: list[dict[Any, Any]] | None = None,
    ) -> tuple[str, bool]:
        """The prompt text, and whether tokenizing it should add the tokenizer's special tokens (BOS).
        ``tools`` (the template's ``tools`` argument) goes to templates only: wrapping has no tools."""
        if continue_final_message and messages[-1]["role"] != "assistant":
            raise ChatError(
                "`continue_final_message` needs an assistant message last", "continue_final_message"
            )
        if self.wrapping is not None:
            return self.wrapping.render(messages, add_generation_prompt, continue_final_message), True
        if not self.template:
            raise ChatError(
                "this model has no chat template: start the server with --chat-template (a Jinja file or "
                "string), or set the TGICHAT_USER_PRE/POST, TGICHAT_ASS_PRE/POST and TGICHAT_SYS_PRE/POST "
                "environment variables to wrap messages",
                "messages",
            )
        try:
            text = self.tokenizer.hf.apply_chat_template(
                messages,
                chat_template=self.template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt and not continue_final_message,
                continue_final_message=continue_final_message,
                tools=None if tools is None else [*tools],
                **(template_kwargs or {}),
            )
        except Exception as e:  # jinja2 errors and raise_exception() in templates
            raise ChatError(f"the chat template failed: {e}", "messages") from None
        if not isinstance(text, str):  # tokenize=False renders text; the signature covers token ids too
            raise ChatError(f"the chat template rendered {type(text).__name__}, not text", "messages")
        return text, False
