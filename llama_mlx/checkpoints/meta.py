"""Meta's own layout: params.json, tokenizer.model, consolidated.NN.pth (one per model-parallel rank)."""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx

from ..config import config_from_meta_params
from ..errors import CheckpointError, ConfigError
from ..paths import check_folder_files, resolve_inside
from ..tokenizer_source import FOLDER_FILES, find_tokenizer_source
from .base import MAX_DIM, MAX_LAYERS, Checkpoint, Tensor, check_config, read_json
from .keymap import meta_shard_axis, meta_to_hf
from .safe_pickle import PthTensor, load_pth

__all__ = ["config_from_params", "is_meta_folder", "load_shards", "merge_shards", "positive_int", "read_meta"]

IGNORED = {"rope.freqs"}  # precomputed frequencies some Meta checkpoints carry


def is_meta_folder(folder: Path) -> bool:
    return (folder / "params.json").is_file() or bool(_shards(folder))


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("consolidated.*.pth")) or sorted(folder.glob("*.pth"))


def _contained_shards(folder: Path) -> list[Path]:
    return [resolve_inside(folder, f.name, what="weight file") for f in _shards(folder)]


def positive_int(params: dict, key: str, file: Path, default=None, limit: int = MAX_DIM) -> int:
    """params[key] (else `default`) as a positive integer of at most `limit`, or a ConfigError naming file and key."""
    value = params.get(key)
    value = default if value is None else value
    if value is None:
        raise ConfigError(f"{file}: missing key {key!r}")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{file}: {key!r} must be a positive integer, found {value!r:.80}")
    if value > limit:
        raise ConfigError(f"{file}: {key!r} is {value}, more than the {limit} any model has")
    return value


def _float(params: dict, key: str, file: Path, default: float) -> float:
    value = params.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{file}: {key!r} must be a positive number, found {value!r:.80}")
    return float(value)


def config_from_params(params: dict, file: Path, *, vocab_size: int | None = None,
                       tied: bool = False, rope_factor: float | None = None) -> dict:
    """Turn a Meta params.json dict into an HF config.json dict (with rope_traditional true).

    The RoPE factor is not in params.json: 32 for the Llama 3.2 1B/3B shapes, else 8, unless given.
    """
    dim = positive_int(params, "dim", file)
    n_layers = positive_int(params, "n_layers", file, limit=MAX_LAYERS)
    n_heads = positive_int(params, "n_heads", file)
    n_kv = positive_int(params, "n_kv_heads", file, n_heads)
    multiple_of = positive_int(params, "multiple_of", file, 256)
    mult = _float(params, "ffn_dim_multiplier", file, None)
    vocab = params.get("vocab_size", -1)
    if vocab is None or vocab == -1:  # Meta writes -1: the tokenizer's size, read from the embedding
        vocab = vocab_size
    else:
        vocab = positive_int(params, "vocab_size", file)
    scaled = params.get("use_scaled_rope", False)
    if not isinstance(scaled, bool):
        raise ConfigError(f"{file}: 'use_scaled_rope' must be true or false, found {scaled!r:.80}")
    if dim % n_heads:
        raise ConfigError(f"{file}: dim {dim} is not a multiple of n_heads {n_heads}")
    if vocab is None:
        raise ConfigError(f"{file}: no usable 'vocab_size'")
    checked = {"dim": dim, "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv, "vocab_size": vocab,
               "multiple_of": multiple_of, "ffn_dim_multiplier": mult,
               "norm_eps": _float(params, "norm_eps", file, 1e-5),
               "rope_theta": _float(params, "rope_theta", file, 500000.0),
               "use_scaled_rope": scaled, "tie_word_embeddings": tied}
    config = config_from_meta_params(checked, rope_factor=rope_factor)
    return check_config(config, file)


def load_shards(files: list[Path]) -> list[dict[str, PthTensor]]:
    """The tensor indexes of model-parallel shards (no data read), checked to name the same tensors."""
    shards = [load_pth(f) for f in files]
    for f, shard in zip(files[1:], shards[1:]):
        if set(shard) != set(shards[0]):
            diff = sorted(set(shard) ^ set(shards[0]))
            raise CheckpointError(f"{f}: tensor names differ from {files[0].name} (e.g. {diff[0]!r})")
    return shards


def merge_shards(name: str, parts: list[PthTensor], files: list[Path], axis: int | None) -> Tensor:
    """One lazy tensor of a tensor's model-parallel parts, concatenated on `axis` (None: replicated),
    their shapes and dtypes checked first."""
    first = parts[0]
    if axis is None or len(parts) == 1:
        for p, f in zip(parts[1:], files[1:]):
            if p.shape != first.shape:
                raise CheckpointError(f"{f}: replicated tensor {name!r} has shape {list(p.shape)}, "
                                      f"shard 0 has {list(first.shape)}")
        return Tensor(first.shape, first.mx_dtype, files[0], first.to_mlx)
    shape = list(first.shape)
    for p, f in zip(parts[1:], files[1:]):
        if len(p.shape) != len(shape) or any(a != b for i, (a, b) in enumerate(zip(p.shape, shape)) if i != axis):
            raise CheckpointError(f"{f}: shard of {name!r} has shape {list(p.shape)}, shard 0 has {list(first.shape)}")
        shape[axis] += p.shape[axis]
    if any(p.mx_dtype != first.mx_dtype for p in parts):
        raise CheckpointError(f"{files[0]}: shards of {name!r} have different dtypes")

    def read() -> mx.array:
        return mx.concatenate([p.to_mlx() for p in parts], axis=axis)

    return Tensor(tuple(shape), first.mx_dtype, files[0], read)


def read_meta(folder: Path, *, rope_factor: float | None = None) -> Checkpoint:
    """Read a Meta checkpoint folder, merging model-parallel shards the way Llama 3 split them."""
    folder = Path(folder)
    params_file = resolve_inside(folder, "params.json", what="params.json", error=ConfigError)
    params = read_json(params_file, "params.json")
    shard_files = _contained_shards(folder)
    if not shard_files:
        raise CheckpointError(f"{folder}: no consolidated.NN.pth weight files")
    shards = load_shards(shard_files)
    names = list(shards[0])

    tensors: dict[str, Tensor] = {}
    for name in names:
        if name in IGNORED:
            continue
        hf = meta_to_hf(name)
        if hf is None:
            raise CheckpointError(f"{shard_files[0]}: unexpected tensor {name!r} in a Llama checkpoint")
        tensors[hf] = merge_shards(name, [s[name] for s in shards], shard_files, meta_shard_axis(name))

    emb = tensors.get("model.embed_tokens.weight")
    config = config_from_params(
        params, params_file,
        vocab_size=emb.shape[0] if emb is not None else None,
        tied="lm_head.weight" not in tensors,
        rope_factor=rope_factor,
    )
    check_folder_files(folder, FOLDER_FILES, what="tokenizer file")  # what the tokenizer load reads
    return Checkpoint(
        format="meta",
        path=folder,
        config=config,
        tensors=tensors,
        files=shard_files,
        tokenizer_source=find_tokenizer_source(folder, required=False),
    )
