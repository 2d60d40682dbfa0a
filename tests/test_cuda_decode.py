"""The fused CUDA decode step's wiring, checked on the CPU against mlx-lm.

The CUDA kernels cannot run here, so each is replaced by MLX ops computing what its docstring
says (`fused_matvec`: residual + RMSNorm / SwiGLU prologue, 4-bit matvec, RoPE and q/k/v split;
`decode_attention`: attention of row b over its first offset[b] + 1 buffer positions). The step that
`backends.decode_step` compiles around them (residual stream, norms, cache writes at an array offset,
retracing when the cache grows) must then give mlx-lm's logits token by token. The kernels
themselves are compared with the plain graph on the GPU by `benchmarks/decode_probe.py`.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from llama_mlx import backends
from llama_mlx.backends import cuda, fusion
from llama_mlx.cache import make_prompt_cache
from llama_mlx.model import Model, ModelArgs

CONFIG = {
    "model_type": "llama", "hidden_size": 128, "num_hidden_layers": 2, "intermediate_size": 256,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "max_position_embeddings": 131072,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 64},
}


def matvec(w, scales, biases, group_size, *, x=None, residual=None, gate_up=None, rope=None):
    h = None
    if residual is not None:
        a, b, weight, eps = residual
        h = a + b
        x = mx.fast.rms_norm(h, weight, eps)
    elif gate_up is not None:
        gate, up = mx.split(gate_up, 2)
        x = nn.silu(gate) * up
    out = mx.quantized_matmul(x[None], w, scales, biases, transpose=True, group_size=group_size, bits=4)[0]
    if rope is not None:
        nq, nkv, D = rope["n_heads"], rope["n_kv_heads"], rope["head_dim"]

        def rotate(t):
            return mx.fast.rope(t, D, traditional=rope["traditional"], base=None, scale=1.0,
                                offset=rope["offset"][0], freqs=1.0 / rope["inv_freq"])

        q = rotate(out[: nq * D].reshape(1, nq, 1, D))
        k = rotate(out[nq * D : (nq + nkv) * D].reshape(1, nkv, 1, D))
        v = out[(nq + nkv) * D :].reshape(1, nkv, 1, D)
        return (q, k, v) if h is None else (q, k, v, h)
    return out if h is None else (out, h)


def attention(q, keys, values, offset, scale):
    """Row b attends over its positions 0..offset[b]."""
    mask = (mx.arange(keys.shape[2])[None] <= offset[:, None])[:, None, None]
    return mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask=mask).reshape(-1)


@pytest.mark.parametrize("tied, traditional", [(True, False), (False, True)])
def test_fused_step_gives_mlx_lm_logits_token_by_token(monkeypatch, tied, traditional):
    from mlx_lm.models import llama as mlx_lm_llama
    from mlx_lm.models.cache import make_prompt_cache as mlx_lm_cache

    monkeypatch.setattr(cuda, "supported", lambda model: True)
    monkeypatch.setattr(cuda.kernels, "fused_matvec", matvec)
    monkeypatch.setattr(cuda.kernels, "decode_attention", attention)

    config = dict(CONFIG, tie_word_embeddings=tied, rope_traditional=traditional)
    mx.random.seed(3)
    theirs = mlx_lm_llama.Model(mlx_lm_llama.ModelArgs.from_dict(config))
    nn.quantize(theirs, group_size=32, bits=4)
    for _, m in theirs.named_modules():  # norms start at ones: make each one distinguishable
        if isinstance(m, nn.RMSNorm):
            m.weight = 1.0 + 0.3 * mx.random.normal(m.weight.shape)
    ours = Model(ModelArgs.from_dict(config))
    nn.quantize(ours, group_size=32, bits=4)
    ours.load_weights(tree_flatten(theirs.parameters()), strict=True)
    fusion.fuse(ours)

    ids = np.random.default_rng(4).integers(0, 256, size=262)
    prompt, steps = mx.array(ids[None, :250]), ids[250:]  # the cache grows past 256: a second trace
    cache, their_cache = make_prompt_cache(len(ours.layers)), mlx_lm_cache(theirs)
    step = backends.decode_step(ours, cache)
    assert step.kind == "fused"
    ours(prompt, cache)
    theirs(prompt, cache=their_cache)
    got, want = [], []
    for t in steps:
        token = mx.array([[int(t)]])
        got.append(np.array(step(token)))
        want.append(np.array(theirs(token, cache=their_cache)[:, -1, :]))
    np.testing.assert_allclose(np.concatenate(got), np.concatenate(want), atol=1e-4, rtol=0)
    assert cache[0].offset == 262 and cache[0].keys.shape[2] == 512
