"""Loading Llama 3.2 Vision folders: Hugging Face (`model_type: mllama`, safetensors shards,
`preprocessor_config.json`, a chat template with `<|image|>`) and the MLX folders mlx-vlm writes
(`vision_tower.*`, maybe quantized), unchanged. `Processor` pairs the tokenizer with the image
processor and stands in for the tokenizer everywhere a tokenizer is taken.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx

from ..errors import CheckpointError, ConfigError
from .model import MllamaArgs, Model, is_mllama_config
from .processor import ImageProcessor

__all__ = ["Processor", "is_mllama_folder", "load_mllama", "mllama_config"]

IMAGE_TOKEN = "<|image|>"


class Processor:
    """The tokenizer (every tokenizer attribute reads through) with `image_processor` and the
    image token: what `llama_mlx.load` returns for a vision model, in mlx-vlm's idiom."""

    def __init__(self, tokenizer: Any, image_processor: ImageProcessor, image_token_id: int):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token = IMAGE_TOKEN
        self.image_token_id = image_token_id

    def __getattr__(self, name: str):
        if name in ("tokenizer", "image_processor", "image_token", "image_token_id"):
            raise AttributeError(name)
        return getattr(self.tokenizer, name)


def mllama_config(path: str | Path) -> Optional[dict]:
    """The config.json dict of the Llama 3.2 Vision folder `path` is (or is a file in), else None
    (read once: callers hand it on to `load_mllama`, `describe_mllama`, `write_mllama`)."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix not in (".json", ".safetensors"):
        return None
    file = (path if path.is_dir() else path.parent) / "config.json"
    if not file.is_file():
        from .meta import is_meta_vision_folder, meta_mllama_config

        folder = path if path.is_dir() else path.parent
        return meta_mllama_config(folder) if is_meta_vision_folder(folder) else None  # Meta's own layout
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # the text loader's read_json says what is wrong
        return None
    return config if isinstance(config, dict) and is_mllama_config(config) else None


def is_mllama_folder(path: str | Path) -> bool:
    """Whether `path` is a folder (or a file in one) holding a Llama 3.2 Vision config.json."""
    return mllama_config(path) is not None


def load_mllama(path: str | Path, *, dtype: Optional[mx.Dtype] = None, lazy: bool = True,
                allow_vocab_mismatch: bool = False, config: Optional[dict] = None):
    """(Model, Processor) from a Hugging Face, mlx-vlm or Meta (`vision.meta`) Llama 3.2 Vision folder;
    `config`: its config.json already read (`mllama_config`), else it is read here."""
    from .. import backends
    from ..build import check_vocabulary
    from ..checkpoints.base import is_float, read_json
    from ..checkpoints.hf import _weight_files, load_safetensors
    from ..quant import prepare_quantized
    from ..tokenizer import load_tokenizer

    folder = Path(path).expanduser()
    folder = folder if folder.is_dir() else folder.parent
    if config is None:
        config = read_json(folder / "config.json", "config")
    if not isinstance(config.get("text_config"), dict) or not isinstance(config.get("vision_config"), dict):
        raise ConfigError(f"{folder / 'config.json'}: a Llama 3.2 Vision config needs text_config and vision_config")
    from .meta import META_LAYOUT, read_meta_mllama, vision_tokenizer

    meta = bool(config.get(META_LAYOUT))
    files = [] if meta else _weight_files(folder)
    if not files and not meta:
        raise CheckpointError(f"{folder}: no model*.safetensors weight files")
    weights: dict[str, mx.array] = {}
    for f in files:
        arrays, _ = load_safetensors(f)
        for name, a in arrays.items():
            if name in weights:
                raise CheckpointError(f"{f}: tensor {name!r} appears twice")
            if dtype is not None and is_float(a.dtype) and a.dtype != dtype:
                a = a.astype(dtype)
            weights[name] = a
    try:
        model = Model(MllamaArgs.from_dict(config))
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"{folder / 'config.json'}: {e}") from None
    if meta:  # consolidated.NN.pth, merged, renamed and checked against the model's shapes
        weights = {name: a.astype(dtype) if dtype is not None and is_float(a.dtype) and a.dtype != dtype else a
                   for name, a in read_meta_mllama(folder, config, model).items()}
    weights = model.sanitize(weights)
    if config.get("quantization"):
        prepare_quantized(model, weights)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise CheckpointError(f"{folder}: weights do not fit the model: {e}") from None
    model.eval()
    model = backends.prepare(model, fuse=False)
    if not lazy:
        mx.eval(model.parameters())

    tokenizer = load_tokenizer(folder)
    if meta:
        tokenizer = vision_tokenizer(tokenizer, model.config.image_token_index)
    if not allow_vocab_mismatch:
        check_vocabulary(tokenizer, model.args.vocab_size, folder)
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        image_processor = ImageProcessor.from_dict(read_json(pre, "preprocessor config"))
    else:
        vision = model.config.vision
        image_processor = ImageProcessor.for_model(vision.image_size, vision.max_num_tiles)
    return model, Processor(tokenizer, image_processor, model.config.image_token_index)
