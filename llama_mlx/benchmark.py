"""Measure a generation runtime on one model, and write random-weight models of real shapes.

One trial loads the model (timed until its weights are evaluated), warms it up, generates
`gen_tokens` tokens greedily after a prompt of random token ids, then frees everything; a curve
trial times decode steps at growing context positions. Two runtimes are measured the same way:

- ``llama-mlx``: `llama_mlx.loading.load` + `llama_mlx.generate.generate_step`
- ``mlx-lm``: `mlx_lm.load` + `mlx_lm.generate.generate_step`

Each trial reports load time, time to first token (prefill of the prompt and the first sampled
token), prompt tokens/s (prompt tokens / time to first token), generation tokens/s (the tokens
after the first, over the time from the first to the last), and peak memory during generation
(`mx.get_peak_memory()` after `mx.reset_peak_memory()`, weights included). Benchmarks are
medians over trials.

`write_random_model(folder, "1b")` writes an MLX folder (4-bit, group 64 by default) of Llama 3.2
1B's shape with random weights, which both runtimes load: random weights cost the same as real
ones. Tensors are generated shard by shard, so memory holds one shard at a time.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import mlx.core as mx

from .config import llama3_rope_scaling

__all__ = [
    "SHAPES",
    "BenchResult",
    "Trial",
    "benchmark",
    "curve_trial",
    "decode_curve",
    "default_warmup_tokens",
    "device_summary",
    "free_memory",
    "get_runtime",
    "measure_generation",
    "preload",
    "random_prompt",
    "run_trial",
    "shape_config",
    "write_random_model",
]

# ------------------------------------------------------------------------------------------------
# Model shapes


SHAPES: dict[str, dict[str, Any]] = {
    # A few-MB model for tests: every code path of the real ones, in milliseconds.
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=256, vocab_size=512, tie_word_embeddings=True, rope_factor=32.0),
    # Llama 3.2 1B
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, rope_factor=32.0),
    # Llama 3.1 8B
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False, rope_factor=8.0),
}


def shape_config(shape: str | dict) -> dict:
    """The Hugging Face config.json dict (Llama 3 RoPE scaling) of a named shape or a dict of its sizes."""
    sizes = dict(SHAPES[shape] if isinstance(shape, str) else shape)
    factor = sizes.pop("rope_factor", 8.0)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_traditional": False,
        "max_position_embeddings": 131072,
        "rope_scaling": llama3_rope_scaling(factor),
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        **sizes,
    }
    config["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    config["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", False))  # mlx-lm defaults to true
    return config


# ------------------------------------------------------------------------------------------------
# Random-weight MLX folders

_MARKER = "llama_mlx_benchmark"  # config.json entry describing how the random folder was made
_SPECIAL = ["<unk>", "<|begin_of_text|>", "<|end_of_text|>"]


def _param_specs(config: dict, bits: int, group_size: int) -> list[tuple[str, tuple[int, ...], Any]]:
    """(name, shape, dtype) of every parameter of the quantized model, in order; nothing is computed."""
    from mlx.utils import tree_flatten

    from .model import Model, ModelArgs
    from .quant import quantize

    model = Model(ModelArgs.from_dict(config))  # lazily initialised: only shapes are read
    quantize(model, bits, group_size)
    specs = [(name, tuple(a.shape), a.dtype) for name, a in tree_flatten(model.parameters())]
    del model
    return specs


def _random_tensor(name: str, shape: tuple[int, ...], stored: Any, dtype: Any, bits: int,
                   group_size: int, seed: int) -> mx.array:
    """Random packed weights, scales centred so a dequantized row has about unit gain, norms of ones."""
    if stored == mx.uint32:  # packed quantized values: random bytes
        return mx.random.randint(0, 256, (*shape[:-1], shape[-1] * 4), dtype=mx.uint8).view(mx.uint32)
    if name.endswith(".scales") or name.endswith(".biases"):
        in_features = shape[-1] * group_size
        levels = (1 << bits) - 1
        # Uniform codes in [0, levels] have std ~ levels / sqrt(12); aim for weights of std 1/sqrt(in).
        base = math.sqrt(12) / levels / math.sqrt(in_features)
        key = mx.random.key(zlib.crc32(f"{seed}:{name.rsplit('.', 1)[0]}".encode()))  # scales and biases agree
        scales = mx.random.uniform(0.5 * base, 1.5 * base, shape, key=key)
        out = scales if name.endswith(".scales") else -scales * (levels / 2)
        return out.astype(dtype)
    return mx.ones(shape, dtype=dtype)  # RMSNorm weights (and any other float vector)


def _write_tokenizer(folder: Path, size: int = 256) -> None:
    """A small word-level tokenizer that both runtimes load (benchmarks feed token ids directly)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(_SPECIAL)}
    for i in range(len(_SPECIAL), size):
        vocab[f"t{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(_SPECIAL)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": _SPECIAL[1], "eos_token": _SPECIAL[2],
              "unk_token": _SPECIAL[0], "add_bos_token": False, "model_max_length": 131072}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_random_model(folder: str | Path, shape: str | dict = "1b", *, bits: int = 4, group_size: int = 64,
                       dtype: str = "bfloat16", seed: int = 0, max_shard_bytes: int = 1 << 30,
                       force: bool = False) -> Path:
    """Write a random-weight, quantized MLX folder of a model shape (see SHAPES); returns its path.

    The folder has config.json (Hugging Face keys, `quantization`, explicit `tie_word_embeddings`),
    safetensors shards with an index, and a small tokenizer; `llama_mlx.loading.load` and
    `mlx_lm.load` both read it. An existing folder made with the same settings is reused (unless
    `force`); it is written into a temporary folder and renamed into place when complete.
    """
    folder = Path(folder)
    config = shape_config(shape)
    made = {"shape": shape if isinstance(shape, str) else dict(shape), "bits": bits, "group_size": group_size,
            "dtype": dtype, "seed": seed, "weights": "random"}
    if (folder / "config.json").is_file() and not force:
        try:
            old = json.loads((folder / "config.json").read_text()).get(_MARKER)
        except (OSError, json.JSONDecodeError):
            old = None
        if old == made:
            return folder
        raise FileExistsError(f"{folder}: exists and was not made with these settings (use force to replace it)")
    from .checkpoints.plan import Item
    from .checkpoints.writer import write_weights

    float_dtype = getattr(mx, dtype)

    def item(name: str, shape: tuple[int, ...], stored: Any) -> Item:
        out_dtype = stored if stored == mx.uint32 else float_dtype
        return Item(name, [(name, shape, out_dtype)],
                    lambda: {name: _random_tensor(name, shape, stored, float_dtype, bits, group_size, seed)},
                    math.prod(shape))

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        mx.random.seed(seed)
        # The converter's writer: shards of bounded size with an index, one tensor in memory at a time.
        write_weights(tmp, [item(*spec) for spec in _param_specs(config, bits, group_size)],
                      max_shard_bytes=max_shard_bytes)
        _write_tokenizer(tmp)
        quantization = {"group_size": group_size, "bits": bits}
        full = {**config, "torch_dtype": dtype, "quantization": quantization, "quantization_config": quantization,
                "bos_token_id": 1, "eos_token_id": 2, _MARKER: made}
        (tmp / "config.json").write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


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


