"""Image preprocessing for Llama 3.2 Vision, equal to transformers' `MllamaImageProcessor`.

An image is resized (bilinear, keeping its aspect ratio) to fit the best canvas of whole tiles
(at most `max_image_tiles` of `tile_size` pixels square), padded with zeros to that canvas,
rescaled and normalised, and cut into tiles. Each image also gets its aspect-ratio id (1-based
index of its tile grid among the supported ones) and a mask of its valid tiles. numpy does the
arithmetic; Pillow decodes files and resizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np

from ..errors import ImageError

__all__ = [
    "ImageProcessor",
    "fit_to_canvas",
    "load_image",
    "optimal_canvas",
    "supported_aspect_ratios",
]

IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)  # transformers' class defaults
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)
LLAMA_VISION_MEAN = (0.48145466, 0.4578275, 0.40821073)  # what Llama 3.2 Vision uses (Meta's image transform)
LLAMA_VISION_STD = (0.26862954, 0.26130258, 0.27577711)


@lru_cache(maxsize=16)
def supported_aspect_ratios(max_image_tiles: int) -> tuple[tuple[int, int], ...]:
    """Every tile grid (a, b) with a * b <= max_image_tiles, in the order the aspect-ratio ids follow."""
    return tuple((a, b) for a in range(1, max_image_tiles + 1) for b in range(1, max_image_tiles + 1)
                 if a * b <= max_image_tiles)


def optimal_canvas(height: int, width: int, max_image_tiles: int, tile_size: int) -> tuple[int, int]:
    """The canvas (height, width), in whole tiles, that needs the least upscaling (or, when every
    canvas is smaller, the least downscaling); ties go to the smallest area."""
    best = None
    for rows, cols in supported_aspect_ratios(max_image_tiles):
        canvas_h, canvas_w = rows * tile_size, cols * tile_size
        scale = min(canvas_h / height, canvas_w / width)
        # Upscaling candidates (>= 1) beat downscaling ones; among them the smallest scale, among
        # downscaling ones the largest; then the smaller area, then the first.
        key = (0, scale) if scale >= 1 else (1, -scale)
        key = (*key, canvas_h * canvas_w)
        if best is None or key < best[0]:
            best = (key, (canvas_h, canvas_w))
    return best[1]


def fit_to_canvas(height: int, width: int, canvas_h: int, canvas_w: int, tile_size: int) -> tuple[int, int]:
    """The size (height, width) an image is resized to inside its canvas, aspect ratio kept."""
    target_w = min(max(width, tile_size), canvas_w)
    target_h = min(max(height, tile_size), canvas_h)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


def load_image(source: Any):
    """A Pillow image from a path, bytes, or an image already decoded; ImageError when it is not one."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        return Image.fromarray(source)
    import io

    try:
        if isinstance(source, (bytes, bytearray)):
            image = Image.open(io.BytesIO(source))
            name = "the image data"
        else:
            name, path = str(source), Path(source).expanduser()
            if path.exists() and not path.is_file() and not path.is_dir():  # a FIFO would block the open
                raise ImageError(f"{source}: not a regular file")
            image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise ImageError(f"{source}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{source}: is a folder, not an image") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageError(f"{name}: not an image Pillow can read ({e.__class__.__name__})") from None
    return image


def _to_rgb(image):
    from PIL import Image

    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        # Transparency is composited onto white, as transformers does.
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


@dataclass
class ImageProcessor:
    """`processor(images) -> {"pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "num_tiles"}`
    for one sample's images: pixel_values [1, images, max_image_tiles, 3, tile, tile] float32,
    aspect_ratio_ids [1, images], aspect_ratio_mask [1, images, max_image_tiles] (numpy)."""

    tile_size: int = 560
    max_image_tiles: int = 4
    image_mean: Sequence[float] = field(default=IMAGENET_STANDARD_MEAN)
    image_std: Sequence[float] = field(default=IMAGENET_STANDARD_STD)
    rescale_factor: float = 1 / 255

    @classmethod
    def from_dict(cls, config: dict) -> "ImageProcessor":
        """From a preprocessor_config.json dict (its `size`, `max_image_tiles`, mean, std, rescale)."""
        size = config.get("size") or {}
        tile = size.get("height", size.get("shortest_edge", 560)) if isinstance(size, dict) else int(size)
        if isinstance(size, dict) and size.get("width", tile) != tile:
            raise ImageError(f"preprocessor size {size}: tiles must be square")
        return cls(tile_size=int(tile), max_image_tiles=int(config.get("max_image_tiles", 4)),
                   image_mean=tuple(config.get("image_mean", IMAGENET_STANDARD_MEAN)),
                   image_std=tuple(config.get("image_std", IMAGENET_STANDARD_STD)),
                   rescale_factor=float(config.get("rescale_factor", 1 / 255)))

    @classmethod
    def for_model(cls, tile_size: int, max_image_tiles: int) -> "ImageProcessor":
        """Llama 3.2 Vision's processing (Meta's mean and std), for a folder without preprocessor_config.json."""
        return cls(tile_size=tile_size, max_image_tiles=max_image_tiles, image_mean=LLAMA_VISION_MEAN,
                   image_std=LLAMA_VISION_STD)

    def tiles(self, image) -> tuple[np.ndarray, tuple[int, int]]:
        """One image as tiles [n, 3, tile, tile] and its grid (rows, columns)."""
        from PIL import Image

        image = _to_rgb(load_image(image))
        width, height = image.size
        canvas_h, canvas_w = optimal_canvas(height, width, self.max_image_tiles, self.tile_size)
        new_h, new_w = fit_to_canvas(height, width, canvas_h, canvas_w, self.tile_size)
        resized = np.asarray(image.resize((new_w, new_h), resample=Image.Resampling.BILINEAR))
        canvas = np.zeros((canvas_h, canvas_w, 3), dtype=np.uint8)
        canvas[:new_h, :new_w] = resized
        pixels = (canvas.transpose(2, 0, 1).astype(np.float64) * self.rescale_factor).astype(np.float32)
        mean = np.asarray(self.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.image_std, dtype=np.float32)[:, None, None]
        pixels = ((pixels - mean) / std).astype(np.float32)
        rows, cols = canvas_h // self.tile_size, canvas_w // self.tile_size
        t = self.tile_size
        # [3, rows*t, cols*t] -> [rows*cols, 3, t, t], row-major over the grid.
        tiles = pixels.reshape(3, rows, t, cols, t).transpose(1, 3, 0, 2, 4).reshape(rows * cols, 3, t, t)
        return np.ascontiguousarray(tiles), (rows, cols)

    def __call__(self, images: Union[Any, Sequence[Any]]) -> dict:
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise ImageError("no images given")
        T, t = self.max_image_tiles, self.tile_size
        pixel_values = np.zeros((1, len(images), T, 3, t, t), dtype=np.float32)
        ids = np.zeros((1, len(images)), dtype=np.int64)
        mask = np.zeros((1, len(images), T), dtype=np.int64)
        num_tiles = []
        grids = supported_aspect_ratios(T)
        for i, image in enumerate(images):
            tiles, grid = self.tiles(image)
            pixel_values[0, i, : len(tiles)] = tiles
            ids[0, i] = grids.index(grid) + 1
            mask[0, i, : len(tiles)] = 1
            num_tiles.append(len(tiles))
        return {"pixel_values": pixel_values, "aspect_ratio_ids": ids, "aspect_ratio_mask": mask,
                "num_tiles": [num_tiles]}
