"""OpenAI's Responses API, stateless: `POST /v1/responses`.

`input` (text, or message / function_call / function_call_output items) and `instructions` become
chat messages rendered through the model's template with `tools` (function tools); `max_output_tokens`,
`temperature` and `top_p` its sampling; `text.format` (json_schema, json_object) and a forced
`tool_choice` go through constrained decoding, as on /v1/chat/completions. Replies are `message`
items (`output_text`) and `function_call` items; streamed as OpenAI's typed events, numbered by
`sequence_number`. Nothing is stored: `previous_response_id`, `conversation` and `background` are
refused (send the whole conversation in `input`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, AsyncIterator, Optional

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .api_common import ApiError, CutCall, _event, _get, _sse, shown_text
from .engine import EngineEvent

__all__ = ["responses"]

log = logging.getLogger("llama_mlx.server")

_TEXT_PARTS = ("input_text", "output_text", "text")


def _text(content: Any, where: str, images: bool = False) -> Any:
    """A content's text; with `images`, a content holding an `input_image` part stays a list of parts
    (text and that image, decoded by the server's `chat_prompt`)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not all(isinstance(p, dict) for p in content):
        raise ApiError(400, f"{where}: content must be a string or a list of content parts", param="input")
    if images and any(p.get("type") == "input_image" for p in content):
        if all(p.get("type") in _TEXT_PARTS + ("input_image",) for p in content):
            return [p if p.get("type") == "input_image" else {"type": "text", "text": str(p.get("text", ""))}
                    for p in content]
    for part in content:
        if part.get("type") not in _TEXT_PARTS:
            raise ApiError(400, f"{where}: content parts of type {part.get('type')!r} are not supported (text only)",
                           param="input")
    return "".join(str(p.get("text", "")) for p in content)


def to_messages(input_: Any, instructions: Any) -> list[dict]:
    """Chat messages of a request's `instructions` and `input` (a string or a list of items)."""
    messages: list[dict] = []
    if instructions is not None:
        if not isinstance(instructions, str):
            raise ApiError(400, "'instructions' must be a string", param="instructions")
        messages.append({"role": "system", "content": instructions})
    if isinstance(input_, str):
        return messages + [{"role": "user", "content": input_}]
    if not isinstance(input_, list) or not input_ or not all(isinstance(i, dict) for i in input_):
        raise ApiError(400, "'input' must be a string or a non-empty list of items", param="input")
    for n, item in enumerate(input_):
        kind = item.get("type", "message" if "role" in item else None)
        where = f"input item {n}"
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise ApiError(400, f"{where}: 'role' must be user, assistant, system or developer", param="input")
            messages.append({"role": "system" if role == "developer" else role,
                             "content": _text(item.get("content"), where, images=role == "user")})
        elif kind == "function_call":
            name, arguments = item.get("name"), item.get("arguments", "{}")
            if not isinstance(name, str) or not isinstance(arguments, str):
                raise ApiError(400, f"{where}: a function_call needs 'name' and 'arguments' (a JSON string)",
                               param="input")
            call = {"id": item.get("call_id"), "type": "function", "function": {"name": name, "arguments": arguments}}
            if messages and messages[-1]["role"] == "assistant":  # the calls of one turn share its message
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": _text(output if output is not None else "", where)})
        elif kind == "reasoning":
            continue  # another model's reasoning: this one has none to continue
        else:
            raise ApiError(400, f"{where}: items of type {kind!r} are not supported (message, function_call, "
                                "function_call_output)", param="input")
    return messages


def _tools(tools: Any) -> Optional[list[dict]]:
    """Responses function tools as chat tools."""
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ApiError(400, "'tools' must be a list of objects", param="tools")
    out = []
    for t in tools:
        if t.get("type") != "function" or not isinstance(t.get("name"), str):
            raise ApiError(400, f"only function tools (type 'function' with a 'name') are supported, got "
                                f"{str(t.get('type'))[:40]!r}", param="tools")
        out.append({"type": "function", "function": {"name": t["name"], "description": t.get("description") or "",
                                                     "parameters": t.get("parameters") or {"type": "object"}}})
    return out or None


def _tool_choice(choice: Any) -> Any:
    if choice is None or choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise ApiError(400, "'tool_choice' must be auto, none, required or {type: function, name}", param="tool_choice")


def _response_format(text: Any) -> Optional[dict]:
    """`text.format` as chat's `response_format`."""
    if text is None:
        return None
    if not isinstance(text, dict):
        raise ApiError(400, "'text' must be an object", param="text")
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise ApiError(400, "'text.format.type' must be text, json_object or json_schema", param="text.format")
    if fmt["type"] == "json_schema":
        return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}}
    return {"type": fmt["type"]}


