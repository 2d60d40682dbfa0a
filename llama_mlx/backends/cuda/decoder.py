"""The CUDA wing's decoders: one token in eight graph nodes per layer, and a batch's step.

MLX's CUDA backend costs the host about 4-5 microseconds per graph node at evaluation, so the
plain model's ~15 nodes per layer make decode host-bound (benchmarks/README.md). This step runs
the same transformer with the kernels in `kernels.py`:

    qkv   = matvec(rms_norm(a + b) * input_layernorm) + RoPE, split into q, k, v
    K, V  = slice_update(K, k), slice_update(V, v)      (in place: the buffers are donated)
    attn  = decode_attention(q, K, V, offset)
    o     = matvec(attn)
    gu    = matvec(rms_norm(h + o) * post_attention_layernorm)
    m     = matvec(silu(gate) * up)                      -> the next layer's (a, b) = (h + o, m)

The cache offset is an array and the K/V buffers have a fixed capacity, so `mx.compile` traces
the step once per capacity. It applies to 4-bit affine models (group size a multiple of 32)
with float16/bfloat16 activations and batch 1; `supported(model)` says whether it does.

`FusedRowsDecoder` (a batch's step, a row per sequence) and `check.FusedCheckDecoder` (a
speculative check, a row per position) run the same eight nodes a layer over 2-16 rows, with the
few-row `kernels.rows_matmul` in place of the matvec (`fused_rows_supported(model)`).
Each decoder class says where it applies (`supported(model)`); the backend table picks the class.
"""

from __future__ import annotations

import weakref

import mlx.core as mx
import mlx.nn as nn

from ...cache import RowsDecodeView
from ..fusion import FusedAttention, FusedMLP
from ..steps import RowsDecoder
from . import kernels

__all__ = [
    "FusedDecoder",
    "FusedRowsDecoder",
    "KernelRowsDecoder",
    "PaddedQuantizedEmbedding",
    "PaddedQuantizedLinear",
    "pad_small_matmuls",
    "fused_rows_supported",
    "rows_supported",
    "supported",
]


def _q4(module: nn.Module) -> bool:
    return (
        isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding))
        and getattr(module, "mode", "affine") == "affine"
        and "bias" not in module
        and "biases" in module
        and kernels.matvec_supported(module["weight"].shape[1] * 32 // module.bits, module.bits, module.group_size)
    )


def _q4_rows(module: nn.Module, norm: bool) -> bool:
    return _q4(module) and kernels.rows_matmul_supported(module["weight"].shape[1] * 8, module["weight"].shape[0],
                                                         4, module.group_size, norm)


def _fused_projections(model: nn.Module, q4) -> bool:
    # Fused q/k/v and gate/up, every projection and the output head 4-bit affine as `q4(module,
    # norm)` takes them (norm: the input is rms_norm's).
    if getattr(model, "model_type", None) != "llama" or not rows_supported(model):
        return False
    args = model.args
    head = model.model.embed_tokens if args.tie_word_embeddings else getattr(model, "lm_head", None)
    if head is None or not q4(head, True):
        return False
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if not isinstance(attn, FusedAttention) or not isinstance(mlp, FusedMLP):
            return False
        if not all(q4(m, n) for m, n in ((attn.qkv_proj, True), (attn.o_proj, False),
                                         (mlp.gate_up_proj, True), (mlp.down_proj, False))):
            return False
    return True


def supported(model: nn.Module) -> bool:
    """Whether `FusedDecoder` can run this model here (CUDA, fused 4-bit projections, fp16/bf16)."""
    return _fused_projections(model, lambda module, norm: _q4(module))


def fused_rows_supported(model: nn.Module) -> bool:
    """Whether `FusedRowsDecoder` and `FusedCheckDecoder` can run this model here: as `supported`,
    with every projection's shape one `kernels.rows_matmul` takes and a head_dim RoPE's pairs
    tile (a multiple of 16)."""
    return _fused_projections(model, _q4_rows) and model.args.head_dim % 16 == 0


PAD_ROWS = 8  # MLX's CUDA quantized matmul: 8 rows cost about one, 2-7 rows about M


def _dtype(model: nn.Module) -> mx.Dtype:
    # The activations': the compute dtype, else what the embedding hands out.
    inner = model.model
    embed = inner.embed_tokens
    return inner.compute_dtype or (embed.scales.dtype if "scales" in embed else embed.weight.dtype)


def rows_supported(model: nn.Module) -> bool:
    """Whether `KernelRowsDecoder` (and the attention of `FusedDecoder`) can run this model here:
    CUDA, fp16/bf16 activations, a head layout the attention kernel takes."""
    args = getattr(model, "args", None)
    return (
        kernels.cuda_available()
        and args is not None
        and kernels.attention_supported(args.num_attention_heads, args.num_key_value_heads, args.head_dim,
                                        _dtype(model))
    )


