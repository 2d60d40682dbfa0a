"""OpenAI's `POST /v1/embeddings` over `llama_mlx.embed` (the final norm's states, mean-pooled by
default, L2-normalised), and the plumbing the ollama endpoints share with it."""

from __future__ import annotations

import asyncio
import base64
import struct
from typing import Any, Optional

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .api_common import ApiError, _get
from .embed import POOLINGS, embed, embedding_tokens
from .engine import Engine, EngineClosedError
from .errors import LlamaMLXError

__all__ = ["embed_rows", "embeddings", "tokenize_inputs"]

_PER_CALL = 8


async def tokenize_inputs(engine: Engine, inputs: Any, *, param: str = "input",
                          truncate: bool = False) -> list[list[int]]:
    """Token ids of an embeddings request's inputs (strings or token id lists), tokenized off the event
    loop (a body of text takes about a second a MB); ApiError 400 for inputs that are empty, malformed
    or (unless `truncate`) longer than the model's context."""
    if isinstance(inputs, list) and not inputs:
        raise ApiError(400, f"'{param}' is empty", param=param)
    try:
        rows = await asyncio.to_thread(embedding_tokens, engine.tokenizer, inputs)
    except LlamaMLXError as e:
        raise ApiError(400, f"'{param}': {e}", param=param) from None
    limit = engine.context_length
    for i, ids in enumerate(rows):
        if len(ids) > limit:
            if not truncate:
                raise ApiError(400, f"'{param}' {i} has {len(ids)} tokens; the model's context holds {limit}",
                               param=param, code="context_length_exceeded")
            rows[i] = ids[:limit]
    return rows


async def embed_rows(engine: Engine, rows: list[list[int]], *, pooling: str = "mean",
                     normalize: bool = True) -> list[list[float]]:
    """The embeddings of token rows, computed on the engine's worker thread between generation steps."""
    if engine.lockstep is not None:
        raise ApiError(400, "embeddings are not served under mlx.launch (every rank would have to run them)",
                       code="unsupported")
    if pooling not in POOLINGS:
        raise ApiError(400, f"'pooling' must be one of {', '.join(POOLINGS)}", param="pooling")
    out: list[list[float]] = []
    try:
        # A few inputs a call: the streams being generated step between them.
        for start in range(0, len(rows), _PER_CALL):
            part = rows[start:start + _PER_CALL]
            out += await engine.call(lambda model, tok, part=part: embed(model, tok, part, pooling=pooling,
                                                                         normalize=normalize).tolist())
        return out
    except EngineClosedError as e:
        raise ApiError(503, str(e), code="server_busy") from None


def _base64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def _shorten(vector: list[float], dimensions: Optional[int]) -> list[float]:
    """The first `dimensions` values, normalised again (a Matryoshka-style cut, as OpenAI's `dimensions`)."""
    if dimensions is None or dimensions >= len(vector):
        return vector
    head = vector[:dimensions]
    norm = sum(v * v for v in head) ** 0.5 or 1.0
    return [v / norm for v in head]


async def embeddings(api, request: Request) -> Response:
    """POST /v1/embeddings: `input` a string, a list of strings, a token id list or a list of them;
    `encoding_format` float or base64; `dimensions`; `pooling` (mean or last, an extension)."""
    api.check_key(request)
    body = await api.read_json(request)
    engine = await api.engine_for(body.get("model"))
    if "input" not in body:
        raise ApiError(400, "'input' is required", param="input")
    encoding = _get(body, "encoding_format", (str,), "float")
    if encoding not in ("float", "base64"):
        raise ApiError(400, "'encoding_format' must be 'float' or 'base64'", param="encoding_format")
    dimensions = _get(body, "dimensions", (int,), None)
    if dimensions is not None and dimensions < 1:
        raise ApiError(400, "'dimensions' must be at least 1", param="dimensions")
    pooling = _get(body, "pooling", (str,), "mean")
    rows = await tokenize_inputs(engine, body["input"])
    vectors = await embed_rows(engine, rows, pooling=pooling)
    data = []
    for i, vector in enumerate(vectors):
        vector = _shorten(vector, dimensions)
        data.append({"object": "embedding", "index": i,
                     "embedding": _base64(vector) if encoding == "base64" else vector})
    tokens = sum(map(len, rows))
    return JSONResponse({"object": "list", "data": data, "model": api.name_of(engine),
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
