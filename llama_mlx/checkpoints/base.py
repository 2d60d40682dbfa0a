"""What every reader returns: an HF-style config and lazily read tensors under HF names."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import mlx.core as mx

from ..errors import CheckpointError, ConfigError
from ..tokenizer_source import TokenizerSource

__all__ = [
    "Checkpoint",
    "FLOAT_DTYPES",
    "LazyWeights",
    "REQUIRED_CONFIG_KEYS",
    "Tensor",
    "check_config",
    "check_tensors",
    "dtype_name",
    "expected_shapes",
    "is_float",
    "module_quantization",
    "parse_dtype",
    "read_json",
]

REQUIRED_CONFIG_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
)

FLOAT_DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


@dataclass
class Tensor:
    """One tensor of a checkpoint: shape and dtype known up front, data read by `read()`."""

    shape: tuple[int, ...]
    dtype: mx.Dtype
    file: Path
    reader: Callable[[], mx.array]

    def read(self) -> mx.array:
        try:
            return self.reader()
        except CheckpointError:
            raise
        except (OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{self.file}: cannot read tensor data: {e}") from None

    @classmethod
    def of(cls, array: mx.array, file: Path) -> "Tensor":
        return cls(tuple(array.shape), array.dtype, file, lambda: array)


@dataclass
class Checkpoint:
    """A checkpoint in any layout, seen through HF names."""

    format: str  # "meta" | "hf" | "mlx" | "gguf"
    path: Path
    config: dict  # HF config.json keys, plus `quantization` and `rope_traditional`
    tensors: dict[str, Tensor]
    files: list[Path]  # weight files, for provenance
    tokenizer_source: TokenizerSource | None  # None: no usable tokenizer beside the weights
    tokenizer_files: list[Path] = field(default_factory=list)  # copied verbatim by the writer
    generation_config: dict | None = None


class LazyWeights(Mapping):
    """A read-only mapping name -> mx.array that reads each tensor when it is asked for."""

    def __init__(self, tensors: dict[str, Tensor], dtype: mx.Dtype | None = None):
        self._tensors = tensors
        self._dtype = dtype

    def __getitem__(self, name: str) -> mx.array:
        t = self._tensors[name]
        a = t.read()
        if self._dtype is not None and is_float(a.dtype) and a.dtype != self._dtype:
            a = a.astype(self._dtype)
        return a

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def is_float(dtype: mx.Dtype) -> bool:
    return dtype in (mx.float16, mx.bfloat16, mx.float32)


def parse_dtype(dtype: str | mx.Dtype | None) -> mx.Dtype | None:
    """float16 / bfloat16 / float32 (str or mx.Dtype) -> mx.Dtype; None stays None."""
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in FLOAT_DTYPES:
        raise ConfigError(f"unsupported dtype {dtype!r}: choose float16, bfloat16 or float32")
    return FLOAT_DTYPES[dtype]


def dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).rpartition(".")[2]


def read_json(path: Path, what: str = "config") -> dict:
    """Read a JSON object, turning every failure into a one-line ConfigError naming the file."""
    if not path.is_file():
        raise ConfigError(f"{path}: missing {what} file")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: malformed JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def check_config(config: dict, file: Path) -> dict:
    """Validate the keys every Llama config needs and fill the defaults; returns the config."""
    for key in REQUIRED_CONFIG_KEYS:
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            if key not in config:
                raise ConfigError(f"{file}: missing key {key!r}")
            raise ConfigError(f"{file}: {key!r} must be a positive integer, found {value!r}")
    heads = config["num_attention_heads"]
    config.setdefault("num_key_value_heads", heads)
    kv = config["num_key_value_heads"]
    if not isinstance(kv, int) or kv <= 0 or heads % kv:
        raise ConfigError(f"{file}: num_key_value_heads {kv!r} must divide num_attention_heads {heads}")
    if config.get("head_dim") is None:
        if config["hidden_size"] % heads:
            raise ConfigError(f"{file}: hidden_size {config['hidden_size']} is not a multiple of {heads} heads")
        config["head_dim"] = config["hidden_size"] // heads
    config.setdefault("model_type", "llama")
    if config["model_type"] != "llama":
        raise ConfigError(f"{file}: model_type {config['model_type']!r} is not a Llama model")
    config.setdefault("rms_norm_eps", 1e-5)
    config.setdefault("rope_theta", 10000.0)
    config.setdefault("rope_traditional", False)
    return config


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Logical (unquantized) shape of every parameter a Llama model with this config has."""
    d, ff, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (q, d),
            p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d),
            p + "self_attn.o_proj.weight": (d, q),
            p + "mlp.gate_proj.weight": (ff, d),
            p + "mlp.up_proj.weight": (ff, d),
            p + "mlp.down_proj.weight": (d, ff),
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
        })
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (v, d)
    return shapes


def module_quantization(quantization: dict | None, module: str) -> dict | None:
    """The {group_size, bits} a module path is quantized with according to a config, or None."""
    if not quantization:
        return None
    own = quantization.get(module)
    if isinstance(own, dict):
        return {"group_size": own.get("group_size", quantization.get("group_size", 64)),
                "bits": own.get("bits", quantization.get("bits", 4))}
    if own is False:
        return None
    return {"group_size": quantization.get("group_size", 64), "bits": quantization.get("bits", 4)}


def check_tensors(ckpt: Checkpoint) -> None:
    """Every tensor present with the shape the config implies (quantized ones by their scales)."""
    config, tensors = ckpt.config, ckpt.tensors
    expected = expected_shapes(config)
    for name, shape in expected.items():
        module = name[: -len(".weight")]
        t = tensors.get(name)
        if t is None:
            raise CheckpointError(f"{ckpt.path}: tensor {name!r} is missing")
        scales = tensors.get(module + ".scales")
        if scales is None:
            if t.shape != shape:
                raise CheckpointError(
                    f"{t.file}: tensor {name!r} has shape {list(t.shape)}, the config implies {list(shape)}")
            continue
        q = module_quantization(config.get("quantization"), module)
        if q is None or module + ".biases" not in tensors:
            raise CheckpointError(f"{t.file}: tensor {name!r} is quantized but the config has no quantization for it")
        out, inp = shape
        packed = inp * q["bits"] // 32
        want = {name: (out, packed), module + ".scales": (out, inp // q["group_size"]),
                module + ".biases": (out, inp // q["group_size"])}
        for n, s in want.items():
            if tensors[n].shape != s:
                raise CheckpointError(
                    f"{tensors[n].file}: tensor {n!r} has shape {list(tensors[n].shape)}, the config "
                    f"({q['bits']}-bit, group size {q['group_size']}) implies {list(s)}")
    extra = [n for n in tensors if n.rpartition(".")[0] + ".weight" not in expected]
    if extra:
        raise CheckpointError(f"{tensors[extra[0]].file}: unexpected tensor {extra[0]!r} for this config")
