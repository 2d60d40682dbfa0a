"""Tokens/s and memory per rank of distributed inference, 1, 2 and 4 ranks (ring backend, loopback).

    python benchmarks/distributed.py [--model PATH] [--mode pipeline|tensor] [--ranks 1,2,4] [--tokens 32]

Each configuration runs under `mlx.launch --backend ring --hosts 127.0.0.1 -n N`; every rank
greedily decodes the same random prompt and reports its timings and MLX peak memory; the table
shows rank 0's speed and the largest per-rank memory. On one machine the ranks share its cores
and memory bandwidth, so this measures the engine's overhead, not the speed-up of N machines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker(args) -> None:
    import mlx.core as mx

    from llama_mlx import generate_step, make_sampler
    from llama_mlx.benchmark import random_prompt
    from llama_mlx.distributed import group
    from llama_mlx.loading import load

    g = group()
    t0 = time.perf_counter()
    model, _ = load(args.model, distributed=args.mode if g.size() > 1 else False)
    if g.size() == 1:
        for layer in model.layers:
            mx.eval(layer.parameters())
        mx.eval(model.parameters())
    load_s, load_peak = time.perf_counter() - t0, mx.get_peak_memory()
    prompt = mx.array(random_prompt(model.args.vocab_size, args.prompt_tokens, seed=1))
    times = []
    t = time.perf_counter()
    for _ in generate_step(prompt, model, max_tokens=args.tokens, sampler=make_sampler(0.0)):
        times.append(time.perf_counter() - t)
        t = time.perf_counter()
    decode = times[1:]
    out = {"rank": g.rank(), "size": g.size(), "load_s": load_s, "load_peak": load_peak,
           "peak": mx.get_peak_memory(), "prefill_s": times[0],
           "prompt_tps": args.prompt_tokens / times[0], "decode_tps": len(decode) / sum(decode)}
    Path(args.out, f"rank{g.rank()}.json").write_text(json.dumps(out))


def run(args) -> list[dict]:
    rows = []
    launch = Path(sys.executable).parent / "mlx.launch"
    for n in [int(x) for x in args.ranks.split(",")]:
        with tempfile.TemporaryDirectory() as out:
            # One rank runs without the launcher (which hands a single rank an empty hostfile).
            head = [str(launch), "--hosts", "127.0.0.1", "-n", str(n), "--backend", "ring", "--"] if n > 1 else []
            cmd = [*head, sys.executable, __file__, "--worker", "--out", out, "--model", str(args.model),
                   "--mode", args.mode, "--tokens", str(args.tokens), "--prompt-tokens", str(args.prompt_tokens)]
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
            if not Path(out, "rank0.json").is_file():
                sys.exit(f"{n} ranks failed:\n{proc.stdout}{proc.stderr}")
            ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(n)]
        rows.append({"ranks": n, "mode": args.mode if n > 1 else "single",
                     "decode_tps": ranks[0]["decode_tps"], "prompt_tps": ranks[0]["prompt_tps"],
                     "load_peak_mb": max(r["load_peak"] for r in ranks) / 1e6,
                     "peak_mb": max(r["peak"] for r in ranks) / 1e6, "load_s": ranks[0]["load_s"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "weights" / "SmolLM2-135M-Instruct"))
    ap.add_argument("--mode", choices=["pipeline", "tensor"], default="pipeline")
    ap.add_argument("--ranks", default="1,2,4")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    rows = run(args)
    print("| ranks | mode | decode tok/s | prompt tok/s | peak MB/rank (load) | peak MB/rank (run) | load s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['ranks']} | {r['mode']} | {r['decode_tps']:.1f} | {r['prompt_tps']:.1f} | "
              f"{r['load_peak_mb']:.1f} | {r['peak_mb']:.1f} | {r['load_s']:.2f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
