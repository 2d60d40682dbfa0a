"""Converting Llama 3.2 Vision folders (Hugging Face or MLX) into an MLX folder, optionally with
the language model quantized (4/8-bit affine) and the vision tower quantized or kept in float.
The output keeps Hugging Face names (`vision_model.*`, `language_model.*`) with a channels-last
patch convolution, and loads here and in mlx-vlm (which renames `vision_model` itself)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from ..errors import CheckpointError

__all__ = ["convert_mllama"]

COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
          "preprocessor_config.json", "processor_config.json", "chat_template.json", "chat_template.jinja")


def convert_mllama(src: Path, dst: Path, *, quantize: bool = False, bits: int = 4, group_size: int = 64,
                   dtype: Optional[str] = None, quantize_vision: bool = False, source_label: Optional[str] = None):
    """Write `src` (a Llama 3.2 Vision folder) as an MLX folder at `dst` (already checked replaceable
    by `llama_mlx.convert.convert`, which calls this). Returns a `ConvertResult`."""
    from ..checkpoints.base import dtype_name, parse_dtype
    from ..checkpoints.writer import fsync_dir
    from ..convert import MARKER_KEY, ConvertResult, _remove, _swap_into_place, _version
    from ..quant import quantize as quantize_model
    from .loading import load_mllama

    start = time.perf_counter()
    model, _ = load_mllama(src, dtype=parse_dtype(dtype), allow_vocab_mismatch=True)
    parameters = sum(v.size for _, v in tree_flatten(model.parameters()))
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    was_quantized = bool(config.get("quantization"))
    if was_quantized and quantize:
        raise CheckpointError(f"{src}: already quantized; convert from the float checkpoint")
    if quantize:
        quantization = quantize_model(model.language_model, bits, group_size)
        if quantize_vision:
            quantize_model(model.vision_model, bits, group_size)
        config["quantization"] = config["quantization_config"] = quantization
    for key in ("torch_dtype", "dtype"):
        config.pop(key, None)
    out_dtype = model.language_model.model.norm.weight.dtype
    config["torch_dtype"] = dtype_name(out_dtype)
    config[MARKER_KEY] = {"format": "mlx" if "quantization" in config else "hf",
                          "path": source_label or str(src.resolve()), "converter": f"llama-mlx {_version()}"}
    weights = dict(tree_flatten(model.parameters()))
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-{os.getpid()}-", dir=dst.parent))
    try:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for name in COPIED:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        fsync_dir(tmp)
        old = _swap_into_place(tmp, dst)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"{dst}: cannot write the output: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        _remove(old)
    size = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())
    nbytes = sum(v.nbytes for v in weights.values())
    return ConvertResult(path=dst, source_format="mlx" if was_quantized else "hf", parameters=parameters, bits_per_weight=8 * nbytes / max(parameters, 1),
                         size_bytes=size, seconds=time.perf_counter() - start, tensors=len(weights),
                         dtype=dtype_name(out_dtype), quantization=config.get("quantization"))
