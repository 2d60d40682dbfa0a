"""ollama's API on the same port: /api/version, /api/tags, /api/show, /api/ps, /api/chat, /api/generate,
/api/embed, /api/embeddings and /api/pull, in ollama's shapes (errors as `{"error": "..."}`).

Streams are newline-delimited JSON, on by default as ollama's are (`"stream": false` for one object).
`format` ("json" or a JSON schema) goes through constrained decoding. `options` map onto sampling:
temperature, top_p, top_k, min_p, seed, num_predict (-1/-2: up to the context), stop, presence_penalty,
frequency_penalty, repeat_penalty and repeat_last_n; the others (num_ctx, num_gpu, num_thread,
mirostat, tfs_z, typical_p, ...) are ignored. Unset, temperature and top_p are the model's (its
generation_config.json or GGUF general.sampling.*, else Meta's 0.6 / 0.9; serve's --temp / --top-p
first), top_k ollama's 40. `keep_alive` goes to the model registry. /api/pull downloads a Hugging Face
id (org/name[:QUANT]) into the hub cache through llama_mlx.hub; ollama's own registry is not reached.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, AsyncIterator, Optional

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from . import hub
from .api_common import ApiError, _get, shown_text
from .api_embeddings import _shorten, embed_rows, tokenize_inputs
from .engine import Engine, EngineEvent
from .errors import LlamaMLXError
from .tools import supports_tools

__all__ = ["OLLAMA_VERSION", "ROUTES", "chat", "embed", "embeddings", "generate", "parse_keep_alive", "ps", "pull",
           "show", "tags", "version"]

log = logging.getLogger("llama_mlx.server")

# The ollama API level these endpoints follow (clients gate features on it).
OLLAMA_VERSION = "0.12.0"
_DEFAULTS = {"top_k": 40}  # ollama's, where a request sets none (temperature, top_p: the model's, as ollama's Modelfile)
_FOREVER = "9999-12-31T23:59:59Z"
# (handler name = path under /api/, method)
ROUTES = [("version", "GET"), ("tags", "GET"), ("ps", "GET"), ("show", "POST"), ("chat", "POST"), ("generate", "POST"),
          ("embed", "POST"), ("embeddings", "POST"), ("pull", "POST")]


def _now() -> str:
    return _iso(time.time())


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")


_DURATION = re.compile(r"(-?\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: Any) -> Optional[float]:
    """ollama's keep_alive in seconds: a number (seconds) or a Go duration ("5m", "1h30m", "-1");
    negative: forever; None when unset. ApiError 400 otherwise."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"-?\d+(\.\d+)?", text):
            return float(text)
        parts = _DURATION.findall(text)
        if parts and "".join(n + u for n, u in parts) == text:
            return sum(float(n) * _UNITS[u] for n, u in parts)
    raise ApiError(400, f"'keep_alive' must be seconds or a duration such as '5m', got {str(value)[:40]!r}",
                   param="keep_alive")


async def _engine(api, body: dict) -> tuple[Engine, str]:
    model = body.get("model")
    if model is None:
        model = body.get("name")  # older clients' key
    engine = await api.engine_for(model, keep_alive=parse_keep_alive(body.get("keep_alive")))
    return engine, api.name_of(engine)


# -- what a model is


def _parameter_count(a) -> int:
    """Llama's parameter count from its shape (packed quantized weights would undercount)."""
    attn = a.hidden_size * a.head_dim * (2 * a.num_attention_heads + 2 * a.num_key_value_heads)
    mlp = 3 * a.hidden_size * a.intermediate_size
    embed = a.vocab_size * a.hidden_size * (1 if a.tie_word_embeddings else 2)
    return embed + a.num_hidden_layers * (attn + mlp + 2 * a.hidden_size) + a.hidden_size


def _size_label(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}".rstrip("0").rstrip(".") + unit
    return str(n)


def _quant_label(quantization: Optional[dict], dtype: Optional[str]) -> str:
    if quantization and quantization.get("bits"):
        return f"Q{quantization['bits']}"
    return {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}.get(str(dtype or "").removeprefix("mlx.core."),
                                                                       "")


