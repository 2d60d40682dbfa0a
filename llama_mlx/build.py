"""Building a model from a config and weights, and checking that a tokenizer fits it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import mlx.core as mx

from .errors import CheckpointError, VocabularyMismatchError

__all__ = ["build_model", "check_vocabulary", "max_token_id"]


def max_token_id(tokenizer: Any) -> int:
    """The largest id a tokenizer can produce (added tokens included)."""
    backend = getattr(tokenizer, "backend", None)
    top = int(tokenizer.vocab_size) - 1
    if backend is not None and hasattr(backend, "get_added_tokens_decoder"):
        # The model's ids run 0..n-1; added tokens may sit anywhere. Both are read without the vocab dict.
        top = max(top, backend.get_vocab_size(with_added_tokens=False) - 1, *backend.get_added_tokens_decoder())
    elif backend is not None and hasattr(backend, "get_vocab"):
        vocab = backend.get_vocab(with_added_tokens=True)
        top = max(top, *vocab.values()) if vocab else top
    return top


def check_vocabulary(tokenizer: Any, vocab_size: int, source: Path | str) -> None:
    """Raise VocabularyMismatchError when the tokenizer makes ids the model has no embedding for."""
    top = max_token_id(tokenizer)
    if top >= vocab_size:
        raise VocabularyMismatchError(
            f"{source}: the tokenizer makes token ids up to {top}, the model's vocabulary (vocab_size) "
            f"holds {vocab_size}: tokenizer and model do not belong together")


def build_model(config: dict, weights: Mapping[str, mx.array], *, source: Path | None = None):
    """Instantiate llama_mlx.model.Model for an HF-style config, quantize it as the config says, load weights."""
    from .model import Model, ModelArgs
    from .quant import prepare_quantized

    model = Model(ModelArgs.from_dict(config))
    if config.get("quantization"):
        prepare_quantized(model, weights)  # quantized modules are those whose weights carry scales
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise CheckpointError(f"{source or 'checkpoint'}: weights do not fit the model: {e}") from None
    model.eval()
    return model
