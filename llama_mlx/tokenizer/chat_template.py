"""Rendering a checkpoint's own Jinja chat template, in the environment transformers gives it."""

from __future__ import annotations

import json
import re
import string
import sys
import threading
import time
from datetime import datetime
from functools import lru_cache, wraps
from itertools import chain
from typing import Any, Sequence

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import ChatTemplateLimitError, TokenizerError

# A template from a checkpoint file is data: its rendering is bounded in steps, time and size.
MAX_STEPS = 1_000_000  # template lines executed per render
MAX_SECONDS = 5.0
MAX_CHARS = 1 << 23  # characters made by strings, lists and output per render, plus 64 per input character
MAX_ARG = 1 << 16  # an integer argument of a string method or filter (a width, a count)
MAX_INT_BITS = 1 << 16
TEMPLATE_FILE = "<template>"


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
    if isinstance(indent, int) and indent > 64:
        raise ChatTemplateLimitError(f"chat template: tojson indent {indent} is more than 64")
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Budget:
    """What one render may still spend: steps (template lines), time and characters."""

    def __init__(self, chars: int = MAX_CHARS):
        self.steps = 0
        self.chars = chars
        self.deadline = time.monotonic() + MAX_SECONDS

    def spend(self, n: int, what: str = "output") -> None:
        self.chars -= n
        if self.chars < 0:
            raise ChatTemplateLimitError(f"chat template: its {what} grows past the size bound "
                                         f"(a template that multiplies text?)")

    def check(self, n: int, what: str) -> None:
        if n > self.chars:
            raise ChatTemplateLimitError(f"chat template: {what} would be {n} long, past the size bound")

    def tick(self) -> None:
        """Past the deadline: stop (checked by every filter, call and operator, not only per line)."""
        if time.monotonic() > self.deadline:
            raise ChatTemplateLimitError(f"chat template: ran past {MAX_SECONDS:g} seconds")

    def tracer(self, frame, event, arg):
        # Only the template's own code is counted; its loops are lines executed again and again.
        if frame.f_code.co_filename != TEMPLATE_FILE:
            return None
        return self._line

    def _line(self, frame, event, arg):
        if event == "line":
            self.steps += 1
            if self.steps > MAX_STEPS:
                raise ChatTemplateLimitError(f"chat template: ran past {MAX_STEPS} steps (a loop that does not end?)")
            if not self.steps % 256 and time.monotonic() > self.deadline:
                raise ChatTemplateLimitError(f"chat template: ran past {MAX_SECONDS:g} seconds")
        return self._line


_active = threading.local()


def _budget() -> _Budget:
    b = getattr(_active, "budget", None)
    return b if b is not None else _Budget()  # compile-time constant folding: a fresh budget


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple, dict)) else 0


def _check_int_args(args, kwargs, what: str) -> None:
    for v in (*args, *kwargs.values()):
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_ARG:
            raise ChatTemplateLimitError(f"chat template: {what} with argument {v} (more than {MAX_ARG})")


_PERCENT = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_format(fmt: str, args, kwargs, percent: bool) -> None:
    widths = []
    if percent:
        for w, prec in _PERCENT.findall(fmt):
            widths += [int(x) for x in (w, prec) if x.isdigit()]
    else:
        try:
            for _, _, spec, _ in string.Formatter().parse(fmt):
                widths += [int(x) for x in re.findall(r"\d+", spec or "")]
        except ValueError:
            return  # the formatter itself refuses it
    if any(w > MAX_ARG for w in widths):
        raise ChatTemplateLimitError(f"chat template: a format width past {MAX_ARG}")
    _check_int_args(args if isinstance(args, tuple) else (args,), kwargs, "formatting")


def _text_size(value: Any, limit: int, indent: int = 0) -> int:
    """About how many characters `str`, `join` or `tojson` make of `value` (a list holding one long text
    many times makes it many times over), counted only up to just past `limit`."""
    total, stack = 0, [(iter((value,)), 0)]
    while stack and total <= limit:
        items, depth = stack[-1]
        v = next(items, _END)
        if v is _END:
            stack.pop()
        elif isinstance(v, (str, bytes)):
            total += len(v) + 2
        elif isinstance(v, dict):
            total += 2 + indent * depth
            stack.append((chain.from_iterable(v.items()), depth + 1))
        elif isinstance(v, (list, tuple, set, frozenset)):
            total += 2 + indent * depth
            stack.append((iter(v), depth + 1))
        else:
            total += 24 + indent * depth
    return total


_END = object()


def _bounded_str(value: Any = "", *args) -> str:
    """`str`, as the compiled template calls it to print a value: its size checked before it is made."""
    if args or isinstance(value, str):
        return str(value, *args)
    b = _budget()
    b.check(_text_size(value, b.chars), "a printed value")
    return str(value)


def _bounded_join(seq) -> str:
    parts = [_bounded_str(x) for x in seq]
    _budget().spend(sum(map(len, parts)), "text")
    return "".join(parts)


_CONTEXTS = (nodes.EvalContext, jinja2.runtime.Context, jinja2.Environment)
# Filters whose text grows with everything their first argument holds: that size is checked first.
_TEXT_FILTERS = frozenset(["join", "tojson", "string", "pprint", "e", "escape", "forceescape", "safe",
                           "urlencode", "xmlattr", "format", "indent", "center", "wordwrap", "upper", "lower",
                           "title", "capitalize", "trim", "striptags", "truncate", "urlize", "replace", "list",
                           "sum", "unique", "sort", "dictsort", "reverse", "wordcount"])


