"""Llama 3.2 Vision (mllama): image preprocessing, the tiled vision encoder, and the language model
with gated cross-attention layers."""

from .language import CrossAttentionCache
from .model import MllamaArgs, Model, is_mllama_config
from .processor import ImageProcessor, load_image
from .vision import VisionArgs, VisionModel

__all__ = ["CrossAttentionCache", "ImageProcessor", "MllamaArgs", "Model", "VisionArgs", "VisionModel",
           "is_mllama_config", "load_image"]
