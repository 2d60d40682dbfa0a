"""What every reader returns: an HF-style config and lazily read tensors under HF names."""

from __future__ import annotations

import json
import math
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
    "check_layer_count",
    "check_quantization",
    "check_rope_scaling",
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

    def __contains__(self, name: object) -> bool:
        return name in self._tensors  # Mapping's own would read the tensor

    def shape_of(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, known without reading it."""
        return self._tensors[name].shape

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
    except RecursionError:
        raise ConfigError(f"{path}: malformed JSON (nested too deeply)") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


# Every model dimension must be at most this: far beyond any Llama, far below what overflows shapes.
MAX_DIM = 1 << 24
MAX_LAYERS = 4096
ROPE_TYPES = ("linear", "llama3")
QUANT_BITS = (2, 3, 4, 5, 6, 8)
QUANT_GROUP_SIZES = (32, 64, 128)


def _positive_int(config: dict, key: str, file: Path, limit: int = MAX_DIM) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        if key not in config:
            raise ConfigError(f"{file}: missing key {key!r}")
        raise ConfigError(f"{file}: {key!r} must be a positive integer, found {value!r:.80}")
    if value > limit:
        raise ConfigError(f"{file}: {key!r} is {value}, more than the {limit} any model has")
    return value


def _positive_number(config: dict, key: str, file: Path) -> float:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{file}: {key!r} must be a positive number, found {value!r:.80}")
    return float(value)


def _boolean(config: dict, key: str, file: Path) -> None:
    if key in config and not isinstance(config[key], bool):
        raise ConfigError(f"{file}: {key!r} must be true or false, found {config[key]!r:.80}")


def check_rope_scaling(scaling, file: Path, key: str = "rope_scaling") -> None:
    """None, or a mapping with a known rope_type and a positive factor (llama3: sane band constants)."""
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        raise ConfigError(f"{file}: {key!r} must be a mapping or null, found {scaling!r:.80}")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ROPE_TYPES:
        raise ConfigError(f"{file}: {key!r} has rope_type {kind!r:.80}; supported: {', '.join(ROPE_TYPES)}")
    if "factor" not in scaling:
        raise ConfigError(f"{file}: {key!r} has no 'factor'")
    _positive_number(scaling, "factor", file)
    if kind == "llama3":
        for k in ("low_freq_factor", "high_freq_factor"):
            if k in scaling:
                _positive_number(scaling, k, file)
        if scaling.get("low_freq_factor", 1.0) >= scaling.get("high_freq_factor", 4.0):
            raise ConfigError(f"{file}: {key!r} needs low_freq_factor < high_freq_factor")
        if "original_max_position_embeddings" in scaling:
            _positive_int(scaling, "original_max_position_embeddings", file)


def check_quantization(q, file: Path) -> None:
    """mlx-lm's quantization dict: bits and group_size from the closed lists, per-module dicts or false."""
    if q is None:
        return
    if not isinstance(q, dict):
        raise ConfigError(f"{file}: 'quantization' must be a mapping, found {q!r:.80}")

    def check(d: dict, where: str) -> None:
        bits, group = d.get("bits", 4), d.get("group_size", 64)
        if isinstance(bits, bool) or bits not in QUANT_BITS:
            raise ConfigError(f"{file}: {where} bits must be one of {QUANT_BITS}, found {bits!r:.80}")
        if isinstance(group, bool) or group not in QUANT_GROUP_SIZES:
            raise ConfigError(f"{file}: {where} group_size must be one of {QUANT_GROUP_SIZES}, found {group!r:.80}")

    check(q, "'quantization'")
    for k, v in q.items():
        if isinstance(v, dict):
            check(v, f"'quantization' of {k!r:.80}")
        elif k not in ("bits", "group_size", "mode") and not isinstance(v, bool):
            raise ConfigError(f"{file}: 'quantization' entry {k!r:.80} must be a mapping or a boolean")


def check_config(config: dict, file: Path) -> dict:
    """Validate every key the model reads and fill the defaults; returns the config.

    Integers are integers (not booleans, not strings) within bounds, eps and theta positive,
    booleans booleans, rope_scaling a mapping with its factor: a ConfigError naming the key.
    """
    for key in REQUIRED_CONFIG_KEYS:
        _positive_int(config, key, file, MAX_LAYERS if key == "num_hidden_layers" else MAX_DIM)
    heads = config["num_attention_heads"]
    config.setdefault("num_key_value_heads", heads)
    if config["num_key_value_heads"] is None:
        config["num_key_value_heads"] = heads
    kv = _positive_int(config, "num_key_value_heads", file)
    if heads % kv:
        raise ConfigError(f"{file}: num_key_value_heads {kv!r} must divide num_attention_heads {heads}")
    if config.get("head_dim") is None:
        if config["hidden_size"] % heads:
            raise ConfigError(f"{file}: hidden_size {config['hidden_size']} is not a multiple of {heads} heads")
        config["head_dim"] = config["hidden_size"] // heads
    head_dim = _positive_int(config, "head_dim", file)
    if head_dim % 2:
        raise ConfigError(f"{file}: 'head_dim' {head_dim} must be even (rotary pairs)")
    config.setdefault("model_type", "llama")
    if config["model_type"] != "llama":
        raise ConfigError(f"{file}: model_type {config['model_type']!r:.80} is not a Llama model")
    config.setdefault("rms_norm_eps", 1e-5)
    config.setdefault("rope_theta", 10000.0)
    config.setdefault("rope_traditional", False)
    _positive_number(config, "rms_norm_eps", file)
    _positive_number(config, "rope_theta", file)
    for key in ("rope_traditional", "tie_word_embeddings", "attention_bias", "mlp_bias"):
        _boolean(config, key, file)
    if "max_position_embeddings" in config:
        _positive_int(config, "max_position_embeddings", file, 1 << 30)
    check_rope_scaling(config.get("rope_scaling"), file)
    check_quantization(config.get("quantization"), file)
    return config


def check_layer_count(ckpt: "Checkpoint") -> None:
    """The layer count the config declares is the one the tensors hold (before anything loops over it)."""
    present = set()
    for name in ckpt.tensors:
        if name.startswith("model.layers."):
            index = name.split(".")[2]
            if index.isdigit():
                present.add(int(index))
    declared = ckpt.config["num_hidden_layers"]
    if present != set(range(declared)):
        have = f"layers 0..{max(present)}" if present else "no layers"
        raise ConfigError(f"{ckpt.path}: 'num_hidden_layers' is {declared}, the tensors hold {have}"
                          f" ({len(present)} distinct)")


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
    check_layer_count(ckpt)
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
