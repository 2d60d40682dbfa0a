"""Llama 3.2 Vision end to end: a Hugging Face folder (save_pretrained of a tiny random transformers
model, a byte-level tokenizer, preprocessor_config.json) through `llama_mlx.load`, `generate(...,
images=[...])`, chat turns with the prompt cache, and `llama-mlx generate --image` in a real process;
the oracle is transformers' MllamaProcessor + MllamaForConditionalGeneration.generate (float32)."""

import json
import re
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from PIL import Image

import llama_mlx
from llama_mlx.cache import PromptCache
from llama_mlx.errors import ImageError
from llama_mlx.generate import stream_generate
from llama_mlx.vision.language import CrossAttentionCache
from llama_mlx.vision.loading import Processor
from llama_mlx.vision.model import Model

from mllama_oracle import CHAT_TEMPLATE, IMAGE_TOKEN, meta_semantics, write_tiny_folder
from test_cli_generate import run

N = 10


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("mllama") / "tiny-vision"
    return path, write_tiny_folder(path)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "odd.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (33, 71, 3), dtype=np.uint8)).save(path)
    return path


def oracle(folder, messages, images, max_new_tokens=N):
    """transformers' tokens and text for a conversation (its processor builds every input), with Meta's
    semantics (`meta_semantics`), which llama-mlx follows by default."""
    from transformers import AutoTokenizer, MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    path, hf = folder
    tok = AutoTokenizer.from_pretrained(path)
    processor = MllamaProcessor(image_processor=MllamaImageProcessorPil.from_pretrained(path), tokenizer=tok,
                                chat_template=CHAT_TEMPLATE)
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[[Image.open(p) for p in images]] if images else None, text=[text],
                       add_special_tokens=False, return_tensors="pt")
    with torch.no_grad(), meta_semantics():
        out = hf.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    return new, tok.decode(new, skip_special_tokens=True)


def tokens(model, processor, messages, **kwargs):
    return [r.token for r in stream_generate(model, processor, messages, N, **kwargs)]


def test_load_gives_model_and_processor(folder):
    model, processor = llama_mlx.load(folder[0])
    assert isinstance(model, Model) and isinstance(processor, Processor)
    assert processor.image_processor.tile_size == 28 and processor.image_token_id == IMAGE_TOKEN
    assert processor.eos_token_ids == processor.tokenizer.eos_token_ids


def test_generate_with_an_image_equals_transformers(folder, image_path):
    model, processor = llama_mlx.load(folder[0])
    question = [{"role": "user", "content": "What is in the picture?"}]
    want, text = oracle(folder, [{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                  "text": question[0]["content"]}]}],
                        [image_path])
    assert tokens(model, processor, question, images=[image_path]) == want
    assert llama_mlx.generate(model, processor, question, N, images=[str(image_path)]) == text


def test_generate_without_an_image_equals_transformers(folder):
    model, processor = llama_mlx.load(folder[0])
    messages = [{"role": "user", "content": "Hello there"}]
    want, _ = oracle(folder, messages, [])
    assert tokens(model, processor, messages) == want


def test_chat_turns_reuse_the_image(folder, image_path, monkeypatch):
    """Turn 2 has no new image: the cache keeps turn 1's, the vision model does not run again."""
    model, processor = llama_mlx.load(folder[0])
    first = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    pc = PromptCache(model)
    answer = tokens(model, processor, first, images=[image_path], prompt_cache=pc)
    reply = processor.decode(answer)
    calls = []
    monkeypatch.setattr(model, "encode_images", lambda *a: calls.append(a))
    second = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And the colours?"}]
    got = tokens(model, processor, second, images=[image_path], prompt_cache=pc)
    assert calls == []
    assert len([c for c in pc.cache if isinstance(c, CrossAttentionCache)][0].spans) == 1
    want, _ = oracle(folder, second, [image_path])
    assert got == want


