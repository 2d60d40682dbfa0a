"""What the server's endpoint modules share: `ApiError` (OpenAI's error fields), request field checks,
a job's text as streams show it (`shown_text`), and server-sent event frames."""

from __future__ import annotations

import asyncio
import json
import math
import re
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional

from starlette.responses import JSONResponse, StreamingResponse

from .tools import ParsedReply, ToolCallStream, parse_tool_calls

__all__ = ["ApiError", "CutCall", "close_json", "forced", "read_reply"]


class ApiError(Exception):
    """An HTTP error with OpenAI's error fields."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 413: "invalid_request_error", 415: "invalid_request_error",
             422: "invalid_request_error", 503: "overloaded_error"}

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def openai(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)

    def ollama(self) -> JSONResponse:
        return JSONResponse({"error": self.message}, status_code=self.status)

    def for_path(self, path: str) -> JSONResponse:
        """The error in the shape of the API that `path` belongs to: Anthropic's, ollama's or OpenAI's."""
        if path.startswith("/v1/messages"):
            return self.anthropic()
        return self.ollama() if path.startswith("/api/") else self.openai()

    def anthropic(self) -> JSONResponse:
        kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                413: "request_too_large", 503: "overloaded_error"}.get(self.status, "invalid_request_error")
        return JSONResponse({"type": "error", "error": {"type": kind, "message": self.message}},
                            status_code=self.status)


# -- request parsing


def _kind(value: Any, kinds: tuple) -> bool:
    if isinstance(value, bool) and bool not in kinds:
        return False
    return isinstance(value, kinds)


def _get(body: dict, key: str, kinds: tuple, default: Any = None, what: str = "") -> Any:
    value = body.get(key)
    if value is None:
        return default
    if not _kind(value, kinds):
        raise ApiError(400, f"'{key}' must be {what or ' or '.join(k.__name__ for k in kinds)}", param=key)
    return value


def _in_range(key: str, value: float, lo: float, hi: float, *, open_lo: bool = False) -> None:
    if value is not None and not math.isfinite(value):
        raise ApiError(400, f"'{key}' must be a finite number", param=key)
    if value is not None and (value < lo or value > hi or (open_lo and value == lo)):
        raise ApiError(400, f"'{key}' must be in {'(' if open_lo else '['}{lo}, {hi}], got {value}", param=key)


MAX_STOP = 16  # most stop strings of one request (OpenAI allows 4)
MAX_STOP_BYTES = 4096  # most UTF-8 bytes of them all: each is matched against every token's text


def _stop_list(body: dict, key: str) -> list[str]:
    """A request's stop strings: at most MAX_STOP of them, MAX_STOP_BYTES in all (else 400)."""
    stop = body.get(key)
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, f"'{key}' must be a string or a list of strings", param=key)
    if len(stop) > MAX_STOP or sum(len(s.encode("utf-8", "replace")) for s in stop) > MAX_STOP_BYTES:
        raise ApiError(400, f"'{key}' holds at most {MAX_STOP} strings of {MAX_STOP_BYTES} bytes in all", param=key)
    return stop