def _details(engine: Optional[Engine], path: str = "") -> dict:
    details = {"parent_model": "", "format": "gguf" if path.endswith(".gguf") else "mlx", "family": "llama",
               "families": ["llama"], "parameter_size": "", "quantization_level": ""}
    args, dtype = None, None
    if engine is not None and engine.ready:
        args, dtype = engine.model.args, engine.model.model.embed_tokens.weight.dtype
    elif path and (Path(path) / "config.json").is_file():
        try:
            from .model import ModelArgs

            config = json.loads((Path(path) / "config.json").read_text())
            args, dtype = ModelArgs.from_dict(config), config.get("torch_dtype")
        except (OSError, ValueError, TypeError, KeyError):
            return details
    if args is not None:
        details["parameter_size"] = _size_label(_parameter_count(args))
        details["quantization_level"] = _quant_label(args.quantization, dtype)
    return details


def _digest(name: str, path: str) -> str:
    # Names this model (ollama's is its manifest's content hash; nothing here has one).
    return hashlib.sha256(f"{name}\0{path}".encode()).hexdigest()


def _modified(path: str) -> str:
    try:
        return _iso(Path(path).stat().st_mtime)
    except OSError:
        return _now()


async def version(api, request: Request) -> Response:
    """GET /api/version."""
    api.check_key(request)
    from . import __version__

    return JSONResponse({"version": OLLAMA_VERSION, "llama_mlx": __version__})


async def tags(api, request: Request) -> Response:
    """GET /api/tags: every model the server can serve (listed off the event loop: it reads the disk)."""
    api.check_key(request)

    def models() -> list[dict]:
        engines = api.registry.engines()
        return [{"name": info.name, "model": info.name, "modified_at": _modified(info.path), "size": info.size_bytes,
                 "digest": _digest(info.name, info.path), "details": _details(engines.get(info.name), info.path)}
                for info in api.registry.list()]

    return JSONResponse({"models": await asyncio.to_thread(models)})


async def ps(api, request: Request) -> Response:
    """GET /api/ps: the models loaded now."""
    import mlx.core as mx

    api.check_key(request)
    engines = api.registry.engines()
    gpu = mx.default_device().type == mx.gpu
    models = []
    for info in api.registry.list(listed=False):
        engine = engines.get(info.name)
        if not info.loaded or engine is None:
            continue
        size = info.loaded_bytes or info.size_bytes
        models.append({"name": info.name, "model": info.name, "size": size, "digest": _digest(info.name, info.path),
                       "details": _details(engine, info.path),
                       "expires_at": _iso(info.expires_at) if info.expires_at is not None else _FOREVER,
                       "size_vram": size if gpu else 0,
                       "context_length": engine.context_length if engine.ready else 0})
    return JSONResponse({"models": models})


async def show(api, request: Request) -> Response:
    """POST /api/show: the model's details, `model_info` (its shape under GGUF's keys), template and
    capabilities (loads the model)."""
    api.check_key(request)
    body = await api.read_json(request)
    engine, name = await _engine(api, body)
    a, tok = engine.model.args, engine.tokenizer
    info = {"general.architecture": "llama", "general.parameter_count": _parameter_count(a),
            "llama.context_length": engine.context_length, "llama.embedding_length": a.hidden_size,
            "llama.block_count": a.num_hidden_layers, "llama.feed_forward_length": a.intermediate_size,
            "llama.attention.head_count": a.num_attention_heads,
            "llama.attention.head_count_kv": a.num_key_value_heads, "llama.attention.key_length": a.head_dim,
            "llama.attention.value_length": a.head_dim, "llama.attention.layer_norm_rms_epsilon": a.rms_norm_eps,
            "llama.rope.freq_base": a.rope_theta, "llama.vocab_size": a.vocab_size}
    capabilities = ["completion"] + (["tools"] if supports_tools(tok) else [])
    path = next((i.path for i in api.registry.list(listed=False) if i.name == name), "")
    stops = sorted(tok.token_bytes(t).decode("utf-8", "replace") for t in tok.stop_tokens)
    return JSONResponse({"license": "", "modelfile": f"FROM {path}\n" if path else "",
                         "parameters": "\n".join(f"stop {json.dumps(s)}" for s in stops),
                         "template": getattr(tok, "chat_template", None) or "",
                         "details": _details(engine, path), "model_info": info, "capabilities": capabilities,
                         "modified_at": _modified(path)})


# -- generation


