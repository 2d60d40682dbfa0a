"""GGUF files (llama.cpp): header parsed by `llama_mlx.gguf_file` and checked here, tensors read lazily
(gguf_lazy), metadata turned into an HF config.

Quantized tensors become MLX affine triples (group size 32; gguf_quants says which are exact),
F16/F32/BF16 tensors arrays, each memory-mapped and read only when asked for.
q/k rows of llama.cpp's files are in Meta's interleaved RoPE layout: the config says rope_traditional.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..config import LLAMA3_ROPE, llama3_rope_scaling
from ..errors import CheckpointError, ConfigError
from ..gguf_file import GGUFHeader, read_gguf_header
from ..tokenizer_source import TokenizerSource
from .base import Checkpoint, Tensor, check_config
from . import gguf_quants as quants
from .gguf_lazy import gguf_tensors, read_float
from .keymap import gguf_to_hf

__all__ = ["BLOCKS", "config_from_metadata", "read_gguf", "rope_scaling_from_freqs"]

# Supported types: (elements per block, bytes per block).
BLOCKS = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), **quants.BLOCKS}
GROUP_SIZE = quants.GROUP_SIZE  # of every GGUF quant type's MLX conversion


def _check_tensors(header: GGUFHeader, path: Path) -> None:
    """Every tensor of a type MLX reads, whole blocks, inside the file, and the tensors tiling the data
    section as llama.cpp writes it: each starts where the previous one ends (rounded up to the
    alignment), so no two share bytes (a small file cannot load as many times its size) and a tensor
    holding other bytes than its type's size (F32 data under an F16 type) does not fit its slot."""
    extents = []
    for name, info in header.tensors.items():
        if info.type not in BLOCKS:
            raise CheckpointError(
                f"{path}: unsupported GGUF tensor type {info.type} (tensor {name!r}); "
                f"supported: {', '.join(BLOCKS)}")
        per, nbytes = BLOCKS[info.type]
        numel = math.prod(info.shape)
        if numel % per:
            raise CheckpointError(f"{path}: tensor {name!r} of {numel} elements is not whole {info.type} blocks")
        if info.offset + numel // per * nbytes > header.file_size:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} extends past the end of the file")
        extents.append((info.offset, numel // per * nbytes, name))
    align = header.alignment
    expected, before = header.data_start, None
    for offset, size, name in sorted(extents):
        if offset != expected:
            where = f"after tensor {before!r}" if before else "at the start of the data"
            problem = "overlaps the tensor before it" if offset < expected else "leaves a gap"
            raise CheckpointError(f"{path}: corrupt GGUF tensor table: tensor {name!r} at offset {offset} "
                                  f"{problem} ({where}, expected offset {expected}: the sizes of the tensors "
                                  f"do not match their types)")
        expected, before = offset + (size + align - 1) // align * align, name
        end = offset + size
    if extents and header.file_size - end >= align:
        raise CheckpointError(f"{path}: corrupt GGUF tensor table: {header.file_size - end} bytes follow the "
                              f"last tensor {before!r} (the sizes of the tensors do not match their types)")


def _meta(metadata: dict, key: str, path: Path, default=None, kind=int):
    """A metadata value of the type `kind` (int: a positive integer; float: a positive finite number)."""
    value = metadata.get(key, default)
    if value is None:
        raise ConfigError(f"{path}: GGUF metadata {key!r} is missing")
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
    else:
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
              and value > 0)
    if not ok:
        what = "a positive integer" if kind is int else "a positive number"
        raise ConfigError(f"{path}: GGUF metadata {key!r} must be {what}, found {value!r:.80}")
    return kind(value)


def config_from_metadata(metadata: dict, tensors: dict, path: Path) -> dict:
    """HF config dict from GGUF metadata (`llama.*` keys) and tensor shapes."""
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ConfigError(f"{path}: GGUF architecture {arch!r:.80} is not supported (only 'llama')")
    p = "llama."
    hidden = _meta(metadata, p + "embedding_length", path)
    heads = _meta(metadata, p + "attention.head_count", path)
    emb = tensors.get("token_embd.weight")
    tokens = metadata.get("tokenizer.ggml.tokens", [])
    if p + "vocab_size" in metadata:
        vocab = _meta(metadata, p + "vocab_size", path)
    else:
        vocab = (len(tokens) if isinstance(tokens, list) else 0) or (emb.shape[0] if emb is not None else None)
    head_dim = _meta(metadata, p + "attention.key_length", path, hidden // heads or None)
    rope_dim = _meta(metadata, p + "rope.dimension_count", path, head_dim)
    if rope_dim != head_dim:
        raise ConfigError(f"{path}: partial rotary embeddings ({rope_dim} of {head_dim} dims) are not supported")
    if not vocab:
        raise ConfigError(f"{path}: GGUF metadata gives no vocabulary size")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": _meta(metadata, p + "feed_forward_length", path),
        "num_hidden_layers": _meta(metadata, p + "block_count", path),
        "num_attention_heads": heads,
        "num_key_value_heads": _meta(metadata, p + "attention.head_count_kv", path, heads),
        "head_dim": head_dim,
        "vocab_size": vocab,
        "rms_norm_eps": _meta(metadata, p + "attention.layer_norm_rms_epsilon", path, 1e-5, float),
        "rope_theta": _meta(metadata, p + "rope.freq_base", path, 10000.0, float),
        "max_position_embeddings": _meta(metadata, p + "context_length", path, 8192),
        "tie_word_embeddings": "output.weight" not in tensors,
        "rope_traditional": True,
        "rope_scaling": None,
    }
    # float32 metadata: round 1e-05 back from 9.99999974e-06
    config["rms_norm_eps"] = float(f"{config['rms_norm_eps']:.6g}")
    kind = metadata.get(p + "rope.scaling.type")
    if kind is not None and not isinstance(kind, str):
        raise ConfigError(f"{path}: GGUF metadata {p + 'rope.scaling.type'!r} must be a string, found {kind!r:.80}")
    if kind == "linear":
        config["rope_scaling"] = {"rope_type": "linear",
                                  "factor": _meta(metadata, p + "rope.scaling.factor", path, kind=float)}
    elif kind not in (None, "none"):
        raise ConfigError(f"{path}: RoPE scaling type {kind!r} is not supported")
    return check_config(config, path)


def rope_scaling_from_freqs(factors: np.ndarray, config: dict, original: int, path: Path) -> dict:
    """llama.cpp stores Llama 3.1 RoPE scaling as per-frequency divisors; recover the HF dict."""
    factor = float(factors.max())
    scaling = llama3_rope_scaling(factor)
    scaling["original_max_position_embeddings"] = original
    dim = config["head_dim"]
    freqs = 1.0 / config["rope_theta"] ** (np.arange(0, dim, 2) / dim)
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    low_wl, high_wl = original / low, original / high
    want = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < high_wl:
            want.append(1.0)
        elif wl > low_wl:
            want.append(factor)
        else:
            s = (original / wl - low) / (high - low)
            want.append(1 / ((1 - s) / factor + s))
    if factors.shape != (dim // 2,) or not np.allclose(factors, want, rtol=1e-3):
        raise ConfigError(f"{path}: rope_freqs do not match Llama 3 RoPE scaling")
    return scaling


def read_gguf(path: Path, *, scale_dtype: mx.Dtype = mx.float16) -> Checkpoint:
    """Read a llama-architecture GGUF file: F32, F16, BF16 and the quant types of gguf_quants.BLOCKS.

    Tensors are left unread (memory-mapped one at a time when read). scale_dtype: of the MLX
    scales and biases the quantized tensors become (float32 keeps every exact type bit-exact).
    """
    path = Path(path)
    header = read_gguf_header(path)
    _check_tensors(header, path)
    config = config_from_metadata(header.metadata, header.tensors, path)

    tensors: dict[str, Tensor] = {}
    rope_freqs = None
    for name, info in header.tensors.items():
        if name == "rope_freqs.weight":
            rope_freqs = np.array(read_float(path, info).astype(mx.float32))
            continue
        hf = gguf_to_hf(name)
        if hf is None or not hf.endswith(".weight"):
            raise CheckpointError(f"{path}: unexpected tensor {name!r} in a Llama GGUF")
        tensors.update(gguf_tensors(path, info, hf, scale_dtype))
    if rope_freqs is not None:
        original = _meta(header.metadata, "llama.rope.scaling.original_context_length", path,
                         LLAMA3_ROPE["original_max_position_embeddings"])
        config["rope_scaling"] = rope_scaling_from_freqs(rope_freqs, config, original, path)

    quantization = _quantization(tensors)
    if quantization:
        config["quantization"] = quantization
    return Checkpoint(
        format="gguf",
        path=path,
        config=config,
        tensors=tensors,
        files=[path],
        tokenizer_source=TokenizerSource("gguf", path, gguf_metadata=header.metadata),
    )


def _quantization(tensors: dict[str, Tensor]) -> dict | None:
    """mlx-lm's quantization dict from the packed shapes: the commonest bit width, others per module."""
    bits = {}
    for name, t in tensors.items():
        if name.endswith(".scales"):
            module = name[: -len(".scales")]
            packed = tensors[module + ".weight"].shape[-1]
            bits[module] = packed // t.shape[-1]  # packed*32 / (groups*32)
    if not bits:
        return None
    common = Counter(bits.values()).most_common(1)[0][0]
    q = {"group_size": GROUP_SIZE, "bits": common}
    for module, b in bits.items():
        if b != common:
            q[module] = {"group_size": GROUP_SIZE, "bits": b}
    return q
