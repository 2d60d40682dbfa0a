"""`load(path)`: any checkpoint layout to (model, tokenizer), lazily.

Where a named model is (paths, the weights folder, hub ids, the default model) is `resolve`'s;
building it is `build`'s; fitting it to the device is `backends.prepare`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx

from . import backends
from .build import build_model, check_vocabulary
from .checkpoints import LazyWeights, read_checkpoint
from .checkpoints.base import parse_dtype
from .checkpoints.plan import main_dtype
from .errors import ArgumentError, CheckpointError
from .resolve import DEFAULT_MODEL, ensure_default_model, resolve_model, weights_dir
from .tokenizer import load_tokenizer

__all__ = ["DEFAULT_MODEL", "META_SAMPLING", "build_model", "ensure_default_model", "generation_defaults", "load",
           "resolve_model", "resolve_sampling", "weights_dir"]

META_SAMPLING = {"temp": 0.6, "top_p": 0.9}  # Meta's reference chat defaults (llama/generation.py)


def load(path: str | Path | None = None, *, dtype: str | None = None, lazy: bool = True,
         rope_factor: float | None = None, fuse: bool | None = None, distributed: bool | str | None = None,
         allow_vocab_mismatch: bool = False, adapter_path: str | Path | None = None):
    """Load a model and its tokenizer from a Meta folder, HF folder, GGUF file or MLX folder; a Llama 3.2
    Vision folder (`model_type: mllama`) gives (model, processor) (`llama_mlx.vision.loading.Processor`).

    path: a file, a folder, a model name under the weights folder, or None for the default model.
    dtype: float16 / bfloat16 / float32 for float tensors (default: the checkpoint's own).
    lazy: leave weights unread until first used (safetensors are read from disk on demand).
    fuse: merge q/k/v and gate/up projections; default on GPUs only. The model is fitted to the
    device by `backends.prepare` (see there for fusion, compute dtype and CPU threads).
    distributed: None (or "auto") shards the model when this process is one rank of a group of
    several (started by `mlx.launch`): by heads (tensor parallel) where they divide by the ranks,
    else by layers (pipeline parallel; `model.shard_plan` tells which, and why). "pipeline" splits
    its layers, "tensor" (or True) its heads or refuses, False never shards (see
    `llama_mlx.distributed.load_sharded`).
    A tokenizer with ids past the model's vocabulary is refused (VocabularyMismatchError) unless
    `allow_vocab_mismatch` (tiny test models paired with a real tokenizer; ids are still range-checked
    when they reach generation).
    adapter_path: an mlx-lm LoRA/DoRA adapter folder applied to the model (`llama_mlx.lora`).
    """
    if distributed not in (None, False, True, "auto", "tensor", "pipeline"):
        raise ValueError(f"distributed must be None, False, True, 'auto', 'tensor' or 'pipeline', "
                         f"not {distributed!r}")
    from .lora import read_adapter

    adapter = read_adapter(adapter_path) if adapter_path is not None else None  # checked before loading
    if distributed is not False:
        from . import distributed as dist

        group = dist.group()
        if group.size() > 1 or distributed not in (None, "auto"):
            if adapter is not None:
                raise ArgumentError("an adapter (--adapter-path) cannot be applied to a model split over "
                                    "several processes: fuse it first (llama-mlx convert --adapter-path)")
            pipeline = None if distributed in (None, "auto") else distributed == "pipeline"
            return dist.load_sharded(path, group, pipeline=pipeline, dtype=dtype,
                                     rope_factor=rope_factor, allow_vocab_mismatch=allow_vocab_mismatch)
    resolved = resolve_model(path)
    from .vision.loading import load_mllama, mllama_config

    vision_config = mllama_config(resolved)
    if vision_config is not None:  # Llama 3.2 Vision: (model, processor)
        if adapter is not None:
            raise ArgumentError(f"{resolved}: adapters apply to Llama 3 text models, not Llama 3.2 Vision")
        return load_mllama(resolved, dtype=parse_dtype(dtype), lazy=lazy, allow_vocab_mismatch=allow_vocab_mismatch,
                           config=vision_config)
    ckpt = read_checkpoint(resolved, rope_factor=rope_factor)
    weights = LazyWeights(ckpt.tensors, parse_dtype(dtype) or main_dtype(ckpt))
    tokenizer = load_tokenizer(ckpt.tokenizer_source or ckpt.path)
    if not allow_vocab_mismatch:
        check_vocabulary(tokenizer, ckpt.config["vocab_size"], ckpt.path)
    model = build_model(ckpt.config, weights, source=ckpt.path)
    if adapter is not None:  # before fusion: the adapted projections stay apart there
        from .lora import apply_adapter

        apply_adapter(model, adapter)
    model = backends.prepare(model, fuse=fuse)
    del weights, ckpt  # so that each layer's unfused arrays are freed once its fused ones exist
    if not lazy:
        # One layer at a time, so fusing never holds two copies of more than one layer's weights.
        for layer in model.layers:
            mx.eval(layer.parameters())
        mx.eval(model.parameters())
    return model, tokenizer


def generation_defaults(path: str | Path) -> dict[str, Any]:
    """The sampling settings a model recommends: its folder's generation_config.json (temperature,
    top_p, top_k, min_p, repetition_penalty; do_sample false means greedy), or a GGUF file's
    general.sampling.* metadata, as {"temp", "top_p", ...}; {} when it records none."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        from .gguf_file import read_gguf_metadata

        meta = read_gguf_metadata(path)
        found = {ours: meta.get(f"general.sampling.{key}") for key, ours in
                 (("temp", "temp"), ("top_p", "top_p"), ("top_k", "top_k"), ("min_p", "min_p"))}
    else:
        import json

        file = path / "generation_config.json"
        try:
            config = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{file}: cannot read: {e}") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{file}: expected a JSON object")
        found = {ours: config.get(key) for key, ours in (("temperature", "temp"), ("top_p", "top_p"), ("top_k", "top_k"),
                                                         ("min_p", "min_p"), ("repetition_penalty", "repetition_penalty"))}
        if config.get("do_sample") is False:
            found["temp"] = 0.0
    out: dict[str, Any] = {}
    for key, value in found.items():
        if hasattr(value, "tolist"):
            value = value.tolist()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = int(value) if key == "top_k" else float(value)
    return out


def resolve_sampling(recommended: dict[str, Any], **given: float | None) -> tuple[dict[str, float], dict[str, str]]:
    """temp and top_p of a generation: `given`'s where not None, else the model's `recommended`
    (`generation_defaults`), else Meta's chat defaults (0.6, 0.9), never 1.0 by omission. Returns
    ({"temp", "top_p"}, {name: "given" | "model" | "meta"}, where each came from)."""
    values, sources = {}, {}
    for name in ("temp", "top_p"):
        if given.get(name) is not None:
            values[name], sources[name] = float(given[name]), "given"
        elif name in recommended:
            values[name], sources[name] = float(recommended[name]), "model"
        else:
            values[name], sources[name] = float(META_SAMPLING[name]), "meta"
    return values, sources
