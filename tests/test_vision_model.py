"""Llama 3.2 Vision in MLX against transformers' MllamaForConditionalGeneration on a tiny random
config (float32): prompt logits with and without an image, over turns with the cache, and greedy tokens."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image

from llama_mlx.errors import ImageError
from llama_mlx.generate import generate_step
from llama_mlx.vision.model import MllamaArgs, Model
from llama_mlx.vision.processor import ImageProcessor

from mllama_oracle import IMAGE_TOKEN, cross_attention_mask, meta_semantics, state_dict_numpy, tiny_mllama

TOL = 1e-4


@pytest.fixture(scope="module")
def hf():
    return tiny_mllama()


def _ours(hf, rows):
    ours = Model(MllamaArgs.from_dict({**hf.config.to_dict(), "cross_attention_rows": rows}))
    weights = {k: mx.array(v) for k, v in state_dict_numpy(hf).items()}
    ours.load_weights(list(ours.sanitize(weights).items()), strict=True)
    return ours


@pytest.fixture(scope="module", params=["meta", "transformers"])
def pair(request, hf):
    """Ours with Meta's rows before the image (the default) against transformers given Meta's, and ours
    with transformers' rows against transformers as it is (Meta's intermediate states in both)."""
    return hf, _ours(hf, request.param), request.param == "meta"


def _inputs(w, h, seed=0):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return ImageProcessor(tile_size=28, max_image_tiles=4)([image])


def _hf(hf, rows, ids, inp=None, mask=None, cache=None):
    kwargs = {}
    if inp is not None:
        kwargs = dict(pixel_values=torch.tensor(inp["pixel_values"]), aspect_ratio_ids=torch.tensor(inp["aspect_ratio_ids"]),
                      aspect_ratio_mask=torch.tensor(inp["aspect_ratio_mask"]))
    with torch.no_grad(), meta_semantics(rows=rows):
        out = hf(input_ids=torch.tensor([ids]), cross_attention_mask=mask, cache=cache, use_cache=True, **kwargs)
    return out.logits.numpy(), out.cache


def _close(got, want):
    got = np.array(got)
    assert got.shape == want.shape
    assert np.abs(got - want).max() < TOL, np.abs(got - want).max()


@pytest.mark.parametrize("size", [(70, 40), (23, 61), (29, 29)])
def test_prompt_logits_with_an_image(pair, size):
    hf, ours, rows = pair
    inp = _inputs(*size)
    ids = [1, 5, 7, IMAGE_TOKEN, 9, 11, 13, 200, 17]
    want, _ = _hf(hf, rows, ids, inp, cross_attention_mask(ids, inp["num_tiles"][0][0]))
    cache = ours.make_cache()
    ours.attach_images(cache, inp["pixel_values"], inp["aspect_ratio_ids"], inp["aspect_ratio_mask"])
    _close(ours(mx.array([ids]), cache), want)


def test_prompt_logits_without_an_image(pair):
    hf, ours, rows = pair
    ids = [1, 5, 7, 9, 250, 11]
    want, _ = _hf(hf, rows, ids)
    _close(ours(mx.array([ids])), want)
    cache = ours.make_cache()
    _close(ours(mx.array([ids]), cache), want)
    assert all(c.nbytes == 0 for i, c in enumerate(cache) if i in (1, 3))  # no cross-attention work


def test_turns_with_the_cache(pair):
    """Turn 1 holds the image, turns 2 and 3 reuse its cached keys; decode one token at a time too."""
    hf, ours, rows = pair
    inp = _inputs(90, 30, seed=3)
    turns = [[1, 5, IMAGE_TOKEN, 9, 11], [40, 41, 42], [43], [44, 45, 46, 47]]
    full = [t for turn in turns for t in turn]
    mask = cross_attention_mask(full, inp["num_tiles"][0][0])
    cache, hf_cache, seen = ours.make_cache(), None, 0
    ours.attach_images(cache, inp["pixel_values"], inp["aspect_ratio_ids"], inp["aspect_ratio_mask"])
    for n, turn in enumerate(turns):
        want, hf_cache = _hf(hf, rows, turn, inp if n == 0 else None, mask[:, : seen + len(turn)], hf_cache)
        _close(ours(mx.array([turn]), cache), want)
        seen += len(turn)
    want_all, _ = _hf(hf, rows, full, inp, mask)
    assert np.abs(want_all[0, -1] - want[0, -1]).max() < TOL  # the oracle agrees with itself


def test_second_image_in_a_later_turn(pair):
    hf, ours, rows = pair
    first, second = _inputs(70, 40, seed=1), _inputs(20, 50, seed=2)
    turns = [[1, IMAGE_TOKEN, 9, 11], [12, IMAGE_TOKEN, 14, 15]]
    full = turns[0] + turns[1]
    mask = torch.zeros(1, len(full), 2, 4, dtype=torch.long)
    mask[0, 1:5, 0, : first["num_tiles"][0][0]] = 1  # until the next image token
    mask[0, 5:, 1, : second["num_tiles"][0][0]] = 1
    cache = ours.make_cache()
    want, hf_cache = _hf(hf, rows, turns[0], first, mask[:, :4, :1])
    ours.attach_images(cache, first["pixel_values"], first["aspect_ratio_ids"], first["aspect_ratio_mask"])
    _close(ours(mx.array([turns[0]]), cache), want)
    want, _ = _hf(hf, rows, turns[1], second, mask, hf_cache)
    ours.attach_images(cache, second["pixel_values"], second["aspect_ratio_ids"], second["aspect_ratio_mask"])
    _close(ours(mx.array([turns[1]]), cache), want)


def test_greedy_tokens_equal_transformers_generate(pair):
    hf, ours, rows = pair
    inp = _inputs(45, 80, seed=5)
    ids = [1, 5, 7, IMAGE_TOKEN, 9, 11, 13]
    with torch.no_grad(), meta_semantics(rows=rows):
        out = hf.generate(input_ids=torch.tensor([ids]), pixel_values=torch.tensor(inp["pixel_values"]),
                          aspect_ratio_ids=torch.tensor(inp["aspect_ratio_ids"]),
                          aspect_ratio_mask=torch.tensor(inp["aspect_ratio_mask"]),
                          cross_attention_mask=cross_attention_mask(ids, inp["num_tiles"][0][0]),
                          max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    want = out[0, len(ids):].tolist()
    cache = ours.make_cache()
    ours.attach_images(cache, inp["pixel_values"], inp["aspect_ratio_ids"], inp["aspect_ratio_mask"])
    got = [t for t, _ in generate_step(mx.array(ids), ours, max_tokens=12, prompt_cache=cache)]
    assert got == want


def test_meta_rows_leave_text_before_the_image_alone(hf):
    """The default (Meta's): tokens before the image pass the cross-attention layers unchanged."""
    meta, transformers_rows = _ours(hf, "meta"), _ours(hf, "transformers")
    inp = _inputs(70, 40)
    ids = [1, 5, 7, IMAGE_TOKEN, 9]
    got = np.array(meta(mx.array([ids]), _attached(meta, inp)))
    text = np.array(meta(mx.array([ids[:3]])))
    assert np.abs(got[:, :3] - text).max() < 1e-5
    other = np.array(transformers_rows(mx.array([ids]), _attached(transformers_rows, inp)))
    assert np.abs(got[:, :3] - other[:, :3]).max() > 1e-3


def _attached(model, inp):
    cache = model.make_cache()
    model.attach_images(cache, inp["pixel_values"], inp["aspect_ratio_ids"], inp["aspect_ratio_mask"])
    return cache


def test_image_token_without_an_image(pair):
    _, ours, _ = pair
    with pytest.raises(ImageError, match="1 image token"):
        ours(mx.array([[1, IMAGE_TOKEN, 5]]), ours.make_cache())


@pytest.mark.parametrize("grid", [(1, 1), (1, 3), (2, 2), (4, 1), (2, 1)])
def test_vision_encoder_equals_metas_reference(grid):
    """The vision tower against Meta's own VisionEncoder (llama-models), independent of transformers."""
    from llama_mlx.vision.vision import VisionArgs, VisionModel

    from mllama_oracle import TINY_CONFIG, meta_vision_encoder

    meta, weights, grids = meta_vision_encoder()
    ours = VisionModel(VisionArgs.from_dict(TINY_CONFIG["vision_config"]))
    ours.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
    h, w = grid
    pixels = np.zeros((1, 1, 4, 3, 28, 28), np.float32)
    pixels[0, 0, : h * w] = np.random.default_rng(h * 10 + w).standard_normal((h * w, 3, 28, 28))
    mask = np.zeros((1, 1, 4), np.int64)
    mask[0, 0, : h * w] = 1
    with torch.no_grad():
        want = meta(torch.tensor(pixels), torch.tensor([[h, w]])).numpy()
    got = np.array(ours(mx.array(pixels), mx.array([[grids.index(grid) + 1]]), mx.array(mask)))
    assert got.shape == want.shape
    assert np.abs(got - want).max() < TOL, np.abs(got - want).max()


@pytest.fixture(scope="module")
def meta_reference():
    from mllama_oracle import meta_reference_mllama

    run, config, weights, grids = meta_reference_mllama()
    ours = Model(MllamaArgs.from_dict(config))  # Meta's rows: the default
    ours.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
    return run, ours, grids


@pytest.mark.parametrize("grid,image_at,chunks", [((2, 1), 3, ()), ((1, 1), 1, ()), ((2, 2), 2, (5, 1, 1, 3)),
                                                  ((1, 3), 4, (4, 2, 4))])
def test_whole_model_equals_metas_reference(meta_reference, grid, image_at, chunks):
    """Vision tower, projection and the language model with cross-attention against Meta's reference
    (llama-models: VisionEncoder + CrossAttentionTransformerText, its KV cache over the same chunks):
    tokens before the image included."""
    run, ours, grids = meta_reference
    h, w = grid
    pixels = np.zeros((1, 1, 4, 3, 28, 28), np.float32)
    pixels[0, 0, : h * w] = np.random.default_rng(h * 10 + w).standard_normal((h * w, 3, 28, 28))
    mask = np.zeros((1, 1, 4), np.int64)
    mask[0, 0, : h * w] = 1
    tokens = [256, 5, 7, 9, 11, 13, 40, 41, 42, 43]
    tokens.insert(image_at, IMAGE_TOKEN)
    tokens = tokens[:10]
    want = run(tokens, pixels, grid, image_at, chunks)
    cache = ours.make_cache()
    ours.attach_images(cache, pixels, np.array([[grids.index(grid) + 1]]), mask)
    start = 0
    for n, expected in zip(chunks or (len(tokens),), want):
        got = np.array(ours(mx.array([tokens[start:start + n]]), cache))
        assert np.abs(got - expected).max() < TOL, np.abs(got - expected).max()
        start += n
