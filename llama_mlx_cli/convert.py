"""`llama-mlx convert`: any Llama 3 checkpoint to an MLX folder, optionally quantized, with progress."""

from __future__ import annotations

import contextlib
import signal
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .common import error_line, err_console, format_bytes, format_count, handle_errors, out_console, usage_error

EPILOG = """\
[bold]Examples[/bold]

  llama-mlx convert ~/Downloads/Llama3.2-1B-Instruct            # Meta folder -> weights/Llama3.2-1B-Instruct

  llama-mlx convert Meta-Llama-3.1-8B-Instruct weights/llama-8b-4bit -q

  llama-mlx convert model.gguf weights/smol --dtype float32 --force

  llama-mlx convert hf-folder out -q --bits 4 --group-size 64 --recipe mixed

  llama-mlx convert --hf-path hf-folder --mlx-path out -q --q-bits 4 --q-group-size 64   # mlx-lm's names

  llama-mlx convert weights/smol-4bit weights/smol-f16 -d --dtype float16                # dequantize

  llama-mlx convert weights/llama-1b-4bit weights/llama-1b-tuned --adapter-path adapters   # mlx_lm.fuse
"""

QUANT = "Quantization"


def _dtype(value: Optional[str]) -> Optional[str]:
    if value is not None and value not in ("float16", "bfloat16", "float32"):
        raise typer.BadParameter(f"{value!r} is not one of float16, bfloat16, float32")
    return value


def _recipe(value: Optional[str]) -> Optional[str]:
    if value is not None and value not in ("uniform", "mixed"):
        raise typer.BadParameter(f"{value!r} is not one of uniform, mixed")
    return value


