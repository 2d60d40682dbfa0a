"""What a Llama 3.2 Vision model costs in memory: weights (from tensor headers, or from the config
with its quantization when the folder holds no weights), the text KV cache, and the cross-attention
keys and values each image keeps in the cache. Nothing is read but headers."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .model import MllamaArgs

__all__ = ["describe_mllama", "image_cache_bytes", "self_attention_config", "weight_bytes"]


def _linear_bytes(out_f: int, in_f: int, bits: Optional[int], group_size: int, elem: int) -> int:
    if bits is None or in_f % group_size:
        return out_f * in_f * elem
    return out_f * in_f * bits // 8 + 2 * out_f * (in_f // group_size) * elem


def weight_bytes(config: dict, *, bits: Optional[int] = None, group_size: int = 64, quantize_vision: bool = False,
                 elem: int = 2) -> tuple[int, int]:
    """(parameters, bytes) of the model the config describes; `bits`: the language model's linears and
    embedding quantized (and the vision tower's with `quantize_vision`), as `convert -q` writes them."""
    args = MllamaArgs.from_dict(config)
    t, v = args.text, args.vision
    cross = set(args.cross_attention_layers)
    params, nbytes = 0, 0

    def linear(out_f, in_f, q, bias=False):
        nonlocal params, nbytes
        params += out_f * in_f + (out_f if bias else 0)
        nbytes += _linear_bytes(out_f, in_f, q, group_size, elem) + (out_f * elem if bias else 0)

    def vector(n):
        nonlocal params, nbytes
        params += n
        nbytes += n * elem

    D, H, K, hd, F = t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.intermediate_size
    linear(t.vocab_size + 8, D, bits)  # embedding rows (the image token and spares included)
    linear(t.vocab_size, D, bits)  # output head
    vector(D)
    for i in range(t.num_hidden_layers):
        for out_f, in_f in ((H * hd, D), (K * hd, D), (K * hd, D), (D, H * hd), (F, D), (F, D), (D, F)):
            linear(out_f, in_f, bits)
        vector(2 * D)
        if i in cross:
            vector(2 * hd + 2)  # q/k norms, two gates
    qv = bits if quantize_vision else None
    Dv, P, T = v.hidden_size, v.num_patches, v.max_num_tiles
    linear(Dv, v.num_channels * v.patch_size**2, None)  # patch convolution
    vector(Dv + P * Dv + 1 + 2)  # class embedding, position embedding, gates
    linear(T * P * Dv, v.max_aspect_ratio_id + 1, None)  # tile position embedding (as a table)
    for _ in range(2):
        linear(T * Dv, v.max_aspect_ratio_id + 1, None)  # pre/post tile embeddings
    vector(4 * Dv)  # layernorm_pre/post
    for gated in [False] * v.num_hidden_layers + [True] * v.num_global_layers:
        for _ in range(4):
            linear(Dv, Dv, qv)
        linear(v.intermediate_size, Dv, qv, bias=True)
        linear(Dv, v.intermediate_size, qv, bias=True)
        vector(4 * Dv + (2 if gated else 0))
    linear(D, v.vision_output_dim, None, bias=True)  # projector
    return params, nbytes


def image_cache_bytes(config: dict, images: int = 1, elem: int = 2) -> int:
    """Bytes of the cross-attention keys and values `images` images keep in the cache."""
    args = MllamaArgs.from_dict(config)
    t, v = args.text, args.vision
    positions = images * v.max_num_tiles * v.num_patches
    return 2 * len(args.cross_attention_layers) * t.num_key_value_heads * t.head_dim * positions * elem


def self_attention_config(config: dict) -> dict:
    """The text config with only the self-attention layers counted (what `info.kv_cache_bytes` sizes)."""
    args = MllamaArgs.from_dict(config)
    t = args.text
    cross = len(args.cross_attention_layers)
    return {"num_key_value_heads": t.num_key_value_heads, "head_dim": t.head_dim,
            "num_hidden_layers": t.num_hidden_layers - cross, "max_position_embeddings": t.max_position_embeddings}


def describe_mllama(path: Path, config: dict, *, dtype: Optional[str] = None, images: int = 1) -> dict:
    """`llama_mlx.info.describe`'s figures for a Llama 3.2 Vision folder, but for the text KV cache and
    the size on disk (which `describe` adds), with `vision` and, in `memory`, `image_cache` (the
    cross-attention keys and values of `images` images)."""
    from ..checkpoints.base import dtype_name, parse_dtype
    from ..checkpoints.hf import _weight_files, load_safetensors

    args = MllamaArgs.from_dict(config)
    t, v = args.text, args.vision
    from .meta import META_LAYOUT, meta_weight_files

    quant = config.get("quantization") or None
    meta = bool(config.get(META_LAYOUT))  # Meta's consolidated.NN.pth: sizes from config.json's figures
    files = meta_weight_files(path) if meta else _weight_files(path)
    memory_dtype = parse_dtype(dtype) or parse_dtype(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    elem = memory_dtype.size
    parameters, estimated = weight_bytes(config, bits=(quant or {}).get("bits"),
                                         group_size=(quant or {}).get("group_size", 64), elem=elem)
    stored = None
    if files and not meta:
        stored = sum(a.nbytes for f in files for a in load_safetensors(f)[0].values())  # headers only
    weights = estimated if stored is None or dtype is not None else stored
    image = image_cache_bytes(config, images, elem)
    return {
        "path": str(path), "format": "meta" if meta else "mlx" if quant else "hf", "architecture": "mllama",
        "layers": t.num_hidden_layers, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "attention_heads": t.num_attention_heads, "kv_heads": t.num_key_value_heads, "head_dim": t.head_dim,
        "vocab_size": t.vocab_size, "tie_word_embeddings": False, "rope_theta": t.rope_theta,
        "rope_scaling": t.rope_scaling, "parameters": parameters, "quantization": quant,
        "dtype": dtype_name(memory_dtype), "bits_per_weight": round(8 * weights / max(parameters, 1), 3),
        "context_length": int(t.max_position_embeddings),
        "weight_files": [str(f) for f in files], "weight_files_bytes": sum(f.stat().st_size for f in files),
        "tensor_bytes": stored if stored is not None else estimated,
        "vision": {"layers": v.num_hidden_layers, "global_layers": v.num_global_layers,
                   "hidden_size": v.hidden_size, "tile_size": v.image_size, "patch_size": v.patch_size,
                   "max_tiles": v.max_num_tiles, "cross_attention_layers": args.cross_attention_layers},
        "memory": {"dtype": dtype_name(memory_dtype), "weights": weights, "weights_estimated": stored is None,
                   "kv_dtype": dtype_name(memory_dtype), "images": images, "image_cache": image},
    }
