"""Quantized matmuls spread over CPU threads (`quant.use_cpu_threads`) give mlx-lm's logits."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from llama_mlx import quant
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
    assert quant.use_cpu_threads(ours, threads=3) == 3
    layer = ours.layers[0]
    assert isinstance(layer.mlp, quant.ThreadedMLP) and isinstance(layer.self_attn.q_proj, quant.ThreadedQuantizedLinear)
    assert isinstance(ours.model.embed_tokens, quant.ThreadedQuantizedEmbedding)
    assert len(quant._row_parts(layer.mlp.gate_proj, 3)) == 3  # 1024 rows: three blocks

    ids = np.random.default_rng(6).integers(0, 1024, size=24)
    cache, their_cache = make_prompt_cache(len(ours.layers)), mlx_lm_cache(theirs)
    got = [np.array(ours(mx.array(ids[None, :16]), cache))]
    want = [np.array(theirs(mx.array(ids[None, :16]), cache=their_cache))]
    for t in ids[16:]:
        got.append(np.array(ours(mx.array([[int(t)]]), cache)))
        want.append(np.array(theirs(mx.array([[int(t)]]), cache=their_cache)))
    np.testing.assert_allclose(np.concatenate(got, 1), np.concatenate(want, 1), atol=1e-4, rtol=0)
