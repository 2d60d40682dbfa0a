"""The backend table: one row per device, cpu, metal or cuda, carrying every device policy.

The model, the cache and generation ask nothing of the device; they ask the current row
(`current()`), through the functions below. `LLAMA_MLX_BACKEND=cpu|metal|cuda` forces a row
(`use(name)` in-process): with `metal` on a CUDA machine the path Macs run (no CUDA kernels)
runs and can be measured there.

| policy | cpu | metal | cuda |
| --- | --- | --- | --- |
| activations' dtype | float32 | the weights' | the weights' |
| q/k/v and gate/up fused at load | no | yes | yes |
| load-time transform | matmuls over CPU threads | none | 2-7 row matmuls run as 8 |
| one-token step | model graph | model graph | `cuda.FusedDecoder` (4-bit), else graph |
| batch step | model graph | compiled `RowsDecoder` | `cuda.FusedRowsDecoder`, `KernelRowsDecoder`, `RowsDecoder` |
| speculative check | model graph | model graph | `cuda.FusedCheckDecoder` (4-bit), else graph |
| batch sizes warmed up | 2 | all | all |
| drafts a round: model / lookup | 3 / 3 | 3 / 4 | 4 / 10 |
| speculative rounds queued ahead | 0 | 0 | 1 |
| a check of k + 1 positions, in steps (prior) | 1 + 0.8k | 1 + 0.1k | 1 + 0.05k |
| prompt lookup on by default (chat, serve) | no | yes | yes |
| wired memory limit | no | yes | no |

Each row's fields say why (`CPU`, `METAL`, `CUDA` below). A new backend is a new row, and a
wing of its own (`cuda/`) when it brings kernels; nothing outside this package changes.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import mlx.core as mx
import mlx.nn as nn

from ..cache import BatchKVCache, KVCache
from ..errors import ArgumentError
from . import cpu, cuda, fusion
from .steps import GRAPHS, AllPositionsStep, CompiledCheckStep, CompiledStep, GraphStep, MaskedDecoder, RowsDecoder

__all__ = [
    "BACKENDS", "Backend", "CPU", "CUDA", "GRAPHS", "METAL", "Step", "check_cost", "compute_dtype", "current",
    "decode_step", "draft_tokens", "finish_thread", "lookup_by_default", "prepare", "read_ahead", "rows_step", "use",
    "verify_step", "warmup_batch_sizes", "wired_limit",
    "AllPositionsStep", "CompiledCheckStep", "CompiledStep", "GraphStep", "MaskedDecoder", "RowsDecoder",
]

Step = Callable[[mx.array], mx.array]


@dataclass(frozen=True)
class Backend:
    """One row of the table (see the module docstring).

    compute_dtype: activations' and the KV cache's dtype (None: the weights' own).
    fuse: merge q/k/v and gate/up into one matmul each at load.
    transform: a load-time change to the built model (`prepare`), or None.
    decoders / rows_decoders / check_decoders: the compiled decoder classes a one-token step, a
    batch's step and a speculative check run, the first whose `supported(model)` holds; none (or
    none supported): the model's graph.
    warm_all_batch_sizes: a server decodes every batch size once before serving (else two).
    draft_tokens, lookup_tokens: drafts a round with a draft model, with prompt lookup.
    read_ahead: speculative rounds queued on the device before the previous one is read (where
    both steps are `positioned`).
    check_cost: a speculative check of k + 1 positions costs about 1 + check_cost * k one-token
    steps: the adaptive draft length's prior until it has timed a round (`speculative._Adapt`).
    lookup_by_default: chat and serve draft by prompt lookup unless told not to.
    wired_limit: keep the model's memory wired during generation (`mx.set_wired_limit`).
    """

    name: str
    compute_dtype: Optional[mx.Dtype]
    fuse: bool
    transform: Optional[Callable[..., int]]
    decoders: tuple[type, ...]
    rows_decoders: tuple[type, ...]
    check_decoders: tuple[type, ...]
    warm_all_batch_sizes: bool
    draft_tokens: int
    lookup_tokens: int
    read_ahead: int
    wired_limit: bool
    check_cost: float
    lookup_by_default: bool


# MLX's CPU backend: half-precision kernels run 30-50x slower than float32 there, fusion would
# only copy weights, and one quantized matmul runs on one thread (cpu.py spreads it over cores).
# A step is bound by compute, so the graph is as fast as a compiled one, and a check of L
# positions costs nearly L one-token steps: 3 drafts a round (benchmarks/results/*-cpu*), a
# check of k + 1 positions priced 1 + 0.8k steps (measured 2.45-3.38 for k = 3, SmolLM2), and no
# prompt lookup by default: it pays only when nearly every draft holds, and where none does its
# probes still cost (benchmarks/results/speculative_adaptive-cpu.md).
CPU = Backend(
    name="cpu", compute_dtype=mx.float32, fuse=False, transform=cpu.use_threads,
    decoders=(), rows_decoders=(), check_decoders=(), warm_all_batch_sizes=False,
    draft_tokens=3, lookup_tokens=3, read_ahead=0, wired_limit=False, check_cost=0.8, lookup_by_default=False,
)

# Apple GPUs through MLX's Metal backend (unified memory; decode bound by memory bandwidth).
# - The weights' dtype: Metal's fp16/bf16 kernels are MLX's native path (mlx-lm runs them).
# - Fused q/k/v and gate/up: the same bytes read in 2 matmuls instead of 5 per layer, fewer
#   dispatches a token; a prompt runs the fused weight as row blocks (fusion.py). Measured on the
#   proxy (H100, this row forced, 7 alternating trials, 1B shape): fused 1.15x mlx-lm's decode,
#   unfused 1.01x (benchmarks/results/gpu-nvidia-h100-2026-12-08.md).
# - No load-time transform: the other rows' suit their own backends' kernels (one thread per
#   quantized matmul on the CPU, 2-7 row matmuls padded to 8 on CUDA); Metal's run as mlx-lm's do.
# - One-token step and check as the model's graph, as mlx-lm runs them: Metal encodes a node in
#   about a microsecond, and no Metal kernel of ours replaces them.
# - A batch's step compiled (`RowsDecoder`): mx.compile fuses the elementwise ops (masking,
#   RoPE, SwiGLU) into fewer kernels and the host builds one graph, not B rows' worth of nodes.
# - Every batch size warmed up: mx.compile traces once per input shape, and MLX builds a Metal
#   library for each new fused kernel on its first use, before the first request rather than in it.
# - 3 drafts a round with a draft model (mlx-lm's default), 4 with lookup: a quantized matmul of
#   a few rows still reads each weight once, so a check of up to ~5 positions should cost about
#   one step. Reasoned from bandwidth-bound decode, not measured on a Mac; the adaptive draft
#   length (`speculative._Adapt`) times the rounds and corrects it online.
# - A check priced 1 + 0.1k steps until timed (the same reasoning: a few extra rows add little
#   to a step that reads every weight once), and prompt lookup on by default in chat and serve,
#   since by that reasoning a round whose drafts all fail costs about one step, and the adaptive
#   draft length turns drafting off where timing shows it does not pay. Both are reasoned, not
#   measured on Apple GPUs (the CPU and CUDA figures in benchmarks/results/ do not carry over).
# - No rounds queued ahead: that needs steps taking a device-side position (CUDA's fused ones).
# - Wired memory: macOS may page out a model's buffers between tokens; mlx-lm wires them
#   (`mx.set_wired_limit(max_recommended_working_set_size)`) around generation, and so do we.
METAL = Backend(
    name="metal", compute_dtype=None, fuse=True, transform=None,
    decoders=(), rows_decoders=(RowsDecoder,), check_decoders=(), warm_all_batch_sizes=True,
    draft_tokens=3, lookup_tokens=4, read_ahead=0, wired_limit=True, check_cost=0.1, lookup_by_default=True,
)

# MLX's CUDA backend spends 4-5 us of host time per graph node, so a step's speed is its node
# count: the fused decoders (eight nodes a layer) run where they apply (cuda.supported).
# A first use at a new shape compiles kernels (tens of seconds): every batch size is warmed up.
# A check of 2-11 positions costs about one step there: 10 lookup drafts (H200, SmolLM2), 4 with
# a draft model (8B/1B, K 4-6 about equal: benchmarks/results/speculative_draft_queued-*); the
# fused steps take a device position, so one round is queued ahead of the host. A check is priced
# 1 + 0.05k steps until timed; prompt lookup is on by default in chat and serve (as on Metal).
CUDA = Backend(
    name="cuda", compute_dtype=None, fuse=True, transform=cuda.pad_small_matmuls,
    decoders=(cuda.FusedDecoder,), rows_decoders=(cuda.FusedRowsDecoder, cuda.KernelRowsDecoder, RowsDecoder),
    check_decoders=(cuda.FusedCheckDecoder,), warm_all_batch_sizes=True,
    draft_tokens=4, lookup_tokens=10, read_ahead=1, wired_limit=False, check_cost=0.05, lookup_by_default=True,
)

BACKENDS = {b.name: b for b in (CPU, METAL, CUDA)}
_forced: list[Optional[Backend]] = [None]


def use(name: Optional[str]) -> Optional[str]:
    """Force the row `name` ("cpu", "metal" or "cuda") in this process, or None for the device's
    own; returns the previous forced name. `LLAMA_MLX_BACKEND` does the same from outside."""
    previous = _forced[0].name if _forced[0] is not None else None
    if name is not None and name not in BACKENDS:
        raise ArgumentError(f"unknown backend {name!r}: use one of {', '.join(BACKENDS)}")
    _forced[0] = BACKENDS[name] if name is not None else None
    return previous


def current() -> Backend:
    """The row in force: `use`'s, else `LLAMA_MLX_BACKEND`'s, else the default device's."""
    if _forced[0] is not None:
        return _forced[0]
    name = os.environ.get("LLAMA_MLX_BACKEND", "").strip().lower()
    if name:
        if name not in BACKENDS:
            raise ArgumentError(f"LLAMA_MLX_BACKEND={name!r}: use one of {', '.join(BACKENDS)}")
        return BACKENDS[name]
    if mx.default_device() == mx.cpu:
        return CPU
    return CUDA if cuda.available() else METAL


