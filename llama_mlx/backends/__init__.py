"""The one place that decides by device; the model, the cache and generation ask it nothing else.

- `compute_dtype(device)`: activations' dtype, float32 on the CPU, the weights' own on GPUs.
- `prepare(model, fuse=, threads=)`: fits a built model to the default device, in place: sets
  the compute dtype, fuses q/k/v and gate/up (`fusion`, GPUs) or spreads quantized matmuls over
  the CPU cores (`cpu`); on CUDA, 4-bit projections pad 2-7 rows to 8 (`cuda.pad_small_matmuls`).
  `loading.load` calls it once.
- `decode_step(model, cache, compile=)`: the step generation runs, `step(tokens[B, L]) ->
  logits[B, vocab]`: on CUDA the fused decoder of `cuda` (eight graph nodes a layer), elsewhere
  the model's graph, or on request a compiled masked step (`steps`).
- `rows_step(model, cache, compile=)`: the step a batch decodes with, one token per row over
  per-layer `BatchKVCache`s: on GPUs one compiled graph (`steps.RowsDecoder`; on CUDA with the
  attention kernel, `cuda.KernelRowsDecoder`, or with 4-bit models all fused, `cuda.FusedRowsDecoder`),
  on the CPU the model's graph.
- `warmup_batch_sizes(bound)`: how many batch sizes a server runs once before serving.
- `verify_step(model, cache)`: the step speculative decoding checks drafts with, `step(tokens[B, L])
  -> logits[B, L, vocab]` of every position (the K drafts and the token after them, in one forward);
  on CUDA for 4-bit models `cuda.FusedCheckDecoder`, compiled.
- `draft_tokens(lookup)`: how many tokens speculative decoding drafts a round when not told.

A new backend adds a module here and a branch in these functions, nowhere else.
"""

from __future__ import annotations

from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn

from ..cache import KVCache
from . import cpu, cuda, fusion
from .steps import GRAPHS, AllPositionsStep, CompiledCheckStep, CompiledStep, GraphStep, MaskedDecoder, RowsDecoder

__all__ = [
    "Step", "compute_dtype", "decode_step", "draft_tokens", "prepare", "rows_step", "verify_step", "warmup_batch_sizes",
]

Step = Callable[[mx.array], mx.array]


def compute_dtype(device: Optional[mx.Device] = None) -> Optional[mx.Dtype]:
    """Activations' (and the KV cache's) dtype on `device` (default: MLX's default device).

    float32 on the CPU, where half-precision kernels run many times slower; None (the weights'
    own dtype) on GPUs. Weights stay as stored either way.
    """
    device = device if device is not None else mx.default_device()
    return mx.float32 if device == mx.cpu else None


def prepare(model: nn.Module, *, fuse: Optional[bool] = None, threads: Optional[int] = None) -> nn.Module:
    """Fit a built model to the default device, in place; returns it.

    fuse: merge q/k/v and gate/up projections; default on GPUs, where a decode step is bound by
    its number of graph nodes, and off on the CPU, where it would only cost a copy of those weights.
    threads: on the CPU, quantized matmuls run over this many cores (default: the CPU count, at
    most 8; 1 keeps one). Ignored on GPUs.
    """
    on_gpu = mx.default_device() == mx.gpu
    model.model.compute_dtype = compute_dtype()
    if fuse if fuse is not None else on_gpu:
        fusion.fuse(model)
    if on_gpu:
        cuda.pad_small_matmuls(model)
    if not on_gpu:
        cpu.use_threads(model, threads)
    return model


def warmup_batch_sizes(bound: int) -> int:
    """Batch sizes (1 .. n) a server should decode once before serving, for a bound of `bound`:
    all of them on GPUs (MLX's CUDA backend compiles a kernel on its first use, up to tens of
    seconds at a new batch size), two elsewhere."""
    return bound if mx.default_device() == mx.gpu else min(bound, 2)


