"""Llama 3.2 Vision (Hugging Face `model_type: mllama`) in MLX: the vision encoder, the projector
and the language model with cross-attention.

`model(tokens, cache)` runs text exactly like `llama_mlx.model.Model`; `model.attach_images(cache,
pixel_values, aspect_ratio_ids, aspect_ratio_mask)` encodes images once and stores their
cross-attention keys and values in the cache, where the prompt's `<|image|>` tokens find them.
Parameter names are Hugging Face's (`vision_model.*`, `language_model.model.*`,
`multi_modal_projector`); mlx-vlm's `vision_tower.*` folders load through `sanitize`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from ..errors import ImageError
from ..model import ModelArgs
from .language import CrossAttentionCache, LanguageModel
from .vision import VisionArgs, VisionModel

__all__ = ["MllamaArgs", "Model", "is_mllama_config"]


def is_mllama_config(config: dict) -> bool:
    """Whether a config.json dict describes Llama 3.2 Vision."""
    return config.get("model_type") == "mllama" or "MllamaForConditionalGeneration" in (config.get("architectures") or [])


def _text_config(config: dict) -> dict:
    text = dict(config.get("text_config") or {})
    rp = text.pop("rope_parameters", None)
    if isinstance(rp, dict):
        text.setdefault("rope_theta", rp.get("rope_theta", 500000.0))
        if "rope_scaling" not in text:
            kind = rp.get("rope_type", rp.get("type", "default"))
            text["rope_scaling"] = None if kind == "default" else {k: v for k, v in rp.items() if k != "rope_theta"}
    return text


@dataclass
class MllamaArgs:
    text_config: dict
    vision_config: dict
    image_token_index: int = 128256
    cross_attention_rows: str = "meta"
    model_type: str = "mllama"
    quantization: Optional[dict] = field(default=None, repr=False)

    @classmethod
    def from_dict(cls, config: dict) -> "MllamaArgs":
        """From a Hugging Face (or mlx-vlm) mllama config.json dict; unknown keys are ignored."""
        names = inspect.signature(cls).parameters
        args = cls(**{k: v for k, v in config.items() if k in names and k not in ("text_config", "vision_config")},
                   text_config=_text_config(config), vision_config=dict(config.get("vision_config") or {}))
        return args

    @cached_property
    def text(self) -> ModelArgs:
        return ModelArgs.from_dict(self.text_config)

    @cached_property
    def vision(self) -> VisionArgs:
        return VisionArgs.from_dict(self.vision_config)

    @property
    def cross_attention_layers(self) -> list[int]:
        """The text layers that are gated cross-attention layers."""
        return list(self.text_config.get("cross_attention_layers") or [])


class Model(nn.Module):
    """`Model(args)(tokens[B, L], cache) -> logits[B, L, vocab]`, with images attached to the cache first."""

    def __init__(self, args: MllamaArgs):
        super().__init__()
        self.config = args
        text, vision = args.text, args.vision
        self.vision_model = VisionModel(vision)
        self.language_model = LanguageModel(text, args.cross_attention_layers, args.image_token_index,
                                            args.cross_attention_rows)
        self.multi_modal_projector = nn.Linear(vision.vision_output_dim, text.hidden_size, bias=True)
        # What generation reads: the context, and the ids the embedding takes (the image token included).
        self.args = replace(text, vocab_size=text.vocab_size + 8)
        self.model_type = "mllama"

    def __call__(self, tokens: mx.array, cache: Optional[list] = None, mask=None) -> mx.array:
        return self.language_model(tokens, cache, mask)

    @property
    def layers(self) -> list:
        return self.language_model.model.layers

    @property
    def model(self) -> nn.Module:
        """The text model (where `compute_dtype` lives), as `llama_mlx.model.Model.model`."""
        return self.language_model.model

    def make_cache(self) -> list:
        """One cache per layer: a KVCache for self-attention, a CrossAttentionCache for cross-attention."""
        return self.language_model.model.make_cache()

    def encode_images(self, pixel_values: mx.array, aspect_ratio_ids: mx.array,
                      aspect_ratio_mask: mx.array) -> mx.array:
        """Projected image states [B, images * tiles * patches, hidden_size]."""
        states = self.vision_model(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        B = states.shape[0]
        return self.multi_modal_projector(states).reshape(B, -1, self.config.text.hidden_size)

    def attach_images(self, cache: list, pixel_values, aspect_ratio_ids, aspect_ratio_mask) -> None:
        """Encode images (the image processor's arrays, one sequence) and keep their cross-attention
        keys and values in `cache`: computed once, used by every later token."""
        pixel_values, aspect_ratio_ids, aspect_ratio_mask = (
            mx.array(a) for a in (pixel_values, aspect_ratio_ids, aspect_ratio_mask))
        if pixel_values.ndim != 6 or pixel_values.shape[0] != 1:
            raise ImageError("pixel_values must be [1, images, tiles, channels, height, width]")
        if aspect_ratio_ids.shape != pixel_values.shape[:2] or aspect_ratio_mask.shape != pixel_values.shape[:3]:
            raise ImageError("aspect_ratio_ids must be [1, images] and aspect_ratio_mask [1, images, tiles]")
        cross = [i for i, c in enumerate(cache) if isinstance(c, CrossAttentionCache)]
        if not cross:
            raise ImageError("this cache has no cross-attention layers (make it with model.make_cache())")
        dtype = self.multi_modal_projector.weight.dtype
        dtype = dtype if mx.issubdtype(dtype, mx.floating) else mx.float16
        states = self.encode_images(pixel_values.astype(dtype), aspect_ratio_ids, aspect_ratio_mask)
        P = self.config.vision.num_patches
        valid = [int(n) * P for n in mx.sum(aspect_ratio_mask[0], axis=-1).tolist()]
        for i in cross:
            keys, values = self.layers[i].cross_attn.image_keys(states)
            mx.eval(keys, values)
            cache[i].add_image(keys, values, valid)

    def sanitize(self, weights: dict) -> dict:
        """Hugging Face and mlx-vlm names and layouts to ours (mlx-vlm: `vision_tower`; Hugging Face:
        a channels-first patch convolution)."""
        out = {}
        channels = self.config.vision.num_channels
        for name, w in weights.items():
            if name.startswith("vision_tower."):
                name = "vision_model." + name[len("vision_tower."):]
            if name == "vision_model.patch_embedding.weight" and w.shape[1] == channels and w.shape[-1] != channels:
                w = w.transpose(0, 2, 3, 1)
            out[name] = w
        return out
