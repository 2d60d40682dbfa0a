"""An OpenAI- and Anthropic-compatible HTTP server over an `Engine`, or over the several models of a
`llama_mlx.registry.ModelRegistry` (a request's `model` picks one; Starlette; run it with uvicorn).

    app = create_app(engine, model_name="SmolLM2-135M-Instruct", api_key="secret")
    uvicorn.run(app, host="127.0.0.1", port=8080)

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions (both with
`n` choices decoded together), POST /v1/messages and /v1/messages/count_tokens (Anthropic),
GET /v1/internal/stats, GET /metrics (Prometheus' text format). Streams are server-sent events. Chat
prompts go through the model's template with `tools` (llama_mlx.tools); replies that are tool
calls come back as `tool_calls` / `tool_use` blocks; `response_format` and a forced `tool_choice`
are enforced by constrained decoding (llama_mlx.structured). A model whose template ignores tools
(`llama_mlx.tools.supports_tools`; SmolLM2's) never sees them: a forced `tool_choice` ("required",
a named function; Anthropic's any/tool) is a 400, and with "auto" the request is served without
them (no tool-call parsing), its response marked `X-Llama-MLX-Warning`. Errors are OpenAI's JSON
(`{"error": {...}}`; Anthropic's on /v1/messages). Prompts are never logged. What a web page of another
origin could send (a foreign Host or Origin, a POST that is not application/json) is refused (`RequestGuard`).
A request without temperature / top_p samples as its model recommends (`_Api.sampling_defaults`; serve's
--temp / --top-p first, else Meta's 0.6 / 0.9); a forced tool call cut by max_tokens is a call (`CutCall`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
import uuid
import weakref
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Optional, Sequence

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import api_common, api_embeddings, api_ollama, api_responses
from .api_common import (
    ApiError,
    CutCall,
    _data,
    _event,
    _finite,
    _get,
    _in_range,
    _kind,
    _sse,
    _stop_list,
    cut_streams,
    read_reply,
    shown_text,
)
from .api_images import ImagePolicy, has_images, is_image_part, take_images
from .engine import Engine, EngineClosedError, EngineEvent, GenerationRequest, KVCapacityError, QueueFullError
from .errors import LlamaMLXError
from .loading import generation_defaults, resolve_sampling
from .metrics import Gauge, Metrics
from .registry import ModelLoadError, ModelRegistry, RegistryBusyError, UnknownModelError
from .sample import SamplingParams
from .structured import JSONLogitsProcessor, ResponseFormatError, grammar_for_response_format
from .tools import (
    ToolCallStream,
    apply_tool_chat_template,
    normalize_messages,
    supports_tools,
    tools_for_choice,
)
from .vision.prompt import sees_images

__all__ = ["ApiError", "MAX_CHOICES", "RequestGuard", "ServerConfig", "create_app", "run"]

log = logging.getLogger("llama_mlx.server")

MAX_CHOICES = 8  # most `n` of one request: its choices decode together, a batch row each
MAX_JSON_DEPTH = 64  # deepest nesting of a request body's arrays and objects (deeper: 400)
MAX_SEED = (1 << 63) - 1


@dataclass
class ServerConfig:
    model_name: str = "model"
    api_key: Optional[str] = None
    allowed_origins: tuple[str, ...] = ()
    host: str = "127.0.0.1"  # where it listens: decides which Host headers are answered
    allowed_hosts: tuple[str, ...] = ()
    max_body_bytes: int = 8 << 20
    default_max_tokens: int = 512
    # Templating and tokenizing take ~1 s a MB: a chat's messages (their JSON) and tools are bounded
    # before any of it (400), far beyond what a 128k-token context holds (~0.5 MB of text).
    max_prompt_bytes: int = 2 << 20
    max_tools_bytes: int = 256 << 10
    images: ImagePolicy = ImagePolicy()  # where images may come from besides data URLs
    # Sampling of requests that set none (serve's --temp, --top-p); None: each model's own
    # (generation_config.json, GGUF general.sampling.*), else Meta's 0.6 / 0.9.
    temperature: Optional[float] = None
    top_p: Optional[float] = None


class _Api:
    def __init__(self, registry: ModelRegistry, config: ServerConfig):
        self.registry, self.config = registry, config
        self.metrics = Metrics()
        self._defaults: "weakref.WeakKeyDictionary[Engine, dict]" = weakref.WeakKeyDictionary()

    @property
    def engine(self) -> Optional[Engine]:
        """The default model's engine (None while it is unloaded)."""
        return self.registry.default_engine()

    # -- shared plumbing

    def check_key(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        given = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        if given is None or not hmac.compare_digest(given.encode(), key.encode()):
            raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')", code="invalid_api_key")

    async def read_json(self, request: Request) -> dict:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body is over the {limit}-byte limit", code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"the request body is over the {limit}-byte limit", code="request_too_large")
            chunks.append(chunk)
        raw = b"".join(chunks)
        if _json_depth(raw) > MAX_JSON_DEPTH:
            raise ApiError(400, f"the request body nests arrays and objects over {MAX_JSON_DEPTH} deep")
        try:
            body = json.loads(raw, parse_constant=_no_constant)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, an int over 4300 digits
            raise ApiError(400, f"the request body is not valid JSON: {str(e)[:200]}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    async def engine_for(self, model: Any, *, keep_alive: Optional[float] = None) -> Engine:
        """The engine serving a request's `model` (None or "": the default model), loaded: waits while
        it loads (unloading idle models to make room), without blocking the event loop. keep_alive:
        seconds the model stays loaded once idle (ollama's per request; negative: forever).
        ApiError 404 `model_not_found` for a name that names no model this server can serve (see
        `ModelRegistry.engine`), 400 for a `model` that is not a string, 503 when every loaded model
        is busy and none can make room, 500 `model_load_failed` when it fails to load."""
        if model is not None and not isinstance(model, str):
            raise ApiError(400, "'model' must be a string", param="model")
        try:
            return await self.registry.engine(model or None, keep_alive=keep_alive)
        except UnknownModelError as e:
            raise ApiError(404, f"model {e}", param="model", code="model_not_found") from None
        except RegistryBusyError as e:
            raise ApiError(503, str(e), code="server_busy") from None
        except ModelLoadError as e:
            raise ApiError(500, str(e), param="model", code="model_load_failed") from None

    def name_of(self, engine: Engine) -> str:
        """The name answers carry for the model `engine` serves."""
        return self.registry.name_of(engine) or self.config.model_name

    @staticmethod
    def choices(body: dict) -> int:
        """A request's `n`, bounded (400 beyond MAX_CHOICES)."""
        n = _get(body, "n", (int,), 1)
        if not 1 <= n <= MAX_CHOICES:
            raise ApiError(400, f"'n' must be in [1, {MAX_CHOICES}], got {n}", param="n")
        return n

    def submit_all(self, engine: Engine, request: GenerationRequest, n: int) -> list:
        """`n` jobs of one request, decoded together: with a seed, choice i samples with seed + i
        (so that choices differ yet are reproducible). All or none are queued."""
        jobs = []
        try:
            for i in range(n):
                req = request
                if i:
                    params = dataclasses.replace(request.params)
                    if params.seed is not None:
                        params.seed += i
                    req = dataclasses.replace(request, params=params)
                jobs.append(self.submit(engine, req, count_prompt=i == 0))
        except BaseException:
            for job in jobs:
                job.cancel()
            raise
        return jobs

    async def collect_all(self, request: Request, jobs: list) -> Optional[list[list[EngineEvent]]]:
        """Every job's events (None when one did not finish: the client went away)."""
        results = await asyncio.gather(*(self.collect(request, job) for job in jobs))
        if any(not events or events[-1].usage is None for events in results):
            return None
        return results

    def sampling_defaults(self, engine: Engine) -> dict[str, float]:
        """{"temp", "top_p"} of `engine`'s requests that set none: serve's --temp / --top-p, else the
        model's recommendation (`loading.generation_defaults`), else Meta's (`loading.resolve_sampling`)."""
        found = self._defaults.get(engine)
        if found is None:
            path = self.registry.path_of(engine)
            try:
                recommended = generation_defaults(path) if path is not None else {}
            except (LlamaMLXError, OSError) as e:  # the model loaded: serve it with Meta's defaults
                log.warning("%s: the model's sampling defaults are unreadable (%s); using Meta's", path, e)
                recommended = {}
            valid = {"temp": lambda v: 0 <= v < math.inf, "top_p": lambda v: 0 < v <= 1}  # (else: Meta's)
            recommended = {k: v for k, v in recommended.items() if k in valid and valid[k](v)}
            found, _ = resolve_sampling(recommended, temp=self.config.temperature, top_p=self.config.top_p)
            self._defaults[engine] = found
        return found

    def sampling(self, engine: Engine, body: dict, prompt: list[int], *,
                 max_keys=("max_completion_tokens", "max_tokens"),
                 stop_key: str = "stop", temperature_max: float = 2.0) -> GenerationRequest:
        defaults = self.sampling_defaults(engine)
        temperature = _get(body, "temperature", (int, float), None, "a number")
        top_p = _get(body, "top_p", (int, float), None, "a number")
        top_k = _get(body, "top_k", (int,), 0)
        _in_range("temperature", temperature, 0, temperature_max)
        _in_range("top_p", top_p, 0, 1, open_lo=True)
        # Only a request's own values are range-checked: serve's --temp may exceed Anthropic's 1.
        temperature = defaults["temp"] if temperature is None else temperature
        top_p = defaults["top_p"] if top_p is None else top_p
        if top_k < 0:
            raise ApiError(400, "'top_k' must be >= 0", param="top_k")
        max_tokens = None
        for key in max_keys:
            max_tokens = _get(body, key, (int,), None)
            if max_tokens is not None:
                if max_tokens < 1:
                    raise ApiError(400, f"'{key}' must be at least 1", param=key)
                break
        context = engine.context_length
        if len(prompt) >= context:
            fit = getattr(engine, "fit", None)
            holds = "the context that fits in memory" if fit is not None and fit.limited else "the model's context"
            raise ApiError(400, f"the prompt has {len(prompt)} tokens; {holds} holds {context}",
                           code="context_length_exceeded")
        room = context - len(prompt)
        max_tokens = min(max_tokens or self.config.default_max_tokens, room)
        presence = _get(body, "presence_penalty", (int, float), 0.0, "a number")
        frequency = _get(body, "frequency_penalty", (int, float), 0.0, "a number")
        _in_range("presence_penalty", presence, -2, 2)
        _in_range("frequency_penalty", frequency, -2, 2)
        bias = _get(body, "logit_bias", (dict,), None, "an object")
        logit_bias = None
        if bias:
            vocab = engine.tokenizer.vocab_size
            logit_bias = {}
            for k, v in bias.items():
                token = _int(k)
                if token is None or not _kind(v, (int, float)):
                    raise ApiError(400, "'logit_bias' maps token ids to numbers", param="logit_bias")
                if not 0 <= token < vocab or not -100 <= v <= 100:
                    raise ApiError(400, f"'logit_bias': token {k} outside the vocabulary or bias {v} outside "
                                        "[-100, 100]", param="logit_bias")
                logit_bias[token] = float(v)
        seed = _get(body, "seed", (int,), None)
        if seed is not None and not 0 <= seed <= MAX_SEED:
            raise ApiError(400, f"'seed' must be in [0, {MAX_SEED}]", param="seed")
        stop = _stop_list(body, stop_key)
        params = SamplingParams(temp=float(temperature), top_p=float(top_p), top_k=top_k, seed=seed,
                                logit_bias=logit_bias, presence_penalty=float(presence),
                                frequency_penalty=float(frequency))
        images = getattr(prompt, "images", ())  # a chat prompt's (`chat_prompt`): they run with it
        return GenerationRequest(prompt=list(prompt), max_tokens=max_tokens, params=params, stop=stop,
                                 images=tuple(i.image for i in images), image_keys=tuple(i.key for i in images))

    def submit(self, engine: Engine, request: GenerationRequest, *, count_prompt: bool = True):
        """Queue a generation (503 when the engine cannot take it). The job counts in /metrics once it
        finishes, its prompt tokens unless `count_prompt` is False (a second choice of one request)."""
        try:
            return _Metered(engine.submit(request), self.metrics, self.name_of(engine), count_prompt)
        except (QueueFullError, EngineClosedError) as e:
            raise ApiError(503, str(e), code="server_busy") from None
        except KVCapacityError as e:
            raise ApiError(503, f"{e} (--max-kv-bytes); ask for fewer tokens", code="kv_capacity_exceeded") from None

    async def whole(self, request: Request, job, tools: Optional[list], tool_choice: Any = None) -> Optional[tuple]:
        """(events, the last one, the text, its `ParsedReply` where `tools` were rendered: see
        `api_common.read_reply`) of a job run to its end; None when it ended without usage (the client
        went away)."""
        events = await self.collect(request, job)
        last = events[-1] if events else None
        if last is None or last.usage is None:
            return None
        text = "".join(e.text for e in events)
        return events, last, text, read_reply(text, tools, tool_choice, last.finish_reason)

    async def collect(self, request: Request, job) -> list[EngineEvent]:
        """All of a job's events; a client that goes away cancels it, and so does the end of the drain at
        shutdown (`cut_streams`: then a 503)."""

        async def watch():
            while not await request.is_disconnected() and not api_common.streams_cut():
                await asyncio.sleep(0.2)
            job.cancel()

        watcher = asyncio.create_task(watch())
        try:
            events = [event async for event in job]
            if api_common.streams_cut() and (not events or events[-1].usage is None):
                raise ApiError(503, "the server is shutting down: this request was cut", code="server_shutting_down")
            return events
        finally:
            watcher.cancel()
            job.cancel()

    def chat_prompt(self, engine: Engine, messages: Any, tools: Any,
                    tool_choice: Any) -> tuple[list[int], Optional[list], dict]:
        """(prompt ids, the tools rendered or None, response headers)."""
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise ApiError(400, "'messages' must be a non-empty list of objects", param="messages")
        if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
            raise ApiError(400, "'tools' must be a list of objects", param="tools")
        for t in tools or ():
            function = t.get("function", t)
            if (not isinstance(function, dict) or not isinstance(function.get("name"), str)
                    or not isinstance(function.get("parameters") or {}, dict)):
                raise ApiError(400, "each of 'tools' must be {type: 'function', function: {name, description, "
                                    "parameters}} with a string name and an object of parameters", param="tools")
        self.check_prompt_size(messages, tools)
        headers = {}
        try:
            rendered = tools_for_choice(tools, tool_choice if tool_choice is not None else "auto")
            if rendered is not None and not supports_tools(engine.tokenizer):
                if tool_choice == "required" or isinstance(tool_choice, dict):
                    raise ApiError(400, "this model's chat template ignores tools, so the model cannot see them "
                                   "and a forced tool_choice cannot be honored; send tool_choice 'auto' or 'none' "
                                   "(the tools are then left out), or use a model whose template renders tools "
                                   "(such as Llama 3.1+ Instruct)", param="tool_choice")
                # Served as a plain chat: parsing replies for calls of tools the model never saw would pretend.
                rendered, headers = None, {"X-Llama-MLX-Warning": "tools ignored: the model's chat template "
                                                                  "does not render them"}
            images = []
            if has_images(messages):
                if not sees_images(engine.model):
                    raise ApiError(400, "this model takes no images: it reads text only; send the image to a Llama 3.2 "
                                   "Vision model (model_type mllama)", param="messages", code="images_not_supported")
                messages, images = take_images(messages, self.config.images)
            msgs = _template_messages(messages)
            prompt = apply_tool_chat_template(engine.tokenizer, msgs, rendered)
        except (ValueError, TypeError, LlamaMLXError) as e:
            raise ApiError(400, f"cannot render the messages: {e}", param="messages") from None
        if images:
            prompt = _ImagePrompt(prompt, images)
        return prompt, rendered, headers

    def check_prompt_size(self, messages: Any, tools: Any) -> None:
        """400 for messages or tools over `max_prompt_bytes` / `max_tools_bytes` (their JSON), before
        any templating or tokenizing."""
        # Images have their own bounds (api_images): their base64 does not count as prompt text.
        if isinstance(messages, list):
            messages = [{k: ([p for p in v if not is_image_part(p)] if k == "content" and isinstance(v, list) else v)
                         for k, v in m.items() if k != "images"} if isinstance(m, dict) else m for m in messages]
        for what, value, limit in (("messages", messages, self.config.max_prompt_bytes),
                                   ("tools", tools, self.config.max_tools_bytes)):
            if value is not None and len(json.dumps(value, ensure_ascii=False, default=str).encode()) > limit:
                raise ApiError(400, f"'{what}' is over the {limit}-byte limit", param=what, code="request_too_large")

    def constrain(self, req: GenerationRequest, response_format: Any, tools: Optional[list], tool_choice: Any,
                  engine: Optional[Engine] = None) -> None:
        """Enforce `response_format` or a forced tool call by constrained decoding (400 for one that cannot
        be: with `engine`, a grammar that fails at its first token, such as a `$ref` to itself, too)."""
        forced = tools and (tool_choice == "required" or isinstance(tool_choice, dict))
        if forced:
            schemas = [_call_schema(t) for t in tools]
            schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
            response_format = {"type": "json_schema", "json_schema": {"name": "tool_call", "schema": schema}}
        if response_format is None:
            return
        try:
            grammar = grammar_for_response_format(response_format)
            if grammar is None:
                return
            if engine is not None:  # the first step's mask: what fails there would fail mid-generation
                probe = JSONLogitsProcessor(engine.tokenizer, grammar)
                probe.allowed()
                if probe.matcher.is_error():
                    error = probe.matcher.get_error().splitlines()
                    raise ResponseFormatError(f"the schema cannot be enforced: {error[0] if error else 'invalid'}")
        except ResponseFormatError as e:
            raise ApiError(400, str(e), param="tool_choice" if forced else "response_format") from None
        req.params.response_format = response_format

    # -- endpoints

    async def health(self, request: Request) -> Response:
        default = self.engine
        if default is not None and not default.ready and default.load_error is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})  # (which models are loaded: /v1/models)

    async def models(self, request: Request) -> Response:
        self.check_key(request)
        infos = await asyncio.to_thread(self.registry.list)
        now = int(time.time())
        return JSONResponse({"object": "list", "data": [
            {"id": i.name, "object": "model", "created": now, "owned_by": "llama-mlx", "loaded": i.loaded,
             "ready": i.ready, "default": i.default, "size_bytes": i.size_bytes, "loaded_bytes": i.loaded_bytes,
             "expires_at": i.expires_at} for i in infos]})

    async def stats(self, request: Request) -> Response:
        self.check_key(request)
        default = self.engine
        out = default.stats() if default is not None else {"loaded": False}
        out["models"] = {name: engine.stats() for name, engine in self.registry.engines().items()}
        out["registry"] = {"loads": self.registry.loads, "unloads": self.registry.unloads,
                           "max_loaded": self.registry.max_loaded, "max_bytes": self.registry.max_bytes,
                           "keep_alive": self.registry.keep_alive}
        return JSONResponse(out)

    async def prometheus(self, request: Request) -> Response:
        """GET /metrics: Prometheus' text format (behind the API key like /v1: it names the models)."""
        self.check_key(request)
        infos = self.registry.list(listed=False)
        engines = self.registry.engines()
        gauges = {k: [] for k in ("loaded", "weights", "running", "waiting", "pool", "kv")}
        for info in infos:
            m = {"model": info.name}
            gauges["loaded"].append((m, 1.0 if info.ready else 0.0))
            gauges["weights"].append((m, info.loaded_bytes))
            engine = engines.get(info.name)
            if engine is None or not engine.ready:
                continue
            s = engine.stats()
            gauges["running"].append((m, s["active"]))
            gauges["waiting"].append((m, s["waiting"]))
            gauges["pool"].append((m, (s["prompt_cache"] or {}).get("bytes", 0)))
            gauges["kv"].append((m, max(0, (s["batch"] or {}).get("kv_bytes", 0))))
        extra = [
            Gauge("llama_mlx_model_loaded", "1 when the model is loaded and ready.", gauges["loaded"]),
            Gauge("llama_mlx_model_weights_bytes", "Bytes of the model's weights in memory.", gauges["weights"]),
            Gauge("llama_mlx_prompt_cache_bytes", "Bytes of KV kept by the prefix cache.", gauges["pool"]),
            Gauge("llama_mlx_kv_cache_bytes", "Bytes of KV of the running requests.", gauges["kv"]),
            Gauge("llama_mlx_requests_running", "Generations running.", gauges["running"]),
            Gauge("llama_mlx_requests_waiting", "Generations waiting in the queue.", gauges["waiting"]),
            Gauge("llama_mlx_model_loads_total", "Models started since the server started.",
                  [({}, self.registry.loads)], kind="counter"),
            Gauge("llama_mlx_model_unloads_total", "Models unloaded since the server started.",
                  [({}, self.registry.unloads)], kind="counter"),
        ]
        return Response(self.metrics.render(extra), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def chat_completions(self, request: Request) -> Response:
        self.check_key(request)
        body = await self.read_json(request)
        engine = await self.engine_for(body.get("model"))
        stream = _get(body, "stream", (bool,), False)
        tool_choice = body.get("tool_choice")
        prompt, tools, headers = await asyncio.to_thread(self.chat_prompt, engine, body.get("messages"),
                                                         body.get("tools"), tool_choice)
        n = self.choices(body)
        req = self.sampling(engine, body, prompt)
        if _get(body, "logprobs", (bool,), False):
            req.top_logprobs = _get(body, "top_logprobs", (int,), 0)
            _in_range("top_logprobs", req.top_logprobs, 0, 20)
        await asyncio.to_thread(self.constrain, req, body.get("response_format"), tools, tool_choice, engine)
        include_usage = bool((_get(body, "stream_options", (dict,), {}) or {}).get("include_usage"))
        jobs = self.submit_all(engine, req, n)
        meta = {"id": "chatcmpl-" + uuid.uuid4().hex[:24], "created": int(time.time()), "model": self.name_of(engine)}
        if stream:
            return _sse(self.chat_stream(jobs, meta, tools, include_usage, tool_choice), headers)
        results = await self.collect_all(request, jobs)
        if results is None:
            return Response(status_code=499)
        choices = []
        for i, events in enumerate(results):
            last = events[-1]
            text = "".join(e.text for e in events)
            reply = read_reply(text, tools, tool_choice, last.finish_reason)
            message = reply.message() if reply else {"role": "assistant", "content": text}
            choice = {"index": i, "message": message, "finish_reason": reply.finish_reason(last.finish_reason)
                      if reply else last.finish_reason, "logprobs": None}
            if req.top_logprobs is not None:
                choice["logprobs"] = {"content": [self.logprob_entry(engine, e) for e in events
                                                  if e.logprob is not None]}
            choices.append(choice)
        lasts = [events[-1] for events in results]
        return JSONResponse({**meta, "object": "chat.completion", "choices": choices,
                             "usage": _openai_usage(*lasts), "system_fingerprint": None}, headers=headers)

    def logprob_entry(self, engine: Engine, e: EngineEvent) -> dict:
        tok = engine.tokenizer

        def one(token: int, lp: float) -> dict:
            raw = tok.token_bytes(token)
            return {"token": raw.decode("utf-8", "replace"), "logprob": _finite(lp), "bytes": list(raw)}

        return {**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top_logprobs or []]}

    async def chat_stream(self, jobs: list, meta: dict, tools: Optional[list], include_usage: bool,
                          tool_choice: Any = None) -> AsyncIterator[bytes]:
        def chunk(index: int, delta: dict, finish: Optional[str] = None, logprobs: Optional[list] = None) -> bytes:
            choice = {"index": index, "delta": delta, "finish_reason": finish,
                      "logprobs": None if logprobs is None else {"content": logprobs}}
            return _data({**meta, "object": "chat.completion.chunk", "choices": [choice]})

        holders = [ToolCallStream(tools) if tools is not None else None for _ in jobs]
        texts: list[list[str]] = [[] for _ in jobs]  # (a forced call cut by max_tokens is read from it)
        pending: list[list] = [[] for _ in jobs]  # log-probabilities of text held back
        with_logprobs = jobs[0].request.top_logprobs is not None
        lasts: list = [None] * len(jobs)
        try:
            for i in range(len(jobs)):
                yield chunk(i, {"role": "assistant", "content": ""})
            async for i, e in _merged(jobs):
                holder = holders[i]
                if with_logprobs and e.logprob is not None:
                    pending[i].append(self.logprob_entry(jobs[i].engine, e))
                texts[i].append(e.text)
                text = holder.feed(e.text) if holder else e.text
                if text:
                    yield chunk(i, {"content": text}, logprobs=pending[i] if with_logprobs else None)
                    pending[i] = []
                if e.finish_reason is None:
                    continue
                finish = e.finish_reason
                if holder:
                    rest, reply = holder.finish()
                    if not reply.tool_calls and finish == "length":
                        cut = read_reply("".join(texts[i]), tools, tool_choice, finish)
                        reply = cut if isinstance(cut, CutCall) else reply
                    if rest and not isinstance(reply, CutCall):
                        yield chunk(i, {"content": rest}, logprobs=pending[i] if with_logprobs else None)
                        pending[i] = []
                    if reply.tool_calls:
                        calls = [{"index": k, **call} for k, call in enumerate(reply.tool_calls)]
                        yield chunk(i, {"tool_calls": calls}, logprobs=pending[i] if with_logprobs else None)
                    finish = reply.finish_reason(finish)
                yield chunk(i, {}, finish)
                lasts[i] = e
            if all(e is not None and e.usage is not None for e in lasts):
                if include_usage:
                    yield _data({**meta, "object": "chat.completion.chunk", "choices": [],
                                 "usage": _openai_usage(*lasts)})
            yield b"data: [DONE]\n\n"
        except Exception as e:  # noqa: BLE001 - the status line is sent: report in the stream
            log.exception("generation failed")
            yield _data({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})
        finally:
            for job in jobs:
                job.cancel()

    async def completions(self, request: Request) -> Response:
        self.check_key(request)
        body = await self.read_json(request)
        engine = await self.engine_for(body.get("model"))
        stream = _get(body, "stream", (bool,), False)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        tok = engine.tokenizer
        if isinstance(prompt, str):
            if len(prompt.encode("utf-8", "replace")) > self.config.max_prompt_bytes:
                raise ApiError(400, f"'prompt' is over the {self.config.max_prompt_bytes}-byte limit", param="prompt",
                               code="request_too_large")
            ids = await asyncio.to_thread(tok.encode, prompt, bos=tok.add_bos and tok.bos_id is not None)
        elif isinstance(prompt, list) and prompt and all(_kind(t, (int,)) for t in prompt):
            if not all(0 <= t < tok.vocab_size for t in prompt):
                raise ApiError(400, "a prompt token id is outside the vocabulary", param="prompt")
            ids = list(prompt)
        else:
            raise ApiError(400, "'prompt' must be a string or a list of token ids (one prompt)", param="prompt")
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        if _get(body, "echo", (bool,), False):
            raise ApiError(400, "'echo' is not supported", param="echo")
        n = self.choices(body)
        req = self.sampling(engine, body, ids, max_keys=("max_tokens",))
        top = _get(body, "logprobs", (int,), None)
        if top is not None:
            _in_range("logprobs", top, 0, 20)
            req.top_logprobs = top
        await asyncio.to_thread(self.constrain, req, body.get("response_format"), None, None, engine)
        include_usage = bool((_get(body, "stream_options", (dict,), {}) or {}).get("include_usage"))
        jobs = self.submit_all(engine, req, n)
        meta = {"id": "cmpl-" + uuid.uuid4().hex[:24], "created": int(time.time()), "model": self.name_of(engine)}
        if stream:
            return _sse(self.completion_stream(jobs, meta, include_usage))
        results = await self.collect_all(request, jobs)
        if results is None:
            return Response(status_code=499)
        choices = [{"index": i, "text": "".join(e.text for e in events), "finish_reason": events[-1].finish_reason,
                    "logprobs": self.legacy_logprobs(engine, events) if req.top_logprobs is not None else None}
                   for i, events in enumerate(results)]
        lasts = [events[-1] for events in results]
        return JSONResponse({**meta, "object": "text_completion", "choices": choices,
                             "usage": _openai_usage(*lasts)})

    def legacy_logprobs(self, engine: Engine, events: list[EngineEvent], offset: int = 0) -> dict:
        tok = engine.tokenizer
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in events:
            if e.logprob is None:
                continue
            out["tokens"].append(tok.token_bytes(e.token).decode("utf-8", "replace"))
            out["token_logprobs"].append(_finite(e.logprob))
            out["top_logprobs"].append({tok.token_bytes(t).decode("utf-8", "replace"): _finite(lp)
                                        for t, lp in e.top_logprobs or []})
            out["text_offset"].append(offset)
            offset += len(e.text)
        return out

    async def completion_stream(self, jobs: list, meta: dict, include_usage: bool) -> AsyncIterator[bytes]:
        with_logprobs = jobs[0].request.top_logprobs is not None
        offsets = [0] * len(jobs)
        lasts: list = [None] * len(jobs)
        try:
            async for i, e in _merged(jobs):
                if e.text or e.finish_reason:
                    logprobs = self.legacy_logprobs(jobs[i].engine, [e], offsets[i]) if with_logprobs else None
                    offsets[i] += len(e.text)
                    choice = {"index": i, "text": e.text, "finish_reason": e.finish_reason, "logprobs": logprobs}
                    yield _data({**meta, "object": "text_completion", "choices": [choice]})
                if e.finish_reason:
                    lasts[i] = e
            if all(e is not None and e.usage is not None for e in lasts):
                if include_usage:
                    yield _data({**meta, "object": "text_completion", "choices": [], "usage": _openai_usage(*lasts)})
            yield b"data: [DONE]\n\n"
        except Exception as e:  # noqa: BLE001
            log.exception("generation failed")
            yield _data({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})
        finally:
            for job in jobs:
                job.cancel()

    # -- Anthropic Messages

    async def messages(self, request: Request) -> Response:
        self.check_key(request)
        body = await self.read_json(request)
        engine = await self.engine_for(body.get("model"))
        if _get(body, "max_tokens", (int,), None) is None:
            raise ApiError(400, "'max_tokens' is required", param="max_tokens")
        stream = _get(body, "stream", (bool,), False)
        prompt, rendered, headers, tool_choice = await asyncio.to_thread(self.anthropic_prompt, engine, body)
        req = self.sampling(engine, body, prompt, max_keys=("max_tokens",), stop_key="stop_sequences",
                            temperature_max=1.0)
        await asyncio.to_thread(self.constrain, req, None, rendered, tool_choice, engine)
        job = self.submit(engine, req)
        meta = {"id": "msg_" + uuid.uuid4().hex[:24], "model": self.name_of(engine)}
        if stream:
            # (named: a cut before message_start, which waits for the first token, is Anthropic's error event)
            return _sse(self.messages_stream(job, meta, rendered, tool_choice), headers, named=True)
        answer = await self.whole(request, job, rendered, tool_choice)
        if answer is None:
            return Response(status_code=499)
        events, last, text, reply = answer
        content = []
        if reply is None or reply.content:
            content.append({"type": "text", "text": reply.content if reply else text})
        for call in reply.tool_calls if reply else []:
            content.append(_tool_use(call))
        return JSONResponse({**meta, "type": "message", "role": "assistant", "content": content,
                             "stop_reason": _stop_reason(last, reply), "stop_sequence": last.stop_sequence,
                             "usage": _anthropic_usage(last)}, headers=headers)

    async def count_tokens(self, request: Request) -> Response:
        """POST /v1/messages/count_tokens: the prompt /v1/messages would run, counted (its input_tokens
        plus cache_read_input_tokens)."""
        self.check_key(request)
        body = await self.read_json(request)
        engine = await self.engine_for(body.get("model"))
        prompt, _, headers, _ = await asyncio.to_thread(self.anthropic_prompt, engine, body)
        return JSONResponse({"input_tokens": len(prompt)}, headers=headers)

    def anthropic_prompt(self, engine: Engine, body: dict) -> tuple[list[int], Optional[list], dict, Any]:
        """An Anthropic request's (prompt ids, tools rendered or None, response headers, OpenAI tool_choice)."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list", param="messages")
        system = body.get("system")
        if isinstance(system, list):
            if not all(isinstance(b, dict) and b.get("type", "text") == "text" and isinstance(b.get("text"), str)
                       for b in system):
                raise ApiError(400, "'system' must be a string or a list of {type: 'text', text: string} blocks",
                               param="system")
            system = "".join(b["text"] for b in system)
        if system is not None and not isinstance(system, str):
            raise ApiError(400, "'system' must be a string or a list of text blocks", param="system")
        msgs = ([{"role": "system", "content": system}] if system else []) + _from_anthropic(messages)
        tools = body.get("tools")
        if tools is not None:
            if not isinstance(tools, list) or not all(isinstance(t, dict) and "name" in t for t in tools):
                raise ApiError(400, "'tools' must be a list of {name, description, input_schema}", param="tools")
            tools = [{"type": "function", "function": {"name": t["name"], "description": t.get("description", ""),
                                                       "parameters": t.get("input_schema", {"type": "object"})}}
                     for t in tools]
        choice = body.get("tool_choice") or {"type": "auto"}
        kind = choice.get("type") if isinstance(choice, dict) else None
        tool_choice = {"auto": "auto", "any": "required", "none": "none"}.get(kind) or (
            {"type": "function", "function": {"name": choice.get("name")}} if kind == "tool" else None)
        if tool_choice is None:
            raise ApiError(400, "'tool_choice' must be {type: auto | any | tool | none}", param="tool_choice")
        prompt, rendered, headers = self.chat_prompt(engine, msgs, tools, tool_choice)
        return prompt, rendered, headers, tool_choice

    async def messages_stream(self, job, meta: dict, tools: Optional[list],
                              tool_choice: Any = None) -> AsyncIterator[bytes]:
        index, text_open = 0, False
        prompt_tokens = len(job.request.prompt)
        try:
            # message_start waits for the first token: by then the prefix cache's share is known, and
            # Anthropic's input_tokens are the prompt tokens not read from the cache.
            first = await anext(job, None)
            if first is None:
                return
            cached = job.cached_tokens
            yield _event("message_start", {"type": "message_start", "message": {
                **meta, "type": "message", "role": "assistant", "content": [], "stop_reason": None,
                "stop_sequence": None, "usage": {"input_tokens": prompt_tokens - cached, "output_tokens": 0,
                                                 "cache_read_input_tokens": cached,
                                                 "cache_creation_input_tokens": 0}}})
            yield _event("ping", {"type": "ping"})

            def text_delta(text: str) -> list[bytes]:
                nonlocal text_open
                out = []
                if not text_open:
                    text_open = True
                    out.append(_event("content_block_start", {"type": "content_block_start", "index": index,
                                                              "content_block": {"type": "text", "text": ""}}))
                if text:
                    out.append(_event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                              "delta": {"type": "text_delta", "text": text}}))
                return out

            async for text, e, reply in shown_text(_prepended(first, job), tools, tool_choice):
                if e is None:
                    for frame in text_delta(text):
                        yield frame
                    continue
                if not text_open and not (reply and reply.tool_calls):
                    for frame in text_delta(""):
                        yield frame
                if text_open:
                    yield _event("content_block_stop", {"type": "content_block_stop", "index": index})
                    index += 1
                for call in reply.tool_calls if reply else []:
                    block = _tool_use(call)
                    yield _event("content_block_start", {"type": "content_block_start", "index": index,
                                                         "content_block": {**block, "input": {}}})
                    yield _event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": {
                        "type": "input_json_delta", "partial_json": json.dumps(block["input"])}})
                    yield _event("content_block_stop", {"type": "content_block_stop", "index": index})
                    index += 1
                usage = _anthropic_usage(e)
                yield _event("message_delta", {"type": "message_delta", "delta": {
                    "stop_reason": _stop_reason(e, reply), "stop_sequence": e.stop_sequence}, "usage": usage})
                yield _event("message_stop", {"type": "message_stop"})
        except Exception as e:  # noqa: BLE001
            log.exception("generation failed")
            yield _event("error", {"type": "error", "error": {"type": "api_error", "message": str(e)}})
        finally:
            job.cancel()


# -- request bodies

_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_BRACKETS = bytes(range(256)).translate(None, b"[]{}")  # every byte but the brackets (to delete)


def _json_depth(raw: bytes) -> int:
    """How deep the arrays and objects of JSON text `raw` nest (its strings skipped), in C and numpy time."""
    import numpy as np

    brackets = _JSON_STRING.sub(b"", raw).translate(None, _BRACKETS)
    if not brackets:
        return 0
    steps = np.frombuffer(brackets, dtype=np.uint8)
    return int(np.cumsum(np.where((steps == ord("[")) | (steps == ord("{")), 1, -1)).max())


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _int(key: Any) -> Optional[int]:
    """A logit_bias key as a token id (None when it is none)."""
    try:
        return int(key) if isinstance(key, str) and key.strip().lstrip("-").isascii() else None
    except ValueError:
        return None


# -- message and reply mapping


class _ImagePrompt(list):
    """Prompt ids that carry the images of their `<|image|>` tokens (`api_images.ServerImage`s, in order)."""

    def __init__(self, ids: Sequence[int], images: Sequence[Any]):
        super().__init__(ids)
        self.images = tuple(images)


def _template_messages(messages: list[dict]) -> list[dict]:
    """OpenAI messages as chat templates take them: text content, developer as system, a tool call's
    text kept as content for templates that know no tool calls."""
    out = []
    for m in normalize_messages(messages):
        if m.get("role") == "developer":
            m["role"] = "system"
        content = m.get("content")
        if isinstance(content, list):
            if any(isinstance(p, dict) and p.get("type") not in ("text", "image", None) for p in content):
                raise ValueError("only text and image content parts are supported")
            if any(isinstance(p, dict) and p.get("type") == "image" for p in content):  # (`take_images`'s)
                m["content"] = [p if p.get("type") == "image" else {"type": "text", "text": p.get("text", "")}
                                for p in content if isinstance(p, dict)]
            else:
                m["content"] = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if m.get("tool_calls") and "content" not in m:
            m["content"] = "; ".join(json.dumps({"name": c["function"].get("name"),
                                                 "parameters": c["function"].get("arguments", {})})
                                     for c in m["tool_calls"])
        m.setdefault("content", "")
        out.append(m)
    return out


def _from_anthropic(messages: list) -> list[dict]:
    out: list[dict] = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise ApiError(400, "each message needs role 'user' or 'assistant'", param="messages")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": m["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise ApiError(400, "message content must be a string or a list of blocks", param="messages")
        texts, calls, parts = [], [], []
        for block in content:
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                texts.append(block.get("text", ""))
                parts.append({"type": "text", "text": block.get("text", "")})
            elif kind == "image":  # decoded by `chat_prompt` (api_images.take_images)
                parts.append(block)
            elif kind == "tool_use":
                calls.append({"id": block.get("id"), "type": "function",
                              "function": {"name": block.get("name"), "arguments": block.get("input", {})}})
            elif kind == "tool_result":
                result = block.get("content", "")
                if isinstance(result, list):
                    # A tool's image joins the user turn after the results (templates render no images in
                    # tool turns): `chat_prompt` refuses it for a text model, reads it for a vision one.
                    parts.extend(b for b in result if isinstance(b, dict) and b.get("type") == "image")
                    result = "".join(b.get("text", "") for b in result if isinstance(b, dict))
                out.append({"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": result})
            else:
                raise ApiError(400, f"content blocks of type {kind!r} are not supported", param="messages")
        if calls:
            out.append({"role": "assistant", "content": "".join(texts) or None, "tool_calls": calls})
        elif len(parts) > len(texts):  # an image among them: the parts in order
            out.append({"role": m["role"], "content": parts})
        elif texts or not any(isinstance(b, dict) and b.get("type") == "tool_result" for b in content):
            out.append({"role": m["role"], "content": "".join(texts)})
    return out


def _call_schema(tool: dict) -> dict:
    function = tool.get("function", tool)
    parameters = function.get("parameters") or {"type": "object"}
    return {"type": "object", "properties": {"name": {"const": function.get("name")}, "parameters": parameters},
            "required": ["name", "parameters"], "additionalProperties": False}


def _tool_use(call: dict) -> dict:
    return {"type": "tool_use", "id": "toolu_" + call["id"].removeprefix("call_"), "name": call["function"]["name"],
            "input": json.loads(call["function"]["arguments"])}


def _stop_reason(last: EngineEvent, reply) -> str:
    if reply is not None and reply.tool_calls and not isinstance(reply, CutCall):
        return "tool_use"
    if last.finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if last.stop_sequence else "end_turn"


def _openai_usage(e: EngineEvent, *others: EngineEvent) -> dict:
    """OpenAI's usage of a request's last events, one a choice: the prompt once, completions summed."""
    u = e.usage
    completion = u.completion_tokens + sum(o.usage.completion_tokens for o in others)
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": completion,
            "total_tokens": u.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
            "time_to_first_token": u.time_to_first_token}


class _Metered:
    """A job (the engine's `Job`, its attributes delegated) whose finished generation is counted in metrics."""

    def __init__(self, job, metrics: Metrics, model: str, count_prompt: bool):
        self._job, self._metrics, self._model, self._count_prompt = job, metrics, model, count_prompt

    def __getattr__(self, name: str) -> Any:
        return getattr(self._job, name)

    def __aiter__(self) -> "_Metered":
        return self

    async def __anext__(self) -> EngineEvent:
        event = await self._job.__anext__()
        if event.usage is not None:
            self._metrics.generation(self._model, event.usage, prompt=self._count_prompt)
        return event


async def _prepended(first: EngineEvent, job) -> AsyncIterator[EngineEvent]:
    """`first`, then the rest of `job`'s events."""
    yield first
    async for e in job:
        yield e


async def _merged(jobs: list) -> AsyncIterator[tuple[int, EngineEvent]]:
    """(choice index, event) of several jobs, as they come."""
    if len(jobs) == 1:
        async for e in jobs[0]:
            yield 0, e
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, job) -> None:
        try:
            async for e in job:
                queue.put_nowait((i, e))
            queue.put_nowait((i, None))
        except Exception as error:  # noqa: BLE001 - raised to the reader
            queue.put_nowait((i, error))

    tasks = [asyncio.create_task(pump(i, job)) for i, job in enumerate(jobs)]
    try:
        left = len(jobs)
        while left:
            i, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()


