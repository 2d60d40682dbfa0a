"""Past one machine: tensor- and pipeline-parallel inference on MLX's distributed engine.

Run under `mlx.launch` (ring, JACCL, MPI or NCCL backends): every rank runs the same program,
`mx.distributed.init()` finds the group, and `load_sharded` gives each rank its shard:

- tensor parallel (`pipeline=False`): q/k/v and gate/up split by output rows (`AllToShardedLinear`),
  o and down by input columns with an all-sum (`ShardedToAllLinear`), quantized layers alike;
  each rank attends over its own heads and KV heads.
- pipeline parallel (`pipeline=True`): contiguous layer ranges per rank, activations passed on
  with send/recv, the last stage's hidden state shared with every rank.
- automatic (`pipeline=None`, the default): tensor parallel where the heads, KV heads and sizes
  divide by the ranks, else pipeline parallel; the plan's `fallback` says why it fell back.

In both, the vocabulary is split by rows: the embedding lookup is summed over ranks and the head's
logits gathered, so every rank holds the same logits and samples the same token. The sharded
model is called exactly like the plain one; caches hold each rank's own heads or layers.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear

from .checkpoints.base import module_quantization
from .errors import ShardError
from .model import LlamaModel

__all__ = [
    "PipelineLlamaModel",
    "ShardPlan",
    "VocabParallelEmbedding",
    "VocabParallelHead",
    "broadcast_ids",
    "group",
    "load_sharded",
    "plan",
    "quiet_other_ranks",
    "shard_model",
    "sync_random",
]


def group(backend: str = "any") -> mx.distributed.Group:
    """The global group (`mx.distributed.init`): size 1 when not launched by `mlx.launch` or MPI."""
    try:
        return mx.distributed.init(strict=False, backend=backend)
    except RuntimeError as e:  # e.g. a malformed or unreachable hostfile
        raise ShardError(f"cannot join the distributed group ({backend} backend): {e}") from None


@dataclass(frozen=True)
class ShardPlan:
    """What one rank holds: `layers` (global indices), vocabulary rows `vocab`, heads per rank."""

    size: int
    rank: int
    pipeline: bool
    layers: range
    vocab: tuple[int, int]
    vocab_shard: int  # rows per rank (the last may hold fewer)
    n_heads: int
    n_kv_heads: int
    fallback: Optional[str] = None  # automatic mode only: why tensor parallel did not fit (pipeline chosen)

    @property
    def mode(self) -> str:
        """"pipeline" or "tensor"."""
        return "pipeline" if self.pipeline else "tensor"


def plan(config: dict, size: int, rank: int = 0, *, pipeline: Optional[bool] = None,
         source: str = "model") -> ShardPlan:
    """The shard plan of an HF-style config over `size` ranks; ShardError (one line) if it does not divide.

    pipeline: True splits the layers, False the heads; None (automatic) the heads where they divide,
    else the layers, with the reason in the plan's `fallback`.
    """
    n_layers, vocab = config["num_hidden_layers"], config["vocab_size"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    fallback = None
    if pipeline is None:
        fallback = _tensor_parallel_problem(config, size)
        if fallback and size > n_layers:
            raise ShardError(f"{source}: the model does not split over {size} ranks: not by heads ({fallback}; "
                             f"that works with {_or_list(_tensor_parallel_fits(config))} ranks), nor by layers "
                             f"(it has {n_layers}; pipeline parallel works over up to {n_layers} ranks)")
        pipeline = fallback is not None
    if pipeline:
        if size > n_layers:
            raise ShardError(f"{source}: pipeline parallel over {size} ranks needs at least {size} layers; "
                             f"the model has {n_layers} (use at most {n_layers} ranks)")
        start, stop = n_layers * rank // size, n_layers * (rank + 1) // size
        layers, n_heads, n_kv_heads = range(start, stop), heads, kv
    else:
        why = _tensor_parallel_problem(config, size)
        if why:
            pipe = (f"; pipeline parallel (--pipeline, or leave out --tensor-parallel; pipeline=True or None) "
                    f"works over up to {n_layers} ranks")
            raise ShardError(f"{source}: tensor parallel over {size} ranks does not divide: {why}; "
                             f"it works with {_or_list(_tensor_parallel_fits(config))} ranks{pipe}")
        layers, n_heads, n_kv_heads = range(n_layers), heads // size, kv // size
    shard = -(-vocab // size)
    lo = min(rank * shard, vocab)
    return ShardPlan(size, rank, pipeline, layers, (lo, min(lo + shard, vocab)), shard, n_heads, n_kv_heads,
                     fallback)


def _tensor_parallel_fits(config: dict) -> list[int]:
    heads = config["num_attention_heads"]
    return [n for n in range(1, min(heads, 64) + 1) if not _tensor_parallel_problem(config, n)]


def _tensor_parallel_problem(config: dict, n: int) -> Optional[str]:
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    ff, hd = config["intermediate_size"], config.get("head_dim") or config["hidden_size"] // heads
    if heads % n or kv % n:
        return f"{heads} attention heads and {kv} KV heads must both divide by {n}"
    if ff % n:
        return f"intermediate size {ff} must divide by {n}"
    quant = config.get("quantization")
    for i in range(config["num_hidden_layers"]):
        for module, inputs in ((f"model.layers.{i}.self_attn.o_proj", heads * hd), (f"model.layers.{i}.mlp.down_proj", ff)):
            q = module_quantization(quant, module)
            if q and (inputs // n) % q["group_size"]:
                return (f"{module} ({inputs} inputs, quantized in groups of {q['group_size']}) "
                        f"does not split into whole groups over {n} ranks")
    return None


def _or_list(ns: Sequence[int]) -> str:
    ns = [str(n) for n in ns]
    return ns[0] if len(ns) == 1 else ", ".join(ns[:-1]) + " or " + ns[-1]


def _rows(module: nn.Module, start: int, stop: int) -> nn.Module:
    """`module` (a linear or embedding, float or quantized) keeping rows start..stop, copied so the
    full tensor is freed once read."""
    module.update({k: mx.contiguous(v[start:stop]) for k, v in module.parameters().items()})
    return module


def _gather_vocab(logits: mx.array, shard: int, vocab: int, g: mx.distributed.Group) -> mx.array:
    """Every rank's logits shard [..., n] -> the full logits [..., vocab], identical on every rank."""
    *lead, n = logits.shape
    if n < shard:  # the last shard of a vocabulary that does not divide: pad, gather, cut
        logits = mx.pad(logits, [(0, 0)] * len(lead) + [(0, shard - n)], constant_values=-math.inf)
    parts = mx.distributed.all_gather(logits[None], group=g)  # [N, ..., shard]
    return mx.moveaxis(parts, 0, -2).reshape(*lead, -1)[..., :vocab]


