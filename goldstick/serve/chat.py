"""Chat prompts: the tokenizer's own chat template (Jinja), rendered the way transformers' ``apply_chat_template``
renders it.

The template is ``chat_template.jinja`` in the model folder or else ``chat_template`` in ``tokenizer_config.json``
(a string, or a list of named templates of which ``default`` is used). It is rendered in Jinja's sandbox with
``trim_blocks`` and ``lstrip_blocks``, given ``messages``, ``add_generation_prompt`` and the special tokens of
tokenizer_config.json (``bos_token``, ``eos_token``, ...), plus ``raise_exception`` and the ``tojson`` filter.
The rendered text carries its own special tokens, so it is tokenized without adding any. A template or a
tokenizer_config.json that cannot be read, and messages it cannot render, are ``UsageError``s.
"""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from goldstick.errors import UsageError

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token")


def _raise(message: str):
    raise UsageError(f"the chat template refused the messages: {message}")


def _tojson(value, indent=None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


class ChatTemplate:
    """A model's chat template; ``render(messages)`` is the prompt text that asks for the assistant's reply."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None, origin: str = "chat template"):
        self.source = source
        self.origin = origin
        self.special_tokens = dict(special_tokens or {})
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise
        env.filters["tojson"] = _tojson
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateError as exc:
            raise UsageError(f"{origin}: the chat template does not compile: {exc}") from None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ChatTemplate | None:
        """The folder's chat template, or None when it has none."""
        model_dir = Path(model_dir)
        config_path = model_dir / "tokenizer_config.json"
        config = {}
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise UsageError(f"{config_path}: not readable JSON ({exc})") from None
        special = {}
        for key in SPECIAL_TOKEN_KEYS:
            token = config.get(key)
            if isinstance(token, dict):  # {"content": ..., "__type": "AddedToken"}
                token = token.get("content")
            if isinstance(token, str):
                special[key] = token
        jinja_path = model_dir / "chat_template.jinja"
        if jinja_path.is_file():
            return cls(jinja_path.read_text(encoding="utf-8"), special, str(jinja_path))
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if not isinstance(template, str) or not template.strip():
            return None
        return cls(template, special, f"{config_path} chat_template")

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        **self.special_tokens)
        except UsageError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
            raise UsageError(f"the chat template does not render these messages: {exc}") from None
