"""What each CUDA kernel computes, in MLX ops, as its docstring says: the reference math that the
kernels are checked against on the GPU (`test_cuda_kernels.py`) and that stands in for them on
the CPU, where the decoders' wiring is checked (`test_cuda_decode.py`)."""

import mlx.core as mx
import mlx.nn as nn


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


def rows_matmul(w, scales, biases, group_size, *, x=None, residual=None, gate_up=None, rope=None):
    """`kernels.rows_matmul` as its docstring says: `matvec` on each row, at that row's position."""
    R = (x if x is not None else residual[0] if residual is not None else gate_up).shape[0]
    rows = []
    for r in range(R):
        one = dict(x=None if x is None else x[r], gate_up=None if gate_up is None else gate_up[r],
                   residual=None if residual is None else (residual[0][r], residual[1][r], *residual[2:]),
                   rope=None if rope is None else dict(rope, offset=rope["offset"][r : r + 1]))
        out = matvec(w, scales, biases, group_size, **one)
        rows.append(out if isinstance(out, tuple) else (out,))
    outs = [mx.concatenate(parts) if parts[0].ndim == 4 else mx.stack(parts) for parts in zip(*rows)]
    return outs[0] if len(outs) == 1 else tuple(outs)


def shared_attention(q, keys, values, offset, scale, shared=False):
    """`kernels.decode_attention`: row b over its positions 0..offset[b], of one shared sequence
    when `shared`."""
    if shared:
        keys = mx.broadcast_to(keys, (q.shape[0], *keys.shape[1:]))
        values = mx.broadcast_to(values, (q.shape[0], *values.shape[1:]))
    return attention(q, keys, values, offset, scale)
