"""Tiny random Llama 3 checkpoints in every layout, and Meta's reference model, for the checkpoint tests.

No tests here: the test_checkpoints*/test_convert* modules import these helpers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

import assets
from oracles import TINY_META_PARAMS

# A tiny Llama 3: dim 64, 2 layers, 4 heads of 16, 2 kv heads, SwiGLU width 192.
TINY_PARAMS = {**TINY_META_PARAMS, "ffn_dim_multiplier": None, "use_scaled_rope": False}
FFN = 192
TOKENS = [[1, 17, 42, 200, 3, 99, 128, 7, 255, 64, 31, 5]]


def meta_state_dict(params: dict = TINY_PARAMS, *, seed: int = 0, tied: bool = False, dtype=None):
    """A random float32 (or `dtype`) Meta-named state dict (q/k rows in Meta's interleaved layout)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    d, v = params["dim"], params["vocab_size"]
    hd = d // params["n_heads"]
    kv = params["n_kv_heads"] * hd

    def rnd(*shape, scale=0.08):
        return torch.randn(*shape, generator=g) * scale

    sd = {"tok_embeddings.weight": rnd(v, d, scale=0.5), "norm.weight": 1 + rnd(d, scale=0.1)}
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        sd.update({
            p + "attention.wq.weight": rnd(d, d, scale=0.2),
            p + "attention.wk.weight": rnd(kv, d, scale=0.2),
            p + "attention.wv.weight": rnd(kv, d),
            p + "attention.wo.weight": rnd(d, d),
            p + "feed_forward.w1.weight": rnd(FFN, d),
            p + "feed_forward.w2.weight": rnd(d, FFN),
            p + "feed_forward.w3.weight": rnd(FFN, d),
            p + "attention_norm.weight": 1 + rnd(d, scale=0.1),
            p + "ffn_norm.weight": 1 + rnd(d, scale=0.1),
        })
    if not tied:
        sd["output.weight"] = rnd(v, d, scale=0.2)
    if dtype is not None:
        sd = {k: t.to(dtype) for k, t in sd.items()}
    return sd


SHARD_AXIS = {"tok_embeddings": 0, "output": 0, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1}


def write_meta(folder: Path, sd: dict, params: dict = TINY_PARAMS, *, shards: int = 2, tokenizer: bool = True) -> Path:
    """Split the full state dict the way Llama 3's model parallelism did and torch.save each rank."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    parts = [dict() for _ in range(shards)]
    for name, t in sd.items():
        axis = SHARD_AXIS.get(name.split(".")[-2])
        chunks = [t] * shards if axis is None else list(torch.chunk(t, shards, dim=axis))
        for part, c in zip(parts, chunks):
            part[name] = c.clone()
    for i, part in enumerate(parts):
        torch.save(part, folder / f"consolidated.{i:02d}.pth")
    (folder / "params.json").write_text(json.dumps({k: v for k, v in params.items() if v is not None}))
    if tokenizer:
        shutil.copyfile(assets.TOKENIZER_MODEL, folder / "tokenizer.model")
    return folder


def permute_for_hf(w, n_heads: int):
    """Meta's interleaved q/k rows -> Hugging Face's half-split rows (HF's converter)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_state_dict(sd: dict, params: dict = TINY_PARAMS) -> dict:
    from oracles import hf_name

    out = {}
    for name, t in sd.items():
        if name.endswith("attention.wq.weight"):
            t = permute_for_hf(t, params["n_heads"])
        elif name.endswith("attention.wk.weight"):
            t = permute_for_hf(t, params["n_kv_heads"])
        out[hf_name(name)] = t
    return out


def hf_config(params: dict = TINY_PARAMS, *, tied: bool = False, rope_scaling: dict | None = None):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=params["dim"], intermediate_size=FFN, num_hidden_layers=params["n_layers"],
        num_attention_heads=params["n_heads"], num_key_value_heads=params["n_kv_heads"],
        vocab_size=params["vocab_size"], rms_norm_eps=params["norm_eps"], rope_theta=params["rope_theta"],
        rope_scaling=rope_scaling, tie_word_embeddings=tied, max_position_embeddings=131072,
        bos_token_id=128000, eos_token_id=128001,
    )


def write_hf(folder: Path, sd: dict, params: dict = TINY_PARAMS, *, tied: bool = False,
             rope_scaling: dict | None = None, classic_rope_keys: bool = False):
    """transformers' own save_pretrained of a LlamaForCausalLM holding `sd`, with the Llama 3 tokenizer.

    classic_rope_keys: also write rope_theta/rope_scaling (transformers 5 writes only rope_parameters,
    which mlx-lm 0.32 does not read), so mlx-lm and we see the same model.
    """
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    model = LlamaForCausalLM(hf_config(params, tied=tied, rope_scaling=rope_scaling)).eval()
    missing, unexpected = model.load_state_dict(hf_state_dict(sd, params), strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    model.generation_config = GenerationConfig(bos_token_id=128000, eos_token_id=[128001, 128008, 128009])
    model.save_pretrained(folder)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(assets.TOKENIZER_JSON), bos_token="<|begin_of_text|>",
                                  eos_token="<|end_of_text|>")
    tok.save_pretrained(folder)
    if classic_rope_keys:
        cfg = json.loads((folder / "config.json").read_text())
        cfg["rope_theta"] = params["rope_theta"]
        cfg["rope_scaling"] = rope_scaling
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.float().numpy()


GGUF_NAMES = {
    "tok_embeddings": "token_embd", "norm": "output_norm", "output": "output",
    "attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v", "attention.wo": "attn_output",
    "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up",
    "attention_norm": "attn_norm", "ffn_norm": "ffn_norm",
}


def gguf_name(meta_name: str) -> str:
    module = meta_name[: -len(".weight")]
    if module.startswith("layers."):
        _, i, rest = module.split(".", 2)
        return f"blk.{i}.{GGUF_NAMES[rest]}.weight"
    return GGUF_NAMES[module] + ".weight"


_SMOL_TOKENIZER: dict | None = None


def add_smollm2_tokenizer(w) -> None:
    """Write SmolLM2's tokenizer metadata into a gguf.GGUFWriter, each value with its GGUF type."""
    for key, value in smollm2_tokenizer_metadata().items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)


