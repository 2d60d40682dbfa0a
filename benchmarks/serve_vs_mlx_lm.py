"""`llama-mlx serve` against `mlx_lm.server` on the same model folder, in one run.

Each server runs alone (one after the other) as its own process on a free loopback port and is
measured the same way, over raw HTTP streaming chat completions at temperature 0 with the stop
tokens banned (so every answer has `--max-tokens` tokens):

- TTFT and decode tokens/s of a short prompt (median of `--runs`);
- TTFT of a long system prompt the first time (cold) and again with a new question (cached prefix);
- peak resident memory of the server process (VmHWM on Linux, else sampled RSS);
- with `--streams 1,4,8`: N clients at once (streamed /v1/completions, text prompts of different
  lengths, stop tokens not banned unless `--stop-ids`, `stream_options.include_usage`): aggregate
  generated tokens/s (sum of `usage.completion_tokens` over the wall time of the N) and the median
  TTFT (first streamed frame; a token whose text is empty streams no frame, so on a random-weight
  model with a small tokenizer TTFT is an upper bound, the same for both servers). Both servers
  batch: ours with `--decode-concurrency` and `--max-concurrency` set to the largest N, mlx-lm with
  its `--decode-concurrency`.
- with `--model-b PATH`: a model switch. Three servers run at once (each idle while another is
  measured), at their default settings: ours with both models preloaded (`-M A -M B`, both stay
  loaded), ours with `--max-loaded-models 1` (B loaded on request, unloading A, and back), and
  mlx_lm.server (it holds one model and loads the one a request names). Each of `--switch-trials`
  trials asks every server in turn, by path, for B (the switch A->B), B again (steady), A (B->A),
  A again (steady): streamed /v1/completions, a new prompt each time, TTFT of the first text frame.
  Medians per server and the ratios mlx-lm/ours are reported (`--only-switch`: nothing else).

    python benchmarks/serve_vs_mlx_lm.py --model weights/SmolLM2-135M-Instruct --max-tokens 32
    python benchmarks/serve_vs_mlx_lm.py --model /tmp/rand-1b --random-shape 1b --streams 1,4,8 --only-streams
    python benchmarks/serve_vs_mlx_lm.py --model /tmp/smol-f32 --model-b /tmp/rand-135m --random-shape-b 135m \
        --random-dtype float32 --only-switch --out benchmarks/results/serve_vs_mlx_lm-cpu-switch.json
    python benchmarks/serve_vs_mlx_lm.py --model /tmp/rand-1b --random-shape 1b --model-b /tmp/rand-8b \
        --random-shape-b 8b --only-switch --out /tmp/switch-gpu.json        # GPU: bigger shapes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PeakRSS:
    """Peak resident memory of a process: VmHWM where /proc has it, else sampled `ps` RSS."""

    def __init__(self, pid: int):
        self.pid, self.sampled, self._stop = pid, 0, threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _rss(self) -> int:
        try:
            out = subprocess.run(["ps", "-o", "rss=", "-p", str(self.pid)], capture_output=True, text=True).stdout
            return int(out.strip() or 0) * 1024
        except (OSError, ValueError):
            return 0

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            self.sampled = max(self.sampled, self._rss())

    def peak(self) -> int:
        self._stop.set()
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return self.sampled


def start(cmd: list[str], ready_url: str, log: Path) -> subprocess.Popen:
    hub = log.parent / "bench-hf-hub"  # mlx_lm.server's /v1/models scans the HF cache: it must exist
    hub.mkdir(exist_ok=True)
    env = {"HF_HUB_CACHE": str(hub), **os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:4]} exited:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(ready_url, timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{cmd[:4]} did not come up")


def sse_chunks(response):
    """The JSON chunks of a server-sent event stream, up to `data: [DONE]` (mlx_lm.server keeps the
    connection open after it)."""
    for line in response.iter_lines():
        if line == "data: [DONE]":
            return
        if line.startswith("data: "):
            yield json.loads(line[6:])


def stream_chat(base: str, messages: list[dict], max_tokens: int, bias: dict) -> dict:
    body = {"model": "default_model", "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "logit_bias": bias}
    start = time.perf_counter()
    stamps = []
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for chunk in sse_chunks(r):
            choices = chunk.get("choices") or []
            if choices and (choices[0].get("delta") or {}).get("content"):
                stamps.append(time.perf_counter() - start)
    ttft = stamps[0] if stamps else float("nan")
    tps = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 and stamps[-1] > stamps[0] else float("nan")
    return {"ttft": ttft, "tps": tps, "chunks": len(stamps)}


def system_prompt(tag: str, rules: int) -> str:
    return f"You are assistant {tag}. " + " ".join(f"Rule {i}: answer {tag} questions carefully and briefly."
                                                   for i in range(rules))


WORDS = [f"t{i}" for i in range(3, 200)]  # words of random_model's tokenizer; plain words for real ones


def stream_completion(base: str, prompt: str, max_tokens: int, bias: dict, model: str = "default_model") -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    if bias:
        body["logit_bias"] = bias
    start, first, tokens = time.perf_counter(), None, 0
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=1200) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{base} {model}: HTTP {r.status_code}: {r.read()[:500]!r}")
        for chunk in sse_chunks(r):
            if first is None and any(c.get("text") for c in chunk.get("choices") or []):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"ttft": first if first is not None else float("nan"), "tokens": tokens}


def measure_streams(base: str, args, bias: dict, random_words: bool) -> dict:
    """Aggregate tokens/s and median TTFT of N concurrent streams, for each N of --streams."""
    vocab = WORDS if random_words else "the sea and the sky were blue over the quiet town at dawn".split()
    out = {}
    stream_completion(base, " ".join(vocab[:8]), 4, bias)  # warm-up
    for n in args.streams:
        # Different prompt lengths per stream (prefill of newcomers interleaves with the others' decode).
        prompts = [" ".join(vocab[(i * 7 + j) % len(vocab)] for j in range(args.stream_prompt + 13 * i))
                   for i in range(n)]
        results: list = [None] * n

        def run(i: int, tokens: int) -> None:
            results[i] = stream_completion(base, prompts[i], tokens, bias)

        def round_of(tokens: int) -> float:
            threads = [threading.Thread(target=run, args=(i, tokens)) for i in range(n)]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return time.perf_counter() - start

        # An untimed round of the timed one's shapes first: a backend's first call at a new batch
        # size or cache capacity may trace and compile (MLX's CUDA backend: seconds), no steady-state cost.
        round_of(args.max_tokens)
        wall = round_of(args.max_tokens)
        out[str(n)] = {"aggregate_tps": sum(r["tokens"] for r in results) / wall,
                       "ttft": statistics.median(r["ttft"] for r in results),
                       "tokens": sum(r["tokens"] for r in results), "wall": wall}
        print(f"  {n} streams: {json.dumps(out[str(n)])}", flush=True)
    return out


def measure(base: str, args, bias: dict) -> dict:
    user = [{"role": "user", "content": "Write a short poem about the sea."}]
    stream_chat(base, user, 4, bias)  # warm-up
    runs = [stream_chat(base, user, args.max_tokens, bias) for _ in range(args.runs)]
    system = {"role": "system", "content": system_prompt("omega", args.system_rules)}
    cold = stream_chat(base, [system, {"role": "user", "content": "Hello?"}], 4, bias)
    warm = stream_chat(base, [system, {"role": "user", "content": "Who are you?"}], 4, bias)
    return {"ttft": statistics.median(r["ttft"] for r in runs), "tps": statistics.median(r["tps"] for r in runs),
            "long_cold_ttft": cold["ttft"], "long_cached_ttft": warm["ttft"]}


# -- a model switch: the first request for another model, ours against mlx_lm.server

SHAPE_135M = {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
              "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True,
              "rope_factor": 8.0}  # SmolLM2's sizes


def is_random(model: str) -> bool:
    config = Path(model) / "config.json"
    return config.is_file() and "llama_mlx_benchmark" in config.read_text()


def switch_request(model: str, i: int) -> tuple[str, dict | None]:
    """The i-th prompt for `model` (its first word differs from the last one's, so that no server answers
    from a cache of the whole prompt) and its logit bias: a random folder's small word tokenizer has no text
    for most ids its random head picks, so its first token is forced to a word (the forward pass is the
    same; its words are t3..t255, a number would be <unk>); a real model's end tokens are banned (--stop-ids)."""
    if is_random(model):
        return f"t{3 + i % 250} t5 t6 t7", {"10": 100}
    return f"{i} Once upon a time, by the sea,", None