class VocabParallelEmbedding(nn.Module):
    """An embedding holding vocabulary rows start..stop: lookups summed over the group, and (tied
    heads) `as_linear` logits gathered from every rank."""

    def __init__(self, embedding: nn.Module, start: int, stop: int, shard: int, vocab: int, g):
        super().__init__()
        self.shard = _rows(embedding, start, stop)
        self.start, self.stop, self.shard_rows, self.vocab, self.group = start, stop, shard, vocab, g

    def __call__(self, tokens: mx.array) -> mx.array:
        local = tokens - self.start
        inside = (local >= 0) & (local < self.stop - self.start)
        h = self.shard(mx.where(inside, local, 0))
        # Exactly one rank holds each token's row; the others add zeros, so the sum is exact.
        h = mx.where(inside[..., None], h, mx.zeros((), h.dtype))
        return mx.distributed.all_sum(h, group=self.group)

    def as_linear(self, x: mx.array) -> mx.array:
        return _gather_vocab(self.shard.as_linear(x), self.shard_rows, self.vocab, self.group)


class VocabParallelHead(nn.Module):
    """An untied output head holding vocabulary rows start..stop; logits gathered from every rank."""

    def __init__(self, head: nn.Module, start: int, stop: int, shard: int, vocab: int, g):
        super().__init__()
        self.shard = _rows(head, start, stop)
        self.shard_rows, self.vocab, self.group = shard, vocab, g

    def __call__(self, x: mx.array) -> mx.array:
        return _gather_vocab(self.shard(x), self.shard_rows, self.vocab, self.group)


