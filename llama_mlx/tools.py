"""Llama 3.1 / 3.2 / 3.3 tool calling: prompts with OpenAI-style `tools`, and replies parsed into `tool_calls`.

Rendering (`apply_tool_chat_template`): a tokenizer with a Jinja chat template renders it with
the variables transformers' `apply_chat_template(..., tools=...)` passes (`messages`, `tools`,
`documents`, `add_generation_prompt`, the special tokens, any extra keyword). Meta's tiktoken
tokenizer has no template, and a Llama 3.1+ vocabulary whose template ignores `tools` should not
lose them: both get the Llama 3.1 Instruct template's layout, written here:

    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n
    [Environment: ipython\\n][Tools: brave_search, wolfram_alpha\\n\\n]
    Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n{system}<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\\n\\nGiven the following functions, ...\\n\\n
    {tool as JSON, indent 4}\\n\\n...{first user message}<|eot_id|>...

with a `tool` result under an `ipython` header and an assistant call written
`{"name": ..., "parameters": ...}` (built-ins `<|python_tag|>name.call(k="v")<|eom_id|>`).
Other templates that ignore `tools` (SmolLM2's) drop them: `supports_tools` tells, by rendering a
probe tool and looking for its name in the prompt, so callers can say so rather than pretend.

Parsing (`parse_tool_calls`): a whole reply that is one or more JSON calls (`parameters` or
`arguments`, with or without `<|python_tag|>` and `"type": "function"`), a built-in
`name.call(query="...")`, or Llama 3.2's pythonic `[f(a=1), g()]` (read with `ast`, literals only)
becomes OpenAI `tool_calls`; anything else is plain text. `ToolCallStream` holds streamed text
back while it may still become a call.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from .errors import LlamaMLXError, TokenizerError

__all__ = [
    "BUILTIN_TOOLS",
    "CUSTOM_TOOLS_PREAMBLE",
    "ParsedReply",
    "ToolCallStream",
    "apply_tool_chat_template",
    "may_be_tool_call",
    "normalize_messages",
    "parse_tool_calls",
    "supports_tools",
    "tools_for_choice",
]

BUILTIN_TOOLS = ("brave_search", "wolfram_alpha", "photogen", "code_interpreter")
DEFAULT_DATE = "26 Jul 2024"
CUSTOM_TOOLS_PREAMBLE = (
    "Given the following functions, please respond with a JSON for a function call with its proper "
    "arguments that best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
    "Do not use variables.\n\n"
)
SYSTEM_TOOLS_PREAMBLE = (
    "You have access to the following functions. To call a function, please respond with JSON for a function call."
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
    "Do not use variables.\n\n"
)
PYTHON_TAG = "<|python_tag|>"
_PROBE = "llama_mlx_probe_tool_5f2c9e"  # a name no template writes unless it renders the tools given
_UNSET: Any = object()
_END_TAGS = ("<|eom_id|>", "<|eot_id|>", "<|end_of_text|>")


# -- rendering


def tools_for_choice(tools: Optional[Sequence[Mapping]], tool_choice: Any = "auto") -> Optional[list]:
    """The tools to render for an OpenAI `tool_choice`: all of them ("auto", "required"), none
    ("none"), or the one named by `{"type": "function", "function": {"name": ...}}`."""
    if not tools or tool_choice == "none":
        return None
    if tool_choice in (None, "auto", "required"):
        return list(tools)
    if isinstance(tool_choice, Mapping):
        name = (tool_choice.get("function") or {}).get("name")
        chosen = [t for t in tools if _tool_name(t) == name]
        if not chosen:
            raise ValueError(f"tool_choice names {name!r}, which is not among the tools")
        return chosen
    raise ValueError(f"tool_choice must be 'none', 'auto', 'required' or a function, got {tool_choice!r}")


def _tool_name(tool: Mapping) -> Optional[str]:
    function = tool.get("function", tool) if isinstance(tool, Mapping) else None
    return function.get("name") if isinstance(function, Mapping) else None


def normalize_messages(messages: Sequence[Mapping]) -> list[dict]:
    """Messages as templates expect them: keys whose value is None dropped (as transformers does),
    and OpenAI's JSON-string `tool_calls[].function.arguments` decoded into objects."""
    out = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise ValueError(f"a chat message must be a dict, got {message!r}")
        message = {k: v for k, v in message.items() if v is not None}
        if "tool_calls" in message:
            calls = []
            for call in message["tool_calls"]:
                call = dict(call)
                function = dict(call.get("function") or {})
                arguments = function.get("arguments")
                if isinstance(arguments, str):
                    try:
                        function["arguments"] = json.loads(arguments) if arguments.strip() else {}
                    except json.JSONDecodeError:
                        raise ValueError(f"tool call arguments are not JSON: {arguments!r}") from None
                call["function"] = function
                calls.append(call)
            message["tool_calls"] = calls
        out.append(message)
    return out