def _finite(value: Any) -> Any:
    """`value` with every float that JSON cannot carry (NaN, +-Infinity) replaced: -inf by -9999.0 (what
    OpenAI sends for a log-probability of zero), +inf by 9999.0 and NaN by None."""
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return None if math.isnan(value) else math.copysign(9999.0, value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _dumps(obj: Any) -> str:
    """JSON text of `obj`, never with a non-JSON number (see `_finite`)."""
    try:
        return json.dumps(obj, ensure_ascii=False, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(obj), ensure_ascii=False, allow_nan=False)


# -- replies: tool calls, a forced one cut by max_tokens


def forced(tools: Optional[list], tool_choice: Any) -> bool:
    """Whether a request forces a tool call (tool_choice "required" or a named function, tools rendered)."""
    return bool(tools) and (tool_choice == "required" or isinstance(tool_choice, dict))


@dataclass
class CutCall(ParsedReply):
    """A forced tool call that max_tokens cut: the call, its arguments as far as written, closed into
    JSON (`close_json`). Its finish reason stays the generation's ("length")."""

    def finish_reason(self, generation_finish: str = "stop") -> str:
        return generation_finish


_CALL_START = re.compile(r'\s*(?:<\|python_tag\|>)?\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"'
                         r'(?:\s*,\s*"(?:parameters|arguments)"\s*:\s*(.*))?', re.S)


def read_reply(text: str, tools: Optional[list], tool_choice: Any, finish: Optional[str]) -> Optional[ParsedReply]:
    """A whole reply's `ParsedReply` where `tools` were rendered (None without): its tool calls, or for a
    forced call that max_tokens cut (`finish` "length"), a `CutCall`."""
    if tools is None:
        return None
    reply = parse_tool_calls(text, tools)
    if reply.tool_calls or finish != "length" or not forced(tools, tool_choice):
        return reply
    return cut_call(text, tools) or reply


def cut_call(text: str, tools: list) -> Optional[CutCall]:
    """The `CutCall` of a forced call's text `{"name": "f", "parameters": {...` cut short (None when it is
    no such text). A name cut short is the one tool's, when there is one."""
    names = [(t.get("function") or t).get("name") for t in tools]
    m = _CALL_START.match(text)
    name, arguments = None, ""
    if m is not None:
        try:
            name = json.loads(f'"{m.group(1)}"')
        except ValueError:
            name = None
        arguments = m.group(2) or ""
    if name not in names:
        if len(names) != 1 or not text.lstrip().startswith("{"):
            return None
        name, arguments = names[0], ""
    call = {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": name, "arguments": close_json(arguments)}}
    return CutCall(None, [call])


def _scan(text: str) -> tuple[list[str], bool, bool, list[int]]:
    """(open brackets, inside a string, after a backslash there, where values may be cut: the index
    after each `{`/`[` and at each `,` outside strings) of JSON text cut anywhere."""
    stack, cuts, in_string, escaped = [], [], False, False
    for i, c in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            stack.append("}" if c == "{" else "]")
            cuts.append(i + 1)
        elif c in "}]" and stack:
            stack.pop()
        elif c == ",":
            cuts.append(i)
    return stack, in_string, escaped, cuts


def close_json(text: str) -> str:
    """JSON object text cut anywhere, closed: an open string ended, open objects and arrays closed, a
    key or value left half-written dropped (`{"city": "Par` -> `{"city": "Par"}`, `{"city": ` -> `{}`)."""
    try:  # whole already (what follows it, such as the call's own closing brace, aside)
        value, _ = json.JSONDecoder().raw_decode(text.lstrip())
        if isinstance(value, dict):
            return json.dumps(value, ensure_ascii=False)
    except ValueError:
        pass
    while True:
        stack, in_string, escaped, cuts = _scan(text)
        body = text[:-1] if escaped else text
        if not in_string:
            body = body.rstrip().removesuffix(",")
        try:
            value = json.loads(body + ('"' if in_string else "") + "".join(reversed(stack)))
        except ValueError:
            value = None
        if isinstance(value, dict):
            return json.dumps(value, ensure_ascii=False)
        shorter = [c for c in cuts if c < len(text)]
        if not shorter:
            return "{}"
        text = text[: shorter[-1]]


# -- streamed replies


async def shown_text(job, tools: Optional[list], tool_choice: Any = None) -> AsyncIterator[tuple[str, Any, Any]]:
    """A job's text as a stream shows it, the text of tool calls held back where `tools` were rendered
    (`llama_mlx.tools.ToolCallStream`): (text, None, None) for each piece to show, then, at the job's
    last event, ("", that event, its `ParsedReply` with the tool calls, None without `tools`; a
    `CutCall` for a forced call that max_tokens cut, its text not shown)."""
    holder = ToolCallStream(tools) if tools is not None else None
    whole = []
    async for e in job:
        whole.append(e.text)
        text = holder.feed(e.text) if holder else e.text
        if text:
            yield text, None, None
        if e.finish_reason is None:
            continue
        reply = None
        if holder:
            rest, reply = holder.finish()
            if not reply.tool_calls and e.finish_reason == "length" and forced(tools, tool_choice):
                reply = cut_call("".join(whole), tools) or reply
            if rest and not isinstance(reply, CutCall):
                yield rest, None, None
        yield "", e, reply


# -- server-sent events


def _data(obj: dict) -> bytes:
    return b"data: " + _dumps(obj).encode() + b"\n\n"


def _event(name: str, obj: dict) -> bytes:
    return f"event: {name}\n".encode() + _data(obj)


_cut = False  # set by `cut_streams`: the server's shutdown drain has run out
_cut_waiters: set = set()


def cut_streams() -> None:
    """End every server-sent event stream with a final error event (on the event loop, at shutdown once
    the drain's time is up: see server.run's `shutdown_timeout`)."""
    global _cut
    _cut = True
    for waiter in list(_cut_waiters):
        if not waiter.done():
            waiter.set_result(None)


def streams_cut() -> bool:
    """Whether `cut_streams` has been called."""
    return _cut


_CUT_MESSAGE = "the server is shutting down: this stream was cut"


async def _cuttable(frames: AsyncIterator[bytes], named: bool = False) -> AsyncIterator[bytes]:
    """`frames`, until `cut_streams`: then a last error event (Anthropic's `event: error` in a stream of
    named events, or one that will be: `named`, OpenAI's `data: {"error": ...}` otherwise) and the end."""
    it = frames.__aiter__()
    cut = asyncio.get_running_loop().create_future()
    _cut_waiters.add(cut)
    step = None
    try:
        while not _cut:
            step = asyncio.ensure_future(it.__anext__())
            await asyncio.wait({step, cut}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                step.cancel()  # (the stream's own `finally` cancels its jobs)
                break
            try:
                frame = step.result()
            except StopAsyncIteration:
                return
            step = None
            named = named or frame.startswith(b"event:")
            yield frame
        if named:
            yield _event("error", {"type": "error", "error": {"type": "overloaded_error", "message": _CUT_MESSAGE}})
        else:
            yield _data({"error": {"message": _CUT_MESSAGE, "type": "server_error", "param": None,
                                   "code": "server_shutting_down"}})
    finally:
        _cut_waiters.discard(cut)
        if step is not None and not step.done():
            step.cancel()  # (the stream's own `finally` cancels its jobs)


def _sse(frames: AsyncIterator[bytes], headers: Optional[dict] = None, *, named: bool = False) -> StreamingResponse:
    return StreamingResponse(_cuttable(frames, named), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})
