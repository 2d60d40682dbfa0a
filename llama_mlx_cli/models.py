"""`llama-mlx pull` / `list` / `rm`: the models on this machine (weights folder and Hugging Face cache)."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer
from rich.table import Table

from .common import GgufFileOpt, err_console, format_bytes, handle_errors, note_line, out_console

PULL_EPILOG = """\
[bold]Examples[/bold]

  llama-mlx pull mlx-community/Llama-3.2-1B-Instruct-4bit         # ready to chat: MLX weights

  llama-mlx pull bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M       # one .gguf file of a GGUF repo

  llama-mlx pull meta-llama/Llama-3.2-1B-Instruct --convert -q     # gated: accept the licence, set HF_TOKEN
"""
LIST_EPILOG = """\
[bold]Examples[/bold]

  llama-mlx list

  llama-mlx list --json
"""
RM_EPILOG = """\
[bold]Examples[/bold]

  llama-mlx rm Llama-3.2-1B-Instruct-4bit                    # a folder in weights/

  llama-mlx rm mlx-community/Llama-3.2-1B-Instruct-4bit --yes  # a repo of the Hugging Face cache
"""

QUANT = "Conversion"
PLACES = {"weights": "weights", "hf-cache": "HF cache"}


@handle_errors
def pull(
    model_id: Annotated[str, typer.Argument(
        metavar="ID", show_default=False,
        help="A Hugging Face model id: org/name, or org/name:QUANT (e.g. :Q4_K_M) for a GGUF repo.")],
    gguf_file: GgufFileOpt = None,
    convert: Annotated[bool, typer.Option(
        "--convert", help="Also convert it into an MLX folder in weights/.", rich_help_panel=QUANT)] = False,
    quantize: Annotated[bool, typer.Option(
        "--quantize", "-q", help="Quantize while converting (implies --convert).", rich_help_panel=QUANT)] = False,
    q_bits: Annotated[int, typer.Option(
        "--q-bits", help="Bits per weight when quantizing (2, 3, 4, 5, 6, 8).", rich_help_panel=QUANT)] = 4,
    q_group_size: Annotated[int, typer.Option(
        "--q-group-size", help="Weights sharing one scale: 32, 64 or 128.", rich_help_panel=QUANT)] = 64,
    output: Annotated[Optional[str], typer.Option(
        "--output", "-o", metavar="DIR", help="Where to convert to. Default: weights/<name>[-<bits>bit].",
        rich_help_panel=QUANT)] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Replace the converted folder if it exists.", rich_help_panel=QUANT)] = False,
) -> None:
    """Download a model from the Hugging Face hub into its cache (shared with mlx-lm); optionally convert it."""
    from llama_mlx.store import pull as run_pull

    console = err_console()
    if console.is_terminal:
        note_line(f"Fetching {model_id}{':' + gguf_file if gguf_file else ''} from the Hugging Face hub…")
    result = run_pull(model_id, gguf_file=gguf_file, convert=convert or quantize, quantize=quantize, bits=q_bits,
                      group_size=q_group_size, output=output, force=force)
    out = out_console()
    out.print(f"{result.model}: {len(result.files)} file{'s' if len(result.files) != 1 else ''}, "
              f"{format_bytes(result.size_bytes)}, in {result.path}", markup=False)
    if result.converted is not None:
        c = result.converted
        q = c.quantization
        quant = f", {q.get('bits')}-bit group {q.get('group_size')}" if q else ""
        out.print(f"converted to {c.path} ({format_bytes(c.size_bytes)}{quant})", markup=False)
        out.print(f"use it: llama-mlx chat --model {c.path.name}", markup=False)
    else:
        out.print(f"use it: llama-mlx chat --model {result.model}", markup=False)


@handle_errors
def list_models(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON array of the models.")] = False,
) -> None:
    """List the models in the weights folder and in the Hugging Face cache, with their sizes on disk."""
    from llama_mlx.hub import cache_dir
    from llama_mlx.loading import weights_dir
    from llama_mlx.store import list_models as run_list

    entries = run_list()
    if as_json:
        typer.echo(json.dumps([e.to_dict() for e in entries], indent=2))
        return
    if not entries:
        note_line(f"no models in {weights_dir()} or in the Hugging Face cache ({cache_dir()})")
        return
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column, justify in (("NAME", "left"), ("WHERE", "left"), ("LAYOUT", "left"), ("QUANTIZATION", "left"),
                            ("SIZE", "right")):
        table.add_column(column, justify=justify, no_wrap=column != "QUANTIZATION")
    for e in entries:
        table.add_row(e.name, PLACES.get(e.place, e.place), e.layout, e.quantization or "-", format_bytes(e.size_bytes))
    out_console().print(table)
    total = sum(e.size_bytes for e in entries)
    note_line(f"{len(entries)} model{'s' if len(entries) != 1 else ''}, {format_bytes(total)}; "
              f"weights: {weights_dir()}, HF cache: {cache_dir()}")


@handle_errors
def rm(
    name: Annotated[str, typer.Argument(
        metavar="NAME", show_default=False,
        help="A model in weights/ (its name) or a repo of the Hugging Face cache (its id), as `list` shows.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Delete without asking.")] = False,
) -> None:
    """Delete a model from the weights folder or the Hugging Face cache (nothing anywhere else)."""
    from llama_mlx.store import find_model, remove_model

    entry = find_model(name)
    where = PLACES.get(entry.place, entry.place)
    if not yes:
        if not sys.stdin.isatty():
            raise ValueError(f"{entry.name}: not deleting without --yes when not on a terminal ({entry.path})")
        if not typer.confirm(f"Delete {entry.name} ({where}, {format_bytes(entry.size_bytes)}) at {entry.path}?",
                             default=False, err=True):
            note_line("kept")
            raise typer.Exit(1)
    removed = remove_model(name)
    out_console().print(f"removed {removed.name} ({where}, {format_bytes(removed.size_bytes)} freed)", markup=False)
