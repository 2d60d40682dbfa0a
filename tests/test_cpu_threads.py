"""Quantized matmuls spread over CPU threads (`backends.cpu.use_threads`) give mlx-lm's logits."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from llama_mlx import backends
from llama_mlx.backends import cpu, fusion
from llama_mlx.cache import make_prompt_cache
from llama_mlx.model import Model, ModelArgs

# Wide enough that every projection and the tied head split into row blocks (256 rows or more each).
CONFIG = {
    "model_type": "llama", "hidden_size": 512, "num_hidden_layers": 2, "intermediate_size": 1024,
    "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": 1024, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "tie_word_embeddings": True,
}


def test_threaded_model_gives_mlx_lm_logits():
    from mlx_lm.models import llama as mlx_lm_llama
    from mlx_lm.models.cache import make_prompt_cache as mlx_lm_cache

    mx.random.seed(5)
    theirs = mlx_lm_llama.Model(mlx_lm_llama.ModelArgs.from_dict(CONFIG))
    nn.quantize(theirs, group_size=64, bits=4)
    ours = Model(ModelArgs.from_dict(CONFIG))
    nn.quantize(ours, group_size=64, bits=4)
    ours.load_weights(tree_flatten(theirs.parameters()), strict=True)
    assert cpu.use_threads(ours, threads=3) == 3
    layer = ours.layers[0]
    assert isinstance(layer.mlp, cpu.ThreadedMLP) and isinstance(layer.self_attn.q_proj, cpu.ThreadedQuantizedLinear)
    assert isinstance(ours.model.embed_tokens, cpu.ThreadedQuantizedEmbedding)
    assert len(cpu.row_parts(layer.mlp.gate_proj, 3)) == 3  # 1024 rows: three blocks

    ids = np.random.default_rng(6).integers(0, 1024, size=24)
    cache, their_cache = make_prompt_cache(len(ours.layers)), mlx_lm_cache(theirs)
    got = [np.array(ours(mx.array(ids[None, :16]), cache))]
    want = [np.array(theirs(mx.array(ids[None, :16]), cache=their_cache))]
    for t in ids[16:]:
        got.append(np.array(ours(mx.array([[int(t)]]), cache)))
        want.append(np.array(theirs(mx.array([[int(t)]]), cache=their_cache)))
    np.testing.assert_allclose(np.concatenate(got, 1), np.concatenate(want, 1), atol=1e-4, rtol=0)


def test_prepare_on_the_cpu_threads_float32_activations_and_no_fusion():
    from mlx_lm.models import llama as mlx_lm_llama

    mx.random.seed(7)
    theirs = mlx_lm_llama.Model(mlx_lm_llama.ModelArgs.from_dict(CONFIG))
    nn.quantize(theirs, group_size=64, bits=4)  # float32 scales: mlx-lm then computes in float32
    ours = Model(ModelArgs.from_dict(CONFIG))
    nn.quantize(ours, group_size=64, bits=4)
    half = [(k, v.astype(mx.float16) if v.dtype == mx.float32 else v) for k, v in tree_flatten(theirs.parameters())]
    ours.load_weights(half, strict=True)
    theirs.load_weights([(k, v.astype(mx.float32)) if v.dtype == mx.float16 else (k, v) for k, v in half])
    tokens = mx.array(np.random.default_rng(8).integers(0, 1024, size=(1, 12)))
    want = np.array(theirs(tokens))
    in_half = np.array(ours(tokens).astype(mx.float32))  # float16 weights, float16 activations
    assert backends.compute_dtype(mx.cpu) == mx.float32 and backends.compute_dtype(mx.gpu) is None
    assert backends.prepare(ours, threads=3) is ours
    assert ours.model.compute_dtype == mx.float32
    layer = ours.layers[0]
    assert not isinstance(layer.self_attn, fusion.FusedAttention) and "q_proj" in layer.self_attn
    assert isinstance(layer.mlp, cpu.ThreadedMLP) and layer.mlp.threads == 3
    got = ours(tokens)
    assert got.dtype == mx.float32
    err, err_half = np.abs(np.array(got) - want).max(), np.abs(in_half - want).max()
    # Measured: 0.0031 with float32 activations (float16 scales and norms still round), 0.031 without.
    assert err < 0.005 and err_half > 5 * err
    assert isinstance(backends.prepare(ours, fuse=True, threads=3).layers[0].mlp, fusion.FusedMLP)


def test_llama_mlx_threads_environment_sets_the_default(monkeypatch):
    model = Model(ModelArgs.from_dict(CONFIG))
    nn.quantize(model, group_size=64, bits=4)
    monkeypatch.setenv("LLAMA_MLX_THREADS", "1")
    assert cpu.use_threads(model) == 1
    assert type(model.layers[0].mlp).__name__ == "MLP"  # left as it was
    monkeypatch.setenv("LLAMA_MLX_THREADS", "3")
    assert cpu.use_threads(model) == 3 and model.layers[0].mlp.threads == 3
    assert cpu.use_threads(model, threads=2) == 2  # an explicit count wins