def smollm2_tokenizer_metadata() -> dict:
    """The tokenizer.* metadata of the real SmolLM2 GGUF (vocabulary 49152), read from its header only."""
    global _SMOL_TOKENIZER
    if _SMOL_TOKENIZER is None:
        from llama_mlx.gguf_file import read_gguf_metadata

        meta = read_gguf_metadata(assets.SMOLLM2_GGUF)
        _SMOL_TOKENIZER = {k: v for k, v in meta.items() if k.startswith("tokenizer.")}
    return _SMOL_TOKENIZER


def write_gguf(path: Path, sd: dict, params: dict, types: dict[str, str] | None = None) -> dict:
    """Write `sd` (Meta names, Meta q/k layout, as llama.cpp stores it) as a llama GGUF with SmolLM2's
    tokenizer metadata. types: GGUF tensor name suffix (e.g. "attn_q") -> "F16", "BF16", "Q8_0", ...;
    others F32. Returns the state dict as the file holds it (dequantized), for the reference model."""
    import gguf
    import torch
    from gguf import GGMLQuantizationType as T

    types = types or {}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(8192)
    w.add_embedding_length(params["dim"])
    w.add_block_count(params["n_layers"])
    w.add_feed_forward_length(FFN)
    w.add_head_count(params["n_heads"])
    w.add_head_count_kv(params["n_kv_heads"])
    w.add_rope_dimension_count(params["dim"] // params["n_heads"])
    w.add_rope_freq_base(params["rope_theta"])
    w.add_layer_norm_rms_eps(params["norm_eps"])
    w.add_vocab_size(params["vocab_size"])
    add_smollm2_tokenizer(w)
    held = {}
    for name, t in sd.items():
        gname = gguf_name(name)
        kind = types.get(gname.split(".")[-2], "F32")
        x = t.float().numpy()
        if kind == "F32":
            w.add_tensor(gname, x)
            held[name] = torch.from_numpy(x.copy())
        elif kind == "F16":
            w.add_tensor(gname, x.astype(np.float16))
            held[name] = torch.from_numpy(x.astype(np.float16).astype(np.float32))
        else:
            qtype = getattr(T, kind)
            q = gguf.quants.quantize(x, qtype)
            w.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=qtype)
            held[name] = torch.from_numpy(gguf.quants.dequantize(q, qtype).reshape(x.shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


def meta_reference_logits(sd: dict, params: dict = TINY_PARAMS, tokens=TOKENS) -> np.ndarray:
    """Logits of Meta's reference `llama.model.Transformer` (meta-llama3==0.0.1) holding `sd`."""
    import torch

    from oracles import meta_reference

    full = dict(sd)
    full.setdefault("output.weight", full["tok_embeddings.weight"])  # tied checkpoints
    model = meta_reference(params, {k: v.float() for k, v in full.items()}, max_seq_len=64)
    return model(torch.tensor(tokens), 0).float().numpy()


def our_logits(model, tokens=TOKENS) -> np.ndarray:
    import mlx.core as mx

    return np.array(model(mx.array(tokens)).astype(mx.float32))