def apply_tool_chat_template(
    tokenizer,
    messages: Sequence[Mapping],
    tools: Optional[Sequence[Mapping]] = None,
    *,
    add_generation_prompt: bool = True,
    documents: Optional[Sequence[Mapping]] = None,
    **kwargs: Any,
) -> list[int]:
    """Prompt ids for a conversation with tools, BOS included.

    A tokenizer with a chat template renders it as transformers' `apply_chat_template(messages,
    tools=tools, documents=documents, add_generation_prompt=..., **kwargs)` does. Without one, a
    Llama 3 vocabulary gets the Llama 3.1 Instruct layout (`builtin_tools`, `date_string`,
    `tools_in_user_message`, `custom_tools` as that template reads them) when there are tools,
    built-in tools or tool turns, and Meta's plain chat format otherwise. A Llama 3.1+ vocabulary
    whose template ignores `tools` gets that layout when there are tools. Other templates that
    ignore them drop them (see `supports_tools`).
    Raises TokenizerError when the tokenizer has neither, ValueError on malformed messages.
    """
    messages = normalize_messages(messages)
    tools = None if tools is None else [dict(t) for t in tools]
    if getattr(tokenizer, "chat_template", None) and not (
            tools and _llama31_vocabulary(tokenizer) and not _template_renders_tools(tokenizer)):
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tools=tools, documents=documents, **kwargs
        )
    if not _llama3_vocabulary(tokenizer):
        raise TokenizerError("this tokenizer has no chat template and no Llama 3 chat format to render tools with")
    tool_turns = any("tool_calls" in m or m.get("role") in ("tool", "ipython") for m in messages)
    if tools is None and kwargs.get("custom_tools") is None and "builtin_tools" not in kwargs and not tool_turns:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    return Llama31Prompt(tokenizer).encode(messages, tools, add_generation_prompt=add_generation_prompt, **kwargs)


def supports_tools(tokenizer) -> bool:
    """Whether `apply_tool_chat_template` shows `tools` to the model: with Meta's Llama 3 format (no
    template; Llama 3.1's layout), with a chat template that renders them (a probe tool's name reaches
    the prompt), or on a Llama 3.1+ vocabulary whose template ignores them (Llama 3.1's layout instead).
    False for other templates that ignore them (SmolLM2's): the model would never see the tools.
    Cached per tokenizer and template."""
    if not getattr(tokenizer, "chat_template", None):
        return _llama3_vocabulary(tokenizer)
    return _template_renders_tools(tokenizer) or _llama31_vocabulary(tokenizer)


def _llama3_vocabulary(tokenizer) -> bool:
    return "<|start_header_id|>" in (getattr(tokenizer, "special_tokens", None) or {})


def _llama31_vocabulary(tokenizer) -> bool:
    # Llama 3.1 named <|python_tag|> and <|eom_id|> among 3.0's reserved tokens.
    special = getattr(tokenizer, "special_tokens", None) or {}
    return all(t in special for t in ("<|start_header_id|>", "<|python_tag|>", "<|eom_id|>"))


def _template_renders_tools(tokenizer) -> bool:
    template = tokenizer.chat_template
    cached = getattr(tokenizer, "_renders_tools", None)
    if cached is not None and cached[0] == template:
        return cached[1]
    probe = {"type": "function", "function": {"name": _PROBE, "description": "Probe.",
                                              "parameters": {"type": "object", "properties": {}}}}
    renders = False
    # Some templates write tools into the system turn, others into the first or last user turn.
    for messages in ([{"role": "user", "content": "Hi"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]):
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, tools=[probe])
        except (LlamaMLXError, ValueError, TypeError):  # a template that refuses tools does not render them
            continue
        if _PROBE in text:
            renders = True
            break
    try:
        tokenizer._renders_tools = (template, renders)
    except AttributeError:
        pass
    return renders


def _tojson(value: Any, indent: Optional[int] = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)  # transformers' tojson filter


