#!/usr/bin/env python3
"""Decode attention at length: the CUDA wing's kernel (`kernels.decode_attention`) against MLX's
`scaled_dot_product_attention` masked to each row's positions (what the kernel hands over to from
`kernels.SDPA_FROM` positions), one query token per row over K/V buffers of C positions.

    python3 benchmarks/attention_probe.py --lengths 1024,4096,8192 --rows 1,8 --out results.json

Each variant is compiled as the decoders compile it and timed over --iters calls (one evaluation);
the buffers are full (offset C - 1). Heads: Llama 3 1B (32 query, 8 KV, head 64) and 8B (32, 8,
128), bfloat16. Prints the time per call, the faster one at each length, and the first length from
which SDPA wins at every larger length too (the threshold to set), and checks that both agree.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402

from llama_mlx.backends.cuda import kernels  # noqa: E402

HEADS = {"1b": (32, 8, 64), "8b": (32, 8, 128)}


def variant(sdpa: bool):
    def attend(q, k, v, offset):
        saved = kernels.SDPA_FROM
        kernels.SDPA_FROM = 0 if sdpa else 1 << 40
        try:
            return kernels.decode_attention(q, k, v, offset, q.shape[-1] ** -0.5)
        finally:
            kernels.SDPA_FROM = saved

    return mx.compile(attend)


def timed(fn, args, iters: int) -> float:
    mx.eval(fn(*args))
    mx.synchronize()
    start = time.perf_counter()
    outs = [fn(*args) for _ in range(iters)]
    mx.eval(outs)
    mx.synchronize()
    return (time.perf_counter() - start) / iters


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="1024,2048,4096,8192")
    p.add_argument("--rows", default="1,8")
    p.add_argument("--shapes", default="1b,8b")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    print(f"mlx {mx.__version__} on {mx.default_device()} ({mx.device_info().get('device_name', '?')})", flush=True)
    fused, sdpa = variant(False), variant(True)
    rows_out = []
    for shape in args.shapes.split(","):
        hq, hkv, d = HEADS[shape]
        for b in (int(x) for x in args.rows.split(",")):
            for c in lengths:
                q = mx.random.normal((b, hq, 1, d)).astype(mx.bfloat16)
                k = mx.random.normal((b, hkv, c, d)).astype(mx.bfloat16)
                v = mx.random.normal((b, hkv, c, d)).astype(mx.bfloat16)
                offset = mx.full((b,), c - 1, dtype=mx.int32)
                a, s = fused(q, k, v, offset), sdpa(q, k, v, offset)
                diff = mx.abs(a.astype(mx.float32) - s.astype(mx.float32)).max().item()
                tf, ts = timed(fused, (q, k, v, offset), args.iters), timed(sdpa, (q, k, v, offset), args.iters)
                row = {"shape": shape, "rows": b, "length": c, "fused_us": tf * 1e6, "sdpa_us": ts * 1e6,
                       "max_abs_diff": diff, "faster": "fused" if tf < ts else "sdpa"}
                rows_out.append(row)
                print(f"{shape} rows {b} length {c}: fused {tf * 1e6:8.1f} us, sdpa {ts * 1e6:8.1f} us -> "
                      f"{row['faster']} (max |diff| {diff:.3g})", flush=True)
    # The threshold: the smallest length from which SDPA wins at it and every longer one, in every series.
    threshold = None
    for c in sorted(lengths):
        if all(r["faster"] == "sdpa" for r in rows_out if r["length"] >= c):
            threshold = c
            break
    print(f"SDPA from: {threshold if threshold is not None else 'never (in these lengths)'}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": mx.device_info().get("device_name", "?"),
                                              "mlx": mx.__version__, "rows": rows_out,
                                              "sdpa_from": threshold}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
