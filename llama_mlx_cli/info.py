"""`llama-mlx info`: what a model is and what it will cost in memory, read from headers only."""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Annotated, Optional

import typer
from rich.table import Table

from .common import (
    DtypeOpt,
    GgufFileOpt,
    JsonOpt,
    KVBitsOpt,
    KVGroupSizeOpt,
    ModelOpt,
    err_console,
    fetch_default_model,
    format_bytes,
    format_count,
    handle_errors,
    model_label,
    out_console,
    resolve_dtype,
    with_gguf_file,
)

EPILOG = """\
[bold]Examples[/bold]

  llama-mlx info

  llama-mlx info -M weights/Llama-3.2-1B-Instruct --context 32768

  llama-mlx info -M model.gguf --context 4096 --kv-bits 8 --json
"""

FORMATS = {"meta": "Meta (consolidated .pth)", "hf": "Hugging Face (safetensors)", "mlx": "MLX (safetensors)",
           "gguf": "GGUF"}


def _quant_text(q: Optional[dict], dtype: str) -> str:
    if not q:
        return f"none ({dtype})"
    text = f"{q.get('bits', 4)}-bit affine, group size {q.get('group_size', 64)}"
    overrides = {k: v for k, v in q.items() if isinstance(v, dict)}
    if overrides:
        parts = sorted({f"{v.get('bits', q.get('bits'))}-bit" for v in overrides.values()})
        names = [k.rpartition(".")[2] for k in overrides]
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        text += f"; {shown} at {'/'.join(parts)}"
    skipped = [k for k, v in q.items() if v is False]
    if skipped:
        text += f"; {len(skipped)} modules unquantized"
    return text


def render(d: dict, name: str) -> None:
    console = out_console()
    mem = d["memory"]
    rope = f"theta {d['rope_theta']:g}" if d["rope_theta"] is not None else "default"
    if d["rope_scaling"]:
        scaling = d["rope_scaling"]
        rope += f", {scaling.get('rope_type', scaling.get('type', 'scaled'))} scaling ×{scaling.get('factor', '?')}"
    kv = f"{mem['kv_bits']}-bit" if mem["kv_bits"] else mem["kv_dtype"]
    table = Table(show_header=False, box=None, padding=(0, 2), title=name, title_justify="left",
                  title_style="bold")
    table.add_column(style="cyan", no_wrap=True)
    table.add_column()
    rows = [
        ("path", d["path"]),
        ("format", FORMATS.get(d["format"], d["format"])),
        ("architecture", f"{d['architecture']}: {d['layers']} layers, hidden size {d['hidden_size']}, "
                         f"MLP {d['intermediate_size']}, {d['attention_heads']} attention heads / "
                         f"{d['kv_heads']} KV heads × {d['head_dim']}"),
        ("vocabulary", f"{d['vocab_size']:,} tokens" + (", embeddings tied" if d["tie_word_embeddings"] else "")),
        ("RoPE", rope),
        ("parameters", f"{format_count(d['parameters'])} ({d['parameters']:,})"),
        ("quantization", _quant_text(d["quantization"], d["dtype"]) + f" · {d['bits_per_weight']:.2f} bits/weight"),
        ("context length", f"{d['context_length']:,} tokens"),
        ("size on disk", f"{format_bytes(d['size_on_disk'])} ({d['size_on_disk']:,} bytes)"),
        ("memory", f"weights {format_bytes(mem['weights'])} ({mem['dtype']}) + KV cache "
                   f"{format_bytes(mem['kv_cache'])} for {mem['kv_cache_tokens']:,} tokens ({kv}) "
                   + (f"+ image cache {format_bytes(mem['image_cache'])} for {mem['images']} image "
                      if "image_cache" in mem else "") + f"= {format_bytes(mem['total'])}"),
    ]
    fit = mem.get("fit")
    if fit is not None:
        rows.append(("fits", fit["text"]))
    elif "fit" in mem:
        rows.append(("fits", "the weights leave no room for a KV cache in the memory budget"))
    if "vision" in d:
        v = d["vision"]
        rows.insert(3, ("vision", f"{v['layers']} + {v['global_layers']} global layers, hidden size "
                                  f"{v['hidden_size']}, up to {v['max_tiles']} tiles of {v['tile_size']} px; "
                                  f"cross-attention at layers {', '.join(map(str, v['cross_attention_layers']))}"))
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    console.print("memory is an estimate: weights plus KV cache, without activations and runtime overhead",
                  style="dim")


def info(
    model: ModelOpt = None,
    gguf_file: GgufFileOpt = None,
    context: Annotated[Optional[int], typer.Option(
        "--context", "-c", min=1, metavar="N",
        help="Estimate the KV cache for N tokens (default: the model's context length).")] = None,
    kv_bits: KVBitsOpt = None,
    kv_group_size: KVGroupSizeOpt = 64,
    dtype: DtypeOpt = "auto",
    memory_budget: Annotated[Optional[int], typer.Option(
        "--memory-budget", min=1, metavar="BYTES", show_default=False,
        help="Memory the \"fits\" line sizes the context to (default: the device's).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Show a model's architecture, size, quantization, context length and memory needs."""
    model = with_gguf_file(model, gguf_file)
    _run(model, context, kv_bits, kv_group_size, dtype, json_out, memory_budget)


@handle_errors
def _run(model, context, kv_bits, kv_group_size, dtype, json_out, memory_budget=None) -> None:
    from llama_mlx.info import model_info

    fetch_default_model(model)
    console = err_console()
    status = console.status(f"Resolving {model_label(model)}…") if model is None and console.is_terminal \
        else contextlib.nullcontext()
    with status:
        d = model_info(model, context=context, dtype=resolve_dtype(dtype), kv_bits=kv_bits,
                       kv_group_size=kv_group_size, memory_budget=memory_budget)
    if json_out:
        sys.stdout.write(json.dumps({"name": model_label(model), **d}) + "\n")
    else:
        render(d, model_label(model))