def _anthropic_usage(e: EngineEvent) -> dict:
    u = e.usage
    return {"input_tokens": u.prompt_tokens - u.cached_tokens, "output_tokens": u.completion_tokens,
            "cache_read_input_tokens": u.cached_tokens, "cache_creation_input_tokens": 0}


# -- who may call: Host, Origin and Content-Type (web pages of other origins may not)


def _host_part(value: str) -> Optional[str]:
    """The host of a Host header or an origin's authority (`name[:port]`, `[v6][:port]`), lowercased
    and without its port; None when malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        host, sep, port = value[1:].partition("]")
        port = port[1:] if port.startswith(":") else (None if port else "")
        ok = sep and port is not None
    else:
        host, _, port = value.partition(":")
        ok = True
    if not ok or not host or (port and not (port.isascii() and port.isdigit())):
        return None
    return host


def _ip(host: str) -> Optional[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _is_loopback(host: str) -> bool:
    ip = _ip(host)
    return host == "localhost" or (ip is not None and ip.is_loopback)


_ORIGIN = re.compile(r"(https?)://([^/?#@\s]+)/?")
_WILDCARD_BINDS = ("", "0.0.0.0", "::")


class RequestGuard:
    """ASGI middleware refusing what a web page of another origin could send (DNS rebinding, cross-site
    POSTs): a `Host` that is not a loopback name or address, the address listened on (`host`; any IP
    address on a wildcard bind) or one of `allowed_hosts` ('*': any) gets 403; an `Origin` that is not
    a loopback origin or one of `allowed_origins` ('*': any) gets 403; a POST whose Content-Type is not
    application/json gets 415. Errors are JSON (Anthropic's on /v1/messages, ollama's on /api/)."""

    def __init__(self, app, host: str = "127.0.0.1", allowed_hosts: Sequence[str] = (),
                 allowed_origins: Sequence[str] = ()):
        self.app = app
        self.any_host = "*" in allowed_hosts
        self.hosts = {h for h in map(_host_part, allowed_hosts) if h}
        bind = host.strip("[]").lower()
        self.any_ip = bind in _WILDCARD_BINDS  # reachable at every address of the machine
        if not self.any_ip:
            self.hosts.add(bind)
        self.any_origin = "*" in allowed_origins
        self.origins = {o.strip().rstrip("/").lower() for o in allowed_origins}

    def host_allowed(self, value: str) -> bool:
        host = _host_part(value)
        if host is None:
            return False
        # DNS rebinding needs the attacker's name in Host: an IP address cannot be one.
        return (self.any_host or _is_loopback(host) or host in self.hosts
                or (self.any_ip and _ip(host) is not None))

    def origin_allowed(self, origin: str) -> bool:
        origin = origin.strip().lower()
        if self.any_origin or origin.rstrip("/") in self.origins:
            return True
        m = _ORIGIN.fullmatch(origin)
        host = _host_part(m.group(2)) if m else None
        return host is not None and _is_loopback(host)

    def refusal(self, scope) -> Optional[ApiError]:
        headers: dict[str, list[str]] = {}
        for k, v in scope.get("headers", ()):
            headers.setdefault(k.decode("latin-1").lower(), []).append(v.decode("latin-1"))
        hosts = headers.get("host", [])
        if len(hosts) != 1 or not self.host_allowed(hosts[0]):
            shown = ", ".join(hosts) or "(none)"
            return ApiError(403, f"the Host header {shown!r:.100} is not this server's (loopback names, --host, "
                                 "--allowed-hosts)", code="host_not_allowed")
        for origin in headers.get("origin", []):
            if not self.origin_allowed(origin):
                return ApiError(403, f"requests from origin {origin!r:.100} are not allowed (--allowed-origins)",
                                code="origin_not_allowed")
        if scope["method"] == "POST":
            types = headers.get("content-type", [])
            media = types[0].split(";")[0].strip().lower() if len(types) == 1 else ", ".join(types)
            if media != "application/json":
                return ApiError(415, f"the request body must be sent as Content-Type: application/json (got "
                                     f"{repr(media)[:60] if media else 'none'})", code="unsupported_media_type")
        return None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            error = self.refusal(scope)
            if error is not None:
                response = error.for_path(scope["path"])
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _CountRequests:
    """ASGI middleware counting HTTP requests by endpoint (a route's path, else "other") and status."""

    def __init__(self, app, metrics: Metrics, paths: set[str]):
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in self.paths else "other"

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.inc(endpoint=endpoint, method=scope["method"], status=str(message["status"]))
            await send(message)

        await self.app(scope, receive, counting_send)


# -- the application


def create_app(engine: Engine | ModelRegistry, config: Optional[ServerConfig] = None, **options: Any) -> Starlette:
    """The Starlette application over `engine` (started by the caller; closed, drained, at shutdown), or
    over the models of a `ModelRegistry` (its idle models unloaded as its keep-alive says).

    `config` or its fields as keywords: model_name (the one engine's name), api_key, allowed_origins,
    host, allowed_hosts, max_body_bytes, default_max_tokens. `host` is where the app listens: on
    loopback only loopback Host headers (and `allowed_hosts`) are answered (see `RequestGuard`).
    """
    config = config or ServerConfig(**options)
    if isinstance(engine, ModelRegistry):
        registry = engine
    else:
        registry = ModelRegistry()
        registry.add(config.model_name, None, engine=engine, start=False)
    api = _Api(registry, config)

    def guarded(handler: Callable) -> Callable:
        """`handler`, its errors answered in the shape of its API (`ApiError.for_path`)."""

        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request)
            except ApiError as e:
                return e.for_path(request.url.path)
            except Exception:  # noqa: BLE001 - the server lives on
                log.exception("request failed")
                return ApiError(500, "internal error").for_path(request.url.path)

        return endpoint

    async def not_found(request: Request, exc: HTTPException) -> Response:
        status = exc.status_code
        message = "no such endpoint" if status == 404 else exc.detail
        return ApiError(status, f"{message}: {request.method} {request.url.path}").for_path(request.url.path)

    @asynccontextmanager
    async def lifespan(app):
        async def sweep() -> None:  # keep-alive: unload the models idle too long
            while True:
                await asyncio.sleep(0.25)
                try:
                    await registry.sweep()
                except Exception:  # noqa: BLE001 - the server lives on
                    log.exception("unloading idle models failed")

        sweeper = asyncio.create_task(sweep())
        yield
        sweeper.cancel()
        await asyncio.to_thread(registry.close)  # uvicorn has let the in-flight requests finish

    routes = [
        Route("/health", guarded(api.health), methods=["GET"]),
        Route("/v1/models", guarded(api.models), methods=["GET"]),
        Route("/v1/internal/stats", guarded(api.stats), methods=["GET"]),
        Route("/v1/chat/completions", guarded(api.chat_completions), methods=["POST"]),
        Route("/v1/completions", guarded(api.completions), methods=["POST"]),
        Route("/v1/messages", guarded(api.messages), methods=["POST"]),
        Route("/v1/messages/count_tokens", guarded(api.count_tokens), methods=["POST"]),
        Route("/metrics", guarded(api.prometheus), methods=["GET"]),
        Route("/v1/embeddings", guarded(partial(api_embeddings.embeddings, api)), methods=["POST"]),
        Route("/v1/responses", guarded(partial(api_responses.responses, api)), methods=["POST"]),
        *[Route(f"/api/{name}", guarded(partial(getattr(api_ollama, name), api)), methods=[method])
          for name, method in api_ollama.ROUTES],
    ]
    middleware = [Middleware(_CountRequests, metrics=api.metrics, paths={r.path for r in routes}),
                  Middleware(RequestGuard, host=config.host, allowed_hosts=config.allowed_hosts,
                             allowed_origins=config.allowed_origins)]
    if config.allowed_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(config.allowed_origins),
                                     allow_methods=["GET", "POST", "OPTIONS"],
                                     allow_headers=["authorization", "content-type", "x-api-key",
                                                    "anthropic-version"]))
    return Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                     exception_handlers={HTTPException: not_found})


