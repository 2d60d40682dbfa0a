"""The Llama 3 transformer in MLX, after Meta's reference `llama/model.py`.

Parameter names follow Hugging Face / mlx-lm (`model.layers.N.self_attn.q_proj`, ...) so that
mlx-community folders load unchanged. The KV cache is passed in, never owned by the model. The
model is plain: activations' dtype, fusion and threading are set from outside by `backends.prepare`.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .cache import KVCache

__all__ = [
    "MLP",
    "Attention",
    "LlamaModel",
    "Model",
    "ModelArgs",
    "RoPE",
    "TransformerBlock",
    "rope_frequencies",
    "swiglu",
]


@dataclass
class ModelArgs:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: Optional[dict] = None
    rope_traditional: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 8192
    attention_bias: bool = False
    mlp_bias: bool = False
    model_type: str = "llama"
    quantization: Optional[dict] = field(default=None, repr=False)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, config: dict) -> "ModelArgs":
        """Build from a Hugging Face config.json dict; unknown keys are ignored."""
        names = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in config.items() if k in names})


def rope_frequencies(head_dim: int, theta: float, scaling: Optional[dict]) -> mx.array:
    """Per-pair inverse frequencies, with Llama 3.1 "llama3" scaling when configured."""
    inv_freq = 1.0 / (theta ** (mx.arange(0, head_dim, 2, dtype=mx.float32) / head_dim))
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind != "llama3":
        raise ValueError(f"unsupported rope_scaling type {kind!r}")
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = mx.where(wavelen > old_context / low, inv_freq / factor, blended)
    return mx.where(wavelen < old_context / high, inv_freq, scaled)


class RoPE(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.dims = args.head_dim
        self.traditional = args.rope_traditional
        # mx.fast.rope takes periods (1/frequency); kept out of the parameters.
        self._periods = 1.0 / rope_frequencies(args.head_dim, args.rope_theta, args.rope_scaling)

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        return mx.fast.rope(
            x, self.dims, traditional=self.traditional, base=None, scale=1.0,
            offset=offset, freqs=self._periods,
        )


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = self.head_dim**-0.5
        dim, bias = args.hidden_size, args.attention_bias
        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=bias)
        self.rope = RoPE(args)

    def __call__(self, x: mx.array, mask: Optional[mx.array | str], cache: Optional[KVCache]) -> mx.array:
        B, L, D = x.shape
        q, k, v = self.project(x, cache.offset if cache is not None else 0)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        # Grouped-query attention: SDPA broadcasts the K/V heads, nothing is repeated.
        out = scaled_dot_product_attention(q, k, v, self.scale, mask, cache)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def project(self, x: mx.array, offset: int | mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Queries and keys rotated to `offset`, and values: each (B, heads, L, head_dim)."""
        B, L, _ = x.shape
        # (B, L, heads * head_dim) -> (B, heads, L, head_dim)
        q = self.rope(self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3), offset)
        k = self.rope(self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3), offset)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        return q, k, v


def scaled_dot_product_attention(q, k, v, scale, mask, cache):
    if cache is not None and hasattr(cache, "attention"):  # quantized caches attend on their own
        return cache.attention(q, k, v, scale, mask)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, hidden, bias = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


@partial(mx.compile, shapeless=True)
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    # Compiled: one fused kernel instead of three elementwise ones per layer.
    return nn.silu(gate) * up


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask, cache) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        # Activations' dtype (None: the weights'); the backend seam sets it for the device.
        self.compute_dtype: Optional[mx.Dtype] = None

    def __call__(self, tokens: mx.array, cache: Optional[list] = None, mask=None) -> mx.array:
        h = self.embed_tokens(tokens)
        if self.compute_dtype is not None:
            h = h.astype(self.compute_dtype)
        if cache is None:
            cache = [None] * len(self.layers)
        if mask is None:
            L = h.shape[1]
            # A single query token sees the whole cache: no mask.
            mask = cache[0].make_mask(L) if cache[0] is not None else ("causal" if L > 1 else None)
        for layer, layer_cache in zip(self.layers, cache):
            h = layer(h, mask, layer_cache)
        return self.norm(h)


class Model(nn.Module):
    """`Model(args)(tokens[B, L], cache) -> logits[B, L, vocab]`."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = LlamaModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, tokens: mx.array, cache: Optional[list] = None, mask=None) -> mx.array:
        h = self.model(tokens, cache, mask)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    @property
    def layers(self) -> list[TransformerBlock]:
        return self.model.layers
