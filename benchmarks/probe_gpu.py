"""Scratch probe (GPU): quantized matvec bandwidth, custom kernel parity, decode step breakdown."""
import gc
import statistics
import sys
import time

sys.path.insert(0, ".")
import mlx.core as mx
import mlx.nn as nn

from llama_mlx import kernels
from llama_mlx.benchmark import shape_config
from llama_mlx.cache import make_prompt_cache
from llama_mlx.model import Model, ModelArgs

BF = mx.bfloat16


def qmv_bench(N, K, layers, reps=10):
    ws = []
    for _ in range(layers):
        w = (mx.random.normal((N, K)) * 0.02).astype(BF)
        q, s, b = mx.quantize(w, 64, 4)
        mx.eval(q, s, b)
        ws.append((q, s, b))
        del w
    nbytes = sum(a.nbytes for t in ws for a in t)
    x = mx.random.normal((1, K)).astype(BF)
    mx.eval(x)
    res = {}
    for name, fn in [
        ("mlx", lambda q, s, b: mx.quantized_matmul(x, q, s, b, transpose=True, group_size=64, bits=4)),
        ("ours", lambda q, s, b: kernels.quantized_matvec(x, q, s, b, 64)),
    ]:
        ts = []
        for r in range(reps + 2):
            outs = [fn(*t) for t in ws]
            t0 = time.perf_counter()
            mx.eval(outs)
            ts.append(time.perf_counter() - t0)
        t = statistics.median(ts[2:])
        res[name] = (t / layers * 1e6, nbytes / t / 1e9)
    a = mx.quantized_matmul(x, *ws[0], transpose=True, group_size=64, bits=4).astype(mx.float32)
    bq = kernels.quantized_matvec(x, *ws[0], 64).astype(mx.float32)
    ref = (x.astype(mx.float32) @ mx.dequantize(*ws[0], 64, 4).astype(mx.float32).T)
    err_mlx = mx.abs(a - ref).max().item()
    err_ours = mx.abs(bq - ref).max().item()
    scale = mx.abs(ref).max().item()
    print(f"qmv N={N:6d} K={K:5d}: mlx {res['mlx'][0]:7.1f} us {res['mlx'][1]:6.0f} GB/s | ours {res['ours'][0]:7.1f} us "
          f"{res['ours'][1]:6.0f} GB/s | max err vs fp32 ref: mlx {err_mlx:.2e} ours {err_ours:.2e} (|ref| {scale:.2f})",
          flush=True)
    del ws
    gc.collect()
    mx.clear_cache()


def build(shape):
    args = ModelArgs.from_dict(shape_config(shape))
    model = Model(args)
    model.set_dtype(BF)
    nn.quantize(model, group_size=64, bits=4)
    mx.eval(model.parameters())
    model.fuse()
    mx.eval(model.parameters())
    return model


def decode(model, compile, prompt=512, gen=128):
    from llama_mlx.generate import _Stepper, generate_step
    from llama_mlx.sample import make_sampler
    p = mx.random.randint(0, 500, (prompt,))
    mx.eval(p)
    # warm-up (traces)
    for _ in generate_step(p, model, max_tokens=4, compile=compile):
        pass
    t0 = None
    for n, (tok, _) in enumerate(generate_step(p, model, max_tokens=gen, compile=compile)):
        if n == 1:
            t0 = time.perf_counter()
    tps = (gen - 2) / (time.perf_counter() - t0)
    cache = make_prompt_cache(len(model.layers))
    step = _Stepper(model, cache, compile)
    model(p[None, :-1], cache)
    mx.eval([c.state for c in cache])
    y = mx.argmax(step(p[-1:][None]), axis=-1)
    mx.eval(y)
    bs, As, ws = [], [], []
    for _ in range(20):
        t1 = time.perf_counter()
        y = mx.argmax(step(y[None]), axis=-1)
        t2 = time.perf_counter()
        mx.async_eval(y)
        t3 = time.perf_counter()
        y.item()
        t4 = time.perf_counter()
        bs.append(t2 - t1); As.append(t3 - t2); ws.append(t4 - t3)
    med = lambda v: statistics.median(v) * 1e3
    return tps, med(bs), med(As), med(ws)


def parity(model, n_prompt):
    """Logits of the fused CUDA step against the plain path, 10 decode steps after n_prompt tokens."""
    from llama_mlx.generate import _Stepper
    p = mx.random.randint(0, 500, (n_prompt + 10,))
    outs = []
    for comp in (False, None):
        cache = make_prompt_cache(len(model.layers))
        step = _Stepper(model, cache, comp)
        model(p[None, :n_prompt], cache)
        ls = [step(p[None, i:i + 1]).astype(mx.float32) for i in range(n_prompt, n_prompt + 10)]
        mx.eval(ls)
        outs.append(mx.stack(ls))
        print("  fused:", getattr(step, "_fused", None), "capacity", cache[0].keys.shape[2])
    d = mx.abs(outs[0] - outs[1]).max().item()
    agree = (mx.argmax(outs[0], -1) == mx.argmax(outs[1], -1)).mean().item()
    print(f"parity @{n_prompt}: max |dlogit| {d:.3e} (max |logit| {mx.abs(outs[0]).max().item():.2f}), "
          f"argmax agree {agree:.2f}", flush=True)


def main():
    print(mx.__version__, mx.default_device(), mx.device_info().get("device_name"), flush=True)
    which = sys.argv[1:] or ["qmv", "1b", "8b"]
    if "qmv" in which and False:
        for N, K, L in [(3072, 2048, 16), (16384, 2048, 16), (2048, 8192, 16),
                        (6144, 4096, 32), (28672, 4096, 32), (4096, 14336, 32)]:
            qmv_bench(N, K, L)
    if "nodes" in which:
        x = mx.zeros((4096,), BF)
        mx.eval(x)
        for n in (50, 100, 200, 400):
            ts, ws = [], []
            for _ in range(12):
                y = x
                for _ in range(n):
                    y = y + 1
                t0 = time.perf_counter()
                mx.async_eval(y)
                t1 = time.perf_counter()
                y.item() if y.size == 1 else mx.eval(y)
                t2 = time.perf_counter()
                ts.append(t1 - t0); ws.append(t2 - t1)
            print(f"chain of {n} adds: async_eval {statistics.median(ts[2:]) * 1e3:.2f} ms "
                  f"({statistics.median(ts[2:]) / n * 1e6:.1f} us/node), wait {statistics.median(ws[2:]) * 1e3:.2f} ms", flush=True)
    if "check" in which:
        model = build("1b")
        parity(model, 30)
        parity(model, 2100)
        del model
        gc.collect()
        mx.clear_cache()
    for shape in [s for s in which if s in ("1b", "8b")]:
        model = build(shape)
        parity(model, 30)
        pass
        for comp in (False, None):
            tps, b, a, w = decode(model, comp)
            print(f"{shape} compile={comp}: decode {tps:6.1f} tok/s | per step: build {b:.2f} ms, "
                  f"async_eval {a:.2f} ms, wait {w:.2f} ms", flush=True)
        del model
        gc.collect()
        mx.clear_cache()


if __name__ == "__main__":
    main()
