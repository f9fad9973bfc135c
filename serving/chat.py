"""Chat templates: the tokenizer's `chat_template` (tokenizer_config.json), rendered with
jinja2 the way transformers renders it: a sandboxed environment with trim_blocks and
lstrip_blocks, `raise_exception` for templates that refuse a conversation, and the
messages, add_generation_prompt and special tokens as variables."""

from __future__ import annotations

from functools import lru_cache

from mythos_deploy.errors import InputError

ROLES = ("system", "user", "assistant", "tool", "developer")


class TemplateError(InputError):
    """The template refused the conversation (its raise_exception), or failed to render."""


def _raise(message):
    raise TemplateError(f"the chat template refused the conversation: {message}")


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    return env.from_string(template)


def check_messages(messages) -> list[dict]:
    """OpenAI chat messages: a non-empty list of {"role", "content"} with string content (or
    a list of text parts, joined)."""
    if not isinstance(messages, list) or not messages:
        raise InputError("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InputError(f"messages[{i}] must be an object with a string role")
        if m["role"] not in ROLES:
            raise InputError(f"messages[{i}].role {m['role']!r} is not one of {', '.join(ROLES)}")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise InputError(f"messages[{i}].content: only text parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise InputError(f"messages[{i}].content must be a string")
        out.append({"role": m["role"], "content": content})
    return out


def render(template: str, messages: list[dict], special_tokens: dict, add_generation_prompt: bool = True) -> str:
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **special_tokens)
    except TemplateError:
        raise
    except Exception as exc:  # jinja2's TemplateError, or a template's own bug
        raise TemplateError(f"the chat template failed to render: {type(exc).__name__}: {exc}") from None
