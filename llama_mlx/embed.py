"""Sentence embeddings from a causal Llama: the final norm's hidden states, pooled and normalised.

    vectors = llama_mlx.embed(model, tokenizer, ["a cat", "a dog"])    # mx.array [2, hidden], float32

Llama has no embedding head, so a text's vector is pooled from the last layer's output (after the
final RMSNorm, the state the LM head reads). Pooling is "mean" by default: the average over every
token of the text (BOS included), the usual choice for decoder models without an embedding head
(sentence-transformers' mean pooling); it uses every position, where "last" (the final token's
state, which alone has attended to the whole text under the causal mask) rests on one token and
swings with a trailing space or period. Vectors are L2-normalised unless `normalize=False`, so a dot
product is a cosine similarity.
"""

from __future__ import annotations

from typing import Sequence, Union

import mlx.core as mx

from .errors import ArgumentError, ContextLengthError, TokenIdError
from .generate import context_length

__all__ = ["POOLINGS", "embed", "embedding_tokens"]

POOLINGS = ("mean", "last")

Inputs = Union[str, Sequence[int], Sequence[Union[str, Sequence[int]]]]


def embedding_tokens(tokenizer, inputs: Inputs) -> list[list[int]]:
    """The token ids `embed` runs for `inputs` (a string, a list of ids, or a list of either): text is
    encoded as a plain prompt (BOS where the tokenizer adds one); ids are taken as given."""
    if isinstance(inputs, str) or (isinstance(inputs, (list, tuple)) and inputs and _is_id(inputs[0])):
        inputs = [inputs]
    if not isinstance(inputs, (list, tuple)) or not inputs:
        raise ArgumentError("embed needs a non-empty list of texts or token id lists")
    out = []
    for i, item in enumerate(inputs):
        if isinstance(item, str):
            if not item:
                raise ArgumentError(f"input {i} is empty")
            ids = tokenizer.encode(item, bos=tokenizer.add_bos and tokenizer.bos_id is not None)
        elif isinstance(item, (list, tuple)) and all(_is_id(t) for t in item):
            ids = [int(t) for t in item]
            if any(not 0 <= t < tokenizer.vocab_size for t in ids):
                raise TokenIdError(f"input {i}: a token id is outside the vocabulary (size {tokenizer.vocab_size})")
        else:
            raise ArgumentError(f"input {i}: expected a string or a list of token ids")
        if not ids:
            raise ArgumentError(f"input {i} is empty")
        out.append(ids)
    return out


def embed(model, tokenizer, inputs: Inputs, *, pooling: str = "mean", normalize: bool = True,
          batch_size: int = 16) -> mx.array:
    """Embeddings of `inputs` (see `embedding_tokens`) as a float32 array [n, hidden_size]: the final
    norm's output pooled over each input's tokens ("mean", or "last": the final token's state), L2
    normalised unless `normalize=False`. Raises ArgumentError, TokenIdError, or ContextLengthError for
    an input longer than the model's context."""
    if pooling not in POOLINGS:
        raise ArgumentError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
    rows = embedding_tokens(tokenizer, inputs)
    limit = context_length(model)
    for i, ids in enumerate(rows):
        if len(ids) > limit:
            raise ContextLengthError(f"input {i} has {len(ids)} tokens; the model's context holds {limit}")
    vectors: list[mx.array] = [None] * len(rows)  # type: ignore[list-item]
    # Similar lengths share a batch, padded on the right: under the causal mask no real token sees a pad.
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    step = max(1, batch_size)
    for start in range(0, len(order), step):
        chunk = order[start:start + step]
        width = max(len(rows[i]) for i in chunk)
        tokens = mx.array([rows[i] + [0] * (width - len(rows[i])) for i in chunk])
        hidden = model.model(tokens).astype(mx.float32)  # [b, width, hidden]: after the final norm
        lengths = mx.array([len(rows[i]) for i in chunk])
        if pooling == "mean":
            mask = (mx.arange(width)[None, :] < lengths[:, None]).astype(mx.float32)[..., None]
            pooled = (hidden * mask).sum(axis=1) / lengths[:, None].astype(mx.float32)
        else:
            pooled = mx.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
        if normalize:
            pooled = pooled / mx.maximum(mx.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        mx.eval(pooled)
        for j, i in enumerate(chunk):
            vectors[i] = pooled[j]
    return mx.stack(vectors)


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
