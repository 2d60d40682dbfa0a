"""Checkpoint readers (Meta, Hugging Face, GGUF, MLX) and the MLX folder writer."""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError, ConfigError, ModelNotFoundError
from .base import Checkpoint, LazyWeights, Tensor, check_tensors
from .gguf import read_gguf
from .hf import is_safetensors_folder, read_safetensors_folder
from .meta import is_meta_folder, read_meta

__all__ = ["Checkpoint", "LazyWeights", "Tensor", "detect_format", "read_checkpoint"]


def detect_format(path: str | Path) -> str:
    """'meta', 'safetensors' (HF or MLX) or 'gguf' for a file or folder; ModelNotFoundError otherwise."""
    path = Path(path)
    if not path.exists():
        raise ModelNotFoundError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix == ".gguf" or _magic(path) == b"GGUF":
            return "gguf"
        if path.suffix in (".pth", ".safetensors", ".json", ".model"):
            return detect_format(path.parent)
        raise ModelNotFoundError(f"{path}: not a checkpoint (expected a .gguf file or a model folder)")
    if is_safetensors_folder(path):
        return "safetensors"
    if is_meta_folder(path):
        return "meta"
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf"
    if any(path.glob("*.safetensors")):
        raise ConfigError(f"{path / 'config.json'}: missing config.json beside the safetensors files")
    raise ModelNotFoundError(
        f"{path}: no checkpoint found (expected params.json + consolidated.NN.pth, "
        "config.json + model*.safetensors, or one .gguf file)")


def read_checkpoint(path: str | Path, *, rope_factor: float | None = None) -> Checkpoint:
    """Read any supported checkpoint into HF names and an HF config, tensors left unread; shapes checked.

    rope_factor overrides the Llama 3 RoPE scaling factor (Meta checkpoints have no field for it).
    """
    path = Path(path).expanduser()
    kind = detect_format(path)
    if path.is_file() and kind != "gguf":
        path = path.parent
    if kind == "gguf":
        ckpt = read_gguf(path if path.is_file() else sorted(path.glob("*.gguf"))[0])
    elif kind == "meta":
        ckpt = read_meta(path, rope_factor=rope_factor)
    else:
        ckpt = read_safetensors_folder(path)
    if rope_factor is not None and kind != "meta":
        scaling = ckpt.config.get("rope_scaling")
        if not scaling:
            raise CheckpointError(f"{path}: the model has no RoPE scaling whose factor could be overridden")
        ckpt.config["rope_scaling"] = {**scaling, "factor": float(rope_factor)}
    check_tensors(ckpt)
    return ckpt


def _magic(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(4)
    except OSError:
        return b""
