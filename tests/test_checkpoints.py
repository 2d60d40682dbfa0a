"""Checkpoint readers: Meta (2 shards, safe unpickling), Hugging Face, GGUF; logits against the references."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import test_checkpoints_support as S
from llama_mlx import load
from llama_mlx.checkpoints import read_checkpoint
from llama_mlx.checkpoints.keymap import meta_to_hf
from llama_mlx.checkpoints.meta import config_from_params
from llama_mlx.checkpoints.safe_pickle import load_pth
from llama_mlx.errors import CheckpointError, TokenizerError, UnsafeCheckpointError
from conftest import load_checkpoint

import torch


@pytest.fixture(scope="module")
def state_dict():
    return S.meta_state_dict(seed=0)


@pytest.fixture(scope="module")
def reference(state_dict):
    return S.meta_reference_logits(state_dict)


@pytest.fixture(scope="module")
def meta_folder(tmp_path_factory, state_dict):
    return S.write_meta(tmp_path_factory.mktemp("meta") / "Llama-tiny", state_dict, shards=2)


def test_meta_two_shards_match_the_reference(meta_folder, reference):
    model, tokenizer = load(meta_folder, allow_vocab_mismatch=True)
    np.testing.assert_allclose(S.our_logits(model), reference, atol=1e-4, rtol=1e-4)
    assert tokenizer.encode("This is a test sentence.", bos=True, eos=True) == [
        128000, 2028, 374, 264, 1296, 11914, 13, 128001]


def test_meta_shards_merge_by_llama3_rules(meta_folder, state_dict):
    config, weights, _ = load_checkpoint(meta_folder)
    assert config["rope_traditional"] is True and config["tie_word_embeddings"] is False
    assert config["intermediate_size"] == S.FFN and config["rope_scaling"] is None
    assert len(weights) == len(state_dict)
    for name, want in state_dict.items():  # q/k rows stay in Meta's interleaved layout
        np.testing.assert_array_equal(np.array(weights[meta_to_hf(name)]), want.numpy(), err_msg=name)


def test_bfloat16_strided_and_offset_tensors(tmp_path):
    base = torch.randn(6, 8).to(torch.bfloat16)
    sd = {"plain": base, "t": base.t(), "slice": base[2:, 1::2], "half": torch.randn(3, 5).half(),
          "long": torch.arange(12).view(3, 4)[:, 1:], "nested": {"x": torch.ones(2)}}
    torch.save(sd, tmp_path / "x.pth")
    got = load_pth(tmp_path / "x.pth")
    assert set(got) == {"plain", "t", "slice", "half", "long", "nested.x"}
    for name, t in [("plain", base), ("t", base.t()), ("slice", base[2:, 1::2])]:
        a = got[name].to_mlx()
        assert a.dtype == mx.bfloat16
        np.testing.assert_array_equal(np.array(a.astype(mx.float32)), t.float().numpy())
    np.testing.assert_array_equal(np.array(got["half"].to_mlx()), sd["half"].numpy())
    np.testing.assert_array_equal(np.array(got["long"].to_mlx()), sd["long"].numpy())


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Eval:
    def __reduce__(self):
        return (eval, ("__import__('os').getpid()",))


@pytest.mark.parametrize("payload", ["system", "eval", "torch_load"])
def test_a_pickle_that_would_run_code_is_refused(tmp_path, payload):
    marker = tmp_path / "pwned"
    evil = {"system": _RunsCode(marker), "eval": _Eval(), "torch_load": torch.load}[payload]
    path = tmp_path / "consolidated.00.pth"
    torch.save({"tok_embeddings.weight": torch.ones(2, 2), "x": evil}, path)
    with pytest.raises(UnsafeCheckpointError) as e:
        load_pth(path)
    msg = str(e.value)
    assert str(path) in msg and "refused" in msg and "\n" not in msg
    assert {"system": "system", "eval": ".eval", "torch_load": "torch.serialization.load"}[payload] in msg
    assert not marker.exists()


def test_truncated_pth_is_a_clear_error(meta_folder, tmp_path):
    data = (meta_folder / "consolidated.00.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pth: truncated or corrupt"):
        load_pth(tmp_path / "cut.pth")


@pytest.mark.parametrize("tied", [False, True])
def test_hugging_face_matches_transformers(tmp_path, state_dict, reference, tied):
    # Llama 3.1 RoPE scaling as transformers 5 writes it (rope_parameters) must reach the model.
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}  # tiny window, so scaling shows in 12 tokens
    sd = S.meta_state_dict(seed=1, tied=True) if tied else state_dict
    want = S.write_hf(tmp_path, sd, tied=tied, rope_scaling=scaling)
    assert "rope_parameters" in json.loads((tmp_path / "config.json").read_text())
    model, tokenizer = load(tmp_path, allow_vocab_mismatch=True)
    np.testing.assert_allclose(S.our_logits(model), want, atol=1e-4, rtol=1e-4)
    if not tied:  # same weights as the unscaled reference: the scaling must have changed the logits
        assert np.abs(want - reference).max() > 1e-3
    assert {128001, 128008, 128009} <= set(tokenizer.stop_tokens)  # generation_config.json eos ids


def test_gguf_f32_tied_matches_the_reference(tmp_path):
    sd = S.meta_state_dict(seed=2, tied=True)
    S.write_gguf(tmp_path / "tiny.gguf", sd, S.TINY_PARAMS)
    model, tokenizer = load(tmp_path / "tiny.gguf", allow_vocab_mismatch=True)
    assert model.args.tie_word_embeddings and model.args.rope_traditional
    np.testing.assert_allclose(S.our_logits(model), S.meta_reference_logits(sd), atol=1e-4, rtol=1e-4)
    assert tokenizer.vocab_size == 49152  # from the GGUF's tokenizer metadata


def test_gguf_quantized_and_half_tensors_match_the_reference(tmp_path):
    sd = S.meta_state_dict(seed=3)
    types = {"token_embd": "Q8_0", "attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "F16", "attn_output": "BF16",
             "ffn_gate": "Q4_1", "ffn_up": "Q8_0", "ffn_down": "Q4_0", "output": "Q4_1"}
    held = S.write_gguf(tmp_path / "q.gguf", sd, S.TINY_PARAMS, types)
    config, weights, _ = load_checkpoint(tmp_path / "q.gguf")
    assert config["quantization"] == {"group_size": 32, "bits": 4, "model.embed_tokens": {"group_size": 32, "bits": 8},
                                      "model.layers.0.mlp.up_proj": {"group_size": 32, "bits": 8},
                                      "model.layers.1.mlp.up_proj": {"group_size": 32, "bits": 8}}
    assert weights["model.layers.0.self_attn.o_proj.weight"].dtype == mx.bfloat16  # read exactly, not via f16
    model, _ = load(tmp_path / "q.gguf", dtype="float32", allow_vocab_mismatch=True)
    np.testing.assert_allclose(S.our_logits(model), S.meta_reference_logits(held), atol=2e-4, rtol=1e-4)


def test_unsupported_gguf_tensor_type(tmp_path):
    sd = S.meta_state_dict(seed=4)
    # Q5_0 is supported now (test_gguf_quants.py); MXFP4 is a type no MLX affine grid holds
    S.write_gguf(tmp_path / "fp4.gguf", sd, S.TINY_PARAMS, {"attn_q": "MXFP4"})
    with pytest.raises(CheckpointError, match=r"fp4\.gguf: unsupported GGUF tensor type MXFP4 \(tensor 'blk\.0\.attn_q"):
        read_checkpoint(tmp_path / "fp4.gguf")


def test_smollm2_gguf_answers_paris(smollm2_gguf_path):
    from llama_mlx import generate

    model, tokenizer = load(smollm2_gguf_path)
    answer = generate(model, tokenizer, [{"role": "user", "content": "What is the capital of France?"}],
                      max_tokens=16)
    assert "Paris" in answer


def test_rope_factor_is_inferred_from_the_shape_or_given():
    base = {"n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256, "multiple_of": 256, "use_scaled_rope": True,
            "rope_theta": 500000.0}
    llama32_1b = config_from_params({**base, "dim": 2048, "n_layers": 16, "ffn_dim_multiplier": 1.5}, Path("p"))
    llama31_8b = config_from_params({**base, "dim": 4096, "n_layers": 32, "ffn_dim_multiplier": 1.3,
                                     "multiple_of": 1024}, Path("p"))
    assert llama32_1b["rope_scaling"]["factor"] == 32.0 and llama32_1b["intermediate_size"] == 8192
    assert llama31_8b["rope_scaling"]["factor"] == 8.0 and llama31_8b["intermediate_size"] == 14336
    forced = config_from_params({**base, "dim": 2048, "n_layers": 16}, Path("p"), rope_factor=16)
    assert forced["rope_scaling"]["factor"] == 16.0
    assert config_from_params({**base, "use_scaled_rope": False, "dim": 4096, "n_layers": 32},
                              Path("p"))["rope_scaling"] is None


def test_each_reader_names_its_tokenizer_source(tmp_path, meta_folder):
    from llama_mlx.tokenizer import load_tokenizer

    source = read_checkpoint(meta_folder).tokenizer_source
    assert (source.kind, source.path) == ("tiktoken", meta_folder / "tokenizer.model")
    assert load_tokenizer(source).encode("This is a test sentence.") == [2028, 374, 264, 1296, 11914, 13]

    sd = S.meta_state_dict(seed=3)
    S.write_hf(tmp_path / "hf", sd)
    source = read_checkpoint(tmp_path / "hf").tokenizer_source
    assert source.kind == "hf-json" and source.path == tmp_path / "hf"
    assert {128001, 128008, 128009} <= set(source.eos_token_ids)  # transformers' generation_config.json

    S.write_gguf(tmp_path / "tiny.gguf", sd, S.TINY_PARAMS)
    source = read_checkpoint(tmp_path / "tiny.gguf").tokenizer_source
    assert (source.kind, source.path) == ("gguf", tmp_path / "tiny.gguf")
    import gguf  # the gguf package's reader as the oracle of the metadata the source carries

    field = gguf.GGUFReader(str(tmp_path / "tiny.gguf")).fields["tokenizer.ggml.tokens"]
    tokens = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    assert source.gguf_metadata["tokenizer.ggml.tokens"] == tokens and len(tokens) == 49152

    bare = S.write_meta(tmp_path / "bare", sd, shards=1, tokenizer=False)
    assert read_checkpoint(bare).tokenizer_source is None  # readable weights, no tokenizer beside them
    with pytest.raises(TokenizerError, match=re.escape(f"{bare}: no tokenizer.model, tokenizer.json")):
        load(bare)