def switch_servers(args, a: str, b: str) -> dict:
    """name -> command(port) of the three servers of the switch benchmark."""
    ours = [sys.executable, "-m", "llama_mlx_cli.main", "serve", "--log-level", "warning",
            "--prompt-cache-bytes", str(args.prompt_cache_bytes)]
    return {
        "llama-mlx": lambda port: ours + ["-M", a, "-M", b, "--port", str(port)],
        "llama-mlx max-loaded 1": lambda port: ours + ["-M", a, "--max-loaded-models", "1", "--port", str(port)],
        "mlx-lm": lambda port: [sys.executable, "-m", "mlx_lm.server", "--model", a, "--port", str(port),
                                "--prompt-cache-bytes", str(args.prompt_cache_bytes), "--log-level", "WARNING"],
    }


def measure_switch(args, bias: dict) -> dict:
    """Medians of the switch A->B and B->A TTFTs and of the steady ones, per server (see the docstring)."""
    a, b = (str(Path(m).resolve()) for m in (args.model, args.model_b))  # both servers key models by path
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    load_before = os.getloadavg()  # other work on the machine: the run's noise
    servers, procs = {}, []
    try:
        for name, cmd in switch_servers(args, a, b).items():
            port = free_port()
            ready = "/health" if name.startswith("llama-mlx") else "/v1/models"
            began = time.perf_counter()
            procs.append(start(cmd(port), f"http://127.0.0.1:{port}{ready}", logs / f"bench-switch-{len(procs)}.log"))
            servers[name] = {"base": f"http://127.0.0.1:{port}", "startup_s": time.perf_counter() - began,
                             "samples": {k: [] for k in ("switch_a_b", "steady_b", "switch_b_a", "steady_a")}}
        asked = 0

        def ask(server: dict, model: str) -> float:
            nonlocal asked
            asked += 1
            prompt, own_bias = switch_request(model, asked)
            out = stream_completion(server["base"], prompt, args.switch_tokens,
                                    own_bias if own_bias is not None else bias, model)
            return out["ttft"]

        for server in servers.values():  # untimed: each model once (page cache, first calls), then A loaded
            for model in (a, b, a):
                ask(server, model)
        for trial in range(args.switch_trials):
            for name, server in servers.items():  # alternating servers: drift and other load hit all three
                row = {k: ask(server, m) for k, m in (("switch_a_b", b), ("steady_b", b), ("switch_b_a", a),
                                                      ("steady_a", a))}
                for k, v in row.items():
                    server["samples"][k].append(v)
                print(f"  trial {trial + 1} {name}: " + " ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
        for name, server in servers.items():
            if name.startswith("llama-mlx"):  # the loads and unloads it did: the switch reloaded or did not
                stats = httpx.get(server["base"] + "/v1/internal/stats", timeout=30).json()["registry"]
                server["registry"] = {"loads": stats["loads"], "unloads": stats["unloads"]}
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(60)
    results = {}
    for name, server in servers.items():
        samples = server.pop("samples")
        results[name] = {"startup_s": server["startup_s"], **{k: statistics.median(v) for k, v in samples.items()},
                         "samples": samples, **({"registry": server["registry"]} if "registry" in server else {})}
        r = results[name]
        r["switch"] = statistics.median(samples["switch_a_b"] + samples["switch_b_a"])
        r["steady"] = statistics.median(samples["steady_a"] + samples["steady_b"])
    theirs = results["mlx-lm"]
    ratios = {f"{key} (mlx-lm/{name})": theirs[key] / results[name][key]
              for name in ("llama-mlx", "llama-mlx max-loaded 1")
              for key in ("switch", "switch_a_b", "switch_b_a", "steady")}
    return {"model_a": a, "model_b": b, "switch_tokens": args.switch_tokens, "trials": args.switch_trials,
            "machine": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "results": results, "ratios": ratios}


def switch_markdown(report: dict) -> str:
    """The switch results as a Markdown table (seconds, medians)."""
    keys = ("switch_a_b", "switch_b_a", "switch", "steady_a", "steady_b", "steady", "startup_s")
    lines = [(f"A: `{report['model_a']}`, B: `{report['model_b']}`; {report['trials']} trials, "
              f"{report['switch_tokens']} tokens per request; {report['machine']}, {report['cpus']} CPUs, "
              f"load average {report['loadavg_before'][0]:.1f} before, {report['loadavg_after'][0]:.1f} after"), "",
             "| TTFT, s (median) | " + " | ".join(report["results"]) + " |",
             "| --- |" + " ---: |" * len(report["results"])]
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(f"{r[key]:.3f}" for r in report["results"].values()) + " |")
    lines += ["", "| ratio | x |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.2f} |" for k, v in report["ratios"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "weights" / "SmolLM2-135M-Instruct"))
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--system-rules", type=int, default=80, help="length of the long system prompt (~11 tokens each)")
    ap.add_argument("--prompt-cache-bytes", type=int, default=1 << 30)
    ap.add_argument("--stop-ids", default="0,2", help="token ids banned so answers run to --max-tokens")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--streams", default="", help="concurrent stream counts to measure, e.g. 1,4,8 (default: none)")
    ap.add_argument("--stream-prompt", type=int, default=64, help="words in the first stream's prompt")
    ap.add_argument("--stream-stop-ids", default="", help="token ids banned in the stream runs (default: none, "
                                                            "so our rows stay on the batched greedy path)")
    ap.add_argument("--only-streams", action="store_true", help="skip the single-request and prefix-cache part")
    ap.add_argument("--random-shape", choices=["1b", "8b", "tiny"], default=None,
                    help="first write a random-weight model of this shape to --model "
                         "(benchmarks.random_model.write_random_model; reused when already there)")
    ap.add_argument("--model-b", default=None, help="a second model: measure switching between --model and it")
    ap.add_argument("--random-shape-b", choices=["1b", "8b", "tiny", "135m"], default=None,
                    help="first write a random-weight model of this shape to --model-b (135m: SmolLM2's)")
    ap.add_argument("--random-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="scales' dtype of the random models written (float32 matches llama-mlx's CPU default)")
    ap.add_argument("--switch-trials", type=int, default=5)
    ap.add_argument("--switch-tokens", type=int, default=4, help="tokens per request of the switch benchmark")
    ap.add_argument("--only-switch", action="store_true", help="measure only the model switch (needs --model-b)")
    args = ap.parse_args()
    if args.only_switch and not args.model_b:
        ap.error("--only-switch needs --model-b")
    args.streams = [int(n) for n in args.streams.split(",") if n.strip()]
    bias = {i.strip(): -100 for i in args.stop_ids.split(",") if i.strip()}
    stream_bias = {i.strip(): -100 for i in args.stream_stop_ids.split(",") if i.strip()}
    if args.random_shape:
        sys.path.insert(0, str(ROOT))
        from benchmarks.random_model import write_random_model

        write_random_model(args.model, args.random_shape, dtype=args.random_dtype)
    if args.random_shape_b:
        sys.path.insert(0, str(ROOT))
        from benchmarks.random_model import write_random_model

        shape = SHAPE_135M if args.random_shape_b == "135m" else args.random_shape_b
        write_random_model(args.model_b, shape, dtype=args.random_dtype)
    if args.model_b:
        report = measure_switch(args, bias)
        print(switch_markdown(report), flush=True)
        if args.out and args.only_switch:
            args.out.write_text(json.dumps(report, indent=2) + "\n")
            args.out.with_suffix(".md").write_text(switch_markdown(report))
        if args.only_switch:
            return
    random_words = bool(args.random_shape) or (Path(args.model) / "config.json").is_file() and "llama_mlx_benchmark" in (
        Path(args.model) / "config.json").read_text()
    most = max(args.streams, default=1)
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    servers = {
        "llama-mlx": lambda port: [sys.executable, "-m", "llama_mlx_cli.main", "serve", "--model", args.model,
                                   "--port", str(port), "--max-concurrency", str(most),
                                   "--decode-concurrency", str(most),
                                   "--prompt-cache-bytes", str(args.prompt_cache_bytes), "--log-level", "warning"],
        "mlx-lm": lambda port: [sys.executable, "-m", "mlx_lm.server", "--model", args.model, "--port", str(port),
                                "--decode-concurrency", str(most), "--log-level", "WARNING"],
    }
    ready = {"llama-mlx": "/health", "mlx-lm": "/v1/models"}
    results = {}
    for name, cmd in servers.items():
        port = free_port()
        began = time.perf_counter()
        proc = start(cmd(port), f"http://127.0.0.1:{port}{ready[name]}", logs / f"bench-{name}.log")
        startup = time.perf_counter() - began
        rss = PeakRSS(proc.pid)
        base = f"http://127.0.0.1:{port}"
        try:
            print(name, flush=True)
            results[name] = {} if args.only_streams else measure(base, args, bias)
            if args.streams:
                results[name]["streams"] = measure_streams(base, args, stream_bias, random_words)
            results[name]["peak_rss_mb"] = rss.peak() / 2**20
            results[name]["startup_s"] = startup  # to ready: loading, and our warm-up of every batch size
        finally:
            proc.terminate()
            proc.wait(60)
        if not args.only_streams:
            results[name]["long_cache_speedup"] = results[name]["long_cold_ttft"] / results[name]["long_cached_ttft"]
        print(name, json.dumps(results[name]), flush=True)
    ours, theirs = results["llama-mlx"], results["mlx-lm"]
    if args.streams:
        print(f"{'streams':10}{'ours tok/s':>12}{'mlx-lm tok/s':>14}{'ratio':>8}{'ours ttft':>11}{'mlx-lm ttft':>13}")
        for n in map(str, args.streams):
            a, b = ours["streams"][n], theirs["streams"][n]
            print(f"{n:10}{a['aggregate_tps']:12.1f}{b['aggregate_tps']:14.1f}"
                  f"{a['aggregate_tps'] / b['aggregate_tps']:8.2f}{a['ttft']:11.3f}{b['ttft']:13.3f}")
        first = ours["streams"][str(args.streams[0])]["aggregate_tps"]
        scaling = {n: ours["streams"][str(n)]["aggregate_tps"] / first for n in args.streams}
        print("ours: aggregate tok/s over our", args.streams[0], "stream(s):", json.dumps(scaling))
    if args.only_streams:
        report = {"model": args.model, "max_tokens": args.max_tokens, "machine": platform.platform(),
                  "results": results}
        if args.out:
            args.out.write_text(json.dumps(report, indent=2) + "\n")
        return
    ratios = {"tps (ours/mlx-lm)": ours["tps"] / theirs["tps"], "ttft (mlx-lm/ours)": theirs["ttft"] / ours["ttft"],
              "cached long-prompt ttft (mlx-lm/ours)": theirs["long_cached_ttft"] / ours["long_cached_ttft"],
              "peak rss (ours/mlx-lm)": ours["peak_rss_mb"] / theirs["peak_rss_mb"]}
    report = {"model": args.model, "max_tokens": args.max_tokens, "machine": platform.platform(),
              "results": results, "ratios": ratios}
    print(f"{'':28}{'llama-mlx':>12}{'mlx-lm':>12}")
    for key in ("ttft", "tps", "long_cold_ttft", "long_cached_ttft", "long_cache_speedup", "peak_rss_mb"):
        print(f"{key:28}{ours[key]:12.3f}{theirs[key]:12.3f}")
    for key, value in ratios.items():
        print(f"{key:40}{value:8.2f}x")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