def test_vision_prompt_cache_saves_and_loads(folder, image_path, tmp_path):
    """A PromptCache holding an image (its cross-attention keys and values, spans, image-token positions)
    round-trips through a file: the next turn from the loaded cache equals transformers on the whole
    conversation without running the vision tower; files that do not fit the model are refused."""
    from safetensors.numpy import load_file, save_file

    from llama_mlx.errors import PromptCacheError

    model, processor = llama_mlx.load(folder[0])
    first = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    pc = PromptCache(model)
    reply = processor.decode(tokens(model, processor, first, images=[image_path], prompt_cache=pc))
    pc.save(tmp_path / "cache.safetensors")
    loaded, _ = PromptCache.load(model, tmp_path / "cache.safetensors")
    assert loaded.tokens == pc.tokens
    for a, b in zip(loaded.cache, pc.cache):
        assert type(a) is type(b) and a.offset == b.offset
        assert all(np.array_equal(np.array(x), np.array(y)) for x, y in zip(a.state, b.state))
    # odd.png (71x33) takes 3 of the 4 tiles, 5 positions each
    assert [c.spans for c in loaded.cache if isinstance(c, CrossAttentionCache)][0] == [(0, 5 * 3)]
    second = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And the colours?"}]
    model.encode_images = None  # the vision tower must not run again
    assert tokens(model, processor, second, images=[image_path], prompt_cache=loaded) == oracle(
        folder, second, [image_path])[0]

    header = json.loads(load_header(tmp_path / "cache.safetensors")["llama_mlx"])
    arrays = load_file(tmp_path / "cache.safetensors")
    cross = [i for i, layer in enumerate(header["layers"]) if layer["kind"] == "CrossAttentionCache"]

    def refused(match, change_layers=None, change_arrays=None):
        h = json.loads(json.dumps(header))
        a = dict(arrays)
        (change_layers or (lambda _: None))(h["layers"])
        (change_arrays or (lambda _: None))(a)
        bad = tmp_path / "bad.safetensors"
        save_file(a, bad, metadata={"llama_mlx": json.dumps(h), "metadata": "{}"})
        with pytest.raises(PromptCacheError, match=match):
            PromptCache.load(model, bad)

    refused("different images", lambda ls: ls[cross[1]].update(spans=[[0, 10]]))
    refused("are not the used tiles", lambda ls: [ls[i].update(spans=[[0, 16]]) for i in cross])
    refused("image positions", lambda ls: [ls[i].update(image_positions=[]) for i in cross])
    refused("do not fit 1 image", change_arrays=lambda a: a.update({f"{cross[0]}.0": a[f"{cross[0]}.0"][:, :, :4]}))
    refused("where the model has a CrossAttentionCache", lambda ls: ls[cross[0]].update(kind="KVCache"))


def load_header(path):
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        return f.metadata()


def test_two_images_in_one_message_are_refused(folder, image_path):
    model, processor = llama_mlx.load(folder[0])
    with pytest.raises(ImageError, match="one image per message"):
        tokens(model, processor, [{"role": "user", "content": "Compare"}], images=[image_path, image_path])


def test_text_model_given_an_image_is_refused():
    from llama_mlx.model import Model as TextModel, ModelArgs

    text = TextModel(ModelArgs(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                               vocab_size=400))
    with pytest.raises(ImageError, match="reads text only"):
        tokens(text, None, [1, 2, 3], images=["x.png"])


def test_mlx_vlm_folder_loads_unchanged(folder, tmp_path):
    """mlx-vlm's layout: `vision_tower.*`, channels-last patch convolution; same logits."""
    model, _ = llama_mlx.load(folder[0])
    vlm = tmp_path / "mlx-vlm"
    shutil.copytree(folder[0], vlm, ignore=shutil.ignore_patterns("*.safetensors"))
    weights = {k.replace("vision_model.", "vision_tower.", 1): v for k, v in tree_flatten(model.parameters())}
    assert weights["vision_tower.patch_embedding.weight"].shape[-1] == 3
    mx.save_safetensors(str(vlm / "model.safetensors"), weights, metadata={"format": "mlx"})
    again, _ = llama_mlx.load(vlm)
    ids = mx.array([[256, IMAGE_TOKEN, 65, 66, 67]])
    pixels = np.random.default_rng(0).standard_normal((1, 1, 4, 3, 28, 28)).astype(np.float32)
    logits = []
    for m in (model, again):
        cache = m.make_cache()
        m.attach_images(cache, pixels, np.array([[6]]), np.array([[[1, 1, 1, 1]]]))
        logits.append(np.array(m(ids, cache)))
    assert np.abs(logits[0] - logits[1]).max() == 0


def test_cli_generate_image_equals_transformers(folder, image_path):
    want, text = oracle(folder, [{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                  "text": "What is it?"}]}],
                        [image_path])
    r = run("generate", "-M", str(folder[0]), "--image", str(image_path), "--temp", "0", "--max-tokens", str(N),
            "What is it?")
    assert r.returncode == 0, r.stderr
    assert r.stdout == text + "\n"


