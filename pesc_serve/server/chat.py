"""Chat messages -> prompt token ids.

The tokenizer's own chat template wins (SmolLM2, Qwen2idae and Sparsetral ship one; a
``--chat-template`` file overrides it).  Without one we fall back to the format Camelidae
was trained on: ``### System:\\n{sys}\\n### Human:\\n{q}\\n### Assistant:\\n``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pesc_serve.server.protocol import ChatMessage


def camelidae_prompt(messages: list[dict[str, str]], eos_token: str) -> str:
    """The Camelidae training format; earlier assistant turns end with EOS as in training."""
    system = "\n".join(m["content"] for m in messages if m["role"] == "system")
    parts = [f"### System:\n{system}\n"] if system else []
    for m in messages:
        if m["role"] == "user":
            parts.append(f"### Human:\n{m['content']}\n")
        elif m["role"] == "assistant":
            parts.append(f"### Assistant:\n{m['content']}{eos_token}\n")
    parts.append("### Assistant:\n")
    return "".join(parts)


@dataclass
class ChatFormatter:
    """Renders chat requests with the model's template (or the Camelidae fallback)."""

    tokenizer: Any
    template_override: str | None = None

    @property
    def uses_fallback(self) -> bool:
        return self.template_override is None and not getattr(self.tokenizer, "chat_template", None)

    def render(self, messages: list[ChatMessage], add_generation_prompt: bool = True, **template_kwargs: Any) -> str:
        plain = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in messages]
        if self.uses_fallback:
            return camelidae_prompt(plain, self.tokenizer.eos_token or "")
        try:
            return self.tokenizer.apply_chat_template(
                plain,
                chat_template=self.template_override,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
                **template_kwargs,
            )
        except Exception as exc:  # jinja errors (e.g. "roles must alternate") are the client's
            raise ValueError(f"messages could not be formatted with the chat template: {exc}") from None

    def encode(self, text: str) -> list[int]:
        """Token ids of an already-formatted prompt (templates carry their own special tokens)."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_completion_prompt(self, text: str) -> list[int]:
        """Raw completion prompts get the tokenizer's usual special tokens (e.g. BOS)."""
        return self.tokenizer.encode(text, add_special_tokens=True)