class PipelineLlamaModel(LlamaModel):
    """LlamaModel holding a contiguous range of layers: it receives the previous stage's hidden
    state, runs its layers, sends to the next stage, and every rank gets the last stage's output."""

    def __call__(self, tokens: mx.array, cache: Optional[list] = None, mask=None) -> mx.array:
        rank, size, g = self.stage_rank, self.stage_size, self.group
        x = self.embed_tokens(tokens)  # every rank takes part in the lookup's sum
        if self.compute_dtype is not None:
            x = x.astype(self.compute_dtype)
        if cache is None:
            cache = [None] * len(self.layers)
        if mask is None:
            L = x.shape[1]
            mask = cache[0].make_mask(L) if cache[0] is not None else ("causal" if L > 1 else None)
        # recv_like takes only x's shape: the dependency keeps the lookup's sum in every rank's graph.
        h = x if rank == 0 else mx.depends(mx.distributed.recv_like(x, rank - 1, group=g), x)
        for layer, layer_cache in zip(self.layers, cache):
            h = layer(h, mask, layer_cache)
        if rank < size - 1:
            h = mx.distributed.send(h, rank + 1, group=g)
        B = h.shape[0]
        h = mx.distributed.all_gather(h, group=g)[(size - 1) * B:]
        if tokens.shape[1] > 1:
            # Prefill evaluates only each rank's own cache, which would leave a send or a sum
            # unevaluated on some ranks (a deadlock): run the whole stage now.
            mx.eval(h)
        return self.norm(h)


def shard_model(model: nn.Module, g: mx.distributed.Group, *, pipeline: Optional[bool] = None,
                source: str = "model") -> nn.Module:
    """Shard a built (lazily loaded) `llama_mlx.model.Model` in place over group `g`; returns it,
    its `ShardPlan` (the mode chosen, and why when automatic) as `model.shard_plan`.
    pipeline: True by layers, False by heads, None automatic (see `plan`).

    Nothing is read here: each rank's slices of the lazy weights are read when evaluated, and the
    layers another rank owns are dropped unread.
    """
    args = model.args
    p = plan(dataclasses.asdict(args), g.size(), g.rank(), pipeline=pipeline, source=source)
    if g.size() == 1:
        return model
    inner = model.model
    start, stop = p.vocab
    inner.embed_tokens = VocabParallelEmbedding(inner.embed_tokens, start, stop, p.vocab_shard, args.vocab_size, g)
    if not args.tie_word_embeddings:
        model.lm_head = VocabParallelHead(model.lm_head, start, stop, p.vocab_shard, args.vocab_size, g)
    if p.pipeline:
        inner.layers = inner.layers[p.layers.start : p.layers.stop]
        inner.stage_rank, inner.stage_size, inner.group = p.rank, p.size, g
        inner.__class__ = PipelineLlamaModel
    else:
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for name in ("q_proj", "k_proj", "v_proj"):
                setattr(attn, name, shard_linear(getattr(attn, name), "all-to-sharded", group=g))
            attn.o_proj = shard_linear(attn.o_proj, "sharded-to-all", group=g)
            attn.n_heads, attn.n_kv_heads = p.n_heads, p.n_kv_heads
            mlp.gate_proj = shard_linear(mlp.gate_proj, "all-to-sharded", group=g)
            mlp.up_proj = shard_linear(mlp.up_proj, "all-to-sharded", group=g)
            mlp.down_proj = shard_linear(mlp.down_proj, "sharded-to-all", group=g)
    model.shard_plan = p
    return model


