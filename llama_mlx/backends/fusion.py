"""q/k/v and gate/up fusion: one matmul each instead of three and two, applied to a built model.

On GPUs a decode step is bound by its number of graph nodes, so fewer matmuls per layer is
faster; `fuse(model)` swaps each layer's attention and MLP for the fused classes below.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..model import MLP, Attention, swiglu
from ..quant import linear_rows

__all__ = ["FusedAttention", "FusedMLP", "fuse", "row_blocks"]


class FusedAttention(Attention):
    """Attention whose q/k/v projections are one `qkv_proj`."""

    def project(self, x: mx.array, offset: int | mx.array) -> tuple[mx.array, mx.array, mx.array]:
        B, L, _ = x.shape
        if L > 1:
            q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
            q, k, v = row_blocks(self.qkv_proj, x, [q_dim, kv_dim, kv_dim])
            # (B, L, heads * head_dim) -> (B, heads, L, head_dim)
            q = self.rope(q.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3), offset)
            k = self.rope(k.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3), offset)
            return q, k, v.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        # (B, 1, (nq + 2 nkv) * head_dim) -> (B, nq + 2 nkv, 1, head_dim); one RoPE call for q and k
        qkv = self.qkv_proj(x).reshape(B, L, -1, self.head_dim).transpose(0, 2, 1, 3)
        n_qk = self.n_heads + self.n_kv_heads
        qk = self.rope(qkv[:, :n_qk], offset)
        return qk[:, : self.n_heads], qk[:, self.n_heads :], qkv[:, n_qk:]


class FusedMLP(MLP):
    """SwiGLU MLP whose gate and up projections are one `gate_up_proj`."""

    def __call__(self, x: mx.array) -> mx.array:
        if x.shape[1] == 1:
            gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
        else:
            gate, up = row_blocks(self.gate_up_proj, x, 2)
        return self.down_proj(swiglu(gate, up))


def fuse(model: nn.Module) -> nn.Module:
    """Fuse q/k/v and gate/up projections of every layer, in place; returns the model.

    Works on float and affine-quantized linears alike, since quantization groups run
    along the input dimension and the fused weights are stacked along the output one.
    """
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if not isinstance(attn, FusedAttention):
            attn.qkv_proj = _concat_linears([attn.q_proj, attn.k_proj, attn.v_proj])
            del attn.q_proj, attn.k_proj, attn.v_proj
            attn.__class__ = FusedAttention
        if not isinstance(mlp, FusedMLP):
            mlp.gate_up_proj = _concat_linears([mlp.gate_proj, mlp.up_proj])
            del mlp.gate_proj, mlp.up_proj
            mlp.__class__ = FusedMLP
    return model


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
    if x.size // x.shape[-1] <= 8:  # a few rows: no dequantized transient, and one padded matmul on CUDA
        return mx.split(linear(x), [sum(sizes[: i + 1]) for i in range(len(sizes) - 1)], axis=-1)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [linear_rows(linear, x, a, a + n) for a, n in zip(starts, sizes)]


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
    # Mixed precisions, or adapted projections (llama_mlx.lora), keep their own matmuls.
    if any(isinstance(l, nn.QuantizedLinear) or not isinstance(l, nn.Linear) for l in linears):
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
