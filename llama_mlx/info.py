"""What a checkpoint is and what it will cost in memory, from its config and tensor headers (no weights read)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Optional, Union

from .errors import MemoryFitError
from .fit import fit_context

__all__ = ["describe", "disk_size", "kv_cache_bytes", "model_info"]


def disk_size(path: Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def kv_cache_bytes(config: dict, tokens: int, elem_bytes: int, kv_bits: Optional[int] = None,
                   kv_group_size: int = 64) -> int:
    """Bytes of keys and values for `tokens` positions (quantized: packed values plus a scale and bias per group)."""
    per_layer = config["num_key_value_heads"] * config["head_dim"] * tokens
    if kv_bits is None:
        per_layer_bytes = per_layer * elem_bytes
    else:
        per_layer_bytes = per_layer * kv_bits // 8 + 2 * (per_layer // kv_group_size) * elem_bytes
    return 2 * config["num_hidden_layers"] * per_layer_bytes


def describe(path: Path, *, context: Optional[int] = None, dtype: Optional[str] = None,
             kv_bits: Optional[int] = None, kv_group_size: int = 64, images: int = 1,
             memory_budget: Optional[int] = None) -> dict:
    """Figures about the checkpoint at `path`, from its config and tensor headers (no weights read).
    `memory["fit"]`: the context that fits in `memory_budget` bytes (default: the device's memory)
    beside the weights (`llama_mlx.fit`; None when not even its minimum does).
    Llama 3.2 Vision (`vision.info.describe_mllama`): the memory adds `images` images' cross-attention
    keys and values; a folder with config.json alone is estimated from the config and its quantization."""
    from .vision.loading import mllama_config

    config = mllama_config(path)
    if config is not None:
        from .checkpoints.base import parse_dtype
        from .vision.info import describe_mllama, self_attention_config

        folder = Path(path) if Path(path).is_dir() else Path(path).parent
        d = describe_mllama(folder, config, dtype=dtype, images=images)
        text = self_attention_config(config)
        tokens = context or d["context_length"]
        kv = kv_cache_bytes(text, tokens, parse_dtype(d["memory"]["kv_dtype"]).size, kv_bits, kv_group_size)
        d["size_on_disk"] = disk_size(folder)
        d["memory"].update(kv_cache_tokens=tokens, kv_bits=kv_bits, kv_cache=kv,
                           total=d["memory"]["weights"] + kv + d["memory"]["image_cache"])
        return d
    from .checkpoints import read_checkpoint
    from .checkpoints.base import dtype_name, parse_dtype
    from .checkpoints.plan import main_dtype, plan
    from .backends import compute_dtype

    ckpt = read_checkpoint(path)
    config = ckpt.config
    stored = plan(ckpt)[0]  # as the checkpoint holds the tensors
    memory_dtype = parse_dtype(dtype) or main_dtype(ckpt)
    loaded = plan(ckpt, dtype=memory_dtype)[0]  # as `load` will hold them
    parameters = sum(i.parameters for i in stored)
    context_length = int(config.get("max_position_embeddings") or 0)
    tokens = context or context_length
    weights_bytes = sum(i.nbytes for i in loaded)
    kv_dtype = compute_dtype() or memory_dtype  # the cache holds activations' dtype
    kv_bytes = kv_cache_bytes(config, tokens, kv_dtype.size, kv_bits, kv_group_size)
    try:
        fit = fit_context(context_length or tokens, weights_bytes,
                          kv_cache_bytes(config, 1, kv_dtype.size, kv_bits, kv_group_size), memory_budget)
        fitted = {**asdict(fit), "limited": fit.limited, "text": fit.describe()}
    except MemoryFitError:
        fitted = None
    quant = config.get("quantization") or None
    return {
        "path": str(ckpt.path),
        "format": ckpt.format,
        "architecture": config.get("model_type", "llama"),
        "layers": config["num_hidden_layers"],
        "hidden_size": config["hidden_size"],
        "intermediate_size": config["intermediate_size"],
        "attention_heads": config["num_attention_heads"],
        "kv_heads": config["num_key_value_heads"],
        "head_dim": config["head_dim"],
        "vocab_size": config["vocab_size"],
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
        "rope_theta": config.get("rope_theta"),
        "rope_scaling": config.get("rope_scaling"),
        "parameters": parameters,
        "quantization": quant,
        "dtype": dtype_name(main_dtype(ckpt)),
        "bits_per_weight": round(8 * sum(i.nbytes for i in stored) / max(parameters, 1), 3),
        "context_length": context_length,
        "size_on_disk": disk_size(ckpt.path),
        "weight_files": [str(f) for f in ckpt.files],
        "weight_files_bytes": sum(Path(f).stat().st_size for f in ckpt.files),
        "tensor_bytes": sum(i.nbytes for i in stored),
        "memory": {
            "dtype": dtype_name(memory_dtype),
            "weights": weights_bytes,
            "kv_cache_tokens": tokens,
            "kv_bits": kv_bits,
            "kv_dtype": dtype_name(kv_dtype),
            "kv_cache": kv_bytes,
            "total": weights_bytes + kv_bytes,
            "fit": fitted,
        },
    }


def model_info(model: Union[str, Path, None] = None, *, context: Optional[int] = None, dtype: Optional[str] = None,
               kv_bits: Optional[int] = None, kv_group_size: int = 64, memory_budget: Optional[int] = None) -> dict:
    """`describe` of a model as `load` names it (a path, a folder name in weights/, None for the default)."""
    from .resolve import resolve_model

    return describe(resolve_model(model), context=context, dtype=dtype, kv_bits=kv_bits,
                    kv_group_size=kv_group_size, memory_budget=memory_budget)
