"""Measure a generation runtime on one model: what `llama-mlx bench` reports.

One trial loads the model (timed until its weights are evaluated), warms it up, generates
`gen_tokens` tokens greedily after a prompt of random token ids, then frees everything; a curve
trial times decode steps at growing context positions. A runtime is how one library loads a model
and generates ids; this module has llama-mlx's own (`LlamaMLX`: `llama_mlx.loading.load` +
`llama_mlx.generate.generate_step`). benchmarks/runtimes.py adds mlx-lm's, measured the same way,
and benchmarks/random_model.py writes random-weight models of real shapes; neither is installed.

Each trial reports load time, time to first token (prefill of the prompt and the first sampled
token), prompt tokens/s (prompt tokens / time to first token), generation tokens/s (the tokens
after the first, over the time from the first to the last), and peak memory during generation
(`mx.get_peak_memory()` after `mx.reset_peak_memory()`, weights included). Benchmarks are
medians over trials.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import mlx.core as mx

__all__ = [
    "BenchResult",
    "BenchSizes",
    "LlamaMLX",
    "Runtime",
    "Trial",
    "benchmark",
    "curve_trial",
    "decode_curve",
    "default_sizes",
    "default_warmup_tokens",
    "device_summary",
    "free_memory",
    "measure_generation",
    "preload",
    "random_prompt",
    "run_trial",
]

# ------------------------------------------------------------------------------------------------
# Runtimes


class Runtime:
    """How one library loads a model and generates token ids; everything else is shared."""

    name = "?"

    def version(self) -> str:
        raise NotImplementedError

    def prepare(self) -> None:
        """Import what loading needs, so that one-off import time stays out of the first load time."""

    def load(self, path: Path, dtype: Optional[str] = None):
        """(model, tokenizer), the weights evaluated."""
        raise NotImplementedError

    def make_cache(self, model) -> list:
        raise NotImplementedError

    def steps(self, model, prompt: mx.array, max_tokens: int, cache: Optional[list] = None,
              prefill_step_size: Optional[int] = None) -> Iterator[int]:
        """Greedy token ids after `prompt` (the ids not yet in `cache`)."""
        raise NotImplementedError

    @staticmethod
    def offset(cache: list) -> int:
        return int(cache[0].offset)

    def synchronize(self) -> None:
        """Wait for everything queued, on every stream the runtime uses."""
        mx.synchronize()


class LlamaMLX(Runtime):
    name = "llama-mlx"

    def version(self) -> str:
        from . import __version__

        return __version__

    def prepare(self):
        from . import cache, generate, loading, sample, tokenizer  # noqa: F401

    def load(self, path, dtype=None):
        from .loading import load

        model, tokenizer = load(path, dtype=dtype, lazy=False)
        return model, tokenizer

    def make_cache(self, model):
        from .cache import make_prompt_cache

        return make_prompt_cache(len(model.layers))

    def steps(self, model, prompt, max_tokens, cache=None, prefill_step_size=None):
        from .generate import generate_step
        from .sample import make_sampler

        kwargs = {"prefill_step_size": prefill_step_size} if prefill_step_size else {}
        gen = generate_step(prompt, model, max_tokens=max_tokens, sampler=make_sampler(0.0), prompt_cache=cache,
                            **kwargs)
        return (token for token, _ in gen)


# ------------------------------------------------------------------------------------------------
# Measurements


def free_memory() -> None:
    gc.collect()
    mx.synchronize()
    mx.clear_cache()


def random_prompt(vocab_size: int, n: int, seed: int = 0) -> list[int]:
    """n token ids drawn uniformly from the vocabulary, the same for a given seed on every machine."""
    import numpy as np

    return np.random.default_rng(seed).integers(0, vocab_size, n).tolist()


def _drain(gen: Iterator[int]) -> None:
    for _ in gen:
        pass


def measure_generation(runtime: Runtime, model, prompt_ids: Sequence[int], gen_tokens: int,
                       prefill_step_size: Optional[int] = None) -> dict:
    """Time one greedy generation: time to first token, prompt and generation tokens/s, peak memory
    (and `resident_gb`, the memory in use when it starts: the weights, and anything else alive)."""
    if gen_tokens < 2:
        raise ValueError("gen_tokens must be at least 2 (generation speed is timed after the first token)")
    prompt = mx.array(list(prompt_ids))
    free_memory()
    resident = mx.get_active_memory() / 1e9
    mx.reset_peak_memory()
    start = time.perf_counter()
    gen = runtime.steps(model, prompt, gen_tokens, prefill_step_size=prefill_step_size)
    next(gen)
    first = time.perf_counter()
    n = 1
    for _ in gen:
        n += 1
    end = time.perf_counter()
    runtime.synchronize()
    peak = mx.get_peak_memory() / 1e9
    ttft = first - start
    return {"ttft_s": ttft, "prompt_tps": len(prompt_ids) / ttft, "generation_tps": (n - 1) / (end - first),
            "generation_tokens": n, "peak_memory_gb": peak, "resident_gb": resident}


def decode_curve(runtime: Runtime, model, positions: Sequence[int], *, vocab_size: int, steps: int = 16,
                 warm_steps: int = 4, seed: int = 1, prefill_step_size: Optional[int] = None) -> dict[int, float]:
    """Milliseconds per decoded token at each context position: one cache grows through the positions.

    At each position the cache is filled (random ids) up to it, then `warm_steps` untimed and
    `steps` timed decode steps run: one-off costs at that point (cache growth, graph tracing)
    stay out of the per-token cost.
    """
    cache = runtime.make_cache(model)
    out: dict[int, float] = {}
    limit = int(getattr(getattr(model, "args", None), "max_position_embeddings", 1 << 30) or (1 << 30))
    for i, position in enumerate(sorted(set(int(p) for p in positions))):
        fill = position - runtime.offset(cache)
        if fill < 1 or position + warm_steps + steps + 1 > limit:
            continue  # too close to the previous position, or past the context
        ids = mx.array(random_prompt(vocab_size, fill, seed + i))
        gen = runtime.steps(model, ids, warm_steps + steps + 1, cache=cache, prefill_step_size=prefill_step_size)
        for _ in range(warm_steps + 1):
            next(gen)
        t0 = time.perf_counter()
        for _ in range(steps):
            next(gen)
        out[position] = (time.perf_counter() - t0) / steps * 1e3
        _drain(gen)
        runtime.synchronize()
    del cache
    free_memory()
    return out


@dataclass
class Trial:
    """One load + generation of one runtime on one model."""

    load_s: float
    ttft_s: float
    prompt_tps: float
    generation_tps: float
    peak_memory_gb: float
    prompt_tokens: int
    generation_tokens: int
    resident_gb: float = 0.0  # memory in use when the timed generation started (weights included)


METRICS = ("prompt_tps", "generation_tps", "ttft_s", "peak_memory_gb", "load_s")


def preload(runtime: Runtime, path: str | Path, dtype: Optional[str] = None) -> float:
    """Load once, untimed, and free: files in the page cache and one-off setup done for every timed load."""
    free_memory()
    start = time.perf_counter()
    model, tokenizer = runtime.load(Path(path), dtype=dtype)
    seconds = time.perf_counter() - start
    del model, tokenizer
    free_memory()
    return seconds


def default_warmup_tokens(prompt_tokens: int) -> int:
    """The whole prompt on a GPU, where kernels are compiled for the shapes they first meet; on the CPU
    backend a short prompt does (its compiled kernels do not depend on the prompt length), and a full
    prefill there costs as much as the measurement."""
    return prompt_tokens if mx.default_device() == mx.gpu else min(prompt_tokens, 16)


def run_trial(runtime: Runtime, path: str | Path, prompt_ids: Sequence[int], gen_tokens: int, *,
              dtype: Optional[str] = None, warmup_tokens: Optional[int] = None,
              prefill_step_size: Optional[int] = None) -> Trial:
    """Load (timed), warm up, time one generation, free: the model is gone afterwards.

    warmup_tokens: prompt length of the untimed warm-up generation (0 skips it; default: see
    `default_warmup_tokens`).
    """
    free_memory()
    start = time.perf_counter()
    model, tokenizer = runtime.load(Path(path), dtype=dtype)
    load_s = time.perf_counter() - start
    try:
        warm = default_warmup_tokens(len(prompt_ids)) if warmup_tokens is None else min(warmup_tokens,
                                                                                          len(prompt_ids))
        if warm > 0:
            _drain(runtime.steps(model, mx.array(list(prompt_ids[:warm])), 3, prefill_step_size=prefill_step_size))
            runtime.synchronize()
        m = measure_generation(runtime, model, prompt_ids, gen_tokens, prefill_step_size)
    finally:
        del model, tokenizer  # compiled steps live in the backend seam, keyed weakly by the model
        free_memory()
    return Trial(load_s=load_s, ttft_s=m["ttft_s"], prompt_tps=m["prompt_tps"], generation_tps=m["generation_tps"],
                 peak_memory_gb=m["peak_memory_gb"], prompt_tokens=len(prompt_ids),
                 generation_tokens=m["generation_tokens"], resident_gb=m["resident_gb"])


def curve_trial(runtime: Runtime, path: str | Path, positions: Sequence[int], *, dtype: Optional[str] = None,
                steps: int = 16, prefill_step_size: Optional[int] = None, seed: int = 1) -> dict[int, float]:
    """Load, `decode_curve` (ms per token at each position), free. Separate from `run_trial`, so caches
    the long prefills leave behind cannot weigh on a generation trial's peak memory."""
    free_memory()
    model, tokenizer = runtime.load(Path(path), dtype=dtype)
    try:
        return decode_curve(runtime, model, positions, vocab_size=int(model.args.vocab_size), steps=steps,
                            seed=seed, prefill_step_size=prefill_step_size)
    finally:
        del model, tokenizer  # compiled steps live in the backend seam, keyed weakly by the model
        free_memory()