def test_cli_image_errors(folder, tmp_path, image_path):
    from test_hostile import write_tiny_hf

    text_model = write_tiny_hf(tmp_path / "text")
    r = run("generate", "-M", str(text_model), "--image", str(image_path), "Hi")
    assert r.returncode == 1 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "reads text only" in r.stderr
    bad = tmp_path / "notes.png"
    bad.write_text("not a picture")
    r = run("generate", "-M", str(folder[0]), "--image", str(bad), "Hi")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "not an image" in r.stderr


@pytest.mark.parametrize("bits", [4, 8])
def test_convert_quantizes_the_language_model(folder, tmp_path, bits):
    """convert -q: quantized language model, float vision tower; loads back and stays close to float."""
    from llama_mlx.convert import convert
    from llama_mlx.quant import quantize

    out = tmp_path / f"q{bits}"
    result = convert(folder[0], out, quantize=True, bits=bits, group_size=32)
    assert result.quantization == {"group_size": 32, "bits": bits}
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == bits and config["model_type"] == "mllama"
    model, _ = llama_mlx.load(folder[0])
    quantized, processor = llama_mlx.load(out)
    assert "scales" in quantized.language_model.model.layers[1].cross_attn.q_proj
    assert "scales" not in quantized.vision_model.transformer.layers[0].self_attn.q_proj
    assert processor.image_processor.tile_size == 28
    ids = mx.array([[256, IMAGE_TOKEN, 65, 66, 67]])
    pixels = np.random.default_rng(0).standard_normal((1, 1, 4, 3, 28, 28)).astype(np.float32)
    in_memory, _ = llama_mlx.load(folder[0])
    quantize(in_memory.language_model, bits, 32)
    logits = []
    for m in (model, quantized, in_memory):
        cache = m.make_cache()
        m.attach_images(cache, pixels, np.array([[6]]), np.array([[[1, 1, 1, 1]]]))
        logits.append(np.array(m(ids, cache)))
    assert np.abs(logits[1] - logits[2]).max() == 0  # the folder holds exactly the quantized model
    err = np.abs(logits[0] - logits[1]).max() / np.abs(logits[0]).max()
    assert 0 < err < (1.0 if bits == 4 else 0.05)  # random tiny weights: 4 bits is coarse
    both = tmp_path / "both"
    convert(folder[0], both, quantize=True, bits=bits, group_size=32, quantize_vision=True)
    again, _ = llama_mlx.load(both)
    assert "scales" in again.vision_model.transformer.layers[0].self_attn.q_proj


def test_cli_convert_q(folder, tmp_path, image_path):
    out = tmp_path / "cli-q4"
    r = run("convert", str(folder[0]), str(out), "-q", "--q-group-size", "32", "--quantize-vision")
    assert r.returncode == 0, r.stderr
    model, _ = llama_mlx.load(out)
    assert "scales" in model.vision_model.transformer.layers[0].self_attn.q_proj
    r = run("generate", "-M", str(out), "--image", str(image_path), "--temp", "0", "--max-tokens", "4", "Hi")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr


def test_chat_session_and_cli_chat_image(folder, image_path, tmp_path):
    """ChatSession.add_user(text, image=...) and `/image PATH` in `llama-mlx chat`: two turns, the image
    encoded once, each answer equal to transformers on the conversation so far."""
    import os
    import subprocess

    from llama_mlx.chat import ChatSession
    from test_cli_generate import command

    model, processor = llama_mlx.load(folder[0])
    session = ChatSession(model, processor, max_tokens=N)
    session.add_user("What is it?", image=image_path)
    first = "".join(r.text for r in session.respond())
    session.add_user("Why?")
    second = "".join(r.text for r in session.respond())
    image_message = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}
    assert first == oracle(folder, [image_message], [image_path])[1]
    assert second == oracle(folder, [image_message, {"role": "assistant", "content": first},
                                     {"role": "user", "content": "Why?"}], [image_path])[1]

    env = dict(os.environ, LLAMA_MLX_HISTORY="off")
    r = subprocess.run([*command(), "chat", "-M", str(folder[0]), "--temp", "0", "--max-tokens", str(N)],
                       input=f"/image {tmp_path / 'missing.png'}\n/image {image_path}\nWhat is it?\nWhy?\n/exit\n",
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "missing.png: no such file" in r.stderr and "odd.png goes with your next message" in r.stdout
    assert first in r.stdout and second in r.stdout


def test_saved_vision_chats_are_checked(folder, image_path, tmp_path):
    """Only image paths are saved; a saved user message is text, or one image path and text."""
    from llama_mlx.chat import SESSION_FORMAT, ChatSession, SessionFileError

    model, processor = llama_mlx.load(folder[0])
    session = ChatSession(model, processor, max_tokens=2)
    session.add_user("What is it?", image=image_path.read_bytes())
    with pytest.raises(SessionFileError, match="cannot be saved: give its file path"):
        session.save(tmp_path / "bytes.json")
    for content in ([{"type": "image", "image": 5}, {"type": "text", "text": "x"}],
                    [{"type": "image", "image": "a.png"}, {"type": "image", "image": "b.png"}],
                    [{"type": "text", "text": "x"}, {"type": "image", "image": "a.png"}],
                    [{"type": "image", "image": "a.png", "extra": 1}, {"type": "text", "text": "x"}]):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"format": SESSION_FORMAT, "messages": [{"role": "user", "content": content}]}))
        with pytest.raises(SessionFileError, match="message 1 is not"):
            ChatSession(model, processor).load(bad)