def compute_dtype(device: Optional[mx.Device] = None) -> Optional[mx.Dtype]:
    """Activations' (and the KV cache's) dtype: the current row's, or for `device` the default
    row of that device (float32 on the CPU, the weights' own on GPUs)."""
    if device is None:
        return current().compute_dtype
    return CPU.compute_dtype if device == mx.cpu else None


def prepare(model: nn.Module, *, fuse: Optional[bool] = None, threads: Optional[int] = None) -> nn.Module:
    """Fit a built model to the current row, in place; returns it: the compute dtype, fusion of
    q/k/v and gate/up (`fuse` overrides the row), the row's transform (CPU: quantized matmuls over
    `threads` cores, default the CPU count up to 8; CUDA: 2-7 row matmuls run as 8).
    `loading.load` calls it once."""
    row = current()
    model.model.compute_dtype = row.compute_dtype
    if fuse if fuse is not None else row.fuse:
        fusion.fuse(model)
    if row.transform is cpu.use_threads:
        cpu.use_threads(model, threads)
    elif row.transform is not None:
        row.transform(model)
    return model


def _first(decoders: tuple[type, ...], model: nn.Module) -> Optional[type]:
    return next((d for d in decoders if d.supported(model)), None)


def _plain(cache: list) -> bool:
    return all(type(c) is KVCache for c in cache)


