"""Meta's own Llama 3.2 Vision layout (params.json with vision keys, consolidated.NN.pth, tokenizer.model)
loads, merges model-parallel shards and converts: against Meta's reference (llama-models 0.3.0:
VisionEncoder, the vision projection and CrossAttentionTransformerText, at a tiny width with the
reference's fixed encoder depth, heads and intermediate layers) run on the very state dict we save, and
against transformers 4.46.3's convert_mllama_weights_to_hf (names, shard dims, tensors: its write_model
hard-codes the 11B/90B vision encoder, so its parts run; transformers 5 ships no converter)."""

from __future__ import annotations

import base64
import json
import sys
import types

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from test_cli_errors import assert_one_line_error
from test_cli_errors import run as run_cli

import llama_mlx
from llama_mlx.convert import convert
from llama_mlx.info import describe
from llama_mlx.vision.processor import supported_aspect_ratios

VOCAB = 300  # 44 byte tokens, then Llama 3's 256 special tokens (BOS 44); the image token is 300
WIDTH = 32
PARAMS = {"dim": 64, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2, "vocab_size": VOCAB, "multiple_of": 32,
          "ffn_dim_multiplier": 0.75, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True,
          "max_seq_len": 64, "vision_chunk_size": 28, "vision_max_num_chunks": 4,
          "vision_num_cross_attention_layers": 2}
ALPHABET = b" abcdefghijklmnopqrstuvwxyz0123456789.,?!\n:'"
TOL = 1e-4
NL = ALPHABET.index(b"\n")
PRINTABLE = NL  # the tokens before it: space, letters, digits, .,?!


def _write_tokenizer_model(path) -> None:
    """Meta's tiktoken format: one `base64(token) rank` line per token; 44 single bytes here."""
    assert len(ALPHABET) == VOCAB - 256
    path.write_bytes(b"".join(base64.b64encode(bytes([c])) + b" %d\n" % i for i, c in enumerate(ALPHABET)))


def _reference_modules() -> None:
    """Import llama-models' multimodal model (model parallel of size 1). Its image transform imports
    torchvision (not installed): stand-ins while it imports, gone after (transformers, which mlx-vlm
    imports, would take any torchvision module for the real one)."""
    from oracles import _init_fairscale

    stubs = [n for n in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
             if n not in sys.modules]
    sys.modules.update({n: types.ModuleType(n) for n in stubs})
    try:
        import llama_models.llama3.multimodal.model  # noqa: F401
    finally:
        for n in stubs:
            sys.modules.pop(n, None)
    _init_fairscale()


