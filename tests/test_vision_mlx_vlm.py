"""Llama 3.2 Vision folders between llama-mlx and mlx-vlm (the `test` extra's pin, 0.7.10): our `convert`
(float16, and `-q` 4-bit) loads in `mlx_vlm.load` unchanged and reads as the same model; the folders
`mlx_vlm.convert` writes (float16, 4-bit) load here with mlx-vlm's outputs.

The prompt puts the image first (Meta's base-model layout): no token precedes it, so Meta's and
transformers' rows agree; the image fills all four tiles, as mlx-vlm's decode steps attend to every tile
unmasked. mlx-vlm's vision encoder keeps the listed local layers' *outputs* as intermediate states
(transformers 5's choice; Meta's reference and ours keep their *inputs*): it is checked as loaded against
transformers as it is, then `meta_indices` (layer i's input is layer i-1's output) gives it Meta's states
to compare with ours and with transformers under `meta_semantics`."""

import json
import shutil

import mlx.core as mx
import mlx_vlm
import numpy as np
import pytest
import torch
from mlx.utils import tree_map
from mlx_vlm.convert import convert as vlm_convert
from mlx_vlm.generate import generate_step as vlm_generate_step
from PIL import Image

import llama_mlx
from llama_mlx.convert import convert
from llama_mlx.generate import stream_generate

from mllama_oracle import IMAGE_TOKEN, cross_attention_mask, meta_semantics, write_tiny_folder

PROMPT = [IMAGE_TOKEN, 256, *b"The picture shows"]
N = 10
F16 = 5e-2  # float16 weights against float32 transformers (logits up to ~5; 0.02 seen)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A transformers 5 save_pretrained folder (rope_parameters, vision attention_heads), its model, a
    square image (a 2x2 grid: four used tiles) and the processor's arrays for it."""
    root = tmp_path_factory.mktemp("vlm")
    hf = write_tiny_folder(root / "hf")
    image = root / "square.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (56, 56, 3), dtype=np.uint8)).save(image)
    _, processor = llama_mlx.load(root / "hf")
    arrays = processor.image_processor([Image.open(image)])
    assert arrays["aspect_ratio_mask"].tolist() == [[[1, 1, 1, 1]]]
    return root, hf, image, arrays


def _transformers(hf, arrays, meta: bool) -> np.ndarray:
    inputs = dict(input_ids=torch.tensor([PROMPT]), pixel_values=torch.tensor(arrays["pixel_values"]),
                  aspect_ratio_ids=torch.tensor(arrays["aspect_ratio_ids"]),
                  aspect_ratio_mask=torch.tensor(arrays["aspect_ratio_mask"]),
                  cross_attention_mask=cross_attention_mask(PROMPT, 4))
    with torch.no_grad():
        if not meta:
            return hf(**inputs).logits.numpy()
        with meta_semantics():
            return hf(**inputs).logits.numpy()


def _vlm_inputs(arrays) -> dict:
    return dict(pixel_values=mx.array(arrays["pixel_values"]), aspect_ratio_ids=mx.array(arrays["aspect_ratio_ids"]),
                aspect_ratio_mask=mx.array(arrays["aspect_ratio_mask"]),
                cross_attention_mask=mx.array(cross_attention_mask(PROMPT, 4).numpy()))


def _vlm_logits(model, arrays) -> np.ndarray:
    return np.array(model(mx.array([PROMPT]), **_vlm_inputs(arrays)).logits.astype(mx.float32))


def _vlm_tokens(model, arrays) -> list[int]:
    """mlx-vlm's own decoding loop (greedy) on our prompt's ids."""
    kw = _vlm_inputs(arrays)
    out = []
    for token, _ in vlm_generate_step(mx.array([PROMPT]), model, kw.pop("pixel_values"), None, max_tokens=N,
                                      temperature=0.0, **kw):
        out.append(int(token))
        if len(out) == N:
            break
    return out


def meta_indices(model) -> None:
    """mlx-vlm's encoder given Meta's intermediate states: the outputs of the layers before the listed ones."""
    tower = model.vision_tower
    assert min(tower.intermediate_layers_indices) > 0
    tower.intermediate_layers_indices = [i - 1 for i in tower.intermediate_layers_indices]


def float32(model) -> None:
    """Float16 parameters (quantization scales included) to float32. mlx-vlm's float32 pixels make float32
    image states, which turn its hidden states float32 from the first cross-attention layer on, where ours
    stay in the weights' dtype: in float32 both compute alike (2e-6 seen) and only the layouts can differ."""
    model.update(tree_map(lambda a: a.astype(mx.float32) if a.dtype == mx.float16 else a, model.parameters()))