class Llama31Prompt:
    """The Llama 3.1 Instruct template's output, built as pieces: special-token ids and text.

    Text between two special tokens is encoded as one string, as a template's output would be;
    special-token text inside messages stays plain text.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.parts: list = []

    def special(self, name: str) -> None:
        self.parts.append(self.tokenizer.special_tokens[name])

    def text(self, text: str) -> None:
        if self.parts and isinstance(self.parts[-1], str):
            self.parts[-1] += text
        else:
            self.parts.append(text)

    def header(self, role: str) -> None:
        self.special("<|start_header_id|>")
        self.text(role)
        self.special("<|end_header_id|>")
        self.text("\n\n")

    def ids(self) -> list[int]:
        ids: list[int] = []
        for part in self.parts:
            ids.extend(self.tokenizer.encode(part) if isinstance(part, str) else [part])
        return ids

    def encode(
        self,
        messages: list[dict],
        tools: Optional[list],
        *,
        add_generation_prompt: bool = True,
        builtin_tools: Optional[Sequence[str]] = None,
        custom_tools: Optional[list] = _UNSET,
        date_string: str = DEFAULT_DATE,
        tools_in_user_message: bool = True,
        **_: Any,
    ) -> list[int]:
        if custom_tools is not _UNSET:  # the template's `custom_tools is defined`: a None given clears `tools`
            tools = custom_tools
        self.parts = []
        self.special("<|begin_of_text|>")
        system = ""
        if messages and messages[0].get("role") == "system":
            system, messages = _content(messages[0]).strip(), messages[1:]

        self.header("system")
        if builtin_tools is not None or tools is not None:
            self.text("Environment: ipython\n")
        if builtin_tools is not None:
            self.text("Tools: " + ", ".join(t for t in builtin_tools if t != "code_interpreter") + "\n\n")
        self.text("Cutting Knowledge Date: December 2023\n")
        self.text(f"Today Date: {date_string}\n\n")
        if tools is not None and not tools_in_user_message:
            self.text(SYSTEM_TOOLS_PREAMBLE + "".join(_tojson(t, indent=4) + "\n\n" for t in tools))
        self.text(system)
        self.special("<|eot_id|>")

        if tools is not None and tools_in_user_message:
            if not messages:
                raise ValueError("tools go in the first user message, and there is none")
            first, messages = _content(messages[0]).strip(), messages[1:]
            self.header("user")
            self.text(CUSTOM_TOOLS_PREAMBLE + "".join(_tojson(t, indent=4) + "\n\n" for t in tools) + first)
            self.special("<|eot_id|>")

        for message in messages:
            role = message.get("role")
            if "tool_calls" in message:
                self._tool_call(message, builtin_tools)
            elif role in ("tool", "ipython"):
                self._tool_result(message)
            else:
                if not isinstance(role, str):
                    raise ValueError(f"a chat message needs a string 'role', got {message!r}")
                self.header(role)
                self.text(_content(message).strip())
                self.special("<|eot_id|>")
        if add_generation_prompt:
            self.header("assistant")
        return self.ids()

    def _tool_result(self, message: Mapping) -> None:
        if "content" not in message:  # the template's `content | tojson` fails on it too
            raise ValueError(f"a {message.get('role')!r} message needs 'content'")
        content = message["content"]
        self.header("ipython")
        # The template's `content is mapping or content is iterable`: text too goes through tojson.
        self.text(_tojson(content) if isinstance(content, (str, list, dict)) else str(content))
        self.special("<|eot_id|>")

    def _tool_call(self, message: Mapping, builtin_tools: Optional[Sequence[str]]) -> None:
        calls = message["tool_calls"]
        if len(calls) != 1:
            raise ValueError("Llama 3.1's format has one tool call per assistant message")
        function = calls[0].get("function") or {}
        name, arguments = function.get("name"), function.get("arguments", {})
        if not isinstance(name, str):
            raise ValueError(f"a tool call needs a function name, got {calls[0]!r}")
        self.header("assistant")
        if builtin_tools is not None and name in builtin_tools:
            args = ", ".join(f'{k}="{v}"' for k, v in dict(arguments).items())
            self.special("<|python_tag|>")
            self.text(f"{name}.call({args})")
        else:
            self.text('{"name": "' + name + '", "parameters": ' + _tojson(arguments) + "}")
        self.special("<|eom_id|>" if builtin_tools is not None else "<|eot_id|>")


def _content(message: Mapping) -> str:
    content = message.get("content", "")
    if isinstance(content, list):  # OpenAI content parts: the text ones, joined
        content = "".join(p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text")
    if not isinstance(content, str):
        raise ValueError(f"the content of a {message.get('role')!r} message must be text, got {content!r}")
    return content


# -- parsing


@dataclass
class ParsedReply:
    """A model reply read as OpenAI fields: `content` (None when it is all calls) and `tool_calls`."""

    content: Optional[str]
    tool_calls: list[dict] = field(default_factory=list)

    def finish_reason(self, generation_finish: str = "stop") -> str:
        """"tool_calls" when the reply calls tools, else the generator's own reason."""
        return "tool_calls" if self.tool_calls else generation_finish

    def message(self) -> dict:
        """The OpenAI assistant message."""
        out: dict = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        return out