class _KernelRowsView(RowsDecodeView):
    """Rows attending with the decode kernel over their own positions 0..offset[b] (no mask, no
    padding read); rows the model runs beyond the buffers' (padding) attend to nothing."""

    def make_mask(self, L: int) -> None:
        return None

    def attention(self, q: mx.array, k: mx.array, v: mx.array, scale: float, mask) -> mx.array:
        B, H, L, D = q.shape
        n = k.shape[0]
        out = kernels.decode_attention(q[:n], k, v, self.offset[:n], scale).reshape(n, H, L, D)
        return out if n == B else mx.concatenate([out, q[n:]])  # pad rows: any values of the shape


class KernelRowsDecoder(RowsDecoder):
    """`RowsDecoder` whose attention is `kernels.decode_attention`, one row per block. A batch
    of 2-7 rows runs as 8 (PAD_ROWS) through the model, so every matmul takes 8 rows as they are
    instead of padding and slicing its own input (four times a layer)."""

    view = _KernelRowsView
    kind = "rows-kernel"

    @staticmethod
    def supported(model: nn.Module) -> bool:
        return rows_supported(model)

    def pad(self, tokens: mx.array, offset: mx.array) -> tuple[mx.array, mx.array]:
        B = tokens.shape[0]
        if not 1 < B < PAD_ROWS:
            return tokens, offset
        pad = PAD_ROWS - B
        return (mx.concatenate([tokens, mx.zeros((pad, 1), tokens.dtype)]),
                mx.concatenate([offset, mx.zeros((pad,), offset.dtype)]))