def load_sharded(path: str | Path | None = None, g: Optional[mx.distributed.Group] = None, *,
                 pipeline: Optional[bool] = None, dtype: Optional[str] = None, rope_factor: Optional[float] = None,
                 allow_vocab_mismatch: bool = False):
    """This rank's shard of a model, and the tokenizer: `(model, tokenizer)`, called like `load`'s.

    path: as for `llama_mlx.load` (any checkpoint layout). g: the group (default: `group()`).
    pipeline: True splits the layers across ranks, False the heads; None (the default) the heads
    where they divide by the ranks, else the layers (`model.shard_plan.fallback` says why). A plan
    that does not divide raises ShardError on every rank together. Each rank reads its own slices only,
    largest tensors first, so its memory is about 1/N of the model plus one full tensor while
    loading (safetensors are read tensor by tensor; a GGUF file is read whole, then sliced).
    The global random state is made the same on every rank (`sync_random`).
    """
    from . import backends
    from .checkpoints import LazyWeights, read_checkpoint
    from .checkpoints.base import parse_dtype
    from .checkpoints.plan import main_dtype
    from .build import build_model, check_vocabulary
    from .resolve import resolve_model
    from .tokenizer import load_tokenizer

    g = g if g is not None else group()
    ckpt = read_checkpoint(resolve_model(path), rope_factor=rope_factor)
    source = str(ckpt.path)
    try:
        p = plan(ckpt.config, g.size(), g.rank(), pipeline=pipeline, source=source)  # refuse before reading
    except ShardError:
        # Every rank refuses alike: meet first, as mlx.launch stops the others once one exits,
        # which could cut rank 0 off before it reports.
        mx.eval(mx.distributed.all_sum(mx.zeros(1), group=g))
        raise
    weights = LazyWeights(ckpt.tensors, parse_dtype(dtype) or main_dtype(ckpt))
    tokenizer = load_tokenizer(ckpt.tokenizer_source or ckpt.path)
    if not allow_vocab_mismatch:
        check_vocabulary(tokenizer, ckpt.config["vocab_size"], ckpt.path)
    model = shard_model(build_model(ckpt.config, weights, source=ckpt.path), g, pipeline=p.pipeline, source=source)
    if g.size() > 1:
        model.shard_plan = p  # with the automatic choice's reason
    del weights, ckpt
    # Fused q/k/v would undo the split; the backend seam fits the rest (compute dtype, CPU threads).
    backends.prepare(model, fuse=False)
    _materialize(model)
    sync_random(g)
    return model, tokenizer


def _materialize(model: nn.Module) -> None:
    # Largest first: each full tensor is read while little else is resident, and freed once sliced.
    heads = [model.model.embed_tokens] + ([model.lm_head] if "lm_head" in model else [])
    for module in heads + [model.model.norm] + list(model.layers):
        for _, a in sorted(_flat(module.parameters()), key=lambda kv: -kv[1].nbytes):
            mx.eval(a)
        mx.clear_cache()


def _flat(tree) -> list:
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


def sync_random(g: Optional[mx.distributed.Group] = None) -> None:
    """Seed MLX's global random state on every rank from rank 0's, so unseeded sampling agrees."""
    g = g if g is not None else group()
    if g.size() == 1:
        return
    seed = mx.random.randint(0, 2**31 - 1, (1,)) if g.rank() == 0 else mx.zeros((1,), mx.int32)
    mx.random.seed(int(mx.distributed.all_sum(seed.astype(mx.int32), group=g).item()))


def broadcast_ids(ids: Optional[Sequence[int]], g: Optional[mx.distributed.Group] = None) -> list[int]:
    """Rank 0's token ids on every rank (the others pass None): for prompts only rank 0 reads
    (chat input, HTTP requests)."""
    g = g if g is not None else group()
    if g.size() == 1:
        return list(ids or [])
    mine = g.rank() == 0
    n = int(mx.distributed.all_sum(mx.array([len(ids) if mine else 0], mx.int32), group=g).item())
    data = mx.array(list(ids), mx.int32) if mine else mx.zeros((n,), mx.int32)
    return mx.distributed.all_sum(data, group=g).tolist() if n else []


def quiet_other_ranks(g: Optional[mx.distributed.Group] = None) -> bool:
    """On ranks other than 0 of a group, send stdout and stderr (Python's and the C level's) to
    the null device, so output appears once. Returns whether this rank was quieted."""
    g = g if g is not None else group()
    if g.size() == 1 or g.rank() == 0:
        return False
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    os.close(null)
    sys.stdout = open(os.devnull, "w")
    sys.stderr = open(os.devnull, "w")
    return True
