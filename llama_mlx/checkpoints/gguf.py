"""GGUF files (llama.cpp): header checked here, tensors read lazily (gguf_lazy), metadata turned into an HF config.

Quantized tensors become MLX affine triples (group size 32; gguf_quants says which are exact),
F16/F32/BF16 tensors arrays, each memory-mapped and read only when asked for.
q/k rows of llama.cpp's files are in Meta's interleaved RoPE layout: the config says rope_traditional.
"""

from __future__ import annotations

import math
import mmap
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import CheckpointError, ConfigError
from .base import Checkpoint, Tensor, check_config
from . import gguf_quants as quants
from .gguf_lazy import gguf_tensors, read_float
from .keymap import gguf_to_hf
from ..config import llama3_rope_scaling

GGML_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K",
    11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS",
    19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32",
    27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}
# Supported types: (elements per block, bytes per block).
BLOCKS = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), **quants.BLOCKS}
GROUP_SIZE = quants.GROUP_SIZE  # of every GGUF quant type's MLX conversion

# GGUF metadata value types: struct format of the scalars, 8 = string, 9 = array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (GGUF lists the fastest-moving dimension first)
    type: str
    offset: int  # from the start of the file


@dataclass
class Header:
    version: int
    metadata: dict
    tensors: dict[str, TensorInfo]


class _Reader:
    def __init__(self, data, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int):
        if self.pos + n > len(self.data):
            raise CheckpointError(f"{self.path}: truncated GGUF header")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        try:
            return bytes(self.take(n)).decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.path}: corrupt GGUF header (a string is not UTF-8)") from None

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            itype, count = self.scalar("<I"), self.scalar("<Q")
            if itype in _SCALARS:  # read numeric arrays in one go
                fmt = _SCALARS[itype]
                size = struct.calcsize(fmt)
                return np.frombuffer(self.take(size * count), dtype=np.dtype(fmt)).tolist()
            return [self.value(itype) for _ in range(count)]
        raise CheckpointError(f"{self.path}: corrupt GGUF header (unknown value type {vtype})")


def read_header(path: Path) -> Header:
    """Parse and validate a GGUF header: magic, version, metadata, tensor infos, file size."""
    try:
        with open(path, "rb") as f:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if f.seek(0, 2) else b""
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from None
    r = _Reader(memoryview(data), path)
    if bytes(r.take(4)) != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (bad magic)")
    version = r.scalar("<I")
    if version not in (2, 3):
        raise CheckpointError(f"{path}: unsupported GGUF version {version}")
    n_tensors, n_kv = r.scalar("<Q"), r.scalar("<Q")
    metadata = {}
    for _ in range(n_kv):
        key = r.string()
        metadata[key] = r.value(r.scalar("<I"))
    infos = []
    for _ in range(n_tensors):
        name = r.string()
        dims = [r.scalar("<Q") for _ in range(r.scalar("<I"))]
        type_id, offset = r.scalar("<I"), r.scalar("<Q")
        infos.append((name, tuple(reversed(dims)), type_id, offset))
    align = int(metadata.get("general.alignment", 32))
    start = (r.pos + align - 1) // align * align
    tensors = {}
    for name, shape, type_id, offset in infos:
        kind = GGML_TYPES.get(type_id, f"type {type_id}")
        if kind not in BLOCKS:
            raise CheckpointError(
                f"{path}: unsupported GGUF tensor type {kind} (tensor {name!r}); "
                f"supported: {', '.join(BLOCKS)}")
        per, nbytes = BLOCKS[kind]
        numel = math.prod(shape)
        if numel % per:
            raise CheckpointError(f"{path}: tensor {name!r} of {numel} elements is not whole {kind} blocks")
        if start + offset + numel // per * nbytes > len(data):
            raise CheckpointError(f"{path}: truncated: tensor {name!r} extends past the end of the file")
        tensors[name] = TensorInfo(name, shape, kind, start + offset)
    return Header(version, metadata, tensors)


def _meta(metadata: dict, key: str, path: Path, default=None, kind=int):
    value = metadata.get(key, default)
    if value is None:
        raise ConfigError(f"{path}: GGUF metadata {key!r} is missing")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{path}: GGUF metadata {key!r} has an invalid value {value!r}") from None


def config_from_metadata(metadata: dict, tensors: dict, path: Path) -> dict:
    """HF config dict from GGUF metadata (`llama.*` keys) and tensor shapes."""
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ConfigError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
    p = "llama."
    hidden = _meta(metadata, p + "embedding_length", path)
    heads = _meta(metadata, p + "attention.head_count", path)
    emb = tensors.get("token_embd.weight")
    vocab = metadata.get(p + "vocab_size") or len(metadata.get("tokenizer.ggml.tokens", [])) or (
        emb.shape[0] if emb is not None else None)
    head_dim = _meta(metadata, p + "attention.key_length", path, hidden // heads)
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
    low_wl, high_wl = original / 1.0, original / 4.0
    want = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < high_wl:
            want.append(1.0)
        elif wl > low_wl:
            want.append(factor)
        else:
            s = (original / wl - 1.0) / (4.0 - 1.0)
            want.append(1 / ((1 - s) / factor + s))
    if factors.shape != (dim // 2,) or not np.allclose(factors, want, rtol=1e-3):
        raise ConfigError(f"{path}: rope_freqs do not match Llama 3 RoPE scaling")
    return scaling


def read_gguf(path: Path, *, scale_dtype: mx.Dtype = mx.float16) -> Checkpoint:
    """Read a llama-architecture GGUF file: F32, F16, BF16 and the quant types of gguf_quants.BLOCKS.

    Tensors are left unread (memory-mapped one at a time when read). scale_dtype: of the MLX
    scales and biases the quantized tensors become (float32 keeps every exact type bit-exact).
    """
    from ..tokenizer import load_tokenizer

    path = Path(path)
    header = read_header(path)
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
        original = int(header.metadata.get("llama.rope.scaling.original_context_length", 8192))
        config["rope_scaling"] = rope_scaling_from_freqs(rope_freqs, config, original, path)

    quantization = _quantization(tensors)
    if quantization:
        config["quantization"] = quantization
    metadata = header.metadata
    return Checkpoint(
        format="gguf",
        path=path,
        config=config,
        tensors=tensors,
        files=[path],
        make_tokenizer=lambda: load_tokenizer(path, gguf_metadata=metadata),
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