def median_of(trials: Sequence[Trial], metric: str) -> float:
    return statistics.median(getattr(t, metric) for t in trials)


@dataclass
class BenchResult:
    runtime: str
    model: str
    prompt_tokens: int
    generation_tokens: int
    trials: list[Trial]
    device: dict

    def medians(self) -> dict[str, float]:
        return {k: median_of(self.trials, k) for k in METRICS}

    def to_dict(self) -> dict:
        return {"runtime": self.runtime, "model": self.model, "prompt_tokens": self.prompt_tokens,
                "generation_tokens": self.generation_tokens, "trials": len(self.trials), **self.medians(),
                "per_trial": [asdict(t) for t in self.trials], "device": self.device}


def model_vocab_size(path: str | Path) -> int:
    """The vocabulary size in a checkpoint's config (headers only, no weights read)."""
    from .checkpoints import read_checkpoint

    return int(read_checkpoint(path).config["vocab_size"])


@dataclass(frozen=True)
class BenchSizes:
    prompt_tokens: int
    gen_tokens: int
    trials: int


# mlx-lm's benchmark sizes on a GPU. The CPU backend prefills a few hundred tokens a second at
# best (far fewer on a shared machine), so there a short prompt and two trials give a figure
# in seconds rather than minutes; the full sizes stay one option away.
GPU_SIZES = BenchSizes(512, 128, 3)
CPU_SIZES = BenchSizes(128, 32, 2)