def _usage(e: Optional[EngineEvent]) -> Optional[dict]:
    if e is None or e.usage is None:
        return None
    u = e.usage
    return {"input_tokens": u.prompt_tokens, "input_tokens_details": {"cached_tokens": u.cached_tokens,
                                                                      "cache_write_tokens": 0},
            "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u.prompt_tokens + u.completion_tokens}


def _message_item(item_id: str, text: str, status: str = "completed") -> dict:
    content = [] if status == "in_progress" else [{"type": "output_text", "text": text, "annotations": [],
                                                  "logprobs": []}]
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def _call_item(call: dict, status: str = "completed", arguments: Optional[str] = None) -> dict:
    return {"type": "function_call", "id": "fc_" + call["id"].removeprefix("call_"), "call_id": call["id"],
            "name": call["function"]["name"],
            "arguments": call["function"]["arguments"] if arguments is None else arguments, "status": status}


class _Shape:
    """The response object's fields that echo the request."""

    def __init__(self, body: dict, model: str, req, tool_choice: Any):
        self.id = "resp_" + uuid.uuid4().hex
        self.fields = {
            "object": "response", "created_at": int(time.time()), "model": model,
            "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "metadata": body.get("metadata") or {}, "parallel_tool_calls": bool(body.get("parallel_tool_calls", True)),
            "previous_response_id": None, "temperature": req.params.temp, "top_p": req.params.top_p,
            "tool_choice": body.get("tool_choice") if tool_choice is not None else "auto",
            "tools": body.get("tools") or [], "text": {"format": (body.get("text") or {}).get("format")
                                                       or {"type": "text"}},
            "truncation": "disabled", "store": False, "background": False, "reasoning": None,
            "error": None, "incomplete_details": None, "user": body.get("user")}

    def response(self, status: str, output: list, last: Optional[EngineEvent] = None) -> dict:
        out = {"id": self.id, **self.fields, "status": status, "output": output, "usage": _usage(last)}
        if status == "incomplete":
            out["incomplete_details"] = {"reason": "max_output_tokens"}
        if status in ("completed", "incomplete"):
            out["completed_at"] = int(time.time())
        return out


async def responses(api, request: Request) -> Response:
    """POST /v1/responses (see the module's docstring)."""
    api.check_key(request)
    body = await api.read_json(request)
    engine = await api.engine_for(body.get("model"))
    for key in ("previous_response_id", "conversation"):
        if body.get(key) is not None:
            raise ApiError(400, f"'{key}' is not supported: this server stores no responses; send the whole "
                                "conversation in 'input'", param=key)
    if body.get("background"):
        raise ApiError(400, "'background' is not supported: this server stores no responses", param="background")
    stream = _get(body, "stream", (bool,), False)
    tool_choice = _tool_choice(body.get("tool_choice"))
    messages = to_messages(body.get("input"), body.get("instructions"))
    try:
        prompt, rendered, headers = await asyncio.to_thread(api.chat_prompt, engine, messages,
                                                            _tools(body.get("tools")), tool_choice)
    except ApiError as e:
        if e.param == "messages":  # (this API's messages are its input)
            e.param = "input"
        raise
    sampling = {k: body[k] for k in ("temperature", "top_p", "max_output_tokens") if k in body}
    req = api.sampling(engine, sampling, prompt, max_keys=("max_output_tokens",))
    await asyncio.to_thread(api.constrain, req, _response_format(body.get("text")), rendered, tool_choice, engine)
    shape = _Shape(body, api.name_of(engine), req, tool_choice)
    job = api.submit(engine, req)
    if stream:
        return _sse(_stream(job, shape, rendered, tool_choice), headers)
    answer = await api.whole(request, job, rendered, tool_choice)
    if answer is None:
        return Response(status_code=499)
    events, last, text, reply = answer
    output = []
    if reply is None or reply.content or not reply.tool_calls:
        output.append(_message_item("msg_" + uuid.uuid4().hex, (reply.content or "") if reply else text))
    output += [_call_item(call, _call_status(reply)) for call in (reply.tool_calls if reply else [])]
    return JSONResponse(shape.response(_status(last, reply), output, last), headers=headers)


def _call_status(reply) -> str:
    # A forced call that max_output_tokens cut: its arguments closed into JSON, the item incomplete.
    return "incomplete" if isinstance(reply, CutCall) else "completed"


def _status(last: EngineEvent, reply) -> str:
    calls = reply.tool_calls if reply else []
    return "incomplete" if last.finish_reason == "length" and (not calls or isinstance(reply, CutCall)) else "completed"


async def _stream(job, shape: _Shape, tools: Optional[list], tool_choice: Any = None) -> AsyncIterator[bytes]:
    seq = 0

    def event(kind: str, **fields) -> bytes:
        nonlocal seq
        frame = _event(kind, {"type": kind, "sequence_number": seq, **fields})
        seq += 1
        return frame

    output: list[dict] = []
    message: Optional[dict] = None  # the open message item
    parts: list[str] = []

    def open_message() -> list[bytes]:
        nonlocal message
        message = _message_item("msg_" + uuid.uuid4().hex, "", "in_progress")
        index = len(output)
        output.append(message)
        return [event("response.output_item.added", output_index=index, item=message),
                event("response.content_part.added", item_id=message["id"], output_index=index, content_index=0,
                      part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})]

    def delta(text: str) -> list[bytes]:
        frames = open_message() if message is None else []
        parts.append(text)
        frames.append(event("response.output_text.delta", item_id=message["id"], output_index=len(output) - 1,
                            content_index=0, delta=text, logprobs=[]))
        return frames

    def close_message() -> list[bytes]:
        text, index = "".join(parts), output.index(message)
        done = _message_item(message["id"], text)
        output[index] = done
        part = done["content"][0]
        return [event("response.output_text.done", item_id=done["id"], output_index=index, content_index=0,
                      text=text, logprobs=[]),
                event("response.content_part.done", item_id=done["id"], output_index=index, content_index=0, part=part),
                event("response.output_item.done", output_index=index, item=done)]

    try:
        yield event("response.created", response=shape.response("in_progress", []))
        yield event("response.in_progress", response=shape.response("in_progress", []))
        async for text, e, reply in shown_text(job, tools, tool_choice):
            if e is None:
                for frame in delta(text):
                    yield frame
                continue
            calls = reply.tool_calls if reply else []
            if message is None and not calls:
                for frame in open_message():
                    yield frame
            if message is not None:
                for frame in close_message():
                    yield frame
            for call in calls:
                index = len(output)
                item = _call_item(call, _call_status(reply))
                output.append(item)
                yield event("response.output_item.added", output_index=index, item=_call_item(call, "in_progress", ""))
                yield event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                            delta=item["arguments"])
                yield event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                            name=item["name"], arguments=item["arguments"])
                yield event("response.output_item.done", output_index=index, item=item)
            status = _status(e, reply)
            yield event(f"response.{status}", response=shape.response(status, output, e))
    except Exception as exc:  # noqa: BLE001 - the status line is sent: report in the stream
        log.exception("generation failed")
        yield event("error", code="server_error", message=str(exc), param=None)
    finally:
        job.cancel()
