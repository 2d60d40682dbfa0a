"""Independent oracles: Meta's reference `llama.model` on CPU torch, and random tiny checkpoints.

Meta's reference hard-codes CUDA caches and fairscale's model-parallel group; both are patched at
run time here (a one-process gloo group, `Tensor.cuda` as identity while building), never in its files.
"""

from __future__ import annotations

import contextlib
import tempfile

import numpy as np
import torch

TINY_META_PARAMS = {
    "dim": 64,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "vocab_size": 256,
    "multiple_of": 32,
    "ffn_dim_multiplier": 1.3,
    "norm_eps": 1e-5,
    "rope_theta": 500000.0,
}

# Meta's parameter names -> Hugging Face / mlx-lm names, for the oracle side of tests.
_META_TO_HF_LAYER = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def _init_fairscale() -> None:
    import torch.distributed as dist
    from fairscale.nn.model_parallel import initialize as fs_init

    if not dist.is_initialized():
        store = tempfile.NamedTemporaryFile(prefix="llama-mlx-gloo-", delete=False).name
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    if not fs_init.model_parallel_is_initialized():
        fs_init.initialize_model_parallel(1)


@contextlib.contextmanager
def _cuda_as_cpu():
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def meta_reference(params: dict, state_dict: dict, max_seq_len: int = 256):
    """Meta's `llama.model.Transformer` in float32 on CPU, loaded with `state_dict`."""
    from llama.model import ModelArgs, Transformer

    _init_fairscale()
    known = {k: v for k, v in params.items() if k in ModelArgs.__dataclass_fields__}
    args = ModelArgs(max_batch_size=2, max_seq_len=max_seq_len, **known)
    torch.set_default_dtype(torch.float32)
    with _cuda_as_cpu():
        model = Transformer(args)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def random_meta_state_dict(params: dict, seed: int = 0, scale: float = 0.08) -> dict[str, torch.Tensor]:
    """A random Llama 3 state dict of Meta's names and shapes."""
    from llama_mlx.config import ffn_hidden_dim

    g = torch.Generator().manual_seed(seed)
    dim, n_heads = params["dim"], params["n_heads"]
    n_kv = params.get("n_kv_heads") or n_heads
    head_dim = dim // n_heads
    hidden = ffn_hidden_dim(dim, params["multiple_of"], params.get("ffn_dim_multiplier"))

    def w(*shape):
        return torch.randn(*shape, generator=g) * scale

    sd = {"tok_embeddings.weight": w(params["vocab_size"], dim)}
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        sd[p + "attention.wq.weight"] = w(n_heads * head_dim, dim)
        sd[p + "attention.wk.weight"] = w(n_kv * head_dim, dim)
        sd[p + "attention.wv.weight"] = w(n_kv * head_dim, dim)
        sd[p + "attention.wo.weight"] = w(dim, n_heads * head_dim)
        sd[p + "feed_forward.w1.weight"] = w(hidden, dim)
        sd[p + "feed_forward.w2.weight"] = w(dim, hidden)
        sd[p + "feed_forward.w3.weight"] = w(hidden, dim)
        sd[p + "attention_norm.weight"] = 1 + w(dim)
        sd[p + "ffn_norm.weight"] = 1 + w(dim)
    sd["norm.weight"] = 1 + w(dim)
    sd["output.weight"] = w(params["vocab_size"], dim)
    return sd


def hf_name(meta_name: str) -> str:
    """A Meta parameter name under Hugging Face's naming (written out here, independently of the converter)."""
    base = meta_name.removesuffix(".weight")
    top = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
    if base in top:
        return top[base] + ".weight"
    _, i, rest = base.split(".", 2)
    return f"model.layers.{i}.{_META_TO_HF_LAYER[rest]}.weight"


def meta_to_hf_names(state_dict: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Rename (not permute) Meta weights to HF names, as numpy: the oracle side of parity tests."""
    return {hf_name(name): t.float().numpy() for name, t in state_dict.items()}


def tiny_random_model(params: dict, seed: int = 7, scale: float = 0.3):
    """Our Model with Meta-layout random weights of `params`; large weights make the logits peaked,
    so greedy choices are far from ties."""
    import mlx.core as mx

    from llama_mlx.config import config_from_meta_params
    from llama_mlx.model import Model, ModelArgs

    m = Model(ModelArgs.from_dict(config_from_meta_params(params)))
    weights = meta_to_hf_names(random_meta_state_dict(params, seed=seed, scale=scale))
    m.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
    mx.eval(m.parameters())
    return m


def greedy_without_cache(model, prompt, n: int) -> list[int]:
    """The oracle for cached decoding: n greedy tokens, each from a full forward of everything so far."""
    import mlx.core as mx

    tokens, out = list(prompt), []
    for _ in range(n):
        t = int(mx.argmax(model(mx.array([tokens]))[0, -1]))
        out.append(t)
        tokens.append(t)
    return out
