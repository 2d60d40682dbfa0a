"""The language model of Llama 3.2 Vision: Llama 3 self-attention layers (`llama_mlx.model`'s),
with gated cross-attention layers at the config's `cross_attention_layers` that attend to the
image states.

The cross-attention keys and values of an image are computed once, when the image is attached to
the cache (`CrossAttentionCache.add_image`); a text token attends to the valid tiles of the
latest image whose `<|image|>` token precedes it. A token with no image before it passes the layer
unchanged, as in Meta's reference (`cross_attention_rows="meta"`, the default), or, with
`cross_attention_rows="transformers"`, attends as transformers lets it (to every image key, unmasked)
while its feed-forward is zeroed. With no image attached the cross-attention layers are skipped: the
text layers alone run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from ..cache import KVCache
from ..errors import ImageError
from ..model import MLP, ModelArgs, TransformerBlock

FLOATS = (mx.float16, mx.bfloat16, mx.float32)

__all__ = ["CrossAttention", "CrossAttentionCache", "CrossAttentionDecoderLayer", "LanguageModel", "TextModel"]


class CrossAttentionCache:
    """One cross-attention layer's image keys and values [B, kv_heads, image positions, head_dim],
    the valid span of each image, and the text positions of the `<|image|>` tokens seen so far."""

    def __init__(self):
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.spans: list[tuple[int, int]] = []
        self.image_positions: list[int] = []
        self.offset = 0
        self.decode_rows: Optional["_Rows"] = None  # what a decoded token sees once every image is bound

    def add_image(self, keys: mx.array, values: mx.array, valid: list[int]) -> None:
        """Append images' keys and values; `valid[i]`: how many leading positions of image i's
        equal share of the new positions are real (its used tiles)."""
        start = 0 if self.keys is None else self.keys.shape[2]
        per_image = keys.shape[2] // len(valid)
        self.spans += [(start + i * per_image, start + i * per_image + n) for i, n in enumerate(valid)]
        self.decode_rows = None
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            self.keys = mx.concatenate([self.keys, keys], axis=2)
            self.values = mx.concatenate([self.values, values], axis=2)

    @property
    def has_images(self) -> bool:
        return bool(self.spans)

    @property
    def state(self) -> list[mx.array]:
        return [] if self.keys is None else [self.keys, self.values]

    @property
    def meta_state(self) -> dict:
        return {"spans": self.spans, "image_positions": self.image_positions, "offset": self.offset}

    @classmethod
    def from_saved(cls, state: list, meta: dict, model, tokens: list[int]) -> "CrossAttentionCache":
        """A cache from what `PromptCache.save` wrote (`state`, `meta_state`) for `tokens`, checked
        against the model (ValueError says what does not fit): every `<|image|>` of `tokens` bound to
        one attached image, each image's span its used tiles' positions in its own block."""
        if set(meta) != {"spans", "image_positions", "offset"}:
            raise ValueError("cross-attention cache settings must be spans, image_positions and offset")
        spans, positions, offset = meta["spans"], meta["image_positions"], meta["offset"]
        token = model.config.image_token_index
        if offset != len(tokens) or positions != [i for i, t in enumerate(tokens) if t == token]:
            raise ValueError(f"image positions {positions!r:.80} and offset {offset!r:.20} do not fit the "
                             f"{len(tokens)} tokens")
        vision = model.config.vision
        block = vision.max_num_tiles * vision.num_patches  # an attached image's positions, used or not
        used = [n * vision.num_patches for n in range(1, vision.max_num_tiles + 1)]
        if not isinstance(spans, list) or len(spans) != len(positions) or not all(
                isinstance(s, list) and len(s) == 2 and all(type(v) is int for v in s) and s[0] == i * block and
                s[1] - s[0] in used for i, s in enumerate(spans)):
            raise ValueError(f"spans {spans!r:.80} are not the used tiles of {len(positions)} image(s)")
        want = (1, model.args.num_key_value_heads, len(spans) * block, model.args.head_dim)
        if len(state) != (2 if spans else 0) or any(
                not isinstance(a, mx.array) or tuple(a.shape) != want or a.dtype not in FLOATS for a in state):
            got = ", ".join(f"{a.dtype}{list(a.shape)}" for a in state if isinstance(a, mx.array)) or "none"
            raise ValueError(f"image keys and values {got} do not fit {len(spans)} image(s): each {list(want)}")
        cache = cls()
        if spans:
            cache.keys, cache.values = state
        cache.spans = [tuple(s) for s in spans]
        cache.image_positions, cache.offset = positions, offset
        return cache

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        self.image_positions = [p for p in self.image_positions if p < self.offset]
        return n

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)


class CrossAttention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.scale = self.head_dim**-0.5
        dim = args.hidden_size
        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)

    def image_keys(self, states: mx.array) -> tuple[mx.array, mx.array]:
        """Keys (normalised) and values of image states [B, S, D]: each [B, kv_heads, S, head_dim]."""
        B, S, _ = states.shape
        k = self.k_proj(states).reshape(B, S, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(states).reshape(B, S, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        return self.k_norm(k), v

    def __call__(self, x: mx.array, mask: mx.array, cache: CrossAttentionCache) -> mx.array:
        B, L, D = x.shape
        q = self.q_norm(self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3))
        if cache.keys.dtype != q.dtype:  # once, into the activations' dtype (float32 on CPU), not every token
            cache.keys, cache.values = cache.keys.astype(q.dtype), cache.values.astype(q.dtype)
        out = mx.fast.scaled_dot_product_attention(q, cache.keys, cache.values, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class CrossAttentionDecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.cross_attn = CrossAttention(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.cross_attn_attn_gate = mx.zeros((1,))
        self.mlp = MLP(args)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.cross_attn_mlp_gate = mx.zeros((1,))

    def __call__(self, x: mx.array, mask: mx.array, rows: mx.array, cache: CrossAttentionCache,
                 meta_rows: bool) -> mx.array:
        h = self.cross_attn(self.input_layernorm(x), mask, cache)
        if meta_rows:
            h = h * rows
        h = x + mx.tanh(self.cross_attn_attn_gate).astype(x.dtype) * h
        m = self.mlp(self.post_attention_layernorm(h)) * rows
        return h + mx.tanh(self.cross_attn_mlp_gate).astype(x.dtype) * m


@dataclass
class _Rows:
    mask: mx.array  # [B, 1, L, S] boolean
    rows: mx.array  # [B, L, 1]: 1 where the token has an image before it


class TextModel(nn.Module):
    def __init__(self, args: ModelArgs, cross_attention_layers: list[int], image_token_index: int,
                 cross_attention_rows: str = "meta"):
        super().__init__()
        if cross_attention_rows not in ("transformers", "meta"):
            raise ValueError(f"cross_attention_rows must be 'transformers' or 'meta', not {cross_attention_rows!r}")
        self.cross_attention_layers = sorted(cross_attention_layers)
        self.image_token_index = image_token_index
        self.meta_rows = cross_attention_rows == "meta"
        # Eight rows past the vocabulary: the image token (128256 in Llama 3.2 Vision) and spares.
        self.embed_tokens = nn.Embedding(args.vocab_size + 8, args.hidden_size)
        self.layers = [CrossAttentionDecoderLayer(args) if i in self.cross_attention_layers else TransformerBlock(args)
                       for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.compute_dtype: Optional[mx.Dtype] = None

    def _rows(self, tokens: mx.array, cache: CrossAttentionCache) -> _Rows:
        B, L = tokens.shape
        is_image = tokens == self.image_token_index
        before = len(cache.image_positions)
        index = before + mx.cumsum(is_image.astype(mx.int32), axis=1) - 1  # the image each token sees
        index = mx.minimum(index, len(cache.spans) - 1)
        S = cache.keys.shape[2]
        spans = mx.array(cache.spans, dtype=mx.int32)
        seen = mx.maximum(index, 0)
        start, stop = spans[seen, 0][..., None], spans[seen, 1][..., None]
        s = mx.arange(S)
        has = (index >= 0)[..., None]
        allowed = mx.logical_or(mx.logical_and(s >= start, s < stop), mx.logical_not(has))
        return _Rows(allowed[:, None], has.astype(mx.float32))

    def _image_positions(self, tokens: mx.array, cross: CrossAttentionCache) -> list[int]:
        """Absolute positions of the `<|image|>` tokens among `tokens`, checked against the images attached."""
        B, L = tokens.shape
        if B != 1:
            if cross.has_images or bool(mx.any(tokens == self.image_token_index)):
                raise ImageError("images are supported for one sequence at a time")
            return []
        positions = [cross.offset + i for i, t in enumerate(tokens[0].tolist()) if t == self.image_token_index]
        total = len(cross.image_positions) + len(positions)
        if total > len(cross.spans):
            raise ImageError(f"the prompt holds {total} image token(s) but {len(cross.spans)} image(s) are attached")
        return positions

    def __call__(self, tokens: mx.array, cache: Optional[list] = None, mask=None) -> mx.array:
        h = self.embed_tokens(tokens)
        if self.compute_dtype is not None:
            h = h.astype(self.compute_dtype)
        B, L = tokens.shape
        if cache is None:
            cache = self.make_cache()
        cross = [cache[i] for i in self.cross_attention_layers]
        if not all(isinstance(c, CrossAttentionCache) for c in cross):
            cross = []  # caches made for text alone (a batch engine's): the text layers alone run
        rows = None
        if cross:
            # Decoding one token with every attached image bound needs no look at the token on the
            # host (a sampled <|image|> sees the latest image): the next step is queued without waiting.
            bound = len(cross[0].image_positions) == len(cross[0].spans)
            decoding = (B, L) == (1, 1) and bound
            positions = [] if decoding else self._image_positions(tokens, cross[0])
            if decoding and cross[0].has_images:
                # The latest image, whatever the token: made once per image attached, not per token.
                if cross[0].decode_rows is None:
                    cross[0].decode_rows = self._rows(tokens, cross[0])
                rows = cross[0].decode_rows
            elif cross[0].has_images:
                rows = self._rows(tokens, cross[0])
            for c in cross:
                c.image_positions = c.image_positions + positions
        if mask is None:
            first = next((c for i, c in enumerate(cache) if i not in self.cross_attention_layers), None)
            mask = first.make_mask(L) if first is not None else ("causal" if L > 1 else None)
        row_scale = rows.rows.astype(h.dtype) if rows is not None else None
        for layer, c in zip(self.layers, cache):
            if isinstance(layer, CrossAttentionDecoderLayer):
                if rows is not None:
                    h = layer(h, rows.mask, row_scale, c, self.meta_rows)
            else:
                h = layer(h, mask, c)
        for c in cross:
            c.offset += L
        return self.norm(h)

    def make_cache(self) -> list:
        return [CrossAttentionCache() if i in self.cross_attention_layers else KVCache()
                for i in range(len(self.layers))]


class LanguageModel(nn.Module):
    def __init__(self, args: ModelArgs, cross_attention_layers: list[int], image_token_index: int,
                 cross_attention_rows: str = "meta"):
        super().__init__()
        self.args = args
        self.model = TextModel(args, cross_attention_layers, image_token_index, cross_attention_rows)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, tokens: mx.array, cache: Optional[list] = None, mask=None) -> mx.array:
        return self.lm_head(self.model(tokens, cache, mask))
