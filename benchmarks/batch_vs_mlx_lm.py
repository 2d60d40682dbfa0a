#!/usr/bin/env python3
"""Continuous batching, llama-mlx's `BatchEngine` against mlx-lm's `BatchGenerator`, on the same
weights in one run: aggregate generated tokens/s and time to first token at 1, 4 and 8 streams.

For each model and stream count N, each runtime is given N prompts of the same random ids at once
and decodes -g tokens for each, greedily, no stop tokens. Aggregate tokens/s = N * g / wall time
from submission to the last token; TTFT is from submission to a stream's first token (median and
worst over the streams). The runtimes' models are never resident together: each is loaded, run
over every N (trials alternating runtime by runtime), and freed.

Needs the `bench` (or `test`) extra (mlx-lm). Results go to --out as batch_vs_mlx_lm-<tag>.json/.md.

  # CPU (this machine), about 2 minutes:
  python benchmarks/batch_vs_mlx_lm.py --models smollm2 -p 32 -g 8 --streams 1,4,8
  # GPU (MLX CUDA or Metal):
  python3 benchmarks/batch_vs_mlx_lm.py --models 1b,8b -p 128 -g 128 --work /tmp/bench-work

--first-second: first-request stalls instead. Each runtime in a process of its own loads the
model, runs its public `batch_generate` on N prompts with 8 new tokens (the warm-up, at the timed
runs' batch size and prompt length), then twice on N other prompts with -g new tokens: the first
of those against the second (tokens/s, their ratio) is what a first request pays for new shapes.
Results go to batch_first_second-<tag>.json/.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing llama-mlx

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.runtimes import versions  # noqa: E402
from benchmarks.vs_mlx_lm import MODELS, model_folder  # noqa: E402
from llama_mlx import benchmark as B  # noqa: E402

OURS, THEIRS = "llama-mlx", "mlx-lm"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--models", default="smollm2", help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--streams", default="1,4,8", help="concurrent stream counts (default 1,4,8)")
    p.add_argument("-p", "--prompt-tokens", type=int, default=128)
    p.add_argument("-g", "--gen-tokens", type=int, default=64)
    p.add_argument("-n", "--trials", type=int, default=1, help="trials per runtime and stream count")
    p.add_argument("--prefill-chunk", type=int, default=512, help="our newcomers' prefill chunk (default 512)")
    p.add_argument("--runtimes", default=f"{OURS},{THEIRS}")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="float type of scales/norms (auto: float32 on the CPU, else bfloat16 / the checkpoint's)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--smollm2", default=None, help="folder or GGUF of SmolLM2 (default: the default model)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "llama-mlx-bench"))
    p.add_argument("--tag", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--first-second", action="store_true",
                   help="measure the first batch_generate against the second (each runtime in its own process)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # RUNTIME:FOLDER:STREAMS, --first-second's process
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.streams = [int(s) for s in args.streams.split(",") if s.strip()]
    args.runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    if any(m not in MODELS for m in args.models) or any(r not in (OURS, THEIRS) for r in args.runtimes):
        p.error("unknown model or runtime")
    return args


def prompts_for(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, min(vocab, 32000), size=length)] for _ in range(n)]


def summarize(n: int, g: int, wall: float, ttfts: list[float]) -> dict:
    return {"streams": n, "tokens": n * g, "wall_s": wall, "aggregate_tps": n * g / wall,
            "ttft_median_s": statistics.median(ttfts), "ttft_max_s": max(ttfts)}


def run_ours(folder: Path, args) -> list[dict]:
    import llama_mlx
    from llama_mlx.batch import BatchEngine

    model, tokenizer = llama_mlx.load(folder, lazy=False)
    vocab = model.args.vocab_size
    out = []
    # Warm-up: one short stream, so first-call costs are not timed.
    warm = BatchEngine(model, tokenizer)
    warm.submit(prompts_for(1, 8, vocab, 99)[0], max_tokens=2, stop_tokens=()).result()
    for n in args.streams:
        # Untimed, the timed run's shapes: a first call at a new batch size or cache capacity
        # traces a graph, and may compile kernels (CUDA: seconds).
        warm = BatchEngine(model, tokenizer, max_batch=n, prefill_chunk=args.prefill_chunk)
        for p in prompts_for(n, args.prompt_tokens, vocab, 98):
            warm.submit(p, max_tokens=args.gen_tokens, stop_tokens=())
        while warm.has_work():
            warm.step()
        for trial in range(args.trials):
            engine = BatchEngine(model, tokenizer, max_batch=n, prefill_chunk=args.prefill_chunk)
            prompts = prompts_for(n, args.prompt_tokens, vocab, args.seed + trial)
            start = time.perf_counter()
            reqs = [engine.submit(p, max_tokens=args.gen_tokens, stop_tokens=()) for p in prompts]
            while engine.has_work():
                engine.step()
            wall = time.perf_counter() - start
            assert all(len(r.tokens) == args.gen_tokens for r in reqs)
            row = summarize(n, args.gen_tokens, wall, [r.stats.time_to_first_token for r in reqs])
            out.append({"runtime": OURS, "trial": trial, **row})
            log(f"  {OURS:9s} streams {n}: {row['aggregate_tps']:.1f} tok/s, TTFT median {row['ttft_median_s']:.3f} s")
    del model
    gc.collect()
    mx.clear_cache()
    return out


def run_mlx_lm(folder: Path, args) -> list[dict]:
    import mlx_lm
    from mlx_lm.generate import BatchGenerator

    model, _ = mlx_lm.load(str(folder))
    mx.eval(model.parameters())
    vocab = model.args.vocab_size
    out = []

    def run(prompts, g):
        gen = BatchGenerator(model, max_tokens=g, completion_batch_size=len(prompts),
                             prefill_batch_size=len(prompts))
        start = time.perf_counter()
        uids = gen.insert(prompts, [g] * len(prompts))
        first, counts = {}, {u: 0 for u in uids}
        while responses := gen.next_generated():
            now = time.perf_counter()
            for r in responses:
                first.setdefault(r.uid, now - start)
                counts[r.uid] += 1
        wall = time.perf_counter() - start
        gen.close()
        return wall, [first[u] for u in uids], counts

    run(prompts_for(1, 8, vocab, 99), 2)
    for n in args.streams:
        run(prompts_for(n, args.prompt_tokens, vocab, 98), 4)  # untimed, as ours
        for trial in range(args.trials):
            prompts = prompts_for(n, args.prompt_tokens, vocab, args.seed + trial)
            wall, ttfts, counts = run(prompts, args.gen_tokens)
            assert all(c == args.gen_tokens for c in counts.values()), counts
            row = summarize(n, args.gen_tokens, wall, ttfts)
            out.append({"runtime": THEIRS, "trial": trial, **row})
            log(f"  {THEIRS:9s} streams {n}: {row['aggregate_tps']:.1f} tok/s, TTFT median {row['ttft_median_s']:.3f} s")
    del model
    gc.collect()
    mx.clear_cache()
    return out


def first_second_child(spec: str, args) -> dict:
    """In a fresh process: load, warm up (N prompts, 8 tokens), then two timed `batch_generate`s."""
    runtime, folder, n = spec.rsplit(":", 2)
    n = int(n)
    if runtime == OURS:
        import llama_mlx

        model, tokenizer = llama_mlx.load(folder, lazy=False)

        def run(prompts, g):
            res = llama_mlx.batch_generate(model, tokenizer, prompts, max_tokens=g, max_batch=max(n, 8))
            return sum(len(t) for t in res.tokens)
    else:
        import importlib

        import mlx_lm

        gen = importlib.import_module("mlx_lm.generate")
        model, tokenizer = mlx_lm.load(folder)
        mx.eval(model.parameters())

        def run(prompts, g):
            res = gen.batch_generate(model, tokenizer, prompts, max_tokens=g, return_token_ids=True)
            return sum(len(t) for t in res.token_ids)
    vocab = model.args.vocab_size
    run(prompts_for(n, args.prompt_tokens, vocab, 98), 8)
    out = {"runtime": runtime, "streams": n}
    for i, name in enumerate(("first", "second")):
        prompts = prompts_for(n, args.prompt_tokens, vocab, args.seed + i)
        start = time.perf_counter()
        tokens = run(prompts, args.gen_tokens)
        wall = time.perf_counter() - start
        out[name] = {"tokens": tokens, "wall_s": wall, "tps": tokens / wall}
    out["first_over_second"] = out["first"]["tps"] / out["second"]["tps"]
    return out


def first_second(folder: Path, args) -> list[dict]:
    import subprocess

    rows = []
    for n in args.streams:
        for runtime in args.runtimes:
            argv = [sys.executable, __file__, "--child", f"{runtime}:{folder}:{n}", "-p", str(args.prompt_tokens),
                    "-g", str(args.gen_tokens), "--seed", str(args.seed)]
            done = subprocess.run(argv, capture_output=True, text=True)
            if done.returncode:
                log(done.stderr[-2000:])
                rows.append({"runtime": runtime, "streams": n, "error": done.stderr.strip().splitlines()[-1:]})
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            log(f"  {runtime:9s} streams {n}: first {row['first']['tps']:.1f} tok/s, second "
                f"{row['second']['tps']:.1f} tok/s (first/second {row['first_over_second']:.2f})")
    return rows


def first_second_table(run: dict) -> str:
    lines = []
    for name, rows in run["models"].items():
        lines += [f"### {name}", "", "| runtime | streams | first tok/s | second tok/s | first / second |",
                  "|---|---:|---:|---:|---:|"]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['runtime']} | {r['streams']} | error: {r['error']} | | |")
            else:
                lines.append(f"| {r['runtime']} | {r['streams']} | {r['first']['tps']:.1f} | "
                             f"{r['second']['tps']:.1f} | {r['first_over_second']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def table(run: dict) -> str:
    lines = []
    for name, rows in run["models"].items():
        lines += [f"### {name}", "", "| runtime | streams | aggregate tok/s | TTFT median (s) | TTFT max (s) |",
                  "|---|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['runtime']} | {r['streams']} | {r['aggregate_tps']:.1f} | "
                         f"{r['ttft_median_s']:.3f} | {r['ttft_max_s']:.3f} |")
        ours = {r["streams"]: r["aggregate_tps"] for r in rows if r["runtime"] == OURS}
        theirs = {r["streams"]: r["aggregate_tps"] for r in rows if r["runtime"] == THEIRS}
        if ours and theirs:
            lines += ["", "ours / mlx-lm aggregate: " + ", ".join(
                f"{n} streams {ours[n] / theirs[n]:.2f}x" for n in sorted(ours) if n in theirs)]
        if 1 in ours:
            lines += ["ours N streams / ours 1 stream: " + ", ".join(
                f"{n}: {ours[n] / ours[1]:.2f}x" for n in sorted(ours))]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(first_second_child(args.child, args)))
        return 0
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    run = {"device": B.device_summary(), "versions": versions() if THEIRS in args.runtimes else {},
           "settings": {k: v for k, v in vars(args).items() if k not in ("out", "work")}, "models": {}}
    tag = args.tag or ("gpu" if mx.default_device() == mx.gpu else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        folder = model_folder(name, args, work)
        log(f"{name}: {folder}")
        rows = []
        if args.first_second:
            rows = first_second(folder, args)
        if OURS in args.runtimes and not args.first_second:
            rows += run_ours(folder, args)
        if THEIRS in args.runtimes and not args.first_second:
            rows += run_mlx_lm(folder, args)
        run["models"][name] = rows
        stem, show = ("batch_first_second", first_second_table) if args.first_second else ("batch_vs_mlx_lm", table)
        (out / f"{stem}-{tag}.json").write_text(json.dumps(run, indent=2, default=str) + "\n")
        (out / f"{stem}-{tag}.md").write_text(f"# {stem} ({tag})\n\n" + show(run))
    print(show(run))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