def _reference(seed: int = 0, chunk: int = 28):
    """Meta's modules at the tiny size, random (gates far from zero), saved for 28-pixel chunks; returns
    (state dict, run). Another `chunk`: `run` is the encoder for it given that state dict (Meta's load
    hooks resize the position embeddings)."""
    _reference_modules()
    from fairscale.nn.model_parallel.layers import ColumnParallelLinear
    from llama_models.llama3.args import ModelArgs
    from llama_models.llama3.multimodal.model import (
        CrossAttentionTransformerText,
        VisionEncoder,
        _pad_masks,
    )
    torch.manual_seed(seed)
    args = ModelArgs(**PARAMS)
    vision = torch.nn.Module()  # CrossAttentionTransformerVision's attributes, its encoder at width 32
    vision.vision_encoder = VisionEncoder(max_num_tiles=4, image_size=28, patch_size=14, width=WIDTH, layers=32,
                                          heads=16, mlp_ratio=4.0, n_global_layers=8, global_model=True,
                                          return_intermediate=[3, 7, 15, 23, 30])
    vision.vision_projection = ColumnParallelLinear(6 * WIDTH, args.dim, bias=True, init_method=lambda x: x)
    whole = torch.nn.Module()  # CrossAttentionTransformer's two halves, so the state dict has Meta's names
    whole.vision_model, whole.text_model = vision, CrossAttentionTransformerText(args)
    whole.eval()
    with torch.no_grad():
        for name, p in whole.named_parameters():
            if "gate" in name:
                p.copy_(torch.empty_like(p).uniform_(-1.2, 1.2))
            elif "norm" in name or ".ln_" in name:
                p.copy_((0 if name.endswith("bias") else 1) + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
        whole.text_model.output.weight[PRINTABLE:] = 0  # greedy answers in letters, digits and punctuation
    text = whole.text_model
    state = {k: v.clone() for k, v in whole.state_dict().items()}
    if chunk != 28:
        vision.vision_encoder = VisionEncoder(max_num_tiles=4, image_size=chunk, patch_size=14, width=WIDTH,
                                              layers=32, heads=16, mlp_ratio=4.0, n_global_layers=8,
                                              global_model=True, return_intermediate=[3, 7, 15, 23, 30]).eval()
        prefix = "vision_model.vision_encoder."
        vision.vision_encoder.load_state_dict({k[len(prefix):]: v.clone() for k, v in state.items()
                                               if k.startswith(prefix)})
    text.setup_cache(1, torch.device("cpu"), torch.float32)

    def run(tokens, pixels=None, grid=None, image_at=0):
        """Meta's logits: with an image (its token at `image_at`; rows before it see none), or text only."""
        with torch.no_grad():
            ids = torch.tensor([tokens])
            positions = torch.arange(len(tokens))
            h = text.get_partially_trainable_embedding(ids)
            if pixels is None:
                return text.forward(positions, h, None, None, None, text_only_inference=True).numpy()
            states = vision.vision_encoder(torch.tensor(pixels), torch.tensor([list(grid)]))
            states = torch.nn.functional.linear(states, vision.vision_projection.weight, vision.vision_projection.bias)
            B, _, T, _, D = states.shape
            caches = torch.stack([layer.compute_xattn_kv_cache(states.view(B, -1, D))
                                  for layer in text.cross_attention_layers])
            masks = _pad_masks([[[image_at, -1]]], [[grid[0] * grid[1]]], len(tokens), T)
            xattn_mask, rows = text._get_xattn_mask(len(tokens), "cpu", torch.float32, states, masks)
            return text.forward(positions, h, xattn_mask, rows, caches).numpy()

    return state, run


def _split(state: dict, ranks: int) -> list[dict]:
    """Model-parallel shards as Meta's reshard (llama_models/checkpoint.py) cuts them; it replicates the two
    tensors missing from its tables, which the parallel layers split on dim 0 like their kin (VocabParallel
    `learnable_embedding`, ColumnParallelLinear's bias; transformers' converter concatenates both so)."""
    from llama_models.checkpoint import reshard_mp

    shards = [reshard_mp([state], size=ranks, rank=r) for r in range(ranks)]
    for key in ("text_model.learnable_embedding.weight", "vision_model.vision_projection.bias"):
        for r, part in enumerate(state[key].chunk(ranks, dim=0)):
            shards[r][key] = part.clone()
    return shards


def _write(folder, shards: list[dict], params: dict = PARAMS) -> None:
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps(params))
    _write_tokenizer_model(folder / "tokenizer.model")
    for i, shard in enumerate(shards):
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")


@pytest.fixture(scope="module")
def meta(tmp_path_factory):
    root = tmp_path_factory.mktemp("meta-vision")
    state, run = _reference()
    _write(root / "one", [state])
    _write(root / "two", _split(state, 2))
    pixels = np.zeros((1, 1, 4, 3, 28, 28), np.float32)
    pixels[0, 0, :2] = np.random.default_rng(1).standard_normal((2, 3, 28, 28))
    return root, state, run, pixels


TOKENS = [VOCAB, 44, 50, 20, 5, 9, 51, 10, 11, 12]  # <|image|><|begin_of_text|><|start_header_id|>...
GRID = (2, 1)


