"""The CUDA wing's kernels and decoders, run on the GPU against the reference math.

Marked `cuda`: deselected by default (the suite runs where there is no CUDA); on the GPU machine
`python -m pytest -m cuda tests/test_cuda_kernels.py`, or without pytest `python
tests/test_cuda_kernels.py`. Each kernel (`backends/cuda/kernels.py`) is compared with what its
docstring says, in MLX ops (`cuda_reference`), on random 4-bit weights in bfloat16; then each
decoder the CUDA row runs is compared with the model's own graph, token for token.
"""

import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from cuda_reference import attention, matvec, rows_matmul, shared_attention  # noqa: E402
from llama_mlx.backends import CompiledCheckStep, CompiledStep, GraphStep, cuda, fusion  # noqa: E402
from llama_mlx.cache import BatchKVCache, KVCache  # noqa: E402
from llama_mlx.model import Model, ModelArgs  # noqa: E402

try:
    import pytest

    pytestmark = pytest.mark.cuda
except ImportError:  # the GPU machine may have no pytest: see main()
    pytest = None

DTYPE = mx.bfloat16
CONFIG = {
    "model_type": "llama", "hidden_size": 256, "num_hidden_layers": 2, "intermediate_size": 512,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": False,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 64},
}


def close(got, want, rel=0.02):
    """bfloat16 on both sides: within `rel` of the largest reference magnitude."""
    got, want = np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32))
    assert got.shape == want.shape, (got.shape, want.shape)
    err = np.abs(got - want).max()
    assert err <= rel * max(np.abs(want).max(), 1e-3), f"max error {err:.4g}, scale {np.abs(want).max():.4g}"


def weight(N, K, group_size=64, seed=0):
    mx.random.seed(seed)
    w = mx.random.normal((N, K)).astype(DTYPE) * 0.05
    return (*mx.quantize(w, group_size=group_size, bits=4), group_size)


def rope_args(offset, nq=4, nkv=2, D=64, traditional=False):
    inv_freq = 1.0 / (500000.0 ** (mx.arange(0, D, 2, dtype=mx.float32) / D))
    return dict(offset=offset, inv_freq=inv_freq, n_heads=nq, n_kv_heads=nkv, head_dim=D, traditional=traditional)


def prologues(K, R=None, seed=1):
    """The three ways a kernel's input arrives: x, residual + rms_norm, gate/up + SwiGLU."""
    mx.random.seed(seed)
    shape = (K,) if R is None else (R, K)
    gu_shape = (2 * K,) if R is None else (R, 2 * K)
    a, b = mx.random.normal(shape).astype(DTYPE), mx.random.normal(shape).astype(DTYPE)
    norm = (1.0 + 0.1 * mx.random.normal((K,))).astype(DTYPE)
    return {"x": dict(x=a), "residual": dict(residual=(a, b, norm, 1e-5)),
            "gate_up": dict(gate_up=mx.random.normal(gu_shape).astype(DTYPE))}


def test_fused_matvec_equals_its_reference():
    for K, N in ((256, 384), (512, 256), (2048, 512)):
        w = weight(N, K)
        for name, inputs in prologues(K).items():
            got, want = cuda.kernels.fused_matvec(*w, **inputs), matvec(*w, **inputs)
            for g, r in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
                close(g, r)
    w = weight((4 + 2 + 2) * 64, 256)
    for traditional in (False, True):
        rope = rope_args(mx.array([37], dtype=mx.int32), traditional=traditional)
        inputs = prologues(256)["residual"]
        for g, r in zip(cuda.kernels.fused_matvec(*w, rope=rope, **inputs), matvec(*w, rope=rope, **inputs)):
            close(g, r)


def test_decode_attention_equals_its_reference():
    mx.random.seed(2)
    for B, C, offsets in ((1, 256, [40]), (3, 512, [0, 200, 511]), (2, 4096, [3000, 4095])):  # split blocks too
        q = mx.random.normal((B, 4, 1, 64)).astype(DTYPE)
        k, v = (mx.random.normal((B, 2, C, 64)).astype(DTYPE) for _ in range(2))
        offset = mx.array(offsets, dtype=mx.int32)
        close(cuda.kernels.decode_attention(q, k, v, offset, 0.125), attention(q, k, v, offset, 0.125))
    q = mx.random.normal((5, 4, 1, 64)).astype(DTYPE)
    k, v = (mx.random.normal((1, 2, 300, 64)).astype(DTYPE) for _ in range(2))
    offset = mx.array([100, 101, 102, 103, 104], dtype=mx.int32)
    close(cuda.kernels.decode_attention(q, k, v, offset, 0.125, shared=True),
          shared_attention(q, k, v, offset, 0.125, shared=True))