def decode_step(model: nn.Module, cache: list) -> Step:
    """The step that runs `model` on new tokens over `cache` (a per-layer list):
    `step(tokens[B, L]) -> logits[B, vocab]` of the last position, updating the cache.

    The row's one-token decoder where it applies (plain `KVCache`s; on CUDA the fused decoder,
    whose steps run 2-16 tokens of one sequence through the row's check decoder too), else the
    model's graph. A compiled graph is traced once per model and cache capacity, and kept for the
    model (never on it) while the model lives. `kind` names what runs.
    """
    row = current()
    decoder = _first(row.decoders, model) if _plain(cache) else None
    if decoder is None:
        return GraphStep(model, cache)
    check = _first(row.check_decoders, model)
    # A few tokens at once stay compiled too: the graph's step costs several compiled ones there.
    return CompiledStep(model, cache, decoder, CompiledCheckStep(model, cache, check) if check else None)


def rows_step(model: nn.Module, cache: list) -> Step:
    """The step that decodes a batch: `step(tokens[B, 1]) -> logits[B, vocab]` over per-layer
    `BatchKVCache`s, each row at its own position, updating the cache (other shapes take the graph):
    the row's first supported batch decoder, compiled over the cache's whole buffers (traced once
    per batch size and capacity), else the model's graph."""
    decoder = _first(current().rows_decoders, model) if all(type(c) is BatchKVCache for c in cache) else None
    return CompiledStep(model, cache, decoder) if decoder else GraphStep(model, cache)


