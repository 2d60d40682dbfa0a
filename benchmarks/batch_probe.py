"""Where the batched engine's time goes: first-call (compile) costs of its ops, then per-step times.

    python3 benchmarks/batch_probe.py --model 1b          # GPU
    python3 benchmarks/batch_probe.py --model tiny        # anywhere, seconds
    python3 benchmarks/batch_probe.py --model 8b --no-ops --no-engine --step-variants 1,4,8

Part one times the first and second call of each op the batched decode adds to the plain one
(the per-row KV write, the masked attention, the row gather), at several batch sizes: on MLX's
CUDA backend a first call may JIT-compile a kernel. Part two runs `BatchEngine` over a sequence
of stream counts and prints every step slower than `--slow` seconds with what the step did.
`--step-variants` times one steady batched step per variant (the model's graph, the compiled
rows graph with a mask, on CUDA the compiled rows graph with the attention kernel).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.random_model import shape_config, write_random_model  # noqa: E402


def timed(fn) -> float:
    t = time.perf_counter()
    mx.eval(fn())
    return time.perf_counter() - t


def op_costs(config: dict, dtype) -> None:
    H, D = config["num_key_value_heads"], config["head_dim"]
    Hq = config["num_attention_heads"]
    for B in (1, 2, 4, 8):
        keys = mx.zeros((B, H, 256, D), dtype)
        k = mx.ones((B, H, 1, D), dtype)
        lengths = mx.array(list(range(100, 100 + B)), dtype=mx.int32)
        q = mx.ones((B, Hq, 1, D), dtype)
        rows = {}

        def put():
            idx = mx.broadcast_to(lengths[:, None, None, None], (B, H, 1, D))
            return mx.put_along_axis(keys, idx, k, axis=2)

        def mask(S):
            return (mx.arange(S, dtype=mx.int32)[None, None] <= lengths[:, None, None])[:, None]

        for S in (129, 130, 131):
            rows[f"sdpa mask S={S}"] = lambda S=S: mx.fast.scaled_dot_product_attention(
                q, keys[:, :, :S], keys[:, :, :S], scale=D**-0.5, mask=mask(S))
        rows["sdpa nomask"] = lambda: mx.fast.scaled_dot_product_attention(q, keys, keys, scale=D**-0.5)
        rows["put_along_axis"] = put
        rows["take rows"] = lambda: mx.take(keys, mx.array(list(range(B))[::-1], dtype=mx.int32), axis=0)
        rows["slice write"] = lambda: _slice_write(keys, k)
        for name, fn in rows.items():
            first, second = timed(fn), timed(fn)
            print(f"B={B} {name:18s} first {first * 1e3:9.1f} ms  second {second * 1e3:7.2f} ms", flush=True)


def _slice_write(keys, k):
    out = mx.array(keys)
    out[:, :, 100:101] = k
    return out


def matmul_costs(config: dict, dtype, reps: int = 20) -> None:
    """MLX's quantized matmul of M rows, and of M rows padded to 8, at each projection shape."""
    h, i = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    shapes = {"qkv": (h + 2 * kv, h), "o": (h, h), "gate_up": (2 * i, h), "down": (h, i)}
    for name, (N, K) in shapes.items():
        w, scales, biases = mx.quantize(mx.random.normal((N, K)).astype(dtype) * 0.02, group_size=64, bits=4)
        mx.eval(w, scales, biases)

        def qmm(x, w=w, scales=scales, biases=biases):
            return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=64, bits=4)

        for M in (1, 2, 4, 6, 7, 8, 16):
            x = mx.random.normal((M, K)).astype(dtype)
            pad = max(8, M)
            runs = {"plain": lambda x=x: qmm(x),
                    "padded": lambda x=x, pad=pad: qmm(mx.concatenate([x, mx.zeros((pad - M, K), dtype)]))[:M]}
            times = {}
            for label, fn in runs.items():
                mx.eval(fn())
                t = time.perf_counter()
                mx.eval([fn() * (1 + j) for j in range(reps)])
                times[label] = (time.perf_counter() - t) / reps * 1e6
            print(f"{name:8s} N={N:6d} K={K:6d} M={M:2d}: plain {times['plain']:8.1f} us  "
                  f"padded to {pad} {times['padded']:8.1f} us", flush=True)