def _ours(folder, pixels=None):
    model, processor = llama_mlx.load(folder)
    cache = model.make_cache()
    if pixels is not None:
        ids = supported_aspect_ratios(4).index(GRID) + 1
        model.attach_images(cache, pixels, np.array([[ids]]), np.array([[[1, 1, 0, 0]]]))
    return np.array(model(mx.array([TOKENS if pixels is not None else TOKENS[1:]]), cache)), model, processor


def test_meta_folder_equals_metas_reference(meta):
    """One consolidated.00.pth: logits with the image (2 tiles of 4) and text only equal Meta's forward;
    the folder is Llama 3.2 Vision as Hugging Face lays it out (interleaved layers, vocab + 8 rows)."""
    root, _, run, pixels = meta
    got, model, processor = _ours(root / "one", pixels)
    want = run(TOKENS, pixels, GRID)
    assert np.abs(got - want).max() < TOL, np.abs(got - want).max()
    got, _, _ = _ours(root / "one")
    want = run(TOKENS[1:])
    assert np.abs(got - want).max() < TOL, np.abs(got - want).max()
    assert model.config.cross_attention_layers == [0, 3]  # Meta's fusion schedule [0, 2], each before its layer
    assert model.language_model.model.embed_tokens.weight.shape == (VOCAB + 8, 64)
    ip = processor.image_processor  # the reference's transform: chunk size, chunks, CLIP mean and std
    assert (ip.tile_size, ip.max_image_tiles) == (28, 4)
    assert tuple(ip.image_mean) == (0.48145466, 0.4578275, 0.40821073)
    assert tuple(ip.image_std) == (0.26862954, 0.26130258, 0.27577711)
    assert processor.apply_chat_template(CHAT) == _reference_chat(root / "one")
    info = describe(root / "one")  # sizes from the shards' shapes, without reading tensors
    assert info["format"] == "meta" and info["dtype"] == "float32"
    assert info["parameters"] == sum(v.size for _, v in tree_flatten(model.parameters()))


CHAT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " what is it? "}]},
        {"role": "assistant", "content": "a cat."}, {"role": "user", "content": "and now?"}]


def _reference_chat(folder, first=None, turns: int = 3) -> list[int]:
    """llama-models' ChatFormat on the folder's tokenizer.model: the ids it feeds the model (its image token
    128256 is the vocabulary's end, 300 here)."""
    import io

    from llama_models.datatypes import RawMediaItem, RawMessage, RawTextItem
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer
    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    parts = [RawMediaItem(data=png.getvalue()) if p["type"] == "image" else RawTextItem(text=p["text"])
             for p in (first or CHAT[0]["content"])]
    messages = [RawMessage(role="user", content=parts),
                RawMessage(role="assistant", content="a cat.", stop_reason="end_of_turn"),
                RawMessage(role="user", content="and now?")][:turns]
    tokens = ChatFormat(Tokenizer(folder / "tokenizer.model")).encode_dialog_prompt(messages).tokens
    return [VOCAB if t == 128256 else t for t in tokens]


def _converter():
    """transformers 4.46.3's convert_mllama_weights_to_hf (tests/assets.py), imported with transformers 5:
    the torchvision image processor it imports a helper from stands in as the Pillow one's module."""
    import importlib.util

    from assets import MLLAMA_CONVERTER
    from transformers.models.mllama import image_processing_pil_mllama

    name = "transformers.models.mllama.image_processing_mllama"
    stub = name not in sys.modules
    if stub:
        sys.modules[name] = image_processing_pil_mllama
    try:
        spec = importlib.util.spec_from_file_location("convert_mllama_weights_to_hf", MLLAMA_CONVERTER)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if stub:
            sys.modules.pop(name, None)
    return module


