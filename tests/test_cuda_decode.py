"""The fused CUDA decode step's wiring, checked on the CPU against mlx-lm.

The CUDA kernels cannot run here, so each is replaced by MLX ops computing what its docstring
says (`fused_matvec`: residual + RMSNorm / SwiGLU prologue, 4-bit matvec, RoPE and q/k/v split;
`decode_attention`: attention of row b over its first offset[b] + 1 buffer positions). The step that
`backends.decode_step` compiles around them (residual stream, norms, cache writes at an array offset,
retracing when the cache grows) must then give mlx-lm's logits token by token. The kernels
themselves are compared with the plain graph on the GPU by `benchmarks/decode_probe.py`.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from llama_mlx import backends
from llama_mlx.backends import cuda, fusion
from llama_mlx.cache import make_prompt_cache
from llama_mlx.model import Model, ModelArgs
from cuda_reference import attention, matvec, rows_matmul, shared_attention

CONFIG = {
    "model_type": "llama", "hidden_size": 128, "num_hidden_layers": 2, "intermediate_size": 256,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "max_position_embeddings": 131072,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 64},
}


def quantized_pair(tied, traditional, seed):
    """Ours (q/k/v and gate/up fused) and mlx-lm's model with the same random 4-bit g32 weights."""
    from mlx_lm.models import llama as mlx_lm_llama

    config = dict(CONFIG, tie_word_embeddings=tied, rope_traditional=traditional)
    mx.random.seed(seed)
    theirs = mlx_lm_llama.Model(mlx_lm_llama.ModelArgs.from_dict(config))
    nn.quantize(theirs, group_size=32, bits=4)
    for _, m in theirs.named_modules():  # norms start at ones: make each one distinguishable
        if isinstance(m, nn.RMSNorm):
            m.weight = 1.0 + 0.3 * mx.random.normal(m.weight.shape)
    ours = Model(ModelArgs.from_dict(config))
    nn.quantize(ours, group_size=32, bits=4)
    ours.load_weights(tree_flatten(theirs.parameters()), strict=True)
    fusion.fuse(ours)
    return ours, theirs


@pytest.mark.parametrize("tied, traditional", [(True, False), (False, True)])
def test_fused_step_gives_mlx_lm_logits_token_by_token(monkeypatch, backend_row, tied, traditional):
    from mlx_lm.models.cache import make_prompt_cache as mlx_lm_cache

    backend_row("cuda")
    monkeypatch.setattr(cuda.decoder, "supported", lambda model: True)
    monkeypatch.setattr(cuda.kernels, "fused_matvec", matvec)
    monkeypatch.setattr(cuda.kernels, "decode_attention", attention)

    ours, theirs = quantized_pair(tied, traditional, seed=3)

    ids = np.random.default_rng(4).integers(0, 256, size=262)
    prompt, steps = mx.array(ids[None, :250]), ids[250:]  # the cache grows past 256: a second trace
    cache, their_cache = make_prompt_cache(len(ours.layers)), mlx_lm_cache(theirs)
    step = backends.decode_step(ours, cache)
    assert step.kind == "fused"
    ours(prompt, cache)
    theirs(prompt, cache=their_cache)
    got, want = [], []
    for t in steps:
        token = mx.array([[int(t)]])
        got.append(np.array(step(token)))
        want.append(np.array(theirs(token, cache=their_cache)[:, -1, :]))
    np.testing.assert_allclose(np.concatenate(got), np.concatenate(want), atol=1e-4, rtol=0)
    assert cache[0].offset == 262 and cache[0].keys.shape[2] == 512


def fused_pair(monkeypatch, backend_row, tied, traditional):
    """The CUDA row forced, its fused decoders supported, MLX ops in place of its kernels."""
    backend_row("cuda")
    monkeypatch.setattr(cuda.decoder, "fused_rows_supported", lambda model: True)
    monkeypatch.setattr(cuda.kernels, "rows_matmul", rows_matmul)
    monkeypatch.setattr(cuda.kernels, "decode_attention", shared_attention)
    return quantized_pair(tied, traditional, seed=5)