def engine_steps(folder: Path, streams: list[int], prompt: int, gen: int, slow: float) -> None:
    import llama_mlx
    from llama_mlx.batch import BatchEngine

    model, tokenizer = llama_mlx.load(folder, lazy=False)
    vocab = model.args.vocab_size
    rng = np.random.default_rng(0)
    for n in streams:
        engine = BatchEngine(model, tokenizer, max_batch=max(n, 1))
        prompts = [[int(t) for t in rng.integers(3, min(vocab, 32000), size=prompt)] for _ in range(n)]
        start = time.perf_counter()
        reqs = [engine.submit(p, max_tokens=gen, stop_tokens=()) for p in prompts]
        times = []
        while engine.has_work():
            what = (f"running {len(engine.running)}"
                    + (f", prefilling {len(engine.prefilling)}" if engine.prefilling else "")
                    + (f", waiting {len(engine.waiting) + len(engine._incoming)}"))
            t = time.perf_counter()
            engine.step()
            dt = time.perf_counter() - t
            times.append(dt)
            if dt > slow:
                print(f"  streams {n} step {engine.steps}: {dt:.3f} s ({what})", flush=True)
        wall = time.perf_counter() - start
        toks = sum(len(r.tokens) for r in reqs)
        med = sorted(times)[len(times) // 2]
        print(f"streams {n}: {toks / wall:.1f} tok/s aggregate, wall {wall:.2f} s, {len(times)} steps, "
              f"median step {med * 1e3:.2f} ms, TTFT max {max(r.stats.time_to_first_token for r in reqs):.3f} s",
              flush=True)


def layer_costs(folder: Path, batches: list[int], reps: int = 20) -> None:
    """Each module of a decode step alone, on [B, 1, hidden] inputs as the batched step feeds them
    and on the same rows as a [B, hidden] matrix."""
    import llama_mlx

    model, _ = llama_mlx.load(folder, lazy=False)
    layer = model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    h = model.args.hidden_size
    head = model.lm_head if hasattr(model, "lm_head") else model.model.embed_tokens.as_linear
    mods = {"input_layernorm": (layer.input_layernorm, h), "qkv_proj": (getattr(attn, "qkv_proj", None), h),
            "o_proj": (attn.o_proj, h), "gate_up_proj": (getattr(mlp, "gate_up_proj", None), h),
            "down_proj": (mlp.down_proj, model.args.intermediate_size), "lm_head": (head, h)}
    dtype = model.model.norm.weight.dtype
    for B in batches:
        for name, (mod, K) in mods.items():
            if mod is None:
                continue
            times = {}
            for label, shape in (("[B,1,K]", (B, 1, K)), ("[B,K]", (B, K))):
                x = mx.random.normal(shape).astype(dtype)
                mx.eval(mod(x))
                t = time.perf_counter()
                mx.eval([mod(x * (1 + j)) for j in range(reps)])
                times[label] = (time.perf_counter() - t) / reps * 1e6
            print(f"B={B} {name:16s} " + "  ".join(f"{k} {v:8.1f} us" for k, v in times.items()), flush=True)


def step_costs(folder: Path, batches: list[int], prompt: int, steps: int, only: Optional[str] = None) -> None:
    """Steady-state time of one batched decode step per variant of `backends.rows_step`, rows at
    prompt lengths prompt, prompt+1, ..., and whether the variants pick the same greedy tokens."""
    import llama_mlx
    from llama_mlx import backends
    from llama_mlx.backends import cuda
    from llama_mlx.backends.steps import CompiledStep, GraphStep, RowsDecoder
    from llama_mlx.cache import BatchKVCache
    from llama_mlx.cache import KVCache

    model, _ = llama_mlx.load(folder, lazy=False)
    variants = {"graph": lambda c: GraphStep(model, c), "rows (mask)": lambda c: CompiledStep(model, c, RowsDecoder)}
    for decoder in (cuda.KernelRowsDecoder, cuda.FusedRowsDecoder):
        if decoder.supported(model):
            variants[decoder.kind] = lambda c, decoder=decoder: CompiledStep(model, c, decoder)
    if only:
        variants = {k: v for k, v in variants.items() if k in only.split(",")}
    rng = np.random.default_rng(0)
    for B in batches:
        top = min(model.args.vocab_size, 30000)
        prompts = [[int(t) for t in rng.integers(3, top, size=prompt + b)] for b in range(B)]
        rows = []
        for p in prompts:
            cache = [KVCache() for _ in model.layers]
            model(mx.array([p[:-1]]), cache)
            mx.eval([c.state for c in cache])
            rows.append(cache)
        if B == 1:
            solo = [KVCache.from_state(c.state, {}) for c in rows[0]]
            variants_b = dict(variants, **{"solo (decode_step)": None})
        else:
            variants_b = variants
        picks, firsts = {}, {}
        for name, make in variants_b.items():
            if make is None:
                cache = [KVCache.from_state([mx.array(a) for a in c.state], {}) for c in solo]
                step = backends.decode_step(model, cache)
            else:
                cache = [BatchKVCache() for _ in model.layers]
                for layer, c in zip(cache, zip(*rows)):
                    for r in c:
                        layer.add(r.keys, r.values, r.offset)
                step = make(cache)
            tokens = mx.array([[p[-1]] for p in prompts])
            first = step(tokens).astype(mx.float32)
            firsts[name] = first
            tokens = mx.argmax(first, axis=-1)[:, None]
            out = [tokens]
            for _ in range(2):  # untimed: first calls compile
                tokens = mx.argmax(step(tokens), axis=-1)[:, None]
                mx.eval(tokens)
                out.append(tokens)
            t = time.perf_counter()
            for _ in range(steps):  # pipelined as the engine runs: queue the next before reading
                tokens = mx.argmax(step(tokens), axis=-1)[:, None]
                mx.async_eval(tokens)
                out.append(tokens)
            mx.eval(tokens)
            piped = (time.perf_counter() - t) / steps
            t = time.perf_counter()
            for _ in range(5):
                tokens = mx.argmax(step(tokens), axis=-1)[:, None]
                mx.eval(tokens)
            synced = (time.perf_counter() - t) / 5
            picks[name] = np.concatenate([np.array(o) for o in out], axis=1)
            ref = next(iter(picks.values()))
            agree = float((picks[name] == ref).mean())
            ref_logits = next(iter(firsts.values()))
            err = (mx.abs(first - ref_logits).max() / mx.abs(ref_logits).max()).item()
            print(f"B={B} {name:20s} step {piped * 1e3:7.2f} ms pipelined, {synced * 1e3:7.2f} ms synced, "
                  f"{B / piped:8.1f} tok/s; first logits vs {next(iter(picks))}: max rel diff {err:.1e}, "
                  f"tokens agreeing {agree:.2f}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="1b")
    p.add_argument("--streams", default="4,4,8,8,1,2,3")
    p.add_argument("-p", "--prompt-tokens", type=int, default=128)
    p.add_argument("-g", "--gen-tokens", type=int, default=32)
    p.add_argument("--slow", type=float, default=0.25)
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "llama-mlx-bench"))
    p.add_argument("--no-ops", action="store_true")
    p.add_argument("--matmul", default=None, help="a shape (1b, 8b) whose projections to time at 1-16 rows")
    p.add_argument("--step-variants", default=None, help="batch sizes (e.g. 1,4,8) to time each batched step at")
    p.add_argument("--only", default=None, help="with --step-variants: these variants (e.g. rows-kernel,rows-fused)")
    p.add_argument("--no-engine", action="store_true")
    p.add_argument("--layer", default=None, help="batch sizes (e.g. 1,4,8) to time each module of a step at")
    args = p.parse_args()
    dtype = mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16
    config = shape_config(args.model)
    if args.matmul:
        matmul_costs(shape_config(args.matmul), dtype)
    if not args.no_ops:
        op_costs(config, dtype)
    name = "float32" if dtype == mx.float32 else "bfloat16"
    folder = Path(args.work) / f"{args.model}-q4g64-{name}"
    write_random_model(folder, args.model, bits=4, group_size=64, dtype=name, seed=0)
    if args.layer:
        layer_costs(folder, [int(b) for b in args.layer.split(",")])
    if args.step_variants:
        step_costs(folder, [int(b) for b in args.step_variants.split(",")], args.prompt_tokens, 20, args.only)
    if not args.no_engine:
        engine_steps(folder, [int(s) for s in args.streams.split(",")], args.prompt_tokens, args.gen_tokens,
                     args.slow)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