def _call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _openai_call(name: str, arguments: Mapping, make_id: Callable[[], str]) -> dict:
    return {
        "id": make_id(),
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


def _strip_tags(text: str) -> tuple[str, bool]:
    text = text.strip()
    tagged = text.startswith(PYTHON_TAG)
    if tagged:
        text = text[len(PYTHON_TAG) :].lstrip()
    for end in _END_TAGS:
        if text.endswith(end):
            text = text[: -len(end)].rstrip()
    return text, tagged


def _json_call(obj: Any) -> Optional[tuple[str, dict]]:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    if not set(obj) <= {"name", "parameters", "arguments", "type"} or obj.get("type", "function") != "function":
        return None
    arguments = obj.get("parameters", obj.get("arguments", {}))
    if isinstance(arguments, str):  # some replies nest the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return obj["name"], arguments


def _json_calls(text: str) -> Optional[list[tuple[str, dict]]]:
    """One or more JSON calls filling the whole text (separated by ';', ',' or whitespace), or a JSON list of them."""
    decoder = json.JSONDecoder()
    calls, i = [], 0
    while i < len(text):
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return None
        items = obj if isinstance(obj, list) and obj else [obj]
        for item in items:
            call = _json_call(item)
            if call is None:
                return None
            calls.append(call)
        while i < len(text) and (text[i].isspace() or text[i] in ";,"):
            i += 1
    return calls or None


_JSON_NAMES = {"true": True, "false": False, "null": None}


def _literal(node: ast.AST) -> Any:
    """A JSON value from a Python literal node; anything else (names, calls, operators) raises ValueError."""
    if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (str, int, float, bool))):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict) and None not in node.keys:
        keys = [_literal(k) for k in node.keys]
        if all(isinstance(k, str) for k in keys):
            return dict(zip(keys, (_literal(v) for v in node.values)))
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:  # JSON spellings a model may use
        return _JSON_NAMES[node.id]
    raise ValueError("not a literal")


def _dotted(node: ast.AST) -> Optional[str]:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _call_node(node: ast.AST) -> tuple[str, dict]:
    if not isinstance(node, ast.Call) or node.args or any(k.arg is None for k in node.keywords):
        raise ValueError("not a call with keyword arguments")
    name = _dotted(node.func)
    if name is None:
        raise ValueError("not a named function")
    return name, {k.arg: _literal(k.value) for k in node.keywords}


def _parse_python(text: str) -> Optional[ast.AST]:
    if len(text) > 100_000:
        return None
    try:
        return ast.parse(text, mode="eval").body  # parsing only: nothing is evaluated
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def _pythonic_calls(text: str) -> Optional[list[tuple[str, dict]]]:
    """Llama 3.2's `[f(a=1, b="x"), g()]`."""
    if not (text.startswith("[") and text.endswith("]")):
        return None
    node = _parse_python(text)
    if not isinstance(node, ast.List) or not node.elts:
        return None
    try:
        return [_call_node(e) for e in node.elts]
    except ValueError:
        return None


def _builtin_call(text: str) -> Optional[tuple[str, dict]]:
    """A built-in tool's `brave_search.call(query="...")`."""
    if ".call(" not in text:
        return None
    node = _parse_python(text)
    try:
        name, arguments = _call_node(node) if node is not None else (None, None)
    except ValueError:
        return None
    if name is None or not name.endswith(".call") or "." in name[: -len(".call")]:
        return None
    return name[: -len(".call")], arguments


def parse_tool_calls(
    text: str,
    tools: Optional[Sequence[Mapping]] = None,
    *,
    builtin_tools: Iterable[str] = BUILTIN_TOOLS,
    make_id: Callable[[], str] = _call_id,
) -> ParsedReply:
    """Read a whole assistant reply: tool calls, or plain text.

    With `tools`, only calls of those functions (or of `builtin_tools`) count; a call of an
    unknown name leaves the reply as text. Without `tools` any name counts. A `<|python_tag|>`
    reply that is no call is code for the code interpreter when `code_interpreter` is allowed.
    """
    body, tagged = _strip_tags(text)
    builtin = set(builtin_tools)
    known = None if tools is None else {_tool_name(t) for t in tools} | builtin

    calls = None
    if body.startswith(("{", "[")):
        calls = _json_calls(body) or _pythonic_calls(body)
    if calls is None:
        call = _builtin_call(body)
        if call is not None and (call[0] in builtin or (known is not None and call[0] in known)):
            calls = [call]
    if calls is None and tagged and body and "code_interpreter" in builtin and (known is None or "code_interpreter" in known):
        calls = [("code_interpreter", {"code": body})]
    if calls and (known is None or all(name in known for name, _ in calls)):
        return ParsedReply(None, [_openai_call(name, args, make_id) for name, args in calls])
    return ParsedReply(text.strip() if tagged else text)