def _default_output(src: Path, quantize: bool, bits: int) -> Path:
    from llama_mlx.loading import weights_dir

    from llama_mlx.hub import parse_hub_id

    spec = None if src.exists() else parse_hub_id(str(src))
    if spec is not None:  # org/name[:QUANT] -> name[-QUANT]
        name = spec.repo_id.split("/", 1)[1] + (f"-{Path(spec.pick).stem}" if spec.pick else "")
    else:
        name = src.stem if src.is_file() else src.resolve().name
    return weights_dir() / (f"{name}-{bits}bit" if quantize else name)


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM raises KeyboardInterrupt, so the library deletes its temporary folder before exiting."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@handle_errors
def convert(
    src: Annotated[Optional[Path], typer.Argument(
        show_default=False, help="A Meta folder (params.json + consolidated.NN.pth), a Hugging Face or MLX folder, "
                            "a .gguf file, or a Hugging Face id (org/name, org/name:Q4_K_M); or --hf-path.")] = None,
    dst: Annotated[Optional[Path], typer.Argument(
        show_default=False, help="The MLX folder to write (or --mlx-path). "
                                 "Default: weights/<name of SRC>[-<bits>bit].")] = None,
    hf_path: Annotated[Optional[Path], typer.Option(
        "--hf-path", metavar="SRC", show_default=False, help="SRC, as mlx-lm names it.")] = None,
    mlx_path: Annotated[Optional[Path], typer.Option(
        "--mlx-path", metavar="DST", show_default=False, help="DST, as mlx-lm names it.")] = None,
    quantize: Annotated[bool, typer.Option(
        "--quantize", "-q", help="Quantize linear layers and embeddings (affine).", rich_help_panel=QUANT)] = False,
    bits: Annotated[int, typer.Option(
        "--bits", "--q-bits", help="Bits per weight when quantizing: 4 or 8 (MLX also takes 2, 3, 5, 6).",
        rich_help_panel=QUANT)] = 4,
    group_size: Annotated[int, typer.Option(
        "--group-size", "--q-group-size", help="Weights sharing one scale and bias: 32, 64 or 128.",
        rich_help_panel=QUANT)] = 64,
    dequantize: Annotated[bool, typer.Option(
        "--dequantize", "-d", help="Write a quantized checkpoint's weights as floats.", rich_help_panel=QUANT)] = False,
    requantize: Annotated[bool, typer.Option(
        "--requantize", help="Allow -q on an already quantized checkpoint (dequantized, then quantized again).",
        rich_help_panel=QUANT)] = False,
    quantize_vision: Annotated[bool, typer.Option(
        "--quantize-vision", help="Llama 3.2 Vision: quantize the vision tower too (else it stays float).",
        rich_help_panel=QUANT)] = False,
    recipe: Annotated[Optional[str], typer.Option(
        "--recipe", metavar="uniform|mixed", callback=_recipe, rich_help_panel=QUANT,
        help="mixed: keep embeddings and output head at 8 bits (implies --quantize).")] = None,
    dtype: Annotated[Optional[str], typer.Option(
        "--dtype", metavar="float16|bfloat16|float32", callback=_dtype,
        help="Float type of the written weights (and of quantization scales). Default: the checkpoint's.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace DST if it exists.")] = False,
    adapter_path: Annotated[Optional[Path], typer.Option(
        "--adapter-path", metavar="PATH", show_default=False,
        help="Fuse an mlx-lm LoRA/DoRA adapter folder (as `mlx_lm.lora` writes it) into the weights, as "
             "`mlx_lm.fuse` does: quantized weights are quantized again with their own bits and group size "
             "(floats with --dequantize).")] = None,
    rope_factor: Annotated[Optional[float], typer.Option(
        "--rope-factor", min=1.0, help="Llama 3 RoPE scaling factor. Default: read from the checkpoint; for Meta "
                                       "checkpoints 32 for the Llama 3.2 1B/3B shapes, else 8.")] = None,
) -> None:
    """Convert a Llama 3 checkpoint to an MLX folder that llama-mlx and mlx-lm load."""
    from llama_mlx.convert import convert as run_convert

    src, dst = _either("SRC", "--hf-path", src, hf_path), _either("DST", "--mlx-path", dst, mlx_path)
    if src is None:
        raise usage_error("missing SRC (or --hf-path): the checkpoint to convert")
    quantize = quantize or recipe is not None
    if quantize and dequantize:
        raise usage_error("--dequantize and --quantize/--recipe cannot be combined")
    out = dst if dst is not None else _default_output(src, quantize, bits)
    console = err_console()
    bar = Progress(
        TextColumn("[bold]Converting[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}", style="dim"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
    task = None

    def progress(p) -> None:
        nonlocal task
        if task is None:
            task = bar.add_task("", total=p.total)
        bar.update(task, completed=p.done, description=p.tensor)

    start = time.perf_counter()
    try:
        with _sigterm_interrupts(), bar:
            result = run_convert(src, out, quantize=quantize, bits=bits, group_size=group_size, dtype=dtype,
                                 recipe=recipe, force=force, rope_factor=rope_factor, progress=progress,
                                 dequantize=dequantize, requantize=requantize, quantize_vision=quantize_vision,
                                 adapter_path=adapter_path)
    except KeyboardInterrupt:
        error_line(f"{out}: interrupted; nothing was written there")
        raise typer.Exit(130)
    _summary(result, src, time.perf_counter() - start, adapter_path)


def _conversion_rows(errors: dict) -> list[tuple[str, str]]:
    """One row per GGUF source type and what it was written as, with the error measured against the
    source's values (groups held exactly are counted for tensors carried over, not re-quantized)."""
    rows = []
    for (kind, target), e in sorted(errors.items()):
        if e.max_abs == 0 and e.exact_groups == e.groups:
            how = "exact"
        else:
            how = f"max error {e.max_abs:.2g}, relative RMS {e.rel_rms:.2g}"
            if e.groups:
                how += f", {e.exact_groups}/{e.groups} groups exact"
        rows.append((f"From {kind}", f"{target}: {how}"))
    return rows


def _either(name: str, option: str, positional: Optional[Path], named: Optional[Path]) -> Optional[Path]:
    if positional is not None and named is not None:
        raise usage_error(f"give {name} or {option}, not both")
    return positional if named is None else named


def _summary(result, src: Path, seconds: float, adapter: Optional[Path] = None) -> None:
    q = result.quantization
    if q:
        overrides = {k: v for k, v in q.items() if isinstance(v, dict)}
        quant = f"{q.get('bits')}-bit, group size {q.get('group_size')}"
        if overrides:
            quant += f" ({len(overrides)} module{'s' if len(overrides) > 1 else ''} at other widths)"
    else:
        quant = "none"
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in (
        ("Source", f"{src} ({result.source_format})"),
        *([("Adapter", f"{adapter} (fused in)")] if adapter is not None else []),
        ("Output", str(result.path)),
        ("Parameters", format_count(result.parameters)),
        ("Quantization", quant),
        ("Float dtype", result.dtype),
        ("Bits per weight", f"{result.bits_per_weight:.2f}"),
        ("Size on disk", format_bytes(result.size_bytes)),
        ("Tensors", str(result.tensors)),
        ("Time", f"{seconds:.1f} s"),
        *_conversion_rows(result.conversion_errors),
    ):
        table.add_row(key, value)
    out_console().print(table)
