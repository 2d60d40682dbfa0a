"""The tiled vision encoder of Llama 3.2 Vision, after Meta's `llama_models` vision encoder.

Each tile of an image is cut into patches (a strided convolution), given a class token and
gated position embeddings (per patch, and per tile and aspect ratio), then a local transformer
runs over all tiles of the image together, a gated global transformer after it; the output is
the global transformer's, concatenated with the local transformer's intermediate states.
Parameter names follow Hugging Face (`vision_model.transformer.layers.N.self_attn.q_proj`, ...).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from .processor import supported_aspect_ratios

__all__ = ["VisionArgs", "VisionModel"]


@dataclass
class VisionArgs:
    hidden_size: int = 1280
    num_hidden_layers: int = 32
    num_global_layers: int = 8
    attention_heads: int = 16
    num_channels: int = 3
    intermediate_size: int = 5120
    vision_output_dim: int = 7680
    image_size: int = 448
    patch_size: int = 14
    norm_eps: float = 1e-5
    max_num_tiles: int = 4
    intermediate_layers_indices: Sequence[int] = (3, 7, 15, 23, 30)
    supported_aspect_ratios: Optional[Sequence[Sequence[int]]] = None

    def __post_init__(self):
        if self.supported_aspect_ratios is None:
            self.supported_aspect_ratios = [list(g) for g in supported_aspect_ratios(self.max_num_tiles)]

    @classmethod
    def from_dict(cls, config: dict) -> "VisionArgs":
        """From a Hugging Face `vision_config` dict; unknown keys are ignored."""
        names = inspect.signature(cls).parameters
        if "attention_heads" not in config and "num_attention_heads" in config:  # mlx-vlm's spelling
            config = {**config, "attention_heads": config["num_attention_heads"]}
        return cls(**{k: v for k, v in config.items() if k in names})

    @property
    def num_patches(self) -> int:
        """Patches of one tile, the class token included."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def max_aspect_ratio_id(self) -> int:
        return len(self.supported_aspect_ratios)


