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

    python benchmarks/serve_vs_mlx_lm.py --model weights/SmolLM2-135M-Instruct --max-tokens 32
    python benchmarks/serve_vs_mlx_lm.py --model /tmp/rand-1b --random-shape 1b --streams 1,4,8 --only-streams
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


def stream_completion(base: str, prompt: str, max_tokens: int, bias: dict) -> dict:
    body = {"model": "default_model", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    if bias:
        body["logit_bias"] = bias
    start, first, tokens = time.perf_counter(), None, 0
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=1200) as r:
        r.raise_for_status()
        for chunk in sse_chunks(r):
            if chunk.get("choices") and first is None:
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
    args = ap.parse_args()
    args.streams = [int(n) for n in args.streams.split(",") if n.strip()]
    bias = {i.strip(): -100 for i in args.stop_ids.split(",") if i.strip()}
    stream_bias = {i.strip(): -100 for i in args.stream_stop_ids.split(",") if i.strip()}
    if args.random_shape:
        sys.path.insert(0, str(ROOT))
        from benchmarks.random_model import write_random_model

        write_random_model(args.model, args.random_shape)
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