@pytest.mark.parametrize("tied, traditional", [(True, False), (False, True)])
def test_fused_rows_step_gives_each_row_mlx_lm_logits_alone(monkeypatch, backend_row, tied, traditional):
    """The batch step CUDA runs for 4-bit models (`FusedRowsDecoder`: every layer in few-row kernels,
    here MLX ops doing what their docstrings say) over rows of different lengths, rows joining and
    leaving: each row's logits are mlx-lm's for that sequence alone."""
    from mlx_lm.models.cache import make_prompt_cache as mlx_lm_cache

    from llama_mlx.cache import BatchKVCache
    from llama_mlx.cache import KVCache

    ours, theirs = fused_pair(monkeypatch, backend_row, tied, traditional)
    rng = np.random.default_rng(6)
    prompts = [[int(t) for t in rng.integers(0, 256, size=n)] for n in (3, 40, 17)]
    batch = [BatchKVCache() for _ in ours.layers]
    theirs_caches = []
    for p in prompts:
        cache = [KVCache() for _ in ours.layers]
        ours(mx.array([p]), cache)
        for layer, c in zip(batch, cache):
            layer.add(c.keys, c.values, c.offset)
        tc = mlx_lm_cache(theirs)
        theirs(mx.array([p]), cache=tc)
        theirs_caches.append(tc)
    step = backends.rows_step(ours, batch)
    assert step.kind == "rows-fused"
    for i in range(6):
        if i == 3:  # the second row leaves
            for c in batch:
                c.keep([0, 2])
            del theirs_caches[1]
        tokens = [int(t) for t in rng.integers(0, 256, size=len(theirs_caches))]
        got = np.array(step(mx.array([[t] for t in tokens])))
        for b, (t, tc) in enumerate(zip(tokens, theirs_caches)):
            want = np.array(theirs(mx.array([[t]]), cache=tc)[0, -1])
            np.testing.assert_allclose(got[b], want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("tied, traditional", [(True, False), (False, True)])
def test_fused_check_step_gives_mlx_lm_logits_at_every_position(monkeypatch, backend_row, tied, traditional):
    """The speculative check CUDA runs for 4-bit models (`FusedCheckDecoder` through
    `backends.verify_step`): L = 1, 5 and 16 positions after a prompt (and 17, past its bound: the
    graph), each position's logits are mlx-lm's, and the cache holds the L positions afterwards
    (then trimmed, as a rejection does)."""
    from mlx_lm.models.cache import make_prompt_cache as mlx_lm_cache

    ours, theirs = fused_pair(monkeypatch, backend_row, tied, traditional)
    rng = np.random.default_rng(7)
    prompt = mx.array(rng.integers(0, 256, size=(1, 30)).astype(np.int32))
    cache = make_prompt_cache(len(ours.layers))
    ours(prompt, cache)
    step = backends.verify_step(ours, cache)
    assert step.kind == "check-fused"
    for L in (1, 5, 16, 17):
        draft = mx.array(rng.integers(0, 256, size=(1, L)).astype(np.int32))
        tc = mlx_lm_cache(theirs)
        theirs(prompt, cache=tc)
        want = np.array(theirs(draft, cache=tc))
        got = np.array(step(draft))
        assert got.shape == want.shape and cache[0].offset == 30 + L
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        for c in cache:
            c.trim(L)


def test_fused_step_runs_a_few_tokens_through_the_check(monkeypatch, backend_row):
    """A draft model catching up on two tokens (a round it got all right) and a short new turn
    stay on CUDA's fused path: `decode_step` gives 2 and 16 tokens at once to the fused check, and
    their last position's logits are mlx-lm's; 17 tokens take the graph."""
    from mlx_lm.models.cache import make_prompt_cache as mlx_lm_cache

    monkeypatch.setattr(cuda.decoder, "supported", lambda model: True)
    monkeypatch.setattr(cuda.kernels, "fused_matvec", matvec)
    ours, theirs = fused_pair(monkeypatch, backend_row, True, False)
    rng = np.random.default_rng(9)
    prompt = mx.array(rng.integers(0, 256, size=(1, 20)).astype(np.int32))
    cache, their_cache = make_prompt_cache(len(ours.layers)), mlx_lm_cache(theirs)
    ours(prompt, cache)
    theirs(prompt, cache=their_cache)
    step = backends.decode_step(ours, cache)
    assert step.kind == "fused" and step.short.kind == "check-fused"
    calls = []
    monkeypatch.setattr(step.short, "graph", lambda *a, graph=step.short.graph: calls.append(1) or graph(*a))
    for L in (2, 16, 17):
        tokens = mx.array(rng.integers(0, 256, size=(1, L)).astype(np.int32))
        got = np.array(step(tokens))
        want = np.array(theirs(tokens, cache=their_cache)[:, -1, :])
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert len(calls) == 2 and cache[0].offset == 20 + 2 + 16 + 17


def perturbed(model, seed, scale):
    """A copy of `model` (its weights, quantized as they are) with every norm weight nudged: a draft
    that agrees with it often, not always."""
    import copy

    draft = copy.deepcopy(model)
    mx.random.seed(seed)
    for _, m in draft.named_modules():
        if isinstance(m, nn.RMSNorm):
            m.weight = m.weight * (1.0 + scale * mx.random.normal(m.weight.shape))
    return draft


# Drafts a round in place of the adaptive controller's choice: drafting off for up to 20 rounds
# (the draft model then catches up on more tokens than the fused check takes at once).
TOGGLE = [3, 0, 0, 2, 0, 1] + [0] * 20 + [3, 3, 0, 2]


@pytest.mark.parametrize("scale, schedule", [(0.0, None), (0.3, None), (3.0, None), (0.0, TOGGLE)])
def test_queued_rounds_equal_mlx_lm_greedy_and_leave_checked_caches(monkeypatch, backend_row, scale, schedule):
    """On CUDA's fused steps (here with MLX ops as the kernels) speculative rounds are queued on the
    device, each before the previous is read. Drafts agreeing always (the target itself), often and
    rarely, K every round; and drafting switched off and on (`schedule`), the draft model catching
    up on what it skipped: the tokens are mlx-lm's plain greedy ones, every draft of the target's
    own is accepted, and after closing mid-answer each cache holds exactly the keys and values
    mlx-lm computes for the tokens it says it holds."""
    from mlx_lm.generate import generate_step as mlx_lm_generate_step
    from mlx_lm.models.cache import make_prompt_cache as mlx_lm_cache

    from llama_mlx import speculative
    from llama_mlx.speculative import speculative_generate_step

    monkeypatch.setattr(cuda.decoder, "supported", lambda model: True)
    monkeypatch.setattr(cuda.kernels, "fused_matvec", matvec)
    ours, theirs = fused_pair(monkeypatch, backend_row, False, True)
    draft = ours if scale == 0 else perturbed(ours, 11, scale)
    pushed = []
    push = speculative._Rounds.push
    monkeypatch.setattr(speculative._Rounds, "push", lambda self, *a: pushed.append(1) or push(self, *a))
    adaptive = {"adaptive": False}
    if schedule is not None:
        adaptive = {}
        monkeypatch.setattr(speculative._Adapt, "choose",
                            lambda self, limit: min(self.__dict__.setdefault("plan", iter(schedule * 9)).__next__(),
                                                    limit))
    prompt = [int(t) for t in np.random.default_rng(12).integers(0, 256, size=25)]
    want = [int(t) for t, _ in mlx_lm_generate_step(mx.array(prompt), theirs, max_tokens=40)]

    cache, dcache = make_prompt_cache(len(ours.layers)), make_prompt_cache(len(draft.layers))
    steps = speculative_generate_step(mx.array(prompt), ours, draft_model=draft, num_draft_tokens=3,
                                      max_tokens=40, prompt_cache=cache, draft_cache=dcache, **adaptive)
    got = list(steps)
    assert [t.token for t in got] == want and len(pushed) >= 40 // 4
    accepted = sum(t.from_draft for t in got)
    if schedule is not None:
        stats = got[-1].stats
        assert stats["accepted"] == stats["drafted"] >= 10 and stats["rounds_off"] >= 20
    else:
        assert (accepted == got[-1].drafted) if scale == 0 else (0 < accepted < got[-1].drafted) if scale < 1 else True

    for take in (1, 6, 17, 33):
        cache, dcache = make_prompt_cache(len(ours.layers)), make_prompt_cache(len(draft.layers))
        steps = speculative_generate_step(mx.array(prompt), ours, draft_model=draft, num_draft_tokens=3,
                                          max_tokens=40, prompt_cache=cache, draft_cache=dcache, **adaptive)
        assert [next(steps).token for _ in range(take)] == want[:take]
        steps.close()
        seq = prompt + want[:take]
        for c, model in ((cache, theirs), (dcache, None)):
            n = c[0].offset
            assert len(prompt) - 1 <= n <= len(seq) and all(x.offset == n for x in c)
            ref = mlx_lm_cache(theirs)
            if model is None:  # the draft's keys: its own model's, over the same tokens
                ref = make_prompt_cache(len(draft.layers))
                draft(mx.array([seq[:n]]), ref)
            else:
                theirs(mx.array([seq[:n]]), cache=ref)
            for x, y in zip(c, ref):
                np.testing.assert_allclose(np.array(x.keys[..., :n, :]), np.array(y.keys[..., :n, :]), atol=1e-4)
                np.testing.assert_allclose(np.array(x.values[..., :n, :]), np.array(y.values[..., :n, :]), atol=1e-4)


def test_long_buffers_attend_by_sdpa_over_each_rows_positions(monkeypatch):
    """From `kernels.SDPA_FROM` positions the CUDA wing's decode attention is MLX's SDPA (runs on the
    CPU too): row b's one query over its positions 0..offset[b] of the buffers, grouped heads; numpy's
    softmax attention is the oracle, the flat [B * Hq * D] layout the kernel's."""
    monkeypatch.setattr(cuda.kernels, "SDPA_FROM", 64)
    rng = np.random.default_rng(0)
    B, HQ, HKV, C, D = 3, 4, 2, 64, 32
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((B, HQ, 1, D), (B, HKV, C, D), (B, HKV, C, D)))
    offset = np.array([0, 17, 63], dtype=np.int32)
    got = cuda.kernels.decode_attention(mx.array(q), mx.array(k), mx.array(v), mx.array(offset), D**-0.5)
    want = np.zeros((B, HQ, D), np.float32)
    for b in range(B):
        for h in range(HQ):
            n, g = offset[b] + 1, h // (HQ // HKV)
            s = k[b, g, :n] @ q[b, h, 0] * D**-0.5
            w = np.exp(s - s.max())
            want[b, h] = (w / w.sum()) @ v[b, g, :n]
    np.testing.assert_allclose(np.array(got), want.reshape(-1), atol=1e-5)
