"""What the server's endpoint modules share: `ApiError` (OpenAI's error fields), request field checks,
a job's text as streams show it (`shown_text`), and server-sent event frames."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any, AsyncIterator, Optional

from starlette.responses import JSONResponse, StreamingResponse

from .tools import ToolCallStream

__all__ = ["ApiError"]


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


# -- streamed replies


async def shown_text(job, tools: Optional[list]) -> AsyncIterator[tuple[str, Any, Any]]:
    """A job's text as a stream shows it, the text of tool calls held back where `tools` were rendered
    (`llama_mlx.tools.ToolCallStream`): (text, None, None) for each piece to show, then, at the job's
    last event, ("", that event, its `ParsedReply` with the tool calls, None without `tools`)."""
    holder = ToolCallStream(tools) if tools is not None else None
    async for e in job:
        text = holder.feed(e.text) if holder else e.text
        if text:
            yield text, None, None
        if e.finish_reason is None:
            continue
        reply = None
        if holder:
            rest, reply = holder.finish()
            if rest:
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


async def _cuttable(frames: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """`frames`, until `cut_streams`: then a last error event (Anthropic's `event: error` in a stream of
    named events, OpenAI's `data: {"error": ...}` otherwise) and the end."""
    it = frames.__aiter__()
    cut = asyncio.get_running_loop().create_future()
    _cut_waiters.add(cut)
    step = None
    named = False
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


def _sse(frames: AsyncIterator[bytes], headers: Optional[dict] = None) -> StreamingResponse:
    return StreamingResponse(_cuttable(frames), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})
