"""Convert any supported checkpoint into an MLX folder, optionally quantized, written atomically.

The folder is written to a hidden temporary folder beside the target and swapped in at the end,
so an interrupted conversion never leaves a half-written model where a complete one is expected.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx

from .checkpoints import Checkpoint, read_checkpoint
from .checkpoints.base import dtype_name, parse_dtype
from .checkpoints.gguf_lazy import conversion_summary, track_conversion_error
from .checkpoints.plan import check_options, main_dtype, plan
from .checkpoints.writer import (
    Progress,
    SourceReadError,
    fsync_dir,
    generation_config_for,
    write_json,
    write_tokenizer,
    write_weights,
)
from .errors import CheckpointError, ConfigError, OutputExistsError, UnsafeOutputError
# Under its old name: a test replaces `_exchange` here to take the two-rename fallback.
from .fileio import check_replaceable, exchange_paths as _exchange
from .hub import is_hub_id, resolve as resolve_hub_id
from .lora import read_adapter, weight_updater
from .tokenizer import load_tokenizer

__all__ = ["ConvertResult", "MARKER_KEY", "Progress", "check_replaceable_model", "convert"]


@dataclass
class ConvertResult:
    """What a conversion produced."""

    path: Path
    source_format: str
    parameters: int  # logical (unquantized) parameter count
    bits_per_weight: float
    size_bytes: int  # everything in the output folder
    seconds: float
    tensors: int
    dtype: str
    quantization: dict | None
    # GGUF sources: per (source type, what it was written as), the error measured against the
    # source's values (gguf_quants.ConversionError)
    conversion_errors: dict = field(default_factory=dict)


def convert(src: str | Path, dst: str | Path, *, quantize: bool = False, bits: int = 4, group_size: int = 64,
            dtype: str | None = None, recipe: str | None = None, force: bool = False,
            rope_factor: float | None = None,
            progress: Callable[[Progress], None] | None = None, source_label: str | None = None,
            dequantize: bool = False, requantize: bool = False, quantize_vision: bool = False,
            adapter_path: str | Path | None = None) -> ConvertResult:
    """Convert the checkpoint at `src` (Meta, Hugging Face, GGUF or MLX) into an MLX folder at `dst`.

    quantize/bits/group_size: affine quantization of the linear layers and embeddings (a recipe
    implies quantize; "mixed" keeps embeddings and output head at 8 bits). dtype: float16,
    bfloat16 or float32 for the float tensors (default: the checkpoint's). force: replace an
    existing `dst`. rope_factor: override the Llama 3 RoPE scaling factor. progress: called
    after each module's tensors are written. source_label: what config.json records as the source
    (default: its resolved path). dequantize: write a quantized checkpoint's weights as floats.
    A quantized source is never quantized again unless `requantize` (ConfigError otherwise).
    Llama 3.2 Vision folders (`vision.convert`): quantize applies to the language model, and to the
    vision tower too with `quantize_vision` (else it stays float).
    adapter_path: an mlx-lm LoRA/DoRA adapter folder fused into the weights (`mlx_lm.fuse`): a weight kept
    quantized is dequantized, updated and quantized again with its own bits and group size.
    Raises LlamaMLXError subclasses on bad input.
    """
    start = time.perf_counter()
    quantize = quantize or recipe is not None
    if quantize and dequantize:
        raise CheckpointError("quantize and dequantize cannot be combined")
    if quantize:
        check_options(bits, group_size, recipe)
    out_dtype = parse_dtype(dtype)
    adapter = read_adapter(adapter_path) if adapter_path is not None else None  # checked before reading weights
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if not src.exists() and is_hub_id(str(src)):  # a Hugging Face id: the cached (or fetched) snapshot
        src = resolve_hub_id(str(src))
    with contextlib.suppress(OSError):
        _remove_stale(dst.parent, dst.name)
    _check_target(src, dst, force)
    from .vision.loading import mllama_config

    vision_config = mllama_config(src)
    if vision_config is not None:
        if recipe is not None or dequantize or requantize or rope_factor is not None or adapter is not None:
            raise CheckpointError(f"{src}: Llama 3.2 Vision converts with quantize, bits, group_size and dtype only")
        return _convert_mllama(src, dst, start, force=force, quantize=quantize, bits=bits, group_size=group_size,
                               dtype=dtype, quantize_vision=quantize_vision, source_label=source_label,
                               config=vision_config)

    ckpt = read_checkpoint(src, rope_factor=rope_factor)
    _check_requantize(ckpt, src, quantize=quantize, bits=bits, group_size=group_size, requantize=requantize)
    out_dtype = out_dtype or main_dtype(ckpt)
    items, quantization = plan(ckpt, dtype=out_dtype, quantize=quantize, bits=bits,
                               group_size=group_size, recipe=recipe, dequantize=dequantize,
                               update=weight_updater(adapter, ckpt.config) if adapter is not None else None)
    items = track_conversion_error(ckpt, items)
    tokenizer = None if ckpt.tokenizer_files else load_tokenizer(ckpt.tokenizer_source or ckpt.path)

    parent = dst.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-{os.getpid()}-", dir=parent))
    except OSError as e:
        raise CheckpointError(f"{parent}: cannot create the output folder: {e.strerror or e}") from None
    try:
        write_weights(tmp, items, progress)
        write_json(tmp / "config.json", _output_config(ckpt, quantization, out_dtype, source_label))
        write_tokenizer(tmp, ckpt.tokenizer_files, tokenizer)
        generation = ckpt.generation_config or (generation_config_for(tokenizer) if tokenizer else None)
        if generation:
            write_json(tmp / "generation_config.json", generation)
        fsync_dir(tmp)
        if dst.exists() or dst.is_symlink():  # appeared (or changed) while we were writing
            if not force:
                raise OutputExistsError(f"{dst}: already exists (use --force to replace it)")
            check_replaceable_model(dst)
        old = _swap_into_place(tmp, dst)  # the one step that makes the new model visible
    except SourceReadError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        t = ckpt.tensors.get(e.tensor)
        where = t.file if t is not None else ckpt.path
        msg = str(e).split("] ", 1)[-1]
        raise CheckpointError(f"{where}: truncated or unreadable while converting (tensor {e.tensor!r}): "
                              f"{msg}") from None
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        what = Path(e.filename).name if isinstance(e.filename, str) and e.filename else "the output"
        raise CheckpointError(f"{dst}: cannot write {what}: {e.strerror or e}") from None
    except BaseException:  # KeyboardInterrupt included: never leave the partial folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:  # the replaced model; if interrupted here, the next conversion sweeps it
        _remove(old)

    size = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())
    parameters = sum(i.parameters for i in items)
    return ConvertResult(
        path=dst,
        source_format=ckpt.format,
        parameters=parameters,
        bits_per_weight=8 * sum(i.nbytes for i in items) / max(parameters, 1),
        size_bytes=size,
        seconds=time.perf_counter() - start,
        tensors=len(items),
        dtype=dtype_name(out_dtype),
        quantization=quantization,
        conversion_errors=conversion_summary(ckpt),
    )


def _convert_mllama(src: Path, dst: Path, start: float, *, force: bool, source_label: str | None,
                    **options) -> ConvertResult:
    """Llama 3.2 Vision (`vision.convert.write_mllama`), written beside `dst` and swapped in as `convert` does."""
    from .vision.convert import write_mllama

    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-{os.getpid()}-", dir=dst.parent))
    except OSError as e:
        raise CheckpointError(f"{dst.parent}: cannot create the output folder: {e.strerror or e}") from None
    try:
        marker = {"converter": f"llama-mlx {_version()}"}
        if source_label is not None:
            marker["path"] = source_label
        wrote = write_mllama(src, tmp, marker=marker, **options)
        if dst.exists() or dst.is_symlink():  # appeared (or changed) while we were writing, as in `convert`
            if not force:
                raise OutputExistsError(f"{dst}: already exists (use --force to replace it)")
            check_replaceable_model(dst)
        old = _swap_into_place(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        _remove(old)
    return ConvertResult(path=dst, source_format=wrote["source_format"], parameters=wrote["parameters"],
                         bits_per_weight=8 * wrote["nbytes"] / max(wrote["parameters"], 1),
                         size_bytes=sum(f.stat().st_size for f in dst.rglob("*") if f.is_file()),
                         seconds=time.perf_counter() - start, tensors=wrote["tensors"], dtype=wrote["dtype"],
                         quantization=wrote["quantization"])


def _check_requantize(ckpt: Checkpoint, src: Path, *, quantize: bool, bits: int, group_size: int,
                      requantize: bool) -> None:
    """A quantized source is quantized again only on request: each round of quantization adds error."""
    source_q = ckpt.config.get("quantization")
    if quantize and source_q and not requantize:
        have = f"{source_q.get('bits')}-bit, group size {source_q.get('group_size')}"
        raise ConfigError(
            f"{src}: is already quantized ({have}); -q would dequantize it and quantize it again to "
            f"{bits}-bit, group size {group_size}, adding error: pass --requantize to do that, "
            "-d/--dequantize for float weights, or neither to keep it as it is")


def _check_target(src: Path, dst: Path, force: bool) -> None:
    if dst.exists() or dst.is_symlink():
        if not force:
            raise OutputExistsError(f"{dst}: already exists (use --force to replace it)")
        s, d = src.resolve(), dst.resolve()
        if s == d or d in s.parents:
            raise OutputExistsError(f"{dst}: is the source checkpoint (or holds it); refusing to replace it")
        check_replaceable_model(dst)


MARKER_KEY = "converted_from"  # config.json of every folder convert writes carries it, naming the converter


def check_replaceable_model(dst: Path) -> None:
    """Raise UnsafeOutputError unless `dst` is an empty folder or a model folder this tool wrote.

    Ours: a real folder (not a link) whose config.json is a regular file naming llama-mlx as its
    converter (`converted_from.converter`). Links, files, device nodes, FIFOs and sockets are refused.
    """
    try:
        st = os.lstat(dst)
    except FileNotFoundError:
        return
    except OSError as e:
        raise UnsafeOutputError(f"{dst}: cannot check the target: {e.strerror or e}") from None
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeOutputError(f"{dst}: is a symbolic link; refusing to replace it")
    if not stat.S_ISDIR(st.st_mode):
        check_replaceable(dst)  # names a link, device, FIFO or socket
        raise UnsafeOutputError(f"{dst}: is a file, not a model folder; refusing to replace it")
    if not any(os.scandir(dst)):
        return
    config = dst / "config.json"
    try:
        ours = stat.S_ISREG(os.lstat(config).st_mode)
        if ours:
            with open(config, encoding="utf-8") as f:
                data = json.load(f)
            origin = data.get(MARKER_KEY) if isinstance(data, dict) else None
            ours = isinstance(origin, dict) and str(origin.get("converter", "")).startswith("llama-mlx")
    except (OSError, ValueError, RecursionError):
        ours = False
    if not ours:
        raise UnsafeOutputError(f"{dst}: is not a model folder llama-mlx wrote (no config.json with "
                                f"{MARKER_KEY}); refusing to replace it")


def _output_config(ckpt: Checkpoint, quantization: dict | None, dtype: mx.Dtype, source_label: str | None = None) -> dict:
    drop = {"quantization", "quantization_config", "converted_from", "torch_dtype", "dtype"}
    config = {k: v for k, v in ckpt.config.items() if k not in drop}
    config["architectures"] = ["LlamaForCausalLM"]
    config["torch_dtype"] = dtype_name(dtype)
    config["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", False))  # mlx-lm defaults to true
    if quantization:
        config["quantization"] = quantization
        config["quantization_config"] = quantization  # mlx-lm writes both
    config[MARKER_KEY] = {
        "format": ckpt.format,
        "path": source_label or str(ckpt.path.resolve()),
        "files": [f.name for f in ckpt.files],
        "converter": f"llama-mlx {_version()}",
    }
    return config


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("llama-mlx")
    except Exception:  # running from a source checkout that is not installed
        return "0.1.0"


def _remove_stale(parent: Path, name: str) -> None:
    """Clear leftovers of earlier conversions to the same target whose process is gone."""
    prefix = f".{name}.partial-"
    for p in parent.glob(prefix + "*"):
        try:
            pid = int(p.name[len(prefix):].split("-")[0])
        except ValueError:
            continue
        if _alive(pid):
            continue
        target = parent / name
        if p.name.endswith("-old") and not (target.exists() or target.is_symlink()):
            os.rename(p, target)  # killed mid-swap: the old model goes back where it was
        else:
            _remove(p)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _swap_into_place(tmp: Path, dst: Path) -> Path | None:
    """Rename tmp to dst; if dst exists, swap them atomically. Returns where the old model now is."""
    if not (dst.exists() or dst.is_symlink()):
        os.rename(tmp, dst)
        return None
    if _exchange(tmp, dst):
        return tmp  # tmp now holds the old model
    # No atomic swap here: two renames, undone if the second fails. A kill between them leaves
    # the old model at `old`, which the next conversion to this target puts back.
    old = dst.with_name(f".{dst.name}.partial-{os.getpid()}-old")
    os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    return old


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
