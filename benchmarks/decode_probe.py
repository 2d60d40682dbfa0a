"""Where a decode step's time goes, and whether the fused CUDA step agrees with the plain one.

    python3 benchmarks/decode_probe.py --models 1b,8b             # GPU: parity, then the breakdown
    python3 benchmarks/decode_probe.py --models tiny --no-parity  # anywhere, seconds

Random-weight models of the shapes in `benchmarks.random_model.SHAPES` are built in memory (4-bit,
group 64, bfloat16 on GPUs). For each decode path (the Metal row's, the model's graph; and the
device's own row, which is the fused step of `llama_mlx.backends.cuda` on CUDA)
it prints generation tokens/s over `-g` tokens after `-p` prompt tokens, then the median per-step
split of host and device time: building the graph in Python, `mx.async_eval` (MLX encoding the
graph for the device), and waiting for the result. Parity compares the two paths' logits over
ten decode steps, after a short prompt and after one long enough for split attention. With
--mlx-lm, mlx-lm's model of the same shape is timed the same way (its generate_step, then its
model's graph a step): the host time a step costs (build + async_eval) ours against theirs.
With --variants, alternating trials of mlx-lm's generate_step and ours on the Metal row as built
(q/k/v and gate/up fused), unfused, and fused with the one-token q/k/v split before RoPE (as
mlx-lm's separate projections give it): median tokens/s of each, which says what fusion and
the one-token layout cost or save where a step is bound by host time (a GPU).
With --nodes, the primitives of one decode step's graph (`mx.export_to_dot`), ours on the Metal
row against mlx-lm's, by kind (on a CPU the `mx.fast` ops appear as their fallback graphs, on both sides).
"""

from __future__ import annotations

import argparse
import collections
import gc
import re
import tempfile
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from benchmarks.random_model import shape_config  # noqa: E402
from llama_mlx import backends  # noqa: E402
from llama_mlx.backends import fusion  # noqa: E402
from llama_mlx.cache import make_prompt_cache  # noqa: E402
from llama_mlx.generate import generate_step  # noqa: E402
from llama_mlx.model import Model, ModelArgs  # noqa: E402


def build(shape: str, row=None, fuse: bool = True) -> Model:
    model = Model(ModelArgs.from_dict(shape_config(shape)))
    if mx.default_device() == mx.gpu:
        model.set_dtype(mx.bfloat16)
    nn.quantize(model, group_size=64, bits=4)
    mx.eval(model.parameters())
    previous = backends.use(row)  # prepared as that row prepares it (dtype, fusion, transform)
    try:
        backends.prepare(model, fuse=fuse, threads=1)  # fused everywhere unless asked, one CPU thread
    finally:
        backends.use(previous)
    mx.eval(model.parameters())
    return model


def parity(model: Model, n_prompt: int, vocab: int) -> str:
    p = mx.random.randint(0, vocab, (n_prompt + 10,))
    outs, paths = [], []
    for row in ("metal", None):
        cache = make_prompt_cache(len(model.layers))
        previous = backends.use(row)
        step = backends.decode_step(model, cache)
        backends.use(previous)
        model(p[None, :n_prompt], cache)
        logits = [step(p[None, i : i + 1]).astype(mx.float32) for i in range(n_prompt, n_prompt + 10)]
        mx.eval(logits)
        outs.append(mx.stack(logits))
        paths.append(step.kind)
    diff = mx.abs(outs[0] - outs[1]).max().item()
    agree = (mx.argmax(outs[0], -1) == mx.argmax(outs[1], -1)).mean().item()
    return (f"parity after {n_prompt} tokens ({paths[0]} vs {paths[1]}): max |logit difference| {diff:.3g} "
            f"(largest |logit| {mx.abs(outs[0]).max().item():.3g}), same argmax {agree:.0%}")


def breakdown(model: Model, row, prompt: int, gen: int, vocab: int) -> str:
    previous = backends.use(row)
    try:
        return _breakdown(model, row, prompt, gen, vocab)
    finally:
        backends.use(previous)


def _breakdown(model: Model, row, prompt: int, gen: int, vocab: int) -> str:
    p = mx.random.randint(0, vocab, (prompt,))
    for _ in generate_step(p, model, max_tokens=4):  # traces, kernels
        pass
    t0 = None
    for n, _ in enumerate(generate_step(p, model, max_tokens=gen)):
        if n == 1:
            t0 = time.perf_counter()
    tps = (gen - 2) / (time.perf_counter() - t0)

    cache = make_prompt_cache(len(model.layers))
    step = backends.decode_step(model, cache)
    model(p[None, :-1], cache)
    y = mx.argmax(step(p[None, -1:]), axis=-1)
    mx.eval(y)
    return f"{'default' if row is None else 'graph'}: {tps:7.1f} tok/s | " + _host_times(step, y)


