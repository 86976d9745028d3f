"""Chat prompts for instruct decoders, without a Jinja engine.

SmolLM2-Instruct's ``tokenizer.chat_template`` (GGUF metadata) is ChatML with a default system
message when the conversation has none::

    <|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n
    <|im_start|>user\\n{content}<|im_end|>\\n
    <|im_start|>assistant\\n                       (the generation prompt)

We recognise ChatML templates and take the default system message from the template text, so
the rendered prompt is what ``transformers``' Jinja rendering gives (checked in the tests).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from detransformer_edge.errors import ConfigError

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", re.DOTALL)
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConfigError(f"chat role must be one of {', '.join(ROLES)}, got {self.role!r}")


@dataclass(frozen=True)
class ChatTemplate:
    """ChatML rendering; ``default_system`` is inserted when the first message is not a system one."""

    default_system: str | None = None
    source: str = ""  # the template text it was read from, for reference

    @classmethod
    def from_template(cls, template: str) -> ChatTemplate:
        if IM_START not in template or IM_END not in template:
            raise ConfigError("unsupported chat template: only ChatML (<|im_start|> ... <|im_end|>) is implemented")
        match = _DEFAULT_SYSTEM.search(template)
        return cls(default_system=match.group(1) if match else None, source=template)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> ChatTemplate | None:
        """From GGUF ``tokenizer.chat_template``; None when the file has no template."""
        template = metadata.get("tokenizer.chat_template")
        return None if template is None else cls.from_template(str(template))

    def render(
        self, messages: Sequence[ChatMessage | Mapping[str, str]], add_generation_prompt: bool = True
    ) -> str:
        msgs = [m if isinstance(m, ChatMessage) else ChatMessage(m["role"], m["content"]) for m in messages]
        parts: list[str] = []
        if self.default_system is not None and (not msgs or msgs[0].role != "system"):
            if msgs:  # the template adds it inside its loop, i.e. only for a non-empty conversation
                parts.append(f"{IM_START}system\n{self.default_system}{IM_END}\n")
        for m in msgs:
            parts.append(f"{IM_START}{m.role}\n{m.content}{IM_END}\n")
        if add_generation_prompt:
            parts.append(f"{IM_START}assistant\n")
        return "".join(parts)

    def user_prompt(self, text: str, system: str | None = None) -> str:
        """The prompt for a single user turn (and an optional system message)."""
        messages = [ChatMessage("system", system)] if system is not None else []
        return self.render([*messages, ChatMessage("user", text)])
