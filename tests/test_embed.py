"""llama_mlx.embed against transformers: LlamaModel's last_hidden_state (after the final norm) on the
same random float32 weights, pooled and normalised in numpy, the texts tokenized by transformers'
tokenizer."""

import mlx.core as mx
import numpy as np
import pytest
import torch

import llama_mlx
from llama_mlx.errors import ArgumentError, ContextLengthError, TokenIdError
from llama_mlx.model import Model, ModelArgs
from llama_mlx.tokenizer import load_tokenizer
from test_server import MODEL

CONFIG = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 49152,
          "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 64, "tie_word_embeddings": True}
TEXTS = ["The cat sat on the mat.", "Embeddings", "A much longer sentence, so that the batch is padded on the right "
         "and the pads must not leak into the shorter rows."]


@pytest.fixture(scope="module")
def pair():
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    torch.manual_seed(0)
    hf = LlamaModel(LlamaConfig(**CONFIG)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.25)
    ours = Model(ModelArgs.from_dict(CONFIG))
    ours.load_weights([("model." + k, mx.array(v.detach().numpy())) for k, v in hf.state_dict().items()], strict=True)
    mx.eval(ours.parameters())
    return hf, AutoTokenizer.from_pretrained(str(MODEL)), ours, load_tokenizer(MODEL)


def oracle(hf, hf_tok, texts, pooling):
    out = []
    for text in texts:
        ids = hf_tok(text)["input_ids"]
        with torch.no_grad():
            h = hf(torch.tensor([ids])).last_hidden_state[0].numpy()
        v = h.mean(0) if pooling == "mean" else h[-1]
        out.append(v / np.linalg.norm(v))
    return np.stack(out)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_embed_matches_transformers(pair, pooling):
    hf, hf_tok, ours, tok = pair
    assert llama_mlx.embed is not None and "embed" in llama_mlx.__all__
    got = llama_mlx.embed(ours, tok, TEXTS, pooling=pooling, batch_size=2)
    assert got.shape == (3, 64) and got.dtype == mx.float32
    np.testing.assert_allclose(np.array(got), oracle(hf, hf_tok, TEXTS, pooling), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(np.array(got), axis=1), 1, atol=1e-5)


def test_embed_token_ids_and_raw(pair):
    hf, hf_tok, ours, tok = pair
    ids = hf_tok(TEXTS[0])["input_ids"]
    by_ids = np.array(llama_mlx.embed(ours, tok, [ids]))
    np.testing.assert_allclose(by_ids, np.array(llama_mlx.embed(ours, tok, TEXTS[0])), atol=1e-6)
    raw = np.array(llama_mlx.embed(ours, tok, ids, normalize=False))[0]
    with torch.no_grad():
        want = hf(torch.tensor([ids])).last_hidden_state[0].numpy().mean(0)
    np.testing.assert_allclose(raw, want, atol=1e-4, rtol=0)


def test_embed_refuses_bad_input(pair):
    _, _, ours, tok = pair
    with pytest.raises(ArgumentError, match="pooling"):
        llama_mlx.embed(ours, tok, ["x"], pooling="cls")
    with pytest.raises(ArgumentError, match="empty"):
        llama_mlx.embed(ours, tok, [""])
    with pytest.raises(ArgumentError):
        llama_mlx.embed(ours, tok, [])
    with pytest.raises(TokenIdError):
        llama_mlx.embed(ours, tok, [[1, 10**6]])
    with pytest.raises(ContextLengthError, match="65 tokens"):
        llama_mlx.embed(ours, tok, [[1] * 65])


def test_engine_call_runs_on_the_worker_thread(pair):
    """Engine.call, which the server's embeddings go through: on the model's thread, errors raised back."""
    import asyncio
    import threading

    from llama_mlx.engine import Engine, EngineClosedError

    _, _, ours, tok = pair
    engine = Engine(lambda: (ours, tok), max_concurrency=1, prompt_cache_bytes=0, decode_concurrency=1).start()
    engine.wait_ready(120)

    async def main():
        name = await engine.call(lambda model, tokenizer: threading.current_thread().name)
        vector = await engine.call(lambda model, tokenizer: llama_mlx.embed(model, tokenizer, ["x y"]).tolist())
        with pytest.raises(ZeroDivisionError):
            await engine.call(lambda model, tokenizer: 1 / 0)
        return name, vector

    name, vector = asyncio.run(main())
    assert name == "llama-mlx-engine"
    np.testing.assert_allclose(vector, np.array(llama_mlx.embed(ours, tok, ["x y"])), atol=1e-6)
    engine.close()
    with pytest.raises(EngineClosedError):
        asyncio.run(engine.call(lambda model, tokenizer: 0))