# -- streaming

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _json_call_prefix(s: str, in_list: bool = False) -> bool:
    """Whether `s` (starting with '{') may still grow into JSON calls (the items of a JSON list when `in_list`)."""
    decoder = json.JSONDecoder()
    i = 0
    while i < len(s):
        if s[i] != "{":
            return _calls_end(s[i:], in_list)
        key = re.match(r'\{\s*(?:"([a-z]*)("?))?', s[i:])
        if key.end() == len(s) - i:  # the first key is still being written
            name = key.group(1) or ""
            return any(k.startswith(name) and (not key.group(2) or k == name)
                       for k in ("name", "parameters", "arguments", "type"))
        if key.group(1) is None or key.group(1) not in ("name", "parameters", "arguments", "type") or not key.group(2):
            return False
        try:
            obj, i = decoder.raw_decode(s, i)
        except json.JSONDecodeError:
            return True  # an unfinished object: wait for the rest
        if _json_call(obj) is None:
            return False
        while i < len(s) and (s[i].isspace() or s[i] in ";,"):
            i += 1
    return True


def _calls_end(rest: str, in_list: bool) -> bool:
    """Whether `rest`, after whole JSON calls, may still be their end: the list's ']', then an end tag."""
    if in_list:
        if rest[0] != "]":
            return False
        rest = rest[1:].lstrip()
    # parse_tool_calls drops a final end tag, so a reply keeping the stop token's text is still a call
    return not rest or any(tag.startswith(rest.rstrip()) for tag in _END_TAGS)


def _json_list_prefix(s: str) -> bool:
    rest = s[1:].lstrip()
    return not rest or (rest[0] == "{" and _json_call_prefix(rest, in_list=True))


def may_be_tool_call(text: str, builtin_tools: Iterable[str] = BUILTIN_TOOLS) -> bool:
    """Whether a reply beginning with `text` may still turn out to be a tool call (hold it back),
    or is certainly plain text (release it)."""
    s = text.lstrip()
    if not s or PYTHON_TAG.startswith(s) or s.startswith(PYTHON_TAG):
        return True  # nothing yet, or a python_tag: a call or code to the very end
    if s[0] == "{":
        return _json_call_prefix(s)
    if s[0] == "[":
        rest = s[1:].lstrip()
        if not rest or rest[0] == "{":
            return _json_list_prefix(s)
        ident = _IDENT.match(rest)
        if ident is None:
            return False
        after = rest[ident.end() :]
        return after == "" or after[0] in "(."
    for name in builtin_tools:
        prefix = name + ".call("
        if prefix.startswith(s) or s.startswith(prefix):
            return True
    return False


class ToolCallStream:
    """Holds streamed reply text back while it may still be a tool call.

        stream = ToolCallStream(tools)
        for r in stream_generate(...):
            send(stream.feed(r.text))          # "" while held back
        text, reply = stream.finish()          # the held text (when plain), and the parsed reply
    """

    def __init__(self, tools: Optional[Sequence[Mapping]] = None, *, builtin_tools: Iterable[str] = BUILTIN_TOOLS,
                 make_id: Callable[[], str] = _call_id):
        self.tools = tools
        self.builtin_tools = tuple(builtin_tools)
        self.make_id = make_id
        self.text = ""
        self.released = 0  # characters of `text` handed out
        self.plain = False

    def feed(self, delta: str) -> str:
        """Add generated text; return what may be shown now."""
        self.text += delta
        if not self.plain and not may_be_tool_call(self.text, self.builtin_tools):
            self.plain = True
        if not self.plain:
            return ""
        out, self.released = self.text[self.released :], len(self.text)
        return out

    def finish(self) -> tuple[str, ParsedReply]:
        """At the end of generation: the text still held back (empty when the reply is calls) and the parse."""
        if self.plain:
            out, self.released = self.text[self.released :], len(self.text)
            return out, ParsedReply(self.text)
        reply = parse_tool_calls(self.text, self.tools, builtin_tools=self.builtin_tools, make_id=self.make_id)
        if reply.tool_calls:
            return "", reply
        out, self.released = self.text[self.released :], len(self.text)
        return out, reply
