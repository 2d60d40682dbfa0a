"""Safetensors folders: Hugging Face (`config.json` + `model*.safetensors`) and MLX (mlx-lm's, maybe quantized)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from ..errors import CheckpointError, ConfigError
from ..paths import resolve_inside
from ..safetensors_file import check_safetensors
from ..tokenizer_source import TOKENIZER_FILES, find_tokenizer_source
from .base import Checkpoint, Tensor, check_config, read_json

__all__ = ["TOKENIZER_FILES", "is_safetensors_folder", "load_safetensors", "normalize_rope", "read_safetensors_folder"]

INDEX = "model.safetensors.index.json"
DROPPED_SUFFIXES = ("rotary_emb.inv_freq",)


def is_safetensors_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def _weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX
    if index.is_file():
        data = read_json(index, "safetensors index")
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no 'weight_map'")
        names = set()
        for tensor, name in weight_map.items():
            if not isinstance(name, str):
                raise CheckpointError(f"{index}: weight_map entry {tensor!r:.80} is not a file name")
            names.add(name)
        return sorted(resolve_inside(folder, name, what=f"shard (listed in {INDEX})") for name in names)
    if (folder / "model.safetensors").is_file():
        return [resolve_inside(folder, "model.safetensors", what="weight file")]
    found = sorted(folder.glob("model*.safetensors")) or sorted(folder.glob("*.safetensors"))
    return [resolve_inside(folder, f.name, what="weight file") for f in found]


def load_safetensors(file: Path) -> tuple[dict[str, mx.array], dict]:
    """mx.load a safetensors file (lazily: data is read on evaluation), errors naming the file."""
    check_safetensors(file)
    try:
        arrays, metadata = mx.load(str(file), return_metadata=True)
    except (RuntimeError, ValueError, OSError) as e:
        msg = str(e).split("] ", 1)[-1]
        raise CheckpointError(f"{file}: truncated or corrupt safetensors file: {msg}") from None
    return arrays, metadata or {}


def normalize_rope(config: dict) -> None:
    """Transformers 5 writes `rope_parameters`; mlx-lm and we read `rope_theta` + `rope_scaling`."""
    rp = config.pop("rope_parameters", None)
    if isinstance(rp, dict):
        config.setdefault("rope_theta", rp.get("rope_theta", 10000.0))
        if "rope_scaling" not in config:
            kind = rp.get("rope_type", rp.get("type", "default"))
            scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
            config["rope_scaling"] = None if kind == "default" else scaling


def read_safetensors_folder(folder: Path) -> Checkpoint:
    """Read a Hugging Face or MLX folder: config.json, (sharded) safetensors, tokenizer, generation config."""
    folder = Path(folder)
    config_file = resolve_inside(folder, "config.json", what="config", error=ConfigError)
    config = read_json(config_file, "config.json")
    qc = config.get("quantization_config")
    if "quantization" not in config and isinstance(qc, dict) and qc.get("quant_method"):
        raise ConfigError(f"{config_file}: quantization method {qc['quant_method']!r} is not supported")
    normalize_rope(config)
    files = _weight_files(folder)
    if not files:
        raise CheckpointError(f"{folder}: no model*.safetensors weight files")

    tensors: dict[str, Tensor] = {}
    is_mlx = "quantization" in config
    for f in files:
        arrays, metadata = load_safetensors(f)
        is_mlx = is_mlx or metadata.get("format") == "mlx"
        for name, a in arrays.items():
            if name.endswith(DROPPED_SUFFIXES):
                continue
            if name in tensors:
                raise CheckpointError(f"{f}: tensor {name!r} also appears in {tensors[name].file.name}")
            tensors[name] = Tensor.of(a, f)

    if "tie_word_embeddings" not in config:
        config["tie_word_embeddings"] = "lm_head.weight" not in tensors
    if config["tie_word_embeddings"]:  # some exports save the tied head too
        for suffix in ("weight", "scales", "biases"):
            tensors.pop(f"lm_head.{suffix}", None)
    config = check_config(config, config_file)

    gen_file = folder / "generation_config.json"
    if gen_file.is_file() or gen_file.is_symlink():
        generation = read_json(resolve_inside(folder, gen_file.name, what="generation config"), "generation config")
    else:
        generation = None
    tok_files = [resolve_inside(folder, n, what="tokenizer file") for n in TOKENIZER_FILES
                 if (folder / n).is_file() or (folder / n).is_symlink()]
    return Checkpoint(
        format="mlx" if is_mlx else "hf",
        path=folder,
        config=config,
        tensors=tensors,
        files=files,
        tokenizer_source=find_tokenizer_source(folder, required=False),
        tokenizer_files=tok_files,
        generation_config=generation,
    )