def _mlx_lm_model(shape: str):
    """mlx-lm's model of a shape with its own random 4-bit weights (bfloat16 on GPUs), as `build` makes ours."""
    from mlx_lm.models import llama as mlx_lm_llama

    model = mlx_lm_llama.Model(mlx_lm_llama.ModelArgs.from_dict(shape_config(shape)))
    if mx.default_device() == mx.gpu:
        model.set_dtype(mx.bfloat16)
    nn.quantize(model, group_size=64, bits=4)
    mx.eval(model.parameters())
    return model


def mlx_lm_breakdown(shape: str, prompt: int, gen: int, vocab: int) -> str:
    """mlx-lm's model of the same shape (its own random 4-bit weights), timed as `_breakdown`."""
    import importlib

    from mlx_lm.models.cache import make_prompt_cache as mlx_lm_cache

    gen_mod = importlib.import_module("mlx_lm.generate")
    model = _mlx_lm_model(shape)
    p = mx.random.randint(0, vocab, (prompt,))
    for _ in gen_mod.generate_step(p, model, max_tokens=4):
        pass
    t0 = None
    for n, _ in enumerate(gen_mod.generate_step(p, model, max_tokens=gen)):
        if n == 1:
            t0 = time.perf_counter()
    tps = (gen - 2) / (time.perf_counter() - t0)
    cache = mlx_lm_cache(model)
    model(p[None, :-1], cache=cache)
    y = mx.argmax(model(p[None, -1:], cache=cache)[:, -1, :], axis=-1)
    mx.eval(y)
    times = _host_times(lambda t: model(t, cache=cache)[:, -1, :], y)
    del model
    return f"mlx-lm: {tps:7.1f} tok/s | " + times


def _primitives(y: mx.array) -> collections.Counter:
    with tempfile.TemporaryDirectory() as tmp:
        mx.export_to_dot(f"{tmp}/step.dot", y)
        text = Path(f"{tmp}/step.dot").read_text()
    return collections.Counter(re.findall(r'\[label ="([^"]+)", shape=rectangle\]', text))


def graph_nodes(shape: str) -> str:
    """The primitives of one decode step, ours (the Metal row's model graph) against mlx-lm's
    model of the same shape, after a 16-token prompt: totals, per layer, and by kind."""
    from mlx_lm.models import llama as mlx_lm_llama
    from mlx_lm.models.cache import make_prompt_cache as mlx_lm_cache

    p = mx.random.randint(0, 1000, (16,))
    mx.eval(p)  # its own graph stays out of the count
    ours = build(shape, "metal")
    cache = make_prompt_cache(len(ours.layers))
    previous = backends.use("metal")
    try:
        step = backends.decode_step(ours, cache)
        ours(p[None, :-1], cache)
        mx.eval([c.state for c in cache])
        mine = _primitives(step(p[None, -1:]))
    finally:
        backends.use(previous)
    layers = len(ours.layers)
    del ours, cache
    gc.collect()
    theirs_model = mlx_lm_llama.Model(mlx_lm_llama.ModelArgs.from_dict(shape_config(shape)))
    nn.quantize(theirs_model, group_size=64, bits=4)
    mx.eval(theirs_model.parameters())
    cache = mlx_lm_cache(theirs_model)
    theirs_model(p[None, :-1], cache=cache)
    mx.eval([c.state for c in cache])
    theirs = _primitives(theirs_model(p[None, -1:], cache=cache)[:, -1, :])
    del theirs_model, cache
    a, b = sum(mine.values()), sum(theirs.values())
    kinds = ", ".join(f"{k} {mine[k]}/{theirs[k]}" for k in sorted(set(mine) | set(theirs)) if mine[k] != theirs[k])
    return (f"nodes a step: ours {a} ({a / layers:.1f} a layer), mlx-lm {b} ({b / layers:.1f} a layer), "
            f"{a / b:.2f}x | differing kinds, ours/mlx-lm: {kinds}")


class _SplitAttention(fusion.FusedAttention):
    """Fused q/k/v whose one-token output is split, then reshaped and rotated per projection."""

    def project(self, x, offset):
        B, L, _ = x.shape
        if L > 1:
            return super().project(x, offset)
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = mx.split(self.qkv_proj(x), [q_dim, q_dim + kv_dim], axis=-1)
        q = self.rope(q.reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3), offset)
        k = self.rope(k.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3), offset)
        return q, k, v.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)