class FusedDecoder:
    """`decoder(tokens[1, 1], offset, *kv_buffers) -> (logits[1, vocab], *kv_buffers)`.

    kv_buffers are each layer's keys then values, [1, Hkv, capacity, D]; `offset` (int32 array of
    shape [1]) is the position of the new token. Wrap it in `mx.compile`. It holds the model
    weakly, so a compiled step kept for the model never keeps it alive.
    """

    kind = "fused"
    max_batch = 1

    @staticmethod
    def supported(model: nn.Module) -> bool:
        return supported(model)

    @staticmethod
    def position(offset: int) -> mx.array:
        return mx.array([offset], dtype=mx.int32)

    def __init__(self, model: nn.Module):
        self._model = weakref.ref(model)
        args = model.args
        attn = model.layers[0].self_attn
        self.rope = dict(
            inv_freq=1.0 / attn.rope._periods, n_heads=args.num_attention_heads,
            n_kv_heads=args.num_key_value_heads, head_dim=args.head_dim, traditional=attn.rope.traditional,
        )
        self.scale = attn.scale
        self.eps = args.rms_norm_eps

    @staticmethod
    def _weights(m: nn.Module) -> tuple:
        return m["weight"], m["scales"], m["biases"], m.group_size

    def __call__(self, tokens: mx.array, offset: mx.array, *buffers: mx.array):
        out = list(buffers)

        def attend(i, q, k, v):
            out[2 * i] = mx.slice_update(out[2 * i], k, offset, axes=(2,))
            out[2 * i + 1] = mx.slice_update(out[2 * i + 1], v, offset, axes=(2,))
            return kernels.decode_attention(q, out[2 * i], out[2 * i + 1], offset, self.scale)

        # one token's activations as vectors, as the matvec takes them
        return (self.layers(self.embed(tokens).reshape(-1), offset, attend, kernels.fused_matvec)[None], *out)

    def embed(self, tokens: mx.array) -> mx.array:
        inner = self._model().model
        a = inner.embed_tokens(tokens)
        return a if inner.compute_dtype is None else a.astype(inner.compute_dtype)

    def layers(self, a: mx.array, positions: mx.array, attend, matmul) -> mx.array:
        """Logits from embedded tokens `a` ([K] for one, [R, K] for rows) at `positions` through
        every layer, each projection by `matmul` (`fused_matvec` for one, `rows_matmul` for rows);
        `attend(layer, q, k, v)` writes a layer's keys and values and returns its attention output
        shaped as `a`."""
        model = self._model()
        inner = model.model
        b = mx.zeros_like(a)

        def norm(module: nn.Module) -> mx.array:
            return module.weight.astype(a.dtype)  # a no-op when the dtypes agree

        rope = dict(self.rope, offset=positions)
        for i, layer in enumerate(inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            q, k, v, h = matmul(
                *self._weights(attn.qkv_proj), residual=(a, b, norm(layer.input_layernorm), self.eps), rope=rope
            )
            o = matmul(*self._weights(attn.o_proj), x=attend(i, q, k, v))
            gu, h = matmul(
                *self._weights(mlp.gate_up_proj), residual=(h, o, norm(layer.post_attention_layernorm), self.eps)
            )
            a, b = h, matmul(*self._weights(mlp.down_proj), gate_up=gu)
        head = inner.embed_tokens if model.args.tie_word_embeddings else model.lm_head
        logits, _ = matmul(*self._weights(head), residual=(a, b, norm(inner.norm), self.eps))
        return logits



def _q4_any(module: nn.Module) -> bool:
    return getattr(module, "mode", "affine") == "affine" and getattr(module, "bits", 0) == 4


def _padded(x: mx.array, matmul) -> mx.array:
    # MLX's CUDA quantized matmul runs 8 rows as fast as 1 but 2-7 rows about M times slower
    # (benchmarks/batch_probe.py --matmul): a few rows are padded to 8 with zeros. A batch's
    # decode step is [B, 1, K]: as rows of one matrix, not B one-row products.
    rows = x.size // x.shape[-1]
    if not 1 < rows <= PAD_ROWS or x.ndim == 2 and rows == PAD_ROWS:
        return matmul(x)
    flat = x.reshape(rows, x.shape[-1])
    y = matmul(mx.pad(flat, [(0, PAD_ROWS - rows), (0, 0)]) if rows < PAD_ROWS else flat)
    return y[:rows].reshape(*x.shape[:-1], -1)


class PaddedQuantizedLinear(nn.QuantizedLinear):
    """A quantized linear whose 2-7 row inputs (a batch's decode step, a speculative check) run as 8."""

    def __call__(self, x: mx.array) -> mx.array:
        return _padded(x, super().__call__)


class PaddedQuantizedEmbedding(nn.QuantizedEmbedding):
    """A tied quantized embedding whose output-head use (`as_linear`) pads 2-7 rows to 8."""

    def as_linear(self, x: mx.array) -> mx.array:
        return _padded(x, super().as_linear)


def pad_small_matmuls(model: nn.Module) -> int:
    """Make every 4-bit affine projection of `model` (and a tied head) pad 2-7 rows to 8, in
    place; returns how many modules changed. A no-op off CUDA."""
    if not kernels.cuda_available():
        return 0
    changed = 0
    inner = model.model
    modules = [m for layer in inner.layers for _, m in layer.named_modules()]
    modules += [inner.embed_tokens, getattr(model, "lm_head", None)]
    for m in modules:
        if type(m) is nn.QuantizedLinear and _q4_any(m):
            m.__class__ = PaddedQuantizedLinear
            changed += 1
        elif type(m) is nn.QuantizedEmbedding and _q4_any(m) and model.args.tie_word_embeddings:
            m.__class__ = PaddedQuantizedEmbedding
            changed += 1
    return changed


class FusedRowsDecoder(FusedDecoder):
    """`decoder(tokens[B, 1], offset, *kv_buffers) -> (logits[B, vocab], *kv_buffers)` over a batch's
    buffers [B, Hkv, capacity, D], row b's token at position offset[b] (int32 [B]), for
    `mx.compile`: `FusedDecoder`'s layers with `kernels.rows_matmul`, about eight graph nodes
    a layer for all rows. A single row, and batches over `max_rows`, run as `KernelRowsDecoder` (on
    an H200 a row alone is faster there, 8B 6.5 against 10.0 ms; from 2 rows on this is, 10.4
    against 14.5 ms: docs/batching.md)."""

    kind = "rows-fused"
    max_rows = kernels.ROWS_MAX
    max_batch = 1 << 30

    @staticmethod
    def supported(model: nn.Module) -> bool:
        return fused_rows_supported(model)

    def __call__(self, tokens: mx.array, offset: mx.array, *buffers: mx.array):
        B = tokens.shape[0]
        if not 1 < B <= self.max_rows:
            return KernelRowsDecoder(self._model())(tokens, offset, *buffers)
        out = list(buffers)
        # where each row's key and value go: the same for every layer
        at = mx.broadcast_to(offset[:, None, None, None], (B, self.rope["n_kv_heads"], 1, self.rope["head_dim"]))

        def attend(i, q, k, v):
            out[2 * i] = mx.put_along_axis(out[2 * i], at, k, axis=2)
            out[2 * i + 1] = mx.put_along_axis(out[2 * i + 1], at, v, axis=2)
            return kernels.decode_attention(q, out[2 * i], out[2 * i + 1], offset, self.scale).reshape(B, -1)

        return (self.layers(self.embed(tokens.reshape(-1)), offset, attend, kernels.rows_matmul), *out)
