"""Rendering a checkpoint's own Jinja chat template, in the environment transformers gives it."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Sequence

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import TokenizerError


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; here it only renders."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _render(caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template once; a broken template raises TokenizerError."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
        raise TokenizerError(f"chat template does not compile: {e}") from None


def render_chat_template(source: str, messages: list[dict], add_generation_prompt: bool, **context: Any) -> str:
    """The prompt text a template makes of `messages`; its raise_exception calls become TokenizerError."""
    template = compile_chat_template(source)
    try:
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **context)
    except jinja2.exceptions.TemplateError as e:
        raise TokenizerError(f"chat template: {e}") from None


class TemplateNotIncrementalError(TokenizerError):
    """The template renders the conversation so far differently once a turn follows it (a template that
    rewrites earlier turns), so the turn's tokens cannot just be appended: encode the whole conversation."""


def render_turn(
    source: str,
    history: Sequence[dict],
    messages: Sequence[dict],
    *,
    add_generation_prompt: bool,
    after_generation_prompt: bool = False,
    **context: Any,
) -> tuple[str, str]:
    """(the conversation so far, the conversation with `messages`) as the template renders them.

    `after_generation_prompt`: the conversation so far was rendered asking for an answer. The first text
    is a prefix of the second, else TemplateNotIncrementalError.
    """
    before = render_chat_template(source, list(history), after_generation_prompt, **context) if history else ""
    after = render_chat_template(source, [*history, *messages], add_generation_prompt, **context)
    if not after.startswith(before):
        raise TemplateNotIncrementalError("the chat template renders the conversation so far differently once "
                                          "a turn follows")
    return before, after