def _bounded_filter(name: str, fn):
    makes_text = name in _TEXT_FILTERS

    @wraps(fn)
    def filter_(*args, **kwargs):
        b = _budget()
        b.tick()
        if makes_text:
            value = next((a for a in args if not isinstance(a, _CONTEXTS)), "")  # after jinja's context argument
            if not isinstance(value, str):
                indent = kwargs.get("indent", 0) if name == "tojson" else 0
                b.check(_text_size(value, b.chars, indent if isinstance(indent, int) else 0),
                        f"the text of filter {name}")
        _check_int_args(args[1:] if args and not isinstance(args[0], (int, float)) else args, kwargs,
                        f"filter {name}")
        if name == "indent" and args and isinstance(args[0], str) and len(args) > 1 and isinstance(args[1], int):
            b.check(len(args[0]) + (args[0].count("\n") + 1) * args[1], "an indented text")
        if name == "replace" and len(args) >= 3 and all(isinstance(a, str) for a in args[:3]):
            _check_replace(*args[:3])
        if name == "format" and args and isinstance(args[0], str):
            _check_format(args[0], tuple(args[1:]), kwargs, percent=True)
        out = fn(*args, **kwargs)
        b.spend(_size(out), f"filter {name}")
        return out

    return filter_


def _check_replace(s: str, old: str, new: str) -> None:
    count = len(s) + 1 if old == "" else s.count(old)
    _budget().check(len(s) + count * len(new), "a replaced text")


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, with the operations that multiply sizes checked before they run."""

    intercepted_binops = frozenset(["*", "**", "+", "%"])

    def call_binop(self, context, operator, left, right):
        b = _budget()
        b.tick()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if _size(seq) and isinstance(n, int):
                    b.check(len(seq) * max(n, 0), "a repeated text or list")
            if isinstance(left, int) and isinstance(right, int) and \
                    left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise ChatTemplateLimitError("chat template: an integer product past the size bound")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0 and \
                    right * left.bit_length() > MAX_INT_BITS:
                raise ChatTemplateLimitError("chat template: a power past the size bound")
        elif operator == "+":
            if _size(left) and _size(right):
                b.check(len(left) + len(right), "a concatenation")
        elif operator == "%" and isinstance(left, str):
            _check_format(left, right, {}, percent=True)
        out = super().call_binop(context, operator, left, right)
        b.spend(_size(out), "text")
        return out

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
        inner = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        owner = getattr(inner, "__self__", None)
        name = getattr(inner, "__name__", "")
        b = _budget()
        b.tick()
        if isinstance(owner, str) and name == "join" and args:
            b.check(_text_size(args[0], b.chars), "a joined text")
        if isinstance(owner, (str, bytes, list, tuple)):
            _check_int_args(args, kwargs, f"{name}()")
            if name == "expandtabs":
                tab = args[0] if args else kwargs.get("tabsize", 8)
                if isinstance(tab, int):
                    b.check(len(owner) * max(tab, 1), "an expanded text")
            elif name == "replace" and len(args) >= 2 and isinstance(owner, str) and \
                    all(isinstance(a, str) for a in args[:2]):
                _check_replace(owner, args[0], args[1])
            elif name in ("format", "format_map") and isinstance(owner, str):
                _check_format(owner, args, kwargs, percent=False)
        out = super().call(__context, __obj, *args, **kwargs)
        b.spend(_size(out), f"{name or 'call'}()")
        return out


@lru_cache(maxsize=16)
def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template once; a broken template raises TokenizerError."""
    env = _BoundedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
    )
    env.globals.pop("lipsum", None)  # lipsum(n) makes n paragraphs
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(name, fn) for name, fn in env.filters.items()}
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        template = env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
        raise TokenizerError(f"chat template does not compile: {e}") from None
    except (ChatTemplateLimitError, RecursionError, MemoryError) as e:
        raise ChatTemplateLimitError(f"chat template does not compile: {e or type(e).__name__}") from None
    except SyntaxError as e:  # Python's own limits on the code Jinja makes: blocks or indentation nested too deep
        raise ChatTemplateLimitError(f"chat template does not compile: it nests too deep ({type(e).__name__}: "
                                     f"{e.msg})") from None
    # Jinja's generated code joins `a ~ b` with these: bounded like every other way of making text.
    template.root_render_func.__globals__.update(str_join=_bounded_join, markup_join=_bounded_join,
                                                 str=_bounded_str)
    return template


def render_chat_template(source: str, messages: list[dict], add_generation_prompt: bool, **context: Any) -> str:
    """The prompt text a template makes of `messages`; its raise_exception calls become TokenizerError.

    The render is bounded: MAX_STEPS template lines, MAX_SECONDS, and MAX_CHARS (plus 64 per input
    character) of text made; past a bound it stops with ChatTemplateLimitError.
    """
    template = compile_chat_template(source)
    budget = _Budget(MAX_CHARS + 64 * (len(repr(messages)) + len(repr(context))))
    previous_budget, previous_trace = getattr(_active, "budget", None), sys.gettrace()
    _active.budget = budget
    sys.settrace(budget.tracer)
    try:
        out = []
        for chunk in template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                       **context):
            budget.spend(len(chunk))
            out.append(chunk)
        return "".join(out)
    except TokenizerError:
        raise
    except jinja2.exceptions.TemplateError as e:
        raise TokenizerError(f"chat template: {e}") from None
    except (RecursionError, MemoryError, OverflowError) as e:
        raise ChatTemplateLimitError(f"chat template: {type(e).__name__}: {e}"[:300]) from None
    except Exception as e:  # a template error of any other kind is the template's, not ours
        raise TokenizerError(f"chat template: {type(e).__name__}: {e}"[:300]) from None
    finally:
        sys.settrace(previous_trace)
        _active.budget = previous_budget


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
