"""Model configuration in one form: a Hugging Face `config.json` dict.

Meta's params.json is translated here (`config_from_meta_params`), and the Llama 3 constants
(FFN width rule, "llama3" RoPE scaling) live here, so readers never import the model.
"""

from __future__ import annotations

from typing import Optional

__all__ = [
    "LLAMA3_ROPE",
    "config_from_meta_params",
    "ffn_hidden_dim",
    "llama3_rope_scaling",
    "meta_rope_factor",
]

# Llama 3.1's "llama3" RoPE scaling: Meta's constants; only the factor varies between models.
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """Feed-forward width exactly as Meta computes it from params.json."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def meta_rope_factor(params: dict) -> float:
    """Llama 3.2 1B/3B were trained with rope factor 32, the rest with 8; params.json does not say."""
    if params.get("rope_scaling_factor") is not None:
        return float(params["rope_scaling_factor"])
    return 32.0 if (params["dim"], params["n_layers"]) in {(2048, 16), (3072, 28)} else 8.0


def llama3_rope_scaling(factor: float) -> dict:
    """Llama 3.1's "llama3" RoPE scaling with Meta's constants (only the factor varies)."""
    return {**LLAMA3_ROPE, "factor": float(factor)}


def config_from_meta_params(params: dict, *, rope_factor: Optional[float] = None) -> dict:
    """Translate a Meta params.json into a Hugging Face style config dict.

    Scaled RoPE applies when params.json says `use_scaled_rope` or a `rope_factor` is given.
    """
    dim, n_heads = params["dim"], params["n_heads"]
    scaled = bool(params.get("use_scaled_rope", False)) or rope_factor is not None
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": dim,
        "num_hidden_layers": params["n_layers"],
        "num_attention_heads": n_heads,
        "num_key_value_heads": params.get("n_kv_heads") or n_heads,
        "head_dim": dim // n_heads,
        "intermediate_size": ffn_hidden_dim(
            dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier")
        ),
        "vocab_size": params["vocab_size"],
        "rms_norm_eps": params.get("norm_eps", 1e-5),
        "rope_theta": params.get("rope_theta", 500000.0),
        "rope_traditional": True,  # Meta checkpoints rotate interleaved pairs
        "max_position_embeddings": 131072 if scaled else 8192,
        "tie_word_embeddings": bool(params.get("tie_word_embeddings", False)),
        "rope_scaling": None,
    }
    if scaled:
        config["rope_scaling"] = llama3_rope_scaling(
            rope_factor if rope_factor is not None else meta_rope_factor(params)
        )
    return config
