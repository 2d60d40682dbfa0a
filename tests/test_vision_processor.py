"""The image processor against transformers' MllamaImageProcessor (Pillow backend) on odd-sized images."""

import os

import numpy as np
import pytest
from PIL import Image

from llama_mlx.errors import ImageError
from llama_mlx.vision.processor import ImageProcessor, load_image, supported_aspect_ratios

from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil


def _image(w, h, mode="RGB", seed=0):
    rng = np.random.default_rng(seed + w * 7 + h)
    bands = len(Image.new(mode, (1, 1)).getbands())
    data = rng.integers(0, 256, (h, w, bands), dtype=np.uint8)
    return Image.fromarray(data[..., 0] if bands == 1 else data, mode)


@pytest.mark.parametrize("tiles", [1, 2, 4, 6])
@pytest.mark.parametrize("size", [(37, 23), (23, 61), (101, 13), (9, 9), (57, 57), (200, 31), (31, 150)])
def test_equals_transformers(size, tiles):
    ours = ImageProcessor(tile_size=28, max_image_tiles=tiles)
    theirs = MllamaImageProcessorPil(size={"height": 28, "width": 28}, max_image_tiles=tiles)
    image = _image(*size)
    got = ours([image])
    want = theirs(images=[[image]], return_tensors="np")
    assert got["pixel_values"].shape == want["pixel_values"].shape
    np.testing.assert_allclose(got["pixel_values"], want["pixel_values"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got["aspect_ratio_ids"], want["aspect_ratio_ids"])
    np.testing.assert_array_equal(got["aspect_ratio_mask"], want["aspect_ratio_mask"])
    assert got["num_tiles"] == want["num_tiles"]


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_modes_equal_transformers(mode):
    image = _image(45, 29, mode)
    got = ImageProcessor(tile_size=14, max_image_tiles=4)([image])
    want = MllamaImageProcessorPil(size={"height": 14, "width": 14}, max_image_tiles=4)(images=[[image]],
                                                                                         return_tensors="np")
    np.testing.assert_allclose(got["pixel_values"], want["pixel_values"], rtol=0, atol=1e-6)


def test_two_images_and_config():
    config = {"size": {"height": 28, "width": 28}, "max_image_tiles": 4, "image_mean": [0.4, 0.5, 0.6],
              "image_std": [0.2, 0.3, 0.25], "rescale_factor": 1 / 255}
    ours = ImageProcessor.from_dict(config)
    theirs = MllamaImageProcessorPil(**config)
    images = [_image(70, 20), _image(20, 33)]
    got, want = ours(images), theirs(images=[images], return_tensors="np")
    np.testing.assert_allclose(got["pixel_values"], want["pixel_values"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got["aspect_ratio_ids"], want["aspect_ratio_ids"])
    np.testing.assert_array_equal(got["aspect_ratio_mask"], want["aspect_ratio_mask"])


def test_aspect_ratios_order():
    assert supported_aspect_ratios(4) == ((1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1))


def test_not_an_image(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("hello")
    with pytest.raises(ImageError, match="not an image"):
        load_image(bad)
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "missing.png")
    fifo = tmp_path / "pipe.png"  # a saved chat may name any path: reading a FIFO would wait forever
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="not a regular file"):
        load_image(fifo)
    good = tmp_path / "ok.png"
    _image(10, 12).save(good)
    assert load_image(good).size == (10, 12)


def test_without_a_preprocessor_config_metas_mean_and_std(tmp_path):
    """A folder without preprocessor_config.json gets Meta's normalisation (the real config's), not
    transformers' class defaults."""
    image = _image(40, 30)
    got = ImageProcessor.for_model(28, 4)([image])
    want = MllamaImageProcessorPil(size={"height": 28, "width": 28}, max_image_tiles=4,
                                   image_mean=[0.48145466, 0.4578275, 0.40821073],
                                   image_std=[0.26862954, 0.26130258, 0.27577711])(images=[[image]], return_tensors="np")
    np.testing.assert_allclose(got["pixel_values"], want["pixel_values"], rtol=0, atol=1e-6)