def test_names_shard_dims_and_layouts_are_transformers_converters(meta):
    """Every tensor of the tiny checkpoint against transformers' converter (its write_model fixes the 11B/90B
    vision encoder, so its parts run here): the Hugging Face name (up to the interleaved layer number, which
    its formula gets right only when n_layers is a multiple of the cross-attention count: the real sizes,
    test_real_sizes_give_the_hubs_configs), whether and on which dim shards concatenate, and the tensor."""
    from llama_mlx.vision.meta import (
        IGNORED,
        _lookup,
        meta_mllama_config,
        read_meta_mllama,
        shard_axis,
    )

    conv = _converter()
    root, state, _, _ = meta
    names = conv.convert_old_keys_to_new_keys(list(state))
    ours = {k: np.array(v) for k, v in read_meta_mllama(root / "one", meta_mllama_config(root / "one")).items()}
    text = meta_mllama_config(root / "one")["text_config"]
    cross, selfs = text["cross_attention_layers"], [i for i in range(5) if i not in text["cross_attention_layers"]]
    heads, kv, dim = PARAMS["n_heads"], PARAMS["n_kv_heads"], PARAMS["dim"]
    seen = set()
    for key, value in state.items():
        hf = names[key]
        if key in IGNORED:
            assert hf == ""
            continue
        target, n = _lookup(key)
        if key.endswith("learnable_embedding.weight"):
            assert hf == "language_model.model.learnable_embedding.weight"
            continue
        assert target.replace("{n}", str(n)).replace("{self}", str(n)).replace("{cross}", str(n)) == hf, key
        split = conv.is_param_different_across_shards(hf)
        assert shard_axis(key) == (conv.get_concat_dim(hf) if split else None), key
        name = target.replace("{n}", str(n)).replace("{self}", str(selfs[n] if n is not None and n < 3 else n))
        name = name.replace("{cross}", str(cross[n] if n is not None and n < 2 else n))
        value = value.detach()
        if ".layers." in key and "text_model.layers." in key and key.endswith((".wq.weight", ".wk.weight")):
            n_heads = heads if ".wq." in key else kv
            want = conv.permute_for_rope(value, n_heads, n_heads * dim // heads, dim)
        elif hf == "vision_model.patch_embedding.weight":
            want = value.reshape(-1, 3, 14, 14).permute(0, 2, 3, 1)  # ours channels-last
        elif hf == "vision_model.gated_positional_embedding.tile_embedding.weight":
            table = conv.interpolate_positional_embedding(value.permute(2, 0, 1, 3).flatten(1), 28, 14)
            want = conv.pre_compute_positional_embedding(table.reshape(-1, 4, 4, WIDTH).permute(1, 2, 0, 3))
        elif hf == "vision_model.gated_positional_embedding.embedding":
            want = conv.interpolate_positional_embedding(value, 28, 14)
        elif "tile_positional_embedding.embedding" in hf:
            want = conv.pre_compute_positional_embedding(value)
        elif key == "text_model.tok_embeddings.weight":
            want = torch.cat([value, state["text_model.learnable_embedding.weight"]])
        else:
            want = value
        np.testing.assert_array_equal(ours[name], want.numpy(), err_msg=key)
        seen.add(name)
    assert seen == set(ours)


def test_two_model_parallel_shards_merge_to_the_same_model(meta):
    root, _, run, pixels = meta
    got, _, _ = _ours(root / "two", pixels)
    want = run(TOKENS, pixels, GRID)
    assert np.abs(got - want).max() < TOL, np.abs(got - want).max()


def test_convert_writes_a_folder_we_and_mlx_vlm_load(meta, tmp_path):
    """`convert META OUT`: float32 Hugging Face names, tokenizer and preprocessor files; mlx-vlm (given Meta's
    intermediate states, as in test_vision_mlx_vlm) and we read Meta's model from it."""
    import mlx_vlm
    from test_vision_mlx_vlm import meta_indices

    root, _, run, pixels = meta
    out = tmp_path / "out"
    convert(root / "two", out, dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert config["converted_from"]["format"] == "meta" and "meta_layout" not in config
    want = run(TOKENS, pixels, GRID)
    got, _, _ = _ours(out, pixels)
    assert np.abs(got - want).max() < TOL, np.abs(got - want).max()
    model, processor = mlx_vlm.load(str(out))
    meta_indices(model)
    ids = supported_aspect_ratios(4).index(GRID) + 1  # Hugging Face's ids, which mlx-vlm shares
    mask = np.zeros((1, len(TOKENS), 1, 4), np.int64)
    mask[0, :, 0, :2] = 1
    logits = model(mx.array([TOKENS]), pixel_values=mx.array(pixels), aspect_ratio_ids=mx.array([[ids]]),
                   aspect_ratio_mask=mx.array([[[1, 1, 0, 0]]]), cross_attention_mask=mx.array(mask)).logits
    assert np.abs(np.array(logits) - want).max() < TOL
    assert processor.tokenizer.convert_tokens_to_ids("<|image|>") == VOCAB
    ids = processor.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    assert list(getattr(ids, "input_ids", ids)) == _reference_chat(root / "one")

    convert(root / "one", tmp_path / "q4", quantize=True, bits=4, group_size=32)  # `convert -q`
    model, _ = mlx_vlm.load(str(tmp_path / "q4"))
    ours, _ = llama_mlx.load(tmp_path / "q4")
    quantized = {k for k, m in model.named_modules() if hasattr(m, "scales")}
    assert quantized and quantized == {k.replace("vision_model", "vision_tower") for k, m in ours.named_modules()
                                       if hasattr(m, "scales")}


def test_position_embeddings_for_another_chunk_size_resize_as_metas_load_hooks(tmp_path):
    """params.json's vision_chunk_size 42 (3 x 3 patches) over embeddings trained for 28 (2 x 2): the local
    and the tiled position tables are resized as the reference's load hooks do (bilinear, corners kept)."""
    state, run = _reference(seed=3, chunk=42)
    _write(tmp_path / "m", [state], {**PARAMS, "vision_chunk_size": 42})
    pixels = np.zeros((1, 1, 4, 3, 42, 42), np.float32)
    pixels[0, 0, :2] = np.random.default_rng(4).standard_normal((2, 3, 42, 42))
    got, model, _ = _ours(tmp_path / "m", pixels)
    assert model.config.vision.image_size == 42
    want = run(TOKENS, pixels, GRID)
    assert np.abs(got - want).max() < TOL, np.abs(got - want).max()


@pytest.mark.parametrize("size", ["11B", "90B"])
def test_real_sizes_give_the_hubs_configs(size, tmp_path, monkeypatch):
    """Meta's Llama-3.2-{11B,90B}-Vision-Instruct: params.json as llama-models' sku_list gives it, the shards'
    names and shapes those of the reference's CrossAttentionTransformerVision / Text (meta device, no data):
    the config is the Hugging Face hub's (tests/test_vision_info.py), every tensor name mapped."""
    _reference_modules()  # (run alone, nothing imported it yet)
    from llama_models.llama3.args import ModelArgs
    from llama_models.llama3.multimodal.model import (
        CrossAttentionTransformerText,
        CrossAttentionTransformerVision,
    )
    from llama_models.sku_list import all_registered_models
    from test_vision_info import CONFIGS, ROPE, VISION

    import llama_mlx.checkpoints.meta as checkpoints_meta
    from llama_mlx.vision.meta import meta_mllama_config

    (sku,) = [m for m in all_registered_models() if m.huggingface_repo == f"meta-llama/Llama-3.2-{size}-Vision-Instruct"]
    with torch.device("meta"):
        whole = torch.nn.Module()
        whole.vision_model = CrossAttentionTransformerVision(ModelArgs(**sku.arch_args))
        whole.text_model = CrossAttentionTransformerText(ModelArgs(**sku.arch_args))
    shapes = {k: types.SimpleNamespace(shape=tuple(v.shape), mx_dtype=mx.bfloat16, to_mlx=None)  # never read
              for k, v in whole.state_dict().items()}
    monkeypatch.setattr(checkpoints_meta, "load_pth", lambda _file: shapes)  # what load_shards reads
    (tmp_path / "params.json").write_text(json.dumps(sku.arch_args))
    (tmp_path / "consolidated.00.pth").write_bytes(b"")  # its tensors: `shapes`
    config = meta_mllama_config(tmp_path)
    text, vision = config["text_config"], config["vision_config"]
    assert {k: text[k] for k in CONFIGS[size]} == CONFIGS[size]
    assert text["vocab_size"] == config["image_token_index"] == 128256 and text["max_position_embeddings"] == 131072
    assert {**text["rope_scaling"], "rope_theta": text["rope_theta"]} == ROPE
    assert {k: vision[k] for k in VISION} == VISION and config["torch_dtype"] == "bfloat16"


def test_cli_generate_with_an_image_answers_as_metas_reference(meta, tmp_path):
    """`llama-mlx generate --model META --image`: the greedy answer of Meta's model to llama-models' own chat
    ids for the prompt, given the image as our processor tiles it (a 2 x 1 grid)."""
    from PIL import Image

    root, _, run, _ = meta
    image = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 70, 3), dtype=np.uint8)).save(image)
    r = run_cli("generate", "--model", root / "one", "--image", image, "-p", "what is it?", "-m", "4", "--temp", "0")
    assert r.returncode == 0, r.stderr
    _, processor = llama_mlx.load(root / "one")
    arrays = processor.image_processor([Image.open(image)])
    grid = supported_aspect_ratios(4)[int(arrays["aspect_ratio_ids"][0, 0]) - 1]
    ids = _reference_chat(root / "one", [{"type": "image"}, {"type": "text", "text": "what is it?"}], turns=1)
    answer = []
    for _ in range(4):
        logits = run(ids + answer, arrays["pixel_values"], grid, image_at=ids.index(VOCAB))
        answer.append(int(logits[0, -1].argmax()))
    assert r.stdout.strip() == bytes(ALPHABET[t] for t in answer).decode().strip() != "", (r.stdout, answer)


