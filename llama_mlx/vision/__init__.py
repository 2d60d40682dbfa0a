"""Llama 3.2 Vision (mllama): image preprocessing, the tiled vision encoder, and the language model
with gated cross-attention layers."""

from .processor import ImageProcessor, load_image

__all__ = ["ImageProcessor", "load_image"]