def variants(shape: str, prompt: int, gen: int, trials: int) -> str:
    """Median decode tokens/s over alternating trials: mlx-lm, ours fused / unfused / split (Metal row)."""
    import importlib

    gen_mod = importlib.import_module("mlx_lm.generate")
    theirs = _mlx_lm_model(shape)
    fused = build(shape, "metal")
    split = build(shape, "metal")
    for layer in split.layers:
        layer.self_attn.__class__ = _SplitAttention
    unfused = build(shape, "metal", fuse=False)
    previous = backends.use("metal")
    try:
        p = mx.random.randint(0, min(theirs.args.vocab_size, 1000), (prompt,))
        runs = {
            "mlx-lm": lambda: gen_mod.generate_step(p, theirs, max_tokens=gen),
            "fused": lambda: generate_step(p, fused, max_tokens=gen),
            "unfused": lambda: generate_step(p, unfused, max_tokens=gen),
            "split": lambda: generate_step(p, split, max_tokens=gen),
        }
        tps = {name: [] for name in runs}
        for trial in range(trials + 1):  # the first round warms up, untimed
            for name, run in runs.items():
                t0 = None
                for n, _ in enumerate(run()):
                    if n == 1:
                        t0 = time.perf_counter()
                if trial:
                    tps[name].append((gen - 2) / (time.perf_counter() - t0))
    finally:
        backends.use(previous)
    med = {name: statistics.median(v) for name, v in tps.items()}
    return " | ".join(f"{name} {med[name]:.1f} tok/s ({med[name] / med['mlx-lm']:.2f}x) [{min(v):.0f}-{max(v):.0f}]"
                      for name, v in tps.items())


def _host_times(logits, y) -> str:
    # Per decode step: building the graph, handing it to the device (async_eval), then waiting for it.
    build_s, encode_s, wait_s = [], [], []
    for _ in range(20):
        t1 = time.perf_counter()
        y = mx.argmax(logits(y[None]), axis=-1)
        t2 = time.perf_counter()
        mx.async_eval(y)
        t3 = time.perf_counter()
        y.item()
        t4 = time.perf_counter()
        build_s.append(t2 - t1)
        encode_s.append(t3 - t2)
        wait_s.append(t4 - t3)
    ms = lambda v: statistics.median(v) * 1e3  # noqa: E731
    return f"per step: build {ms(build_s):.2f} ms, async_eval {ms(encode_s):.2f} ms, wait {ms(wait_s):.2f} ms"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="1b,8b")
    ap.add_argument("-p", "--prompt-tokens", type=int, default=512)
    ap.add_argument("-g", "--gen-tokens", type=int, default=128)
    ap.add_argument("--no-parity", action="store_true")
    ap.add_argument("--parity-only", action="store_true")
    ap.add_argument("--mlx-lm", action="store_true", help="also mlx-lm's model of each shape, timed the same way")
    ap.add_argument("--nodes", action="store_true", help="only count one decode step's graph nodes, ours vs mlx-lm")
    ap.add_argument("--variants", type=int, default=0, metavar="N",
                    help="only N alternating trials of mlx-lm and our Metal-row variants (fused, unfused, split)")
    ap.add_argument("--rows", default="metal,default", help="rows to time: metal (the model's graph), default")
    args = ap.parse_args(argv)
    print(f"mlx {mx.__version__} on {mx.default_device()} ({mx.device_info().get('device_name', '?')})", flush=True)
    for name in args.models.split(","):
        if args.nodes:
            print(f"{name}: {graph_nodes(name)}", flush=True)
            continue
        if args.variants:
            print(f"{name}: {variants(name, args.prompt_tokens, args.gen_tokens, args.variants)}", flush=True)
            gc.collect()
            mx.clear_cache()
            continue
        model = build(name)
        vocab = min(model.args.vocab_size, 1000)
        if not args.no_parity:
            for n in (30, 2100):
                print(f"{name}: {parity(model, n, vocab)}", flush=True)
        rows = [None if r == "default" else r for r in args.rows.split(",")]
        for row in () if args.parity_only else rows:
            if row is not None:  # built for that row
                del model
                gc.collect()
                model = build(name, row)
            print(f"{name}: {breakdown(model, row, args.prompt_tokens, args.gen_tokens, vocab)}", flush=True)
        del model
        gc.collect()
        mx.clear_cache()
        if args.mlx_lm and not args.parity_only:
            print(f"{name}: {mlx_lm_breakdown(name, args.prompt_tokens, args.gen_tokens, vocab)}", flush=True)
            gc.collect()
            mx.clear_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