def default_sizes() -> BenchSizes:
    """The prompt, generation and trial counts `benchmark` uses unless told: by device."""
    return GPU_SIZES if mx.default_device() == mx.gpu else CPU_SIZES


def benchmark(model: str | Path | None = None, prompt_tokens: Optional[int] = None,
              gen_tokens: Optional[int] = None, trials: Optional[int] = None, *,
              runtime: Optional[Runtime] = None, dtype: Optional[str] = None, warmup_tokens: Optional[int] = None,
              seed: int = 0, progress=None) -> BenchResult:
    """Median-of-trials benchmark of one runtime (default: `LlamaMLX()`) on one model (a path, a name in
    weights/, or None: the default). Sizes left None come from `default_sizes()`.

    progress(stage, trial, trials, result) is called as the run goes: ("load", 0, n, None) before the
    untimed first load, ("trial", i, n, None) as trial i starts, ("done", i, n, Trial) as it ends.
    """
    from .resolve import resolve_model

    sizes = default_sizes()
    prompt_tokens = sizes.prompt_tokens if prompt_tokens is None else prompt_tokens
    gen_tokens = sizes.gen_tokens if gen_tokens is None else gen_tokens
    trials = sizes.trials if trials is None else trials
    if trials < 1 or prompt_tokens < 1:
        raise ValueError("trials and prompt_tokens must be at least 1")
    path = resolve_model(model)
    prompt_ids = random_prompt(model_vocab_size(path), prompt_tokens, seed)
    rt = LlamaMLX() if runtime is None else runtime
    report = progress or (lambda *a: None)
    rt.prepare()
    report("load", 0, trials, None)
    preload(rt, path, dtype)
    results = []
    for i in range(trials):
        report("trial", i + 1, trials, None)
        results.append(run_trial(rt, path, prompt_ids, gen_tokens, dtype=dtype, warmup_tokens=warmup_tokens))
        report("done", i + 1, trials, results[-1])
    return BenchResult(runtime=rt.name, model=str(path), prompt_tokens=prompt_tokens, generation_tokens=gen_tokens,
                       trials=results, device=device_summary())


# ------------------------------------------------------------------------------------------------
# Device


def device_summary() -> dict:
    """The device MLX computes on, the machine and the library versions."""
    device = mx.default_device()
    info: dict = {}
    try:
        info = dict(mx.device_info())
    except Exception:  # not every backend reports
        pass
    kind = "gpu" if device == mx.gpu else "cpu"
    name = info.get("device_name") or (platform.processor() or platform.machine())
    out = {
        "device": str(device),
        "backend": kind,
        "name": str(name),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
    }
    memory = info.get("memory_size") or info.get("total_memory")
    if memory:
        out["memory_gb"] = round(int(memory) / 1e9, 1)
    if kind == "gpu" and sys.platform == "darwin" and not info.get("device_name"):
        out["name"] = "Apple GPU"
    from . import __version__

    out["llama_mlx"] = __version__
    return out
