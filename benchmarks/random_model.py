"""Random-weight MLX folders of real Llama 3 shapes, which llama-mlx and mlx-lm both load.

`write_random_model(folder, "1b")` writes an MLX folder (4-bit, group 64 by default) of Llama 3.2
1B's shape with random weights: random weights cost the same as real ones. Tensors are generated
shard by shard, so memory holds one shard at a time.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import zlib
from pathlib import Path
from typing import Any

import mlx.core as mx

from llama_mlx.config import llama3_rope_scaling

__all__ = ["SHAPES", "shape_config", "write_random_model"]


SHAPES: dict[str, dict[str, Any]] = {
    # A few-MB model for tests: every code path of the real ones, in milliseconds.
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=256, vocab_size=512, tie_word_embeddings=True, rope_factor=32.0),
    # Llama 3.2 1B
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, rope_factor=32.0),
    # Llama 3.1 8B
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False, rope_factor=8.0),
    # Llama 3.1 70B (about 40 GB at 4 bits): for GPUs and multi-machine runs only
    "70b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                intermediate_size=28672, vocab_size=128256, tie_word_embeddings=False, rope_factor=8.0),
}


def shape_config(shape: str | dict) -> dict:
    """The Hugging Face config.json dict (Llama 3 RoPE scaling) of a named shape or a dict of its sizes."""
    sizes = dict(SHAPES[shape] if isinstance(shape, str) else shape)
    factor = sizes.pop("rope_factor", 8.0)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_traditional": False,
        "max_position_embeddings": 131072,
        "rope_scaling": llama3_rope_scaling(factor),
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        **sizes,
    }
    config["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    config["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", False))  # mlx-lm defaults to true
    return config


_MARKER = "llama_mlx_benchmark"  # config.json entry describing how the random folder was made
_SPECIAL = ["<unk>", "<|begin_of_text|>", "<|end_of_text|>"]


def _param_specs(config: dict, bits: int, group_size: int) -> list[tuple[str, tuple[int, ...], Any]]:
    """(name, shape, dtype) of every parameter of the quantized model, in order; nothing is computed."""
    from mlx.utils import tree_flatten

    from llama_mlx.model import Model, ModelArgs
    from llama_mlx.quant import quantize

    model = Model(ModelArgs.from_dict(config))  # lazily initialised: only shapes are read
    quantize(model, bits, group_size)
    specs = [(name, tuple(a.shape), a.dtype) for name, a in tree_flatten(model.parameters())]
    del model
    return specs


def _random_tensor(name: str, shape: tuple[int, ...], stored: Any, dtype: Any, bits: int,
                   group_size: int, seed: int) -> mx.array:
    """Random packed weights, scales centred so a dequantized row has about unit gain, norms of ones."""
    if stored == mx.uint32:  # packed quantized values: random bytes
        return mx.random.randint(0, 256, (*shape[:-1], shape[-1] * 4), dtype=mx.uint8).view(mx.uint32)
    if name.endswith(".scales") or name.endswith(".biases"):
        in_features = shape[-1] * group_size
        levels = (1 << bits) - 1
        # Uniform codes in [0, levels] have std ~ levels / sqrt(12); aim for weights of std 1/sqrt(in).
        base = math.sqrt(12) / levels / math.sqrt(in_features)
        key = mx.random.key(zlib.crc32(f"{seed}:{name.rsplit('.', 1)[0]}".encode()))  # scales and biases agree
        scales = mx.random.uniform(0.5 * base, 1.5 * base, shape, key=key)
        out = scales if name.endswith(".scales") else -scales * (levels / 2)
        return out.astype(dtype)
    return mx.ones(shape, dtype=dtype)  # RMSNorm weights (and any other float vector)


def _write_tokenizer(folder: Path, size: int = 256) -> None:
    """A small word-level tokenizer that both runtimes load (benchmarks feed token ids directly)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(_SPECIAL)}
    for i in range(len(_SPECIAL), size):
        vocab[f"t{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(_SPECIAL)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": _SPECIAL[1], "eos_token": _SPECIAL[2],
              "unk_token": _SPECIAL[0], "add_bos_token": False, "model_max_length": 131072}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_random_model(folder: str | Path, shape: str | dict = "1b", *, bits: int = 4, group_size: int = 64,
                       dtype: str = "bfloat16", seed: int = 0, max_shard_bytes: int = 1 << 30,
                       force: bool = False) -> Path:
    """Write a random-weight, quantized MLX folder of a model shape (see SHAPES); returns its path.

    The folder has config.json (Hugging Face keys, `quantization`, explicit `tie_word_embeddings`),
    safetensors shards with an index, and a small tokenizer; `llama_mlx.loading.load` and
    `mlx_lm.load` both read it. An existing folder made with the same settings is reused (unless
    `force`); it is written into a temporary folder and renamed into place when complete.
    """
    folder = Path(folder)
    config = shape_config(shape)
    made = {"shape": shape if isinstance(shape, str) else dict(shape), "bits": bits, "group_size": group_size,
            "dtype": dtype, "seed": seed, "weights": "random"}
    if (folder / "config.json").is_file() and not force:
        try:
            old = json.loads((folder / "config.json").read_text()).get(_MARKER)
        except (OSError, json.JSONDecodeError):
            old = None
        if old == made:
            return folder
        raise FileExistsError(f"{folder}: exists and was not made with these settings (use force to replace it)")
    from llama_mlx.checkpoints.plan import Item
    from llama_mlx.checkpoints.writer import write_weights

    float_dtype = getattr(mx, dtype)

    def item(name: str, shape: tuple[int, ...], stored: Any) -> Item:
        out_dtype = stored if stored == mx.uint32 else float_dtype
        return Item(name, [(name, shape, out_dtype)],
                    lambda: {name: _random_tensor(name, shape, stored, float_dtype, bits, group_size, seed)},
                    math.prod(shape))

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        mx.random.seed(seed)
        # The converter's writer: shards of bounded size with an index, one tensor in memory at a time.
        write_weights(tmp, [item(*spec) for spec in _param_specs(config, bits, group_size)],
                      max_shard_bytes=max_shard_bytes)
        _write_tokenizer(tmp)
        quantization = {"group_size": group_size, "bits": bits}
        full = {**config, "torch_dtype": dtype, "quantization": quantization, "quantization_config": quantization,
                "bos_token_id": 1, "eos_token_id": 2, _MARKER: made}
        (tmp / "config.json").write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
