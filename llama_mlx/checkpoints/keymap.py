"""The literal name maps from Meta and GGUF checkpoints to Hugging Face / mlx-lm parameter names.

Keys are module paths (no `.weight`), `{n}` standing for the layer number. GGUF tensors keep
their suffix (`.weight`, and `.scales`/`.biases` for MLX-quantized ones) through the map.
"""

from __future__ import annotations

import re

__all__ = ["GGUF_TO_HF", "META_SHARD_AXIS", "META_TO_HF", "gguf_to_hf", "meta_shard_axis", "meta_to_hf"]

META_TO_HF = {
    "tok_embeddings": "model.embed_tokens",
    "norm": "model.norm",
    "output": "lm_head",
    "layers.{n}.attention.wq": "model.layers.{n}.self_attn.q_proj",
    "layers.{n}.attention.wk": "model.layers.{n}.self_attn.k_proj",
    "layers.{n}.attention.wv": "model.layers.{n}.self_attn.v_proj",
    "layers.{n}.attention.wo": "model.layers.{n}.self_attn.o_proj",
    "layers.{n}.feed_forward.w1": "model.layers.{n}.mlp.gate_proj",
    "layers.{n}.feed_forward.w2": "model.layers.{n}.mlp.down_proj",
    "layers.{n}.feed_forward.w3": "model.layers.{n}.mlp.up_proj",
    "layers.{n}.attention_norm": "model.layers.{n}.input_layernorm",
    "layers.{n}.ffn_norm": "model.layers.{n}.post_attention_layernorm",
}

GGUF_TO_HF = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "blk.{n}.attn_q": "model.layers.{n}.self_attn.q_proj",
    "blk.{n}.attn_k": "model.layers.{n}.self_attn.k_proj",
    "blk.{n}.attn_v": "model.layers.{n}.self_attn.v_proj",
    "blk.{n}.attn_output": "model.layers.{n}.self_attn.o_proj",
    "blk.{n}.ffn_gate": "model.layers.{n}.mlp.gate_proj",
    "blk.{n}.ffn_down": "model.layers.{n}.mlp.down_proj",
    "blk.{n}.ffn_up": "model.layers.{n}.mlp.up_proj",
    "blk.{n}.attn_norm": "model.layers.{n}.input_layernorm",
    "blk.{n}.ffn_norm": "model.layers.{n}.post_attention_layernorm",
}

# How Llama 3's model-parallel shards split each Meta weight: concatenation axis, None = replicated.
META_SHARD_AXIS = {
    "tok_embeddings": 0,  # VocabParallelEmbedding in Llama 3 (Llama 2 split dim 1)
    "output": 0,
    "wq": 0,
    "wk": 0,
    "wv": 0,
    "w1": 0,
    "w3": 0,
    "wo": 1,
    "w2": 1,
    "norm": None,
    "attention_norm": None,
    "ffn_norm": None,
}

_LAYER = re.compile(r"^(layers|blk)\.(\d+)\.(.+)$")


def _lookup(table: dict[str, str], module: str) -> str | None:
    m = _LAYER.match(module)
    if m is None:
        return table.get(module)
    prefix, n, rest = m.groups()
    target = table.get(f"{prefix}.{{n}}.{rest}")
    return None if target is None else target.replace("{n}", n)


def _split(name: str) -> tuple[str, str]:
    module, _, suffix = name.rpartition(".")
    return module, suffix


def meta_to_hf(name: str) -> str | None:
    """HF name of a Meta tensor name (`layers.0.attention.wq.weight`), or None if unknown."""
    module, suffix = _split(name)
    target = _lookup(META_TO_HF, module)
    return None if target is None or suffix != "weight" else f"{target}.{suffix}"


def gguf_to_hf(name: str) -> str | None:
    """HF name of a GGUF tensor name (`blk.0.attn_q.weight`, `.scales`, `.biases`), or None if unknown."""
    module, suffix = _split(name)
    target = _lookup(GGUF_TO_HF, module)
    return None if target is None or suffix not in ("weight", "scales", "biases") else f"{target}.{suffix}"


def meta_shard_axis(name: str) -> int | None:
    """Axis along which the shards of a Meta tensor are concatenated (None: replicated)."""
    module, _ = _split(name)
    return META_SHARD_AXIS[module.rpartition(".")[2]]