def _sampling(api, engine: Engine, body: dict, prompt: list[int]):
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'options' must be an object", param="options")
    fields = {**_DEFAULTS, **{k: options[k] for k in ("temperature", "top_p", "top_k", "seed", "stop",
                                                      "presence_penalty", "frequency_penalty") if k in options}}
    predict = _get(options, "num_predict", (int,), None)
    if predict is not None:
        fields["num_predict"] = predict if predict >= 0 else engine.context_length  # -1, -2: to the context's end
    if fields.get("top_p") == 0:
        fields["top_p"] = 1.0  # ollama reads 0 as off
    if fields.get("seed") == -1:
        del fields["seed"]  # ollama's "a random seed"
    req = api.sampling(engine, fields, prompt, max_keys=("num_predict",), temperature_max=math.inf)
    penalty = _get(options, "repeat_penalty", (int, float), None, "a number")
    if penalty is not None and penalty != 1:
        if penalty <= 0:
            raise ApiError(400, "'repeat_penalty' must be positive", param="repeat_penalty")
        req.params.repetition_penalty = float(penalty)
        last_n = _get(options, "repeat_last_n", (int,), 64)
        req.params.repetition_context_size = engine.context_length if last_n < 0 else max(last_n, 1)
    min_p = _get(options, "min_p", (int, float), None, "a number")
    if min_p is not None:
        if not 0 <= min_p <= 1:
            raise ApiError(400, "'min_p' must be in [0, 1]", param="min_p")
        req.params.min_p = float(min_p)
    return req


def _format(value: Any) -> Optional[dict]:
    """ollama's `format` as a response_format."""
    if value in (None, ""):
        return None
    if value == "json":
        return {"type": "json_object"}
    if isinstance(value, dict):
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": value}}
    raise ApiError(400, "'format' must be \"json\" or a JSON schema", param="format")


def _stats(last: EngineEvent, started: float) -> dict:
    u = last.usage
    total = time.monotonic() - started
    prompt_s = max(u.time_to_first_token or 0.0, 0.0)
    return {"total_duration": int(total * 1e9), "load_duration": 0, "prompt_eval_count": u.prompt_tokens,
            "prompt_eval_duration": int(prompt_s * 1e9), "eval_count": u.completion_tokens,
            "eval_duration": int(max(total - prompt_s, 0.0) * 1e9)}