@pytest.mark.parametrize("case", ["absurd", "missing_param", "missing_tensor", "bad_shape", "missing_layer_tensor",
                                  "unknown_tensor", "cli"])
def test_hostile_meta_folders(meta, tmp_path, case):
    """Bad params.json or shards: a named error naming the file and the key, before any tensor is read
    (through the real CLI once: one stderr line, no traceback)."""
    from llama_mlx.errors import LlamaMLXError

    _, state, _, _ = meta
    params, shard = dict(PARAMS), dict(state)
    if case == "absurd":
        params["vision_chunk_size"] = 10 ** 12
        file, words = "params.json", ["'vision_chunk_size'", str(10 ** 12)]
    elif case == "missing_param":
        del params["vision_num_cross_attention_layers"]
        file, words = "params.json", ["missing key 'vision_num_cross_attention_layers'"]
    elif case == "missing_tensor":
        del shard["vision_model.vision_encoder.class_embedding"]
        file, words = "consolidated.00.pth", ["missing tensor 'vision_model.vision_encoder.class_embedding'"]
    elif case == "bad_shape":
        shard["text_model.layers.1.attention.wq.weight"] = torch.zeros(7, 64)
        file, words = "consolidated.00.pth", ["'text_model.layers.1.attention.wq.weight' has shape [7, 64]",
                                              "language_model.model.layers.2.self_attn.q_proj.weight", "[64, 64]"]
    elif case == "missing_layer_tensor":
        del shard["text_model.cross_attention_layers.1.gate_ffwd"]
        file, words = "consolidated.00.pth", ["language_model.model.layers.3.cross_attn_mlp_gate"]
    else:
        shard["text_model.layers.0.attention.bogus.weight"] = torch.zeros(2)
        file, words = "consolidated.00.pth", ["unexpected tensor 'text_model.layers.0.attention.bogus.weight'"]
    folder = tmp_path / "bad"
    _write(folder, [shard], params)
    if case == "cli":
        assert_one_line_error(run_cli("generate", "--model", folder, "-p", "hi", "-m", "1"), 1, str(folder / file), *words)
        return
    with pytest.raises(LlamaMLXError) as e:
        llama_mlx.load(folder)
    message = str(e.value)
    assert "\n" not in message and str(folder / file) in message, message
    assert all(w in message for w in words), message