def verify_step(model: nn.Module, cache: list) -> Step:
    """The step that checks K draft tokens: `step(tokens[B, L]) -> logits[B, L, vocab]` of every
    position, updating `cache` with all L: the row's check decoder where it applies (plain caches;
    up to its `max_rows` positions), else the model's graph, where L positions are one large
    matmul per weight."""
    check = _first(current().check_decoders, model) if _plain(cache) else None
    return CompiledCheckStep(model, cache, check) if check else AllPositionsStep(model, cache)


def warmup_batch_sizes(bound: int) -> int:
    """Batch sizes (1 .. n) a server should decode once before serving, for a bound of `bound`."""
    return bound if current().warm_all_batch_sizes else min(bound, 2)


def draft_tokens(lookup: bool) -> int:
    """Tokens speculative decoding drafts a round when not told: the row's, by draft source."""
    row = current()
    return row.lookup_tokens if lookup else row.draft_tokens


def check_cost() -> float:
    """A speculative check of k + 1 positions in one-token steps, per extra position (the row's prior)."""
    return current().check_cost


def lookup_by_default() -> bool:
    """Whether chat and serve draft by prompt lookup when not told (the row's)."""
    return current().lookup_by_default


def read_ahead() -> int:
    """Speculative rounds the row queues ahead of the host where its steps are `positioned`."""
    return current().read_ahead


def finish_thread() -> None:
    """Wait for everything this thread queued on the device and the CPU to finish. A thread that
    ran a model calls it before it ends: MLX's stream threads must be idle when the process
    exits, or tearing them down may abort it (SIGABRT, "terminate called without an active
    exception"), and no other thread can wait on this one's streams."""
    if mx.default_device() != mx.cpu:
        mx.synchronize(mx.default_stream(mx.default_device()))
    cpu.drain_thread()


@contextlib.contextmanager
def wired_limit(model: nn.Module) -> Iterator[None]:
    """Around generation: on rows that ask for it, where the device recommends a working set
    (Metal), raise MLX's wired-memory limit to it, as mlx-lm does; the old limit is restored after
    the device is done."""
    limit = mx.device_info().get("max_recommended_working_set_size") if current().wired_limit else None
    if limit is None:
        yield
        return
    old = mx.set_wired_limit(limit)
    try:
        yield
    finally:
        mx.synchronize()
        mx.set_wired_limit(old)
