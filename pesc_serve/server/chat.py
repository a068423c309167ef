"""Chat messages -> prompt token ids.

The tokenizer's own chat template wins (SmolLM2, Qwen2idae and Sparsetral ship one; a
``--chat-template`` file overrides it).  Without one we fall back to the format Camelidae
was trained on: ``### System:\\n{sys}\\n### Human:\\n{q}\\n### Assistant:\\n``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jinja2.exceptions import TemplateError

from pesc_serve.server.protocol import ChatMessage
from pesc_serve.server.tools import ToolPlan, native_messages, render_messages


class ChatTemplateError(RuntimeError):
    """The chat template itself failed (syntax, undefined names, type errors): a 500, not the client's fault.

    A template rejects bad messages by calling ``raise_exception(...)``, which raises a plain
    ``TemplateError``; that is a ValueError (400) instead.
    """


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


# apply_chat_template's own arguments: a client's chat_template_kwargs may not override them
_RESERVED_TEMPLATE_KWARGS = frozenset(
    {"conversation", "chat_template", "add_generation_prompt", "tokenize", "return_tensors", "return_dict",
     "continue_final_message", "tools", "documents", "padding", "truncation", "max_length", "tokenizer_kwargs"}
)


@dataclass
class ChatFormatter:
    """Renders chat requests with the model's template (or the Camelidae fallback)."""

    tokenizer: Any
    template_override: str | None = None

    @property
    def takes_tools(self) -> bool:
        """Whether the chat template lays out ``tools`` itself (Qwen2.5's, Hermes'); others get the
        generic tool format (server/tools.py)."""
        if self.uses_fallback:
            return False
        source = self.template_override or self.tokenizer.chat_template
        return isinstance(source, str) and "tools" in source

    @property
    def uses_fallback(self) -> bool:
        return self.template_override is None and not getattr(self.tokenizer, "chat_template", None)

    def render(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
               tool_plan: ToolPlan | None = None, **template_kwargs: Any) -> str:
        """The prompt text; tool calls, tool results and the offered tools in the generic tool
        format (server/tools.py).  Raises ToolError (a ValueError naming its field) for a tool
        message that answers no call."""
        clash = sorted(set(template_kwargs) & _RESERVED_TEMPLATE_KWARGS)
        if clash:
            raise ValueError(f"chat_template_kwargs must not set {', '.join(clash)}")
        if tool_plan is not None and tool_plan.native:  # the template lays out tools, calls and results
            plain = native_messages(messages)
            if tool_plan.active:
                template_kwargs = {**template_kwargs, "tools": tool_plan.template_tools()}
        else:
            plain = render_messages(messages, tool_plan)
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
        except TemplateError as exc:
            if type(exc) is TemplateError:  # the template's raise_exception(): it refused these messages
                raise ValueError(f"messages could not be formatted with the chat template: {exc}") from None
            raise ChatTemplateError(f"the chat template is broken: {type(exc).__name__}: {exc}") from exc
        except Exception as exc:  # TypeError etc. inside the template: the server's bug, not the client's
            raise ChatTemplateError(f"the chat template failed: {type(exc).__name__}: {exc}") from exc

    def encode(self, text: str) -> list[int]:
        """Token ids of an already-formatted prompt (templates carry their own special tokens)."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_completion_prompt(self, text: str) -> list[int]:
        """Raw completion prompts get the tokenizer's usual special tokens (e.g. BOS)."""
        return self.tokenizer.encode(text, add_special_tokens=True)