class MlxLm(Runtime):
    name = "mlx-lm"

    def version(self) -> str:
        import mlx_lm

        return mlx_lm.__version__

    def prepare(self):
        import mlx_lm.generate  # noqa: F401
        import mlx_lm.models.cache  # noqa: F401
        import mlx_lm.models.llama  # noqa: F401
        import mlx_lm.tokenizer_utils  # noqa: F401
        import mlx_lm.utils  # noqa: F401
        from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: F401

    def load(self, path, dtype=None):
        import mlx_lm

        if dtype is not None:
            raise ValueError("mlx-lm loads weights in their stored dtype; write the folder in the dtype wanted")
        model, tokenizer = mlx_lm.load(str(path))  # lazy=False: weights evaluated before it returns
        mx.eval(model.parameters())
        return model, tokenizer

    def make_cache(self, model):
        from mlx_lm.models.cache import make_prompt_cache

        return make_prompt_cache(model)

    def steps(self, model, prompt, max_tokens, cache=None, prefill_step_size=None):
        from mlx_lm.generate import generate_step

        kwargs = {"prefill_step_size": prefill_step_size} if prefill_step_size else {}
        gen = generate_step(prompt, model, max_tokens=max_tokens, sampler=None, prompt_cache=cache, **kwargs)
        return (token for token, _ in gen)  # sampler None: mlx-lm's greedy argmax

    def synchronize(self) -> None:
        from mlx_lm.generate import generation_stream

        mx.synchronize(generation_stream)  # its decode runs ahead on a stream of its own
        mx.synchronize()


RUNTIMES = {"llama-mlx": LlamaMLX, "mlx-lm": MlxLm}


def get_runtime(name: str) -> Runtime:
    """A runtime by name ("llama-mlx" or "mlx-lm"), its modules imported."""
    try:
        runtime = RUNTIMES[name]()
    except KeyError:
        raise ValueError(f"unknown runtime {name!r}: choose {', '.join(RUNTIMES)}") from None
    runtime.prepare()
    return runtime


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


def _release(model) -> None:
    # The compiled decode step holds the model: drop it so the weights can go.
    model.__dict__.pop("_llama_mlx_decode", None)


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
        _release(model)
        del model, tokenizer
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
        _release(model)
        del model, tokenizer
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


def benchmark(model: str | Path | None = None, prompt_tokens: int = 512, gen_tokens: int = 128, trials: int = 3, *,
              runtime: str = "llama-mlx", dtype: Optional[str] = None, warmup_tokens: Optional[int] = None,
              seed: int = 0, progress=None) -> BenchResult:
    """Median-of-trials benchmark of one runtime on one model (a path, a name in weights/, or None: the default)."""
    from .loading import resolve_model

    if trials < 1 or prompt_tokens < 1:
        raise ValueError("trials and prompt_tokens must be at least 1")
    path = resolve_model(model)
    prompt_ids = random_prompt(model_vocab_size(path), prompt_tokens, seed)
    rt = get_runtime(runtime)
    preload(rt, path, dtype)
    results = []
    for i in range(trials):
        results.append(run_trial(rt, path, prompt_ids, gen_tokens, dtype=dtype, warmup_tokens=warmup_tokens))
        if progress:
            progress(i + 1, trials, results[-1])
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
    try:
        import mlx_lm

        out["mlx_lm"] = mlx_lm.__version__
    except ImportError:
        pass
    from . import __version__

    out["llama_mlx"] = __version__
    return out
