"""Converting Llama 3.2 Vision folders (Hugging Face or MLX) into an MLX folder, optionally with
the language model quantized (4/8-bit affine) and the vision tower quantized or kept in float.
The output keeps Hugging Face names (`vision_model.*`, `language_model.*`) with a channels-last
patch convolution, and loads here and in mlx-vlm (which renames `vision_model` itself)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from ..errors import CheckpointError

__all__ = ["mlx_vlm_keys", "write_mllama"]

COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
          "preprocessor_config.json", "processor_config.json", "chat_template.json", "chat_template.jinja")


def mlx_vlm_keys(config: dict) -> dict:
    """`config` with the keys mlx-vlm's mllama reads (those of the Hugging Face hub's config.json):
    transformers 5 writes `rope_parameters` and vision `attention_heads`, and mlx-vlm, missing
    `rope_theta`, `rope_scaling` and `num_attention_heads`, would silently run its defaults
    (theta 10000, no llama3 scaling, 16 vision heads)."""
    text, vision = dict(config.get("text_config") or {}), dict(config.get("vision_config") or {})
    rope = text.get("rope_parameters")
    if isinstance(rope, dict):
        text.setdefault("rope_theta", rope.get("rope_theta", 500000.0))
        kind = rope.get("rope_type", rope.get("type", "default"))
        text.setdefault("rope_scaling", None if kind == "default" else
                        {k: v for k, v in rope.items() if k != "rope_theta"})
    if "attention_heads" in vision:
        vision.setdefault("num_attention_heads", vision["attention_heads"])
    return {**config, "text_config": text, "vision_config": vision}


def write_mllama(src: Path, out: Path, *, quantize: bool = False, bits: int = 4, group_size: int = 64,
                 dtype: Optional[str] = None, quantize_vision: bool = False, marker: Optional[dict] = None,
                 config: Optional[dict] = None) -> dict:
    """Write `src` (a Llama 3.2 Vision folder) as an MLX folder into the empty folder `out` (which
    `llama_mlx.convert.convert` then swaps into place); returns what it wrote: parameters, bytes,
    tensors, dtype, quantization, source_format. `marker` goes into config.json as `converted_from`;
    `config`: src's config.json already read (`loading.mllama_config`), else it is read here."""
    from ..checkpoints.base import dtype_name, parse_dtype, read_json
    from ..checkpoints.writer import fsync_dir, write_json
    from ..quant import quantize as quantize_model
    from .loading import load_mllama
    from .meta import META_LAYOUT, write_meta_tokenizer

    config = dict(config) if config is not None else read_json(src / "config.json", "config")
    model, processor = load_mllama(src, dtype=parse_dtype(dtype), allow_vocab_mismatch=True, config=config)
    meta = bool(config.pop(META_LAYOUT, False))
    parameters = sum(v.size for _, v in tree_flatten(model.parameters()))
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
    config = mlx_vlm_keys(config)
    out_dtype = model.language_model.model.norm.weight.dtype
    config["torch_dtype"] = dtype_name(out_dtype)
    source_format = "meta" if meta else "mlx" if was_quantized else "hf"
    if marker is not None:
        config["converted_from"] = {"format": source_format, "path": str(src.resolve()), **marker}
    weights = dict(tree_flatten(model.parameters()))
    try:
        mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
        write_json(out / "config.json", config)
        for name in COPIED:
            if (src / name).is_file():
                shutil.copyfile(src / name, out / name)
        if meta:  # Meta ships tokenizer.model and no processor config: write what Hugging Face's folder has
            write_meta_tokenizer(processor.tokenizer, out, model.config.image_token_index)
            ip = processor.image_processor  # the reference's tile size, tiles, mean and std
            write_json(out / "preprocessor_config.json", {
                "image_processor_type": "MllamaImageProcessor", "processor_class": "MllamaProcessor",
                "size": {"height": ip.tile_size, "width": ip.tile_size}, "max_image_tiles": ip.max_image_tiles,
                "image_mean": list(ip.image_mean), "image_std": list(ip.image_std),
                "rescale_factor": ip.rescale_factor, "do_resize": True, "do_pad": True, "do_rescale": True,
                "do_normalize": True, "do_convert_rgb": True, "resample": 2})
        fsync_dir(out)
    except OSError as e:
        raise CheckpointError(f"{out}: cannot write the output: {e.strerror or e}") from None
    return {"parameters": parameters, "nbytes": sum(v.nbytes for v in weights.values()), "tensors": len(weights),
            "dtype": dtype_name(out_dtype), "quantization": config.get("quantization"),
            "source_format": source_format}