def test_rows_matmul_equals_its_reference():
    for K, N in ((256, 384), (2048, 512)):
        w = weight(N, K)
        for R in (2, 5, 8, 16):
            for name, inputs in prologues(K, R).items():
                got, want = cuda.kernels.rows_matmul(*w, **inputs), rows_matmul(*w, **inputs)
                for g, r in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
                    close(g, r)
    w = weight((4 + 2 + 2) * 64, 256)
    rope = rope_args(mx.array([5, 9, 200], dtype=mx.int32))
    inputs = prologues(256, 3)["residual"]
    for g, r in zip(cuda.kernels.rows_matmul(*w, rope=rope, **inputs), rows_matmul(*w, rope=rope, **inputs)):
        close(g, r)


def model_4bit(seed=3):
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(CONFIG))
    model.set_dtype(DTYPE)
    nn.quantize(model, group_size=64, bits=4)
    fusion.fuse(model)
    mx.eval(model.parameters())
    return model


def copy(cache):
    return [KVCache.from_state([mx.array(a) for a in c.state], c.meta_state) for c in cache]


def test_the_cuda_rows_decoders_equal_the_graph():
    """`FusedDecoder` token by token, `FusedCheckDecoder` over 1-16 positions and the batch step
    (`FusedRowsDecoder`, `KernelRowsDecoder`) over rows of different lengths: the model's graph's
    logits, within bfloat16's reach, and the same argmax."""
    model = model_4bit()
    assert cuda.supported(model) and cuda.fused_rows_supported(model) and cuda.rows_supported(model)
    rng = np.random.default_rng(4)
    prompt = mx.array(rng.integers(0, 512, size=(1, 300)).astype(np.int32))  # past 256: the buffers grow
    ours = [KVCache() for _ in model.layers]
    model(prompt, ours)
    theirs = copy(ours)
    step, graph = CompiledStep(model, ours, cuda.FusedDecoder), GraphStep(model, theirs)
    for t in rng.integers(0, 512, size=12):
        token = mx.array([[int(t)]])
        close(step(token), graph(token), rel=0.05)
    check = CompiledCheckStep(model, ours, cuda.FusedCheckDecoder)
    for L in (1, 5, 16):
        tokens = mx.array(rng.integers(0, 512, size=(1, L)).astype(np.int32))
        got, want = check(tokens), model(tokens, theirs)
        close(got, want, rel=0.05)
        assert (np.array(mx.argmax(got, -1)) == np.array(mx.argmax(want, -1))).mean() >= 0.9
    for decoder in (cuda.FusedRowsDecoder, cuda.KernelRowsDecoder):
        rows = [[int(t) for t in rng.integers(0, 512, size=n)] for n in (3, 40, 17)]
        batch, alone = [BatchKVCache() for _ in model.layers], []
        for p in rows:
            cache = [KVCache() for _ in model.layers]
            model(mx.array([p]), cache)
            for layer, c in zip(batch, cache):
                layer.add(c.keys, c.values, c.offset)
            alone.append(copy(cache))
        step = CompiledStep(model, batch, decoder)
        for _ in range(4):
            tokens = [int(t) for t in rng.integers(0, 512, size=len(rows))]
            got = step(mx.array([[t] for t in tokens]))
            for b, (t, cache) in enumerate(zip(tokens, alone)):
                close(got[b], model(mx.array([[t]]), cache)[0, -1], rel=0.05)


def main() -> int:
    """Run every test here without pytest; prints pytest's closing line."""
    tests = [(n, f) for n, f in sorted(globals().items()) if n.startswith("test_") and callable(f)]
    failed = 0
    for name, test in tests:
        try:
            test()
            print(f"PASSED {name}", flush=True)
        except Exception as e:  # noqa: BLE001 - reported, counted
            failed += 1
            print(f"FAILED {name}: {type(e).__name__}: {e}", flush=True)
    print(f"{len(tests) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