class VisionAttention(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        dim, self.n_heads = args.hidden_size, args.attention_heads
        self.scale = (dim // self.n_heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def __call__(self, x: mx.array, mask: Optional[mx.array]) -> mx.array:
        B, L, D = x.shape
        q, k, v = (p(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, D))


class VisionMLP(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.fc1 = nn.Linear(args.hidden_size, args.intermediate_size)
        self.fc2 = nn.Linear(args.intermediate_size, args.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(nn.gelu(self.fc1(x)))


class VisionEncoderLayer(nn.Module):
    def __init__(self, args: VisionArgs, gated: bool):
        super().__init__()
        self.gated = gated
        self.self_attn = VisionAttention(args)
        self.mlp = VisionMLP(args)
        self.input_layernorm = nn.LayerNorm(args.hidden_size, eps=args.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(args.hidden_size, eps=args.norm_eps)
        if gated:
            self.gate_attn = mx.zeros((1,))
            self.gate_ffn = mx.zeros((1,))

    def __call__(self, x: mx.array, mask: Optional[mx.array]) -> mx.array:
        h = self.self_attn(self.input_layernorm(x), mask)
        x = x + (mx.tanh(self.gate_attn) * h if self.gated else h)
        h = self.mlp(self.post_attention_layernorm(x))
        return x + (mx.tanh(self.gate_ffn) * h if self.gated else h)


class VisionEncoder(nn.Module):
    def __init__(self, args: VisionArgs, num_layers: int, gated: bool):
        super().__init__()
        self.layers = [VisionEncoderLayer(args, gated) for _ in range(num_layers)]

    def __call__(self, x: mx.array, mask: Optional[mx.array], keep: Sequence[int] = ()) -> tuple[mx.array, list]:
        """The output, and the inputs of the layers numbered in `keep` (Meta's intermediate states)."""
        kept = []
        for i, layer in enumerate(self.layers):
            if i in keep:
                kept.append(x)
            x = layer(x, mask)
        return x, kept


class AspectRatioEmbedding(nn.Module):
    """One gated embedding per tile, chosen by the image's aspect-ratio id."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.max_num_tiles, self.hidden_size = args.max_num_tiles, args.hidden_size
        self.embedding = nn.Embedding(args.max_aspect_ratio_id + 1, args.max_num_tiles * args.hidden_size)
        self.gate = mx.zeros((1,))

    def __call__(self, x: mx.array, aspect_ratio_ids: mx.array) -> mx.array:
        e = self.embedding(aspect_ratio_ids).reshape(-1, self.max_num_tiles, 1, self.hidden_size)
        return x + mx.tanh(self.gate) * e


class PositionEmbedding(nn.Module):
    """Per-patch embedding and per-(tile, aspect ratio) embedding, blended by one gate."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.max_num_tiles, self.num_patches, self.hidden_size = args.max_num_tiles, args.num_patches, args.hidden_size
        self.embedding = mx.zeros((args.num_patches, args.hidden_size))
        self.gate = mx.zeros((1,))
        self.tile_embedding = nn.Embedding(args.max_aspect_ratio_id + 1,
                                           args.max_num_tiles * args.num_patches * args.hidden_size)

    def __call__(self, x: mx.array, aspect_ratio_ids: mx.array) -> mx.array:
        gate = mx.tanh(self.gate)
        x = x + (1 - gate) * self.embedding
        tiles = self.tile_embedding(aspect_ratio_ids).reshape(-1, self.max_num_tiles, self.num_patches,
                                                               self.hidden_size)
        return x + gate * tiles


def tile_padding_mask(aspect_ratio_mask: mx.array, num_patches: int, length: int) -> mx.array:
    """[N, 1, T*length, T*length] boolean: False where both query and key are padding (a padded
    patch position or a tile the image does not use), as Meta's encoder masks."""
    N, T = aspect_ratio_mask.shape
    pad = mx.broadcast_to((aspect_ratio_mask == 0)[:, :, None], (N, T, length))
    pad = mx.logical_or(pad, (mx.arange(length) >= num_patches)[None, None])
    pad = pad.reshape(N, T * length)
    return mx.logical_not(mx.logical_and(pad[:, :, None], pad[:, None, :]))[:, None]


class VisionModel(nn.Module):
    """`VisionModel(args)(pixel_values[B, I, T, C, H, W], aspect_ratio_ids[B, I], aspect_ratio_mask
    [B, I, T]) -> [B, I, T, num_patches, vision_output_dim]`."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.args = args
        dim = args.hidden_size
        self.patch_embedding = nn.Conv2d(args.num_channels, dim, args.patch_size, stride=args.patch_size, bias=False)
        self.class_embedding = mx.zeros((dim,))
        self.gated_positional_embedding = PositionEmbedding(args)
        self.pre_tile_positional_embedding = AspectRatioEmbedding(args)
        self.post_tile_positional_embedding = AspectRatioEmbedding(args)
        self.layernorm_pre = nn.LayerNorm(dim)
        self.layernorm_post = nn.LayerNorm(dim)
        self.transformer = VisionEncoder(args, args.num_hidden_layers, gated=False)
        self.global_transformer = VisionEncoder(args, args.num_global_layers, gated=True)

    def __call__(self, pixel_values: mx.array, aspect_ratio_ids: mx.array, aspect_ratio_mask: mx.array) -> mx.array:
        B, I, T, C, H, W = pixel_values.shape
        N, P, D = B * I, self.args.num_patches, self.args.hidden_size
        ids = aspect_ratio_ids.reshape(N)
        # Channels last for MLX's convolution: [N*T, H, W, C] -> [N*T, H/p, W/p, D].
        x = self.patch_embedding(pixel_values.reshape(N * T, C, H, W).transpose(0, 2, 3, 1).astype(
            self.class_embedding.dtype))
        x = self.pre_tile_positional_embedding(x.reshape(N, T, -1, D), ids)
        cls = mx.broadcast_to(self.class_embedding.astype(x.dtype), (N, T, 1, D))
        x = self.gated_positional_embedding(mx.concatenate([cls, x], axis=2), ids)
        x = self.layernorm_pre(x)
        # Each tile's sequence is padded to a multiple of 8, as in Meta's encoder.
        length = P + (-P) % 8
        x = mx.pad(x, [(0, 0), (0, 0), (0, length - P), (0, 0)])
        mask = tile_padding_mask(aspect_ratio_mask.reshape(N, T), P, length)
        x, kept = self.transformer(x.reshape(N, T * length, D), mask, self.args.intermediate_layers_indices)
        x = self.layernorm_post(x)
        x = self.post_tile_positional_embedding(x.reshape(N, T, length, D), ids)
        x, _ = self.global_transformer(x.reshape(N, T * length, D), mask)
        # The intermediate states interleave feature by feature ([..., D, K] flattened), as Meta stacks them.
        kept = mx.stack(kept, axis=-1).reshape(N, T * length, -1)
        out = mx.concatenate([x, kept], axis=-1).reshape(N, T, length, -1)[:, :, :P]
        return out.reshape(B, I, T, P, -1)