def test_cli_chat_saves_and_resumes_a_vision_chat(folder, image_path, tmp_path):
    """`/save` after a turn with `/image`, then `--load` in a new process with the image file gone: the
    image's keys come from the saved cache (the conversation is not prefilled again), and the next answer equals
    transformers on the whole conversation."""
    import os
    import subprocess

    from test_cli_generate import command

    image = tmp_path / "gone.png"
    shutil.copyfile(image_path, image)
    env = dict(os.environ, LLAMA_MLX_HISTORY="off")
    chat = [*command(), "chat", "-M", str(folder[0]), "--temp", "0", "--max-tokens", str(N)]
    r = subprocess.run(chat, input=f"/image {image}\nWhat is it?\n/save {tmp_path / 'chat.json'}\n/exit\n",
                       capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "saved 1 exchange to" in r.stdout, r.stdout
    cached = re.search(r"and (\d+) cached tokens", r.stdout).group(1)
    saved = json.loads((tmp_path / "chat.json").read_text())
    assert saved["messages"][0]["content"][0] == {"type": "image", "image": str(image)}
    first = saved["messages"][1]["content"]
    image.unlink()
    r = subprocess.run([*chat, "--load", str(tmp_path / "chat.json")], input="Why?\n/exit\n", capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"{cached} tokens already in the KV cache" in r.stdout, r.stdout
    image_message = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}
    want = oracle(folder, [image_message, {"role": "assistant", "content": first}, {"role": "user", "content": "Why?"}],
                  [image_path])[1]
    assert want in r.stdout


def test_batch_of_text_prompts_runs_the_text_layers(folder):
    """A batch engine's caches (text alone) on a vision model: each row as generated alone."""
    model, processor = llama_mlx.load(folder[0])
    prompts = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Hello there, friend"}]]
    batch = llama_mlx.batch_generate(model, processor, prompts, max_tokens=6)
    alone = [llama_mlx.generate(model, processor, p, 6) for p in prompts]
    assert [getattr(r, "text", r) for r in getattr(batch, "texts", batch)] == alone


def test_raw_prompt_and_prompt_lookup_with_an_image(folder, image_path):
    """A plain-text prompt gets the image first, then BOS (Meta's base-model layout, which transformers'
    processor writes too); speculative decoding by prompt lookup gives the same greedy tokens."""
    from transformers import AutoTokenizer, MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    path, hf = folder
    tok = AutoTokenizer.from_pretrained(path)
    hf_processor = MllamaProcessor(image_processor=MllamaImageProcessorPil.from_pretrained(path), tokenizer=tok,
                                   chat_template=CHAT_TEMPLATE)
    inputs = hf_processor(images=[[Image.open(image_path)]], text=["<|image|>The picture shows"],
                          add_special_tokens=False, return_tensors="pt")
    assert inputs["input_ids"][0, :2].tolist() == [IMAGE_TOKEN, 256]
    with torch.no_grad(), meta_semantics():
        out = hf.generate(**inputs, max_new_tokens=N, do_sample=False)
    want = out[0, inputs["input_ids"].shape[1]:].tolist()
    model, processor = llama_mlx.load(path)
    assert tokens(model, processor, "The picture shows", images=[image_path]) == want
    question = [{"role": "user", "content": "What is it? What is it?"}]
    plain = tokens(model, processor, question, images=[image_path])
    assert tokens(model, processor, question, images=[image_path], prompt_lookup=2) == plain
