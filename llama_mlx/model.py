"""The Llama 3 transformer in MLX, after Meta's reference `llama/model.py`.

Parameter names follow Hugging Face / mlx-lm (`model.layers.N.self_attn.q_proj`, ...) so that
mlx-community folders load unchanged. The KV cache is passed in, never owned by the model.
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
from .config import config_from_meta_params


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
        """Build from a Hugging Face config.json or a Meta params.json; unknown keys are ignored."""
        if "dim" in config and "hidden_size" not in config:
            config = config_from_meta_params(config)
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


def default_compute_dtype() -> Optional[mx.Dtype]:
    """float32 activations on the CPU, where half-precision kernels run many times slower;
    None (the weights' own dtype) on GPUs. Weights stay as stored either way."""
    return mx.float32 if mx.default_device() == mx.cpu else None


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
        offset = cache.offset if cache is not None else 0
        if "qkv_proj" in self and L == 1:  # fused at load time by `Model.fuse()`
            # (B, 1, (nq + 2 nkv) * head_dim) -> (B, nq + 2 nkv, 1, head_dim); one RoPE call for q and k
            qkv = self.qkv_proj(x).reshape(B, L, -1, self.head_dim).transpose(0, 2, 1, 3)
            n_qk = self.n_heads + self.n_kv_heads
            qk = self.rope(qkv[:, :n_qk], offset)
            q, k, v = qk[:, : self.n_heads], qk[:, self.n_heads :], qkv[:, n_qk:]
        else:
            if "qkv_proj" in self:
                q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
                q, k, v = row_blocks(self.qkv_proj, x, [q_dim, kv_dim, kv_dim])
            else:
                q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            # (B, L, heads * head_dim) -> (B, heads, L, head_dim)
            q = self.rope(q.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3), offset)
            k = self.rope(k.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3), offset)
            v = v.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        # Grouped-query attention: SDPA broadcasts the K/V heads, nothing is repeated.
        out = scaled_dot_product_attention(q, k, v, self.scale, mask, cache)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


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
        if "gate_up_proj" in self:  # fused at load time by `Model.fuse()`
            if x.shape[1] == 1:
                gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
            else:
                gate, up = row_blocks(self.gate_up_proj, x, 2)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(swiglu(gate, up))


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
        self.compute_dtype = default_compute_dtype()

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

    def set_compute_dtype(self, dtype: Optional[mx.Dtype]) -> "Model":
        """Run activations (and the KV cache) in `dtype`; None follows the weights."""
        self.model.compute_dtype = dtype
        return self

    @property
    def layers(self) -> list[TransformerBlock]:
        return self.model.layers

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Drop what HF checkpoints carry but the model computes (rotary tables, tied head)."""
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights = {k: v for k, v in weights.items() if not k.startswith("lm_head.")}
        return weights

    def fuse(self) -> "Model":
        """Fuse q/k/v and gate/up projections into one matmul each: fewer kernels per token.

        Works on float and affine-quantized linears alike, since quantization groups run
        along the input dimension and the fused weights are stacked along the output one.
        """
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if "qkv_proj" not in attn:
                attn.qkv_proj = _concat_linears([attn.q_proj, attn.k_proj, attn.v_proj])
                del attn.q_proj, attn.k_proj, attn.v_proj
            if "gate_up_proj" not in mlp:
                mlp.gate_up_proj = _concat_linears([mlp.gate_proj, mlp.up_proj])
                del mlp.gate_proj, mlp.up_proj
        return self


def row_blocks(linear: nn.Module, x: mx.array, sizes: list[int] | int) -> list[mx.array]:
    """A fused projection applied as consecutive row blocks of its weight (sizes, or n equal ones).

    Used for multi-token inputs: MLX's GPU backends may dequantize a weight whole for a
    multi-token quantized matmul, and the blocks keep that transient as small as unfused weights.
    """
    if isinstance(linear, _Unfused):
        return [p(x) for p in linear.parts]
    rows = linear.weight.shape[0]
    if isinstance(sizes, int):
        sizes = [rows // sizes] * sizes
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [linear_rows(linear, x, a, a + n) for a, n in zip(starts, sizes)]


def linear_rows(linear: nn.Module, x: mx.array, start: Optional[int] = None, stop: Optional[int] = None) -> mx.array:
    """Output features start..stop (all by default) of a float or affine-quantized linear (or a
    quantized embedding used as one), from row views of its weight: nothing is copied."""

    def rows(name: str) -> mx.array:
        return linear[name] if start is None else linear[name][start:stop]

    if "scales" in linear:
        y = mx.quantized_matmul(
            x, rows("weight"), scales=rows("scales"), biases=rows("biases") if "biases" in linear else None,
            transpose=True, group_size=linear.group_size, bits=linear.bits, mode=linear.mode,
        )
    else:
        y = x @ rows("weight").T
    return y + rows("bias") if "bias" in linear else y


def _concat_linears(linears: list[nn.Module]) -> nn.Module:
    first = linears[0]
    if isinstance(first, nn.QuantizedLinear) and all(
        isinstance(l, nn.QuantizedLinear) and (l.bits, l.group_size, l.mode) == (first.bits, first.group_size, first.mode)
        for l in linears
    ):
        fused = nn.QuantizedLinear.__new__(nn.QuantizedLinear)
        nn.Module.__init__(fused)
        fused.group_size, fused.bits, fused.mode = first.group_size, first.bits, first.mode
        for name in ("weight", "scales", "biases", "bias"):
            if name in first:
                fused[name] = mx.concatenate([l[name] for l in linears], axis=0)
        fused.freeze()
        return fused
    if any(isinstance(l, nn.QuantizedLinear) for l in linears):
        return _Unfused(linears)
    fused = nn.Linear(1, 1, bias="bias" in first)
    fused.weight = mx.concatenate([l.weight for l in linears], axis=0)
    if "bias" in first:
        fused.bias = mx.concatenate([l.bias for l in linears], axis=0)
    return fused


class _Unfused(nn.Module):
    """Mixed-precision projections that cannot share one matmul: run them apart, concatenate."""

    def __init__(self, linears: list[nn.Module]):
        super().__init__()
        self.parts = linears

    def __call__(self, x: mx.array) -> mx.array:
        return mx.concatenate([p(x) for p in self.parts], axis=-1)