def _ollama_calls(calls: list[dict]) -> list[dict]:
    return [{"function": {"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}}
            for c in calls]


def _messages(messages: Any) -> list[dict]:
    """ollama chat messages as OpenAI's (tool calls with ids, tool results)."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ApiError(400, "'messages' must be a list of objects", param="messages")
    out = []
    for i, m in enumerate(messages):
        content = m.get("content") or ""
        if not isinstance(content, str):
            raise ApiError(400, f"message {i}: 'content' must be a string", param="messages")
        msg: dict = {"role": m.get("role"), "content": content}
        calls = m.get("tool_calls")
        if calls:
            if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("function"), dict)
                                                      for c in calls):
                raise ApiError(400, f"message {i}: 'tool_calls' must be a list of {{function: {{name, arguments}}}}",
                               param="messages")
            msg["tool_calls"] = [{"id": f"call_{i}_{j}", "type": "function", "function": {
                "name": c["function"].get("name"), "arguments": c["function"].get("arguments") or {}}}
                for j, c in enumerate(calls)]
            if not content:
                del msg["content"]
        if m.get("tool_name"):
            msg["name"] = m["tool_name"]
        if m.get("images"):  # base64 strings: decoded by chat_prompt (api_images), the image before the text
            msg["content"] = _image_parts(m["images"], "messages") + [{"type": "text", "text": content}]
        out.append(msg)
    return out


def _image_parts(images: Any, param: str) -> list[dict]:
    if not isinstance(images, list) or not all(isinstance(b, str) for b in images):
        raise ApiError(400, "'images' must be a list of base64 strings", param=param)
    return [{"type": "image", "source": {"type": "base64", "data": b}} for b in images]


def _ndjson(lines: AsyncIterator[dict]) -> StreamingResponse:
    async def body():
        async for obj in lines:
            yield json.dumps(obj, ensure_ascii=False).encode() + b"\n"

    return StreamingResponse(body(), media_type="application/x-ndjson")


async def _loaded(api, body: dict, name: str, engine: Engine, reply_key: str) -> Response:
    """An empty chat or prompt: ollama's way to load a model (or, with keep_alive 0, to unload it)."""
    reason = "load"
    if parse_keep_alive(body.get("keep_alive")) == 0:
        await api.registry.unload(name)
        reason = "unload"
    reply = {"role": "assistant", "content": ""} if reply_key == "message" else ""
    return JSONResponse({"model": name, "created_at": _now(), reply_key: reply, "done": True, "done_reason": reason})


async def chat(api, request: Request) -> Response:
    """POST /api/chat."""
    started = time.monotonic()
    api.check_key(request)
    body = await api.read_json(request)
    engine, name = await _engine(api, body)
    stream = _get(body, "stream", (bool,), True)
    if not body.get("messages"):
        return await _loaded(api, body, name, engine, "message")
    tools = body.get("tools") or None
    prompt, rendered, headers = await asyncio.to_thread(api.chat_prompt, engine, _messages(body.get("messages")),
                                                        tools, None)
    req = _sampling(api, engine, body, prompt)
    await asyncio.to_thread(api.constrain, req, _format(body.get("format")), rendered, None, engine)
    job = api.submit(engine, req)
    head = {"model": name}
    if stream:
        return _ndjson(_chat_stream(job, head, rendered, started))
    answer = await api.whole(request, job, rendered)
    if answer is None:
        return Response(status_code=499)
    events, last, text, reply = answer
    message = {"role": "assistant", "content": (reply.content or "") if reply else text}
    if reply and reply.tool_calls:
        message["tool_calls"] = _ollama_calls(reply.tool_calls)
    return JSONResponse({**head, "created_at": _now(), "message": message, "done": True,
                         "done_reason": last.finish_reason, **_stats(last, started)}, headers=headers)


async def _chat_stream(job, head: dict, tools: Optional[list], started: float) -> AsyncIterator[dict]:
    def chunk(content: str, **extra) -> dict:
        return {**head, "created_at": _now(), "message": {"role": "assistant", "content": content, **extra},
                "done": False}

    try:
        async for text, e, reply in shown_text(job, tools):
            if e is None:
                yield chunk(text)
                continue
            if reply and reply.tool_calls:
                yield chunk("", tool_calls=_ollama_calls(reply.tool_calls))
            yield {**chunk(""), "done": True, "done_reason": e.finish_reason, **_stats(e, started)}
    except Exception as exc:  # noqa: BLE001 - the status line is sent: report in the stream
        log.exception("generation failed")
        yield {"error": str(exc)}
    finally:
        job.cancel()


async def generate(api, request: Request) -> Response:
    """POST /api/generate: `prompt` (with `system`) through the chat template, or as is with `raw`;
    `context` (the token ids a previous answer returned) continues that conversation."""
    started = time.monotonic()
    api.check_key(request)
    body = await api.read_json(request)
    engine, name = await _engine(api, body)
    stream = _get(body, "stream", (bool,), True)
    prompt = _get(body, "prompt", (str,), "")
    system = _get(body, "system", (str,), None)
    for key in ("suffix", "template"):
        if body.get(key):
            raise ApiError(400, f"'{key}' is not supported", param=key)
    context = body.get("context") or []
    tok = engine.tokenizer
    if not isinstance(context, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                and 0 <= t < tok.vocab_size for t in context):
        raise ApiError(400, "'context' must be a list of token ids of this model", param="context")
    if not prompt and not context:
        return await _loaded(api, body, name, engine, "response")
    images = body.get("images")
    if images and (context or _get(body, "raw", (bool,), False)):
        raise ApiError(400, "'images' go with a templated prompt, without 'context' or 'raw'", param="images")
    if _get(body, "raw", (bool,), False):
        if len(prompt.encode("utf-8", "replace")) > api.config.max_prompt_bytes:
            raise ApiError(400, f"'prompt' is over the {api.config.max_prompt_bytes}-byte limit", param="prompt")
        ids = await asyncio.to_thread(tok.encode, prompt, bos=tok.add_bos and tok.bos_id is not None and not context)
    else:
        user = _image_parts(images, "images") + [{"type": "text", "text": prompt}] if images else prompt
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        ids = (await asyncio.to_thread(api.chat_prompt, engine, messages, None, None))[0]
        if context and tok.bos_id is not None and ids[:1] == [tok.bos_id]:
            ids = ids[1:]  # the context starts with it already
    if context:
        ids = list(context) + ids
    req = _sampling(api, engine, body, ids)
    await asyncio.to_thread(api.constrain, req, _format(body.get("format")), None, None, engine)
    job = api.submit(engine, req)
    head = {"model": name}
    stops = tok.stop_tokens
    if stream:
        return _ndjson(_generate_stream(job, head, ids, stops, started))
    events = await api.collect(request, job)
    last = events[-1] if events else None
    if last is None or last.usage is None:
        return Response(status_code=499)
    return JSONResponse({**head, "created_at": _now(), "response": "".join(e.text for e in events), "done": True,
                         "done_reason": last.finish_reason,
                         "context": ids + [e.token for e in events if e.token not in stops], **_stats(last, started)})


async def _generate_stream(job, head: dict, ids: list[int], stops, started: float) -> AsyncIterator[dict]:
    tokens = list(ids)
    try:
        async for e in job:
            if e.token not in stops:
                tokens.append(e.token)
            if e.text:
                yield {**head, "created_at": _now(), "response": e.text, "done": False}
            if e.finish_reason is not None:
                yield {**head, "created_at": _now(), "response": "", "done": True, "done_reason": e.finish_reason,
                       "context": tokens, **_stats(e, started)}
    except Exception as exc:  # noqa: BLE001
        log.exception("generation failed")
        yield {"error": str(exc)}
    finally:
        job.cancel()


# -- embeddings


async def embed(api, request: Request) -> Response:
    """POST /api/embed: `input` a string or a list of them; normalised, mean-pooled vectors;
    `truncate` (default true) cuts inputs to the context, `dimensions` shortens them."""
    started = time.monotonic()
    api.check_key(request)
    body = await api.read_json(request)
    engine, name = await _engine(api, body)
    inputs = body.get("input")
    if not isinstance(inputs, str) and not (isinstance(inputs, list) and all(isinstance(s, str) for s in inputs)):
        raise ApiError(400, "'input' must be a string or a list of strings", param="input")
    if inputs == []:
        return JSONResponse({"model": name, "embeddings": []})
    dimensions = _get(body, "dimensions", (int,), None)
    if dimensions is not None and dimensions < 1:
        raise ApiError(400, "'dimensions' must be at least 1", param="dimensions")
    rows = await tokenize_inputs(engine, inputs, truncate=_get(body, "truncate", (bool,), True))
    vectors = [_shorten(v, dimensions) for v in await embed_rows(engine, rows)]
    total = int((time.monotonic() - started) * 1e9)
    return JSONResponse({"model": name, "embeddings": vectors, "total_duration": total, "load_duration": 0,
                         "prompt_eval_count": sum(map(len, rows))})


async def embeddings(api, request: Request) -> Response:
    """POST /api/embeddings (ollama's older endpoint): one `prompt`, its mean-pooled vector not
    normalised, as ollama's older endpoint answers."""
    api.check_key(request)
    body = await api.read_json(request)
    engine, _ = await _engine(api, body)
    prompt = _get(body, "prompt", (str,), "")
    if not prompt:
        return JSONResponse({"embedding": []})
    rows = await tokenize_inputs(engine, [prompt], param="prompt")
    (vector,) = await embed_rows(engine, rows, normalize=False)
    return JSONResponse({"embedding": vector})


# -- pulling


async def pull(api, request: Request) -> Response:
    """POST /api/pull: download a Hugging Face id into the hub cache (llama_mlx.hub), reporting
    status lines (`stream`, default true) or one object; failures are one `error` line."""
    api.check_key(request)
    body = await api.read_json(request)
    model = body.get("model") if body.get("model") is not None else body.get("name")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' must be a Hugging Face id (org/name or org/name:QUANT)", param="model")
    stream = _get(body, "stream", (bool,), True)
    failed = [0]  # the status a one-object answer gets: 400 for a name that is no hub id, else ollama's 500

    async def lines() -> AsyncIterator[dict]:
        yield {"status": "pulling manifest"}
        if not hub.is_hub_id(model):
            failed[0] = 400
            yield {"error": f"{model}: not a Hugging Face id (org/name or org/name:QUANT); this server pulls from "
                            "the Hugging Face hub, not ollama's registry"}
            return
        try:
            path = await asyncio.to_thread(hub.resolve, model)
        except LlamaMLXError as e:
            failed[0] = 500
            yield {"error": str(e)}
            return
        yield {"status": f"pulled into {path}"}
        yield {"status": "success"}

    if stream:
        return _ndjson(lines())
    last: dict = {}
    async for line in lines():
        last = line
    if "error" in last:
        raise ApiError(failed[0], last["error"])
    return JSONResponse(last)
