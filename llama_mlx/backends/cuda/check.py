"""The CUDA wing's speculative check: a few positions of one sequence in eight graph nodes a layer."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import decoder, kernels

__all__ = ["FusedCheckDecoder"]


class FusedCheckDecoder(decoder.FusedDecoder):
    """`decoder(tokens[1, L], offset, *kv_buffers) -> (logits[1, L, vocab], *kv_buffers)`: L <=
    `max_rows` positions of one sequence from `offset` (int32 [1]) on, each attending over what
    precedes it and itself, every position's logits: a speculative check through `FusedDecoder`'s
    layers with `kernels.rows_matmul`, about eight graph nodes a layer."""

    kind = "check-fused"
    max_rows = kernels.ROWS_MAX

    @staticmethod
    def supported(model: nn.Module) -> bool:
        return decoder.fused_rows_supported(model)

    def __call__(self, tokens: mx.array, offset: mx.array, *buffers: mx.array):
        L = tokens.shape[1]
        positions = offset + mx.arange(L, dtype=mx.int32)
        out = list(buffers)

        def attend(i, q, k, v):
            # [L, Hkv, 1, D] -> [1, Hkv, L, D]: the L positions, written at offset
            out[2 * i] = mx.slice_update(out[2 * i], k.transpose(2, 1, 0, 3), offset, axes=(2,))
            out[2 * i + 1] = mx.slice_update(out[2 * i + 1], v.transpose(2, 1, 0, 3), offset, axes=(2,))
            attention = kernels.decode_attention(q, out[2 * i], out[2 * i + 1], positions, self.scale, shared=True)
            return attention.reshape(L, -1)

        return (self.layers(self.embed(tokens.reshape(-1)), positions, attend, kernels.rows_matmul)[None], *out)
