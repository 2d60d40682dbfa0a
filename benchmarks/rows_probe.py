"""The few-row CUDA kernels (`cuda.kernels.rows_matmul`, the shared-buffer attention) against MLX ops,
their cost beside MLX's quantized matmul, and the fused speculative check beside the graph's.

    python3 benchmarks/rows_probe.py --kernels                # correctness, every prologue and epilogue
    python3 benchmarks/rows_probe.py --matmul 8b              # time per projection at 1, 8, 16 rows
    python3 benchmarks/rows_probe.py --check 8b               # check step of L = 1..16 positions

CUDA only. Errors are max |ours - MLX| / max |MLX| over the output.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.random_model import shape_config, write_random_model  # noqa: E402
from llama_mlx.backends.cuda import kernels  # noqa: E402


def rel(a, b) -> float:
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return (mx.abs(a - b).max() / mx.maximum(mx.abs(b).max(), 1e-30)).item()


def reference(w, scales, biases, G, *, x=None, residual=None, gate_up=None, rope=None):
    h = None
    if residual is not None:
        a, b, nw, eps = residual
        h = a + b
        x = mx.fast.rms_norm(h, nw, eps)
    elif gate_up is not None:
        g, u = mx.split(gate_up, 2, axis=-1)
        x = nn.silu(g) * u
    out = mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=G, bits=4)
    if rope is None:
        return out, h
    nq, nkv, D = rope["n_heads"], rope["n_kv_heads"], rope["head_dim"]
    R = out.shape[0]
    rows = []
    for r in range(R):
        o = out[r]
        parts = []
        for lo, hi, rot in ((0, nq * D, True), (nq * D, (nq + nkv) * D, True), ((nq + nkv) * D, None, False)):
            t = o[lo:hi].reshape(1, -1, 1, D)
            if rot:
                t = mx.fast.rope(t, D, traditional=rope["traditional"], base=None, scale=1.0,
                                 offset=int(rope["offset"][r].item()), freqs=1.0 / rope["inv_freq"])
            parts.append(t)
        rows.append(parts)
    q, k, v = (mx.concatenate([row[i] for row in rows]) for i in range(3))
    return (q, k, v), h


def check_kernels() -> bool:
    ok = True
    rng = np.random.default_rng(0)
    cases = [  # (name, K, N, heads for RoPE)
        ("qkv 8b", 4096, 6144, (32, 8, 128)), ("qkv smollm2", 576, 960, (9, 3, 64)),
        ("o 1b", 2048, 2048, None), ("down 8b", 14336, 4096, None), ("gate_up 1b", 2048, 16384, None),
        ("down smollm2", 1536, 576, None),
    ]
    # Each (dtype, group size, shape, prologue, 8 or 16 rows) compiles a kernel: a few of each.
    plan = [(mx.bfloat16, 64, case) for case in cases if "smollm2" not in case[0]]
    plan += [(mx.float16, 32, case) for case in cases if "smollm2" in case[0]]
    for dtype, G, (name, K, N, heads) in plan:
        w, scales, biases = mx.quantize((mx.random.normal((N, K)) * 0.02).astype(dtype), group_size=G, bits=4)
        for R in (1, 5, 11, 16):
            kw = {}
            if heads and name.startswith("qkv"):
                nq, nkv, D = heads
                inv = mx.array(1.0 / (500000.0 ** (np.arange(0, D, 2) / D)), dtype=mx.float32)
                offs = mx.array(rng.integers(0, 5000, size=R), dtype=mx.int32)
                kw["rope"] = dict(offset=offs, inv_freq=inv, n_heads=nq, n_kv_heads=nkv, head_dim=D,
                                  traditional=False)
            variants = {"x": dict(x=mx.random.normal((R, K)).astype(dtype))}
            a, b = (mx.random.normal((R, K)) * 3).astype(dtype), mx.random.normal((R, K)).astype(dtype)
            nw = (1 + 0.3 * mx.random.normal((K,))).astype(dtype)
            if kernels.rows_matmul_supported(K, N, 4, G, norm=True):
                variants["rms"] = dict(residual=(a, b, nw, 1e-5))
            variants["swiglu"] = dict(gate_up=(mx.random.normal((R, 2 * K)) * 2).astype(dtype))
            if "rope" in kw:
                variants = {"rms+rope": dict(variants["rms"], **kw)}
            for vname, args in variants.items():
                want, want_h = reference(w, scales, biases, G, **args)
                got = kernels.rows_matmul(w, scales, biases, G, **args)
                if "residual" in args:
                    got, got_h = got[:-1] if "rope" in args else got[0], got[-1]
                    err_h = rel(got_h, want_h)
                else:
                    err_h = 0.0
                if "rope" in args:
                    err = max(rel(g, t) for g, t in zip(got, want))
                else:
                    err = rel(got, want)
                bad = not (err < 2e-2 and err_h == 0.0)
                ok &= not bad
                if bad or R in (1, 16):
                    print(f"{str(dtype):14s} G={G} {name:13s} R={R:2d} {vname:8s} err {err:.1e} "
                          f"h {err_h:.1e}{'  FAIL' if bad else ''}", flush=True)
    # Shared buffers: row i at position offset + i over one sequence's keys and values.
    for dtype in (mx.bfloat16,):
        Hq, Hkv, D, C, L, off = 32, 8, 128, 512, 11, 300
        keys = mx.random.normal((1, Hkv, C, D)).astype(dtype)
        values = mx.random.normal((1, Hkv, C, D)).astype(dtype)
        q = mx.random.normal((L, Hq, 1, D)).astype(dtype)
        pos = mx.arange(off, off + L, dtype=mx.int32)
        got = kernels.decode_attention(q, keys, values, pos, D**-0.5, shared=True).reshape(L, Hq, 1, D)
        mask = (mx.arange(C)[None] <= pos[:, None])[:, None, None]
        want = mx.fast.scaled_dot_product_attention(q, mx.broadcast_to(keys, (L, Hkv, C, D)),
                                                    mx.broadcast_to(values, (L, Hkv, C, D)), scale=D**-0.5, mask=mask)
        err = rel(got, want)
        ok &= err < 2e-2
        print(f"shared attention L={L} err {err:.1e}{'' if err < 2e-2 else '  FAIL'}", flush=True)
    print("kernels:", "all match" if ok else "MISMATCH", flush=True)
    return ok


def matmul_costs(config: dict, reps: int = 40) -> None:
    h, i = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    dtype = mx.bfloat16
    shapes = {"qkv": (h + 2 * kv, h, "rms"), "o": (h, h, "x"), "gate_up": (2 * i, h, "rms"), "down": (h, i, "swiglu"),
              "head": (config["vocab_size"], h, "rms")}

    def rows(wide, w, scales, biases, args):
        kernels._ROWS_WIDE = wide
        try:
            return kernels.rows_matmul(w, scales, biases, 64, **args)
        finally:
            kernels._ROWS_WIDE = True

    for name, (N, K, pro) in shapes.items():
        w, scales, biases = mx.quantize((mx.random.normal((N, K)) * 0.02).astype(dtype), group_size=64, bits=4)
        mx.eval(w, scales, biases)
        for R in (1, 8, 16):
            x = mx.random.normal((R, K)).astype(dtype)
            gu = mx.random.normal((R, 2 * K)).astype(dtype)
            args = {"x": dict(x=x), "rms": dict(residual=(x, x, x[0], 1e-5)), "swiglu": dict(gate_up=gu)}[pro]
            runs = {
                "mlx qmm": lambda: mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=64, bits=4),
                "rows 8B-loads": lambda: rows(True, w, scales, biases, args),
                "rows 4B-loads": lambda: rows(False, w, scales, biases, args),
            }
            if R == 1:
                one = {"x": dict(x=x[0]), "rms": dict(residual=(x[0], x[0], x[0], 1e-5)),
                       "swiglu": dict(gate_up=gu[0])}[pro]
                runs["fused_matvec"] = lambda: kernels.fused_matvec(w, scales, biases, 64, **one)
            times = {}
            for label, fn in runs.items():
                mx.eval(fn())
                mx.synchronize()
                best = float("inf")
                for _ in range(3):  # reps independent calls in one graph: the GPU's time, not launches'
                    t = time.perf_counter()
                    mx.eval([fn() for _ in range(reps)])
                    mx.synchronize()
                    best = min(best, (time.perf_counter() - t) / reps * 1e6)
                times[label] = best
            gb = N * K / 2 / 1e9
            print(f"{name:8s} N={N:6d} K={K:6d} R={R:2d}: " + "  ".join(
                f"{k} {v:6.1f} us ({gb / (v * 1e-6):5.0f} GB/s)" for k, v in times.items()), flush=True)


def check_costs(folder: Path, steps: int = 20) -> None:
    import llama_mlx
    from llama_mlx import backends
    from llama_mlx.backends import steps as steps_mod
    from llama_mlx.cache import KVCache

    model, _ = llama_mlx.load(folder, lazy=False)
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(3, min(model.args.vocab_size, 30000), size=200)]
    for L in (1, 2, 4, 8, 11, 16):
        draft = [int(t) for t in rng.integers(3, 30000, size=L)]
        res = {}
        for name in ("graph", "fused"):
            cache = [KVCache() for _ in model.layers]
            model(mx.array([prompt]), cache)
            mx.eval([c.state for c in cache])
            step = backends.verify_step(model, cache)
            if name == "graph":
                step = steps_mod.AllPositionsStep(model, cache)
            logits = step(mx.array([draft]))
            mx.eval(logits)
            for c in cache:
                c.trim(L)
            for _ in range(2):
                mx.eval(step(mx.array([draft])))
                for c in cache:
                    c.trim(L)
            t = time.perf_counter()
            for _ in range(steps):
                mx.eval(step(mx.array([draft])))
                for c in cache:
                    c.trim(L)
            res[name] = ((time.perf_counter() - t) / steps, logits, step.kind)
        err = rel(res["fused"][1], res["graph"][1])
        same = mx.argmax(res["fused"][1], -1) == mx.argmax(res["graph"][1], -1)
        agree = same.astype(mx.float32).mean().item()
        graph, fused = res["graph"][0] * 1e3, res["fused"][0] * 1e3
        print(f"check L={L:2d}: graph {graph:6.2f} ms, {res['fused'][2]} {fused:6.2f} ms;"
              f" logits rel diff {err:.1e}, argmax agreeing {agree:.2f}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", action="store_true")
    p.add_argument("--matmul", default=None, help="a shape (1b, 8b) whose projections to time")
    p.add_argument("--check", default=None, help="a shape (1b, 8b) whose check step to time")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "llama-mlx-bench"))
    args = p.parse_args()
    ok = True
    if args.kernels:
        ok = check_kernels()
    if args.matmul:
        matmul_costs(shape_config(args.matmul))
    if args.check:
        folder = Path(args.work) / f"{args.check}-q4g64-bfloat16"
        write_random_model(folder, args.check, bits=4, group_size=64, dtype="bfloat16", seed=0)
        check_costs(folder)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
