"""The MLX transformer against Meta's reference and transformers' LlamaForCausalLM."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch

from llama_mlx.backends import fusion
from llama_mlx.cache import make_prompt_cache
from llama_mlx.config import config_from_meta_params
from llama_mlx.model import Model, ModelArgs, rope_frequencies
from oracles import TINY_META_PARAMS, meta_reference, meta_to_hf_names, random_meta_state_dict


def build(config: dict, weights: dict) -> Model:
    if "dim" in config:  # a Meta params.json
        config = config_from_meta_params(config)
    model = Model(ModelArgs.from_dict(config))
    # transformers' state dict carries the tied head too; the model computes it from the embedding.
    skip = "lm_head." if model.args.tie_word_embeddings else None
    weights = {k: mx.array(v) for k, v in weights.items() if not (skip and k.startswith(skip))}
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def meta_pair():
    params = dict(TINY_META_PARAMS)
    sd = random_meta_state_dict(params, seed=1)
    ref = meta_reference(params, sd, max_seq_len=64)
    ours = build(params, meta_to_hf_names(sd))
    return ref, ours


def test_meta_parity_whole_prompt(meta_pair):
    ref, ours = meta_pair
    tokens = np.random.default_rng(0).integers(0, 256, size=(2, 24))
    want = ref(torch.tensor(tokens), 0).numpy()
    got = np.array(ours(mx.array(tokens)))
    assert got.shape == (2, 24, 256)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def _token_by_token(ref, model, tokens, prompt: int):
    """Logits of a prompt, then one token at a time, on both sides with their KV caches."""
    cache = make_prompt_cache(len(model.layers))
    want = [ref(torch.tensor(tokens[:, :prompt]), 0).numpy()]
    got = [np.array(model(mx.array(tokens[:, :prompt]), cache))]
    for pos in range(prompt, tokens.shape[1]):
        want.append(ref(torch.tensor(tokens[:, pos : pos + 1]), pos).numpy())
        got.append(np.array(model(mx.array(tokens[:, pos : pos + 1]), cache)))
    np.testing.assert_allclose(np.concatenate(got, 1), np.concatenate(want, 1), atol=1e-4, rtol=0)
    return cache


def test_meta_parity_token_by_token_with_cache(meta_pair):
    ref, ours = meta_pair
    cache = _token_by_token(ref, ours, np.random.default_rng(1).integers(0, 256, size=(1, 20)), 5)
    assert cache[0].offset == 20


def test_fused_projections_match_meta_token_by_token(meta_pair):
    # Fused q/k/v and gate/up: a prompt runs them as row blocks, single tokens as one matmul each.
    ref, ours = meta_pair
    fused = fusion.fuse(build(TINY_META_PARAMS, {k: np.array(v) for k, v in _flat(ours).items()}))
    assert "qkv_proj" in fused.layers[0].self_attn and "gate_up_proj" in fused.layers[0].mlp
    assert isinstance(fused.layers[0].self_attn, fusion.FusedAttention) and isinstance(fused.layers[0].mlp, fusion.FusedMLP)
    assert "q_proj" not in fused.layers[0].self_attn and "gate_proj" not in fused.layers[0].mlp
    _token_by_token(ref, fused, np.random.default_rng(2).integers(0, 256, size=(1, 16)), 6)


def _flat(model):
    from mlx.utils import tree_flatten

    return dict(tree_flatten(model.parameters()))


HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 300,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "max_position_embeddings": 131072,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "tie_word_embeddings": True,
    "attention_bias": False,
    "mlp_bias": False,
    "hidden_act": "silu",
}


def test_transformers_parity_llama3_rope_tied_embeddings():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**HF_CONFIG)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.25)
    weights = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    ours = build(HF_CONFIG, weights)
    # A shorter original context (64) puts these positions far past it: the scaling matters.
    tokens = np.random.default_rng(3).integers(0, 300, size=(1, 40))
    prefix = np.random.default_rng(4).integers(0, 300, size=(1, 200))
    full = np.concatenate([prefix, tokens], 1)
    with torch.no_grad():
        want = hf(torch.tensor(full)).logits.numpy()
    cache = make_prompt_cache(2)
    got_prefix = np.array(ours(mx.array(prefix), cache))
    got_rest = np.array(ours(mx.array(tokens), cache))
    np.testing.assert_allclose(np.concatenate([got_prefix, got_rest], 1), want, atol=1e-4, rtol=0)

    # Without the llama3 scaling the same weights give different logits at these positions.
    unscaled = build({**HF_CONFIG, "rope_scaling": None}, weights)
    assert np.abs(np.array(unscaled(mx.array(full))) - want).max() > 1e-2


@pytest.mark.parametrize(
    "name, params, hidden",
    [
        ("3-8B", {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256, "multiple_of": 1024, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True}, 14336),
        ("3-70B", {"dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "vocab_size": 128256, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True}, 28672),
        ("3.2-1B", {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256, "multiple_of": 256, "ffn_dim_multiplier": 1.5, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True}, 8192),
        ("3.2-3B", {"dim": 3072, "n_layers": 28, "n_heads": 24, "n_kv_heads": 8, "vocab_size": 128256, "multiple_of": 256, "ffn_dim_multiplier": 1.0, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True}, 8192),
    ],
)
def test_real_shapes_ffn_width_and_rope(name, params, hidden):
    from llama.model import FeedForward

    args = ModelArgs.from_dict(config_from_meta_params(json.loads(json.dumps(params))))
    assert args.intermediate_size == hidden
    assert args.head_dim == params["dim"] // params["n_heads"]
    # Meta's own FeedForward computes the same width (built on the meta device: no memory).
    with torch.device("meta"):
        from oracles import _init_fairscale

        _init_fairscale()
        ff = FeedForward(params["dim"], 4 * params["dim"], params["multiple_of"], params["ffn_dim_multiplier"])
    assert ff.w1.weight.shape[0] == hidden
    factor = 32.0 if name.startswith("3.2") else 8.0
    assert args.rope_scaling["factor"] == factor
    # transformers' llama3 rope initialiser is the oracle for the scaled frequencies.
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(
        hidden_size=params["dim"], num_attention_heads=params["n_heads"], rope_theta=params["rope_theta"],
        rope_scaling=args.rope_scaling, max_position_embeddings=131072,
    )
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ours = np.array(rope_frequencies(args.head_dim, args.rope_theta, args.rope_scaling))
    np.testing.assert_allclose(ours, inv_freq.numpy(), rtol=1e-6)


def test_quantized_models_stay_close_to_float(meta_pair):
    from llama_mlx.quant import quantize

    _, ours = meta_pair
    weights = {k: np.array(v) for k, v in _flat(ours).items()}
    tokens = mx.array(np.random.default_rng(5).integers(0, 256, size=(1, 32)))
    ref = np.array(ours(tokens))
    errors, correlation = {}, {}
    for bits in (4, 8):
        q = build(TINY_META_PARAMS, weights)
        entry = quantize(q, bits=bits, group_size=32)
        assert entry == {"group_size": 32, "bits": bits}
        assert isinstance(q.layers[0].self_attn.q_proj, nn.QuantizedLinear)
        assert isinstance(q.model.embed_tokens, nn.QuantizedEmbedding)
        got = np.array(q(tokens))
        errors[bits] = np.abs(got - ref).max() / np.abs(ref).max()
        correlation[bits] = np.corrcoef(got.ravel(), ref.ravel())[0, 1]
    # Measured on these Gaussian weights (the hardest case for 4 bits), group 32:
    # 4-bit: max error 0.36 of the largest logit, correlation 0.962; 8-bit: 0.021, 0.9998.
    assert errors[8] < 0.04 and correlation[8] > 0.999
    assert errors[4] < 0.5 and correlation[4] > 0.94
    assert errors[8] < errors[4] / 8