def decode_step(model: nn.Module, cache: list, compile: Optional[bool] = None) -> Step:
    """The step that runs `model` on new tokens over `cache` (a per-layer list).

    `step(tokens[B, L]) -> logits[B, vocab]` of the last position, updating the cache. `compile`:
    None picks the CUDA fused decoder where it applies (`cuda.supported`) and the model's graph
    elsewhere; True compiles single-token steps (fused on CUDA, else masked over the buffers);
    False keeps the graph. On CUDA a few tokens at once (up to 16, one sequence) run through the
    fused check (`verify_step`) and give their last position's logits. Compiling needs plain
    `KVCache`s; the compiled graph is traced once per model and cache capacity, and kept for the
    model (never on it) while the model lives.
    The step's `kind` says which runs: "graph", "compiled" or "fused".
    """
    plain = all(type(c) is KVCache for c in cache)
    fused = plain and cuda.supported(model)
    if not (plain and (fused if compile is None else compile)):
        return GraphStep(model, cache)
    kind = "fused" if fused else "compiled"
    graph = GRAPHS.get(model, kind, cuda.FusedDecoder if fused else MaskedDecoder)
    # A few tokens at once stay fused too: the graph's step costs several fused ones there.
    short = verify_step(model, cache) if fused and cuda.fused_rows_supported(model) else None
    return CompiledStep(model, cache, graph, kind, short)


def rows_step(model: nn.Module, cache: list, compile: Optional[bool] = None) -> Step:
    """The step that decodes a batch: `step(tokens[B, 1]) -> logits[B, vocab]` over per-layer
    `BatchKVCache`s, each row at its own position, updating the cache (other shapes take the graph).

    `compile`: None compiles on GPUs, where a step of B rows would otherwise pay for its graph's
    nodes on the host, and keeps the graph on the CPU, which is bound by compute; True/False force
    it. The compiled graph runs over the cache's whole buffers, traced once per batch size and
    capacity; on CUDA its attention is the decode kernel (`cuda.rows_supported`), and for 4-bit
    models every layer is fused (`cuda.fused_rows_supported`). `kind` says which runs: "graph",
    "rows", "rows-kernel" or "rows-fused".
    """
    if not (compile if compile is not None else mx.default_device() == mx.gpu):
        return GraphStep(model, cache)
    if cuda.fused_rows_supported(model):
        kind, make = "rows-fused", cuda.FusedRowsDecoder
    elif cuda.rows_supported(model):
        kind, make = "rows-kernel", cuda.KernelRowsDecoder
    else:
        kind, make = "rows", RowsDecoder
    return CompiledStep(model, cache, GRAPHS.get(model, kind, make), kind)


def verify_step(model: nn.Module, cache: list) -> Step:
    """The step that checks K draft tokens: `step(tokens[B, L]) -> logits[B, L, vocab]` of every
    position, updating `cache` with all L. On CUDA (`cuda.fused_rows_supported`, plain caches) up
    to 16 positions run through `cuda.FusedCheckDecoder`, compiled (kind "check-fused"): there the
    graph's check of 2-11 positions costs 2 to 4 one-token steps, bound by its nodes' host time
    (SmolLM2 about 2, the 8B shape 3.6 at 4 positions), the fused one 2.3 on 8B. Elsewhere the
    model's graph (kind "verify"), where L positions are one large matmul per weight.
    """
    if all(type(c) is KVCache for c in cache) and cuda.fused_rows_supported(model):
        graph = GRAPHS.get(model, "check-fused", cuda.FusedCheckDecoder)
        return CompiledCheckStep(model, cache, graph, cuda.FusedCheckDecoder.max_rows)
    return AllPositionsStep(model, cache)


def draft_tokens(lookup: bool) -> int:
    """Tokens speculative decoding drafts a round by default. With a draft model (each draft costs
    a draft step): 4 on GPUs (an H200 with queued rounds, 8B/1B shapes: K = 4 to 6 about equal,
    7 slower: benchmarks/results/speculative_draft_queued-*), 3 on the CPU. Prompt lookup's drafts
    cost nothing: 10 on GPUs, where checking 2 to 11 positions costs about the same (the step is
    bound by host time per graph node), 3 on the CPU, where a check of L positions costs nearly L
    one-token steps."""
    if mx.default_device() != mx.gpu:
        return 3
    return 10 if lookup else 4