def _ours(folder, image, arrays, *, as_float32: bool = False):
    """Our greedy tokens for the prompt (`stream_generate`: its raw-prompt layout puts the image before
    BOS), and our logits for it."""
    model, processor = llama_mlx.load(folder)
    tokens = [r.token for r in stream_generate(model, processor, bytes(PROMPT[2:]).decode(), N, images=[image])]
    if as_float32:
        float32(model)
    cache = model.make_cache()
    model.attach_images(cache, arrays["pixel_values"], arrays["aspect_ratio_ids"], arrays["aspect_ratio_mask"])
    return model, np.array(model(mx.array([PROMPT]), cache).astype(mx.float32)), tokens


def _gap(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


def test_our_float16_convert_reads_as_the_same_model_in_mlx_vlm(source, tmp_path):
    root, hf, image, arrays = source
    out = tmp_path / "f16"
    convert(root / "hf", out, dtype="float16")
    model, _ = mlx_vlm.load(str(out))
    text, vision = model.config.text_config, model.config.vision_config
    # What mlx-vlm falls back to without the keys it reads: theta 10000, no llama3 scaling, 16 vision heads.
    assert text.rope_theta == 500000.0 and text.rope_scaling["rope_type"] == "llama3"
    assert text.rope_scaling["factor"] == 8.0 and vision.num_attention_heads == 4
    assert _gap(_vlm_logits(model, arrays), _transformers(hf, arrays, meta=False)) < F16

    meta_indices(model)
    want = _transformers(hf, arrays, meta=True)
    assert _gap(_vlm_logits(model, arrays), want) < F16
    _, logits, tokens = _ours(out, image, arrays, as_float32=True)
    assert _gap(logits, want) < F16
    with torch.no_grad(), meta_semantics():
        hf_tokens = hf.generate(input_ids=torch.tensor([PROMPT]), pixel_values=torch.tensor(arrays["pixel_values"]),
                                aspect_ratio_ids=torch.tensor(arrays["aspect_ratio_ids"]),
                                aspect_ratio_mask=torch.tensor(arrays["aspect_ratio_mask"]),
                                cross_attention_mask=cross_attention_mask(PROMPT, 4),
                                max_new_tokens=N, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert tokens == _vlm_tokens(model, arrays) == hf_tokens[0, len(PROMPT):].tolist()
    float32(model)
    assert _gap(logits, _vlm_logits(model, arrays)) < 1e-4


def test_our_4bit_convert_loads_in_mlx_vlm(source, tmp_path):
    """`convert -q`: mlx-vlm quantizes exactly the layers we wrote scales for (the language model; the vision
    tower and projector stay float) and computes what we do from them."""
    root, _, image, arrays = source
    out = tmp_path / "q4"
    convert(root / "hf", out, quantize=True, bits=4, group_size=64)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["group_size"] == 64 and config["quantization"]["bits"] == 4
    model, _ = mlx_vlm.load(str(out))
    ours, logits, tokens = _ours(out, image, arrays, as_float32=True)
    quantized = {k for k, m in model.named_modules() if hasattr(m, "scales")}
    ours_quantized = {k for k, m in ours.named_modules() if hasattr(m, "scales")}
    assert quantized == {k.replace("vision_model", "vision_tower") for k in ours_quantized}
    assert any(k.startswith("language_model.") for k in quantized)
    assert not any(k.startswith(("vision_tower.", "multi_modal_projector")) for k in quantized)
    meta_indices(model)
    assert tokens == _vlm_tokens(model, arrays)
    float32(model)
    assert _gap(logits, _vlm_logits(model, arrays)) < 1e-4


@pytest.mark.parametrize("quantize", [False, True], ids=["float16", "4-bit"])
def test_mlx_vlm_convert_loads_here(source, tmp_path, quantize):
    """A folder `mlx_vlm.convert` writes, from a source whose config.json has the keys of the hub's files
    (flat rope_theta / rope_scaling, which mlx-vlm reads), loads in llama-mlx unchanged."""
    root, hf, image, arrays = source
    hub = tmp_path / "hub"
    shutil.copytree(root / "hf", hub)
    config = json.loads((hub / "config.json").read_text())
    config["text_config"].update(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})
    config["vision_config"]["num_attention_heads"] = config["vision_config"]["attention_heads"]
    (hub / "config.json").write_text(json.dumps(config))
    out = tmp_path / "mlx-vlm"
    vlm_convert(str(hub), str(out), quantize=quantize, dtype="float16")
    model, _ = mlx_vlm.load(str(out))
    meta_indices(model)
    ours, logits, tokens = _ours(out, image, arrays, as_float32=True)
    assert ("scales" in ours.language_model.model.layers[0].self_attn.q_proj) == quantize
    assert tokens == _vlm_tokens(model, arrays)
    float32(model)
    assert _gap(logits, _vlm_logits(model, arrays)) < 1e-4
    if not quantize:
        assert _gap(logits, _transformers(hf, arrays, meta=True)) < F16