# -- connections: a cap below the open-file limit, deadlines for slow clients, a bounded drain at shutdown


def fd_room() -> int:
    """The soft limit on open files, first raised to the hard one (at most 65536) where allowed."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft == resource.RLIM_INFINITY or soft >= ceiling:
        return ceiling if soft == resource.RLIM_INFINITY else soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))
        return ceiling
    except (ValueError, OSError):
        return soft


def default_max_connections() -> int:
    """Connections served at once by default: 1024, or fewer where the open-file limit (raised as far as
    allowed) leaves fewer than 128 files for the rest (models, logs)."""
    return max(8, min(1024, fd_room() - 128))


def _protocol(max_connections: int, header_timeout: float, write_timeout: float):
    """uvicorn's h11 protocol with a cap and deadlines: a request on a connection beyond the first
    `max_connections` open is answered 503 (JSON, in its endpoint's shape); a connection whose request headers have not all come
    `header_timeout` seconds after it opened or after its last response (a slow or idle client) is
    closed, and so is one whose client has read nothing of a response for `write_timeout` seconds."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _header_deadline = _write_deadline = None

        def _arm_header_deadline(self) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
            self._header_deadline = self.loop.call_later(header_timeout, self._headers_late)

        def _headers_late(self) -> None:
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.abort()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_header_deadline()
            app, connections = self.app, self.connections

            async def capped(scope, receive, send) -> None:
                if scope["type"] == "http" and len(connections) > max_connections:
                    busy = ApiError(503, f"the server is serving its most connections ({max_connections}, "
                                         "--max-connections); try again", code="server_busy")
                    await busy.for_path(scope["path"])(scope, receive, send)
                    return
                await app(scope, receive, send)

            self.app = capped

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_deadline()

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._write_deadline is None:
                self._write_deadline = self.loop.call_later(write_timeout, self.transport.abort)

        def resume_writing(self) -> None:
            super().resume_writing()
            if self._write_deadline is not None:
                self._write_deadline.cancel()
                self._write_deadline = None

        def connection_lost(self, exc) -> None:
            for handle in (self._header_deadline, self._write_deadline):
                if handle is not None:
                    handle.cancel()
            super().connection_lost(exc)

    return Protocol


def _stop_now(*_: Any) -> None:
    """A second SIGINT or SIGTERM: exit at once, in one line (no tracebacks of the threads left)."""
    try:
        sys.stderr.write("llama-mlx: stopped at a second signal, without waiting for requests to finish\n")
        sys.stderr.flush()
    finally:
        os._exit(130)


def run(loader: Callable[[], tuple[Any, Any]], *, host: str = "127.0.0.1", port: int = 8080,
        model_name: str = "model", api_key: Optional[str] = None, allowed_origins: Sequence[str] = (),
        allowed_hosts: Sequence[str] = (), max_body_bytes: int = 8 << 20, default_max_tokens: int = 512,
        max_concurrency: int = 8, queue_size: int = 16, prompt_cache_bytes: int = 1 << 30, decode_concurrency: int = 8,
        max_kv_bytes: Optional[int] = None, speculative: Optional[Callable[[], dict]] = None,
        lockstep=None, log_level: str = "info", on_ready: Optional[Callable[[Engine], None]] = None,
        model_path: Optional[Path] = None, models: Sequence[tuple[str, Path]] = (),
        loader_for: Optional[Callable[[Path], Callable[[], tuple[Any, Any]]]] = None,
        max_loaded_models: Optional[int] = None, max_loaded_bytes: Optional[int] = None,
        keep_alive: Optional[float] = None, images: ImagePolicy = ImagePolicy(),
        max_connections: Optional[int] = None, shutdown_timeout: float = 5.0, header_timeout: float = 10.0,
        write_timeout: float = 60.0, temperature: Optional[float] = None, top_p: Optional[float] = None,
        adapter_path: Optional[Path] = None, cache_options: Optional[dict] = None, fit: bool = True,
        memory_budget: Optional[int] = None) -> bool:
    """Serve the model `loader()` returns (the default one, `model_name`, at `model_path`) on
    http://host:port until SIGINT or SIGTERM (both stop cleanly).

    The engine (see `Engine` for max_concurrency .. lockstep; speculative and lockstep apply to this
    model only) loads in the background; `on_ready(engine)` is called once it has. `models`: more (name,
    path) preloaded. With `loader_for(path)` (a loader of the model at path) any model `llama-mlx list`
    shows, a path, or a hub id in the cache is served on request, loaded then; `max_loaded_models`,
    `max_loaded_bytes` and `keep_alive` (seconds idle) are `ModelRegistry`'s bounds. The app's
    options are `ServerConfig`'s; log_level is uvicorn's and llama_mlx's. Returns False when the
    server could not listen; a failed load of a preloaded model is raised once the server stops.
    images: where request images may come from besides data URLs (`api_images.ImagePolicy`).
    adapter_path: the adapter folder `loader` and `loader_for(path, adapter_path)` apply to the default and
    `models` (part of their identity in the registry: a request naming their path gets the base model).
    temperature, top_p: sampling of requests that set none, for every model (None: each model's own
    recommendation, else Meta's 0.6 / 0.9). cache_options: `PromptCache`'s (kv_bits, kv_group_size:
    a quantized KV cache, batched all the same). fit, memory_budget: `Engine`'s (context and KV
    sized to the memory budget).

    Connections: at most `max_connections` at once (default `default_max_connections()`, below the
    open-file limit; requests beyond it are answered 503 at once); a client that has not sent its
    request headers `header_timeout` seconds after connecting (or after its last response), or that
    reads nothing of a response for `write_timeout` seconds, is disconnected. On SIGINT or SIGTERM
    requests have `shutdown_timeout` seconds to finish; then streams end with an error event and the
    rest are cut. A second SIGINT or SIGTERM exits at once (status 130, one line on stderr).
    """
    import uvicorn

    options = dict(max_concurrency=max_concurrency, queue_size=queue_size, prompt_cache_bytes=prompt_cache_bytes,
                   decode_concurrency=decode_concurrency, max_kv_bytes=max_kv_bytes, cache_options=cache_options,
                   fit=fit, memory_budget=memory_budget)
    factory = None if loader_for is None else (lambda path: Engine(loader_for(path), **options))
    registry = ModelRegistry(factory, max_loaded=max_loaded_models, max_bytes=max_loaded_bytes, keep_alive=keep_alive)
    # The default model keeps its own options (speculative decoding) when loaded again; under
    # mlx.launch it is never unloaded (closing the leader sends the other ranks home).
    make = None if lockstep is not None else (lambda _path: Engine(loader, **options, speculative=speculative))
    engine = registry.add(model_name, model_path, default=True, make=make, adapter=adapter_path,
                          engine=Engine(loader, **options, speculative=speculative, lockstep=lockstep))

    def adapted(path: Path) -> Engine:
        return Engine(loader_for(path, adapter_path), **options)

    preloaded = [engine] + [registry.add(name, path, adapter=adapter_path, make=adapted if adapter_path else None)
                            for name, path in models]
    config = ServerConfig(model_name=model_name, api_key=api_key, allowed_origins=tuple(allowed_origins),
                          host=host, allowed_hosts=tuple(allowed_hosts), max_body_bytes=max_body_bytes,
                          default_max_tokens=default_max_tokens, images=images, temperature=temperature,
                          top_p=top_p)
    app = create_app(registry, config)
    logging.getLogger("llama_mlx").setLevel(log_level.upper())
    if max_connections is None:
        max_connections = default_max_connections()
    else:
        fd_room()

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.should_exit and sig in (signal.SIGINT, signal.SIGTERM):
                _stop_now()
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets=None) -> None:
            # Streams get their last event a little before uvicorn cancels what is left.
            cut = asyncio.get_running_loop().call_later(max(0.0, shutdown_timeout - 0.5), cut_streams)
            try:
                await super().shutdown(sockets)
            finally:
                cut.cancel()

    server = Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, server_header=False,
                                   timeout_graceful_shutdown=shutdown_timeout, timeout_keep_alive=5,
                                   http=_protocol(max_connections, header_timeout, write_timeout)))
    failed: list[BaseException] = []

    def watch_load() -> None:
        try:
            for e in preloaded:
                e.wait_ready()
            if on_ready is not None:
                on_ready(engine)
        except BaseException as e:  # noqa: BLE001 - raised below, the server stops
            failed.append(e)
            server.should_exit = True

    threading.Thread(target=watch_load, daemon=True).start()
    # uvicorn re-raises the signal it shut down on: these handlers take it (the call ends normally), and
    # a second signal while the models close exits at once.
    stopping = []

    def after_serve(*_: Any) -> None:
        if stopping:
            _stop_now()
        stopping.append(True)

    previous = {sig: signal.signal(sig, after_serve) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        stopping.append(True)  # (from here on any signal is a second one)
        registry.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failed:
        raise failed[0]
    return bool(server.started)
