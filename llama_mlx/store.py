"""The models on this machine: the weights folder and the Hugging Face cache; listed, found, removed.

`remove_model` deletes only a direct entry of the weights folder (never through a link that
leads out of it) or a whole repo of the Hugging Face cache (through huggingface_hub's own
cache-deletion API); anything else is refused with RemovalRefusedError.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import LlamaMLXError, ModelNotFoundError, RemovalRefusedError

if TYPE_CHECKING:
    from .hub import HubModel, PullResult

__all__ = ["ModelEntry", "default_name", "find_model", "list_models", "pull", "remove_model"]

WEIGHTS, HF_CACHE = "weights", "hf-cache"

# llama.cpp's LLAMA_FTYPE values (general.file_type), the names published GGUF files carry.
_FTYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
           12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
           19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
           26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16"}


@dataclass
class ModelEntry:
    """One model on disk: what `llama-mlx list` shows and `llama-mlx rm` deletes."""

    name: str  # what --model takes: a weights-folder name or a hub id
    place: str  # "weights" or "hf-cache"
    layout: str  # "mlx", "hf", "gguf", "meta" or "other"
    quantization: str  # "4-bit g64", "Q4_K_M", "bfloat16", ...
    size_bytes: int
    path: Path

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def _weights_dir() -> Path:
    from .resolve import weights_dir

    return weights_dir()


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _dirs, files in os.walk(path, followlinks=False):
        for f in files:
            try:
                total += (Path(root) / f).stat().st_size
            except OSError:
                pass
    return total


def _safetensors_format(folder: Path) -> str | None:
    """The `format` entry of the first safetensors file's metadata (mlx writes "mlx")."""
    for f in sorted(folder.glob("*.safetensors")):
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > 100_000_000:
                    return None
                return (json.loads(fh.read(n)).get("__metadata__") or {}).get("format")
        except (OSError, ValueError, struct.error):
            return None
    return None


def _gguf_quant(path: Path) -> str:
    from .hub import _quant_tag

    try:
        from .checkpoints.gguf import read_header

        ftype = read_header(path).metadata.get("general.file_type")
        if ftype in _FTYPES:
            return _FTYPES[ftype]
    except Exception:  # an unreadable header still has a name
        pass
    return _quant_tag(path.name).upper()


def _describe(path: Path) -> tuple[str, str]:
    """(layout, quantization) of a file or folder; ("other", "") when it is no model llama-mlx reads."""
    if path.is_file():
        return ("gguf", _gguf_quant(path)) if path.suffix == ".gguf" else ("other", "")
    ggufs = sorted(path.glob("*.gguf"))
    if ggufs and not (path / "config.json").is_file():
        return "gguf", ", ".join(_gguf_quant(g) for g in ggufs)
    if (path / "config.json").is_file():
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            return "other", ""
        if not isinstance(config, dict) or not any(path.glob("*.safetensors")):
            return "other", ""
        q = config.get("quantization")
        mlx = bool(q) or "converted_from" in config or _safetensors_format(path) == "mlx"
        if isinstance(q, dict) and "bits" in q:
            mixed = any(isinstance(v, dict) for v in q.values())
            quant = f"{q['bits']}-bit g{q.get('group_size', 64)}" + (" mixed" if mixed else "")
        elif isinstance(config.get("quantization_config"), dict):
            quant = str(config["quantization_config"].get("quant_method", "quantized"))
        else:
            quant = str(config.get("torch_dtype") or config.get("dtype") or "float")
        return ("mlx" if mlx else "hf"), quant
    if (path / "params.json").is_file() and any(path.glob("consolidated.*.pth")):
        return "meta", "float"
    return "other", ""


def _weights_entries() -> list[ModelEntry]:
    home = _weights_dir()
    if not home.is_dir():
        return []
    out = []
    for child in sorted(home.iterdir()):
        if child.name.startswith("."):
            continue  # temporary folders of conversions and downloads in progress
        layout, quant = _describe(child)
        if layout == "other":
            continue
        out.append(ModelEntry(child.name, WEIGHTS, layout, quant, _size(child), child))
    return out


def _scan_cache():
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    from .hub import cache_dir

    try:
        return scan_cache_dir(cache_dir())
    except CacheNotFound:
        return None


def _main_snapshot(repo) -> Path | None:
    revisions = sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True)
    for r in revisions:
        if "main" in r.refs:
            return Path(r.snapshot_path)
    return Path(revisions[0].snapshot_path) if revisions else None


def _cache_entries() -> list[ModelEntry]:
    info = _scan_cache()
    if info is None:
        return []
    out = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id.lower()):
        if repo.repo_type != "model":
            continue
        snapshot = _main_snapshot(repo)
        layout, quant = _describe(snapshot) if snapshot is not None else ("other", "")
        out.append(ModelEntry(repo.repo_id, HF_CACHE, layout, quant, int(repo.size_on_disk), Path(repo.repo_path)))
    return out


def list_models() -> list[ModelEntry]:
    """The models in the weights folder, then the model repos of the Hugging Face cache (name order)."""
    return _weights_entries() + _cache_entries()


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def _weights_candidate(name: str, *, allow_cwd: bool = True) -> Path | None:
    """The weights-folder entry `name` (a bare name or a path) designates, or None if it names none."""
    home = _weights_dir()
    given = Path(name).expanduser()
    if ".." in given.parts:
        raise RemovalRefusedError(f"{name}: '..' is not allowed; name a model in {home} or a Hugging Face id")
    explicit = given.is_absolute() or str(name).startswith(("./", "~", os.sep))
    if not explicit and ((home / name).exists() or (home / name).is_symlink()):
        candidate = home / name
    elif (explicit or allow_cwd) and (given.exists() or given.is_symlink()):
        candidate = given
    else:
        return None
    candidate = Path(os.path.abspath(candidate))
    if not (candidate.exists() or candidate.is_symlink()):
        return None
    home_real = home.resolve()
    if candidate.parent.resolve() != home_real or candidate.name in ("", ".", ".."):
        where = "is the weights folder itself" if candidate.resolve() == home_real else "is outside the weights folder"
        raise RemovalRefusedError(f"{name}: {where} ({home}) and not in the Hugging Face cache; "
                                  "llama-mlx rm deletes only models there")
    if candidate.is_symlink() and not _inside(candidate.resolve(), home_real):
        raise RemovalRefusedError(f"{name}: is a link to {candidate.resolve()}, outside the weights folder; "
                                  "refusing to delete through it")
    return candidate


def find_model(name: str) -> ModelEntry:
    """The model `remove_model(name)` would delete: a weights-folder entry or a Hugging Face cache repo.

    Raises ModelNotFoundError if there is none, RemovalRefusedError for anything outside those two places.
    """
    from .hub import cache_dir, parse_hub_id

    if not str(name).strip():
        raise ModelNotFoundError("no model named")
    spec = parse_hub_id(str(name))
    local = _weights_candidate(str(name), allow_cwd=spec is None)
    repo = None
    if spec is not None and spec.pick is None:
        info = _scan_cache()
        repo = next((r for r in (info.repos if info else ()) if r.repo_type == "model"
                     and r.repo_id == spec.repo_id), None)
    if local is not None and repo is not None:
        raise RemovalRefusedError(f"{name}: is both {local} and a Hugging Face cache repo; "
                                  f"name the folder by its full path ({local}) to remove it")
    if local is not None:
        layout, quant = _describe(local.resolve()) if local.exists() else ("other", "")
        if layout == "other":
            raise RemovalRefusedError(f"{name}: {local} is not a model folder or file; refusing to delete it")
        return ModelEntry(local.name, WEIGHTS, layout, quant, _size(local) if not local.is_symlink() else 0, local)
    if repo is not None:
        snapshot = _main_snapshot(repo)
        layout, quant = _describe(snapshot) if snapshot is not None else ("other", "")
        return ModelEntry(repo.repo_id, HF_CACHE, layout, quant, int(repo.size_on_disk), Path(repo.repo_path))
    if spec is None and (Path(name).expanduser().exists()):
        raise RemovalRefusedError(f"{name}: outside the weights folder ({_weights_dir()}) and the Hugging Face "
                                  f"cache ({cache_dir()}); llama-mlx rm deletes only models there")
    raise ModelNotFoundError(f"{name}: no such model in {_weights_dir()} or in the Hugging Face cache ({cache_dir()})")


def remove_model(name: str) -> ModelEntry:
    """Delete the model `find_model(name)` designates; returns what was deleted (size: what was freed)."""
    entry = find_model(name)
    if entry.place == WEIGHTS:
        path = entry.path
        try:
            if path.is_symlink() or path.is_file():
                path.unlink()
            else:
                shutil.rmtree(path)
        except OSError as e:
            raise LlamaMLXError(f"{path}: cannot delete: {e.strerror or e}") from None
        return entry
    info = _scan_cache()
    repo = next(r for r in info.repos if r.repo_type == "model" and r.repo_id == entry.name)
    info.delete_revisions(*(r.commit_hash for r in repo.revisions)).execute()
    if repo.repo_path.exists():  # a repo with no complete revision: nothing of it is referenced any more
        shutil.rmtree(repo.repo_path, ignore_errors=True)
    return entry


def default_name(spec: "HubModel", path: Path, *, quantize: bool = False, bits: int = 4) -> str:
    """The weights-folder name a converted hub model gets: the repo name (or GGUF file stem)[-<bits>bit]."""
    name = path.stem if path.suffix == ".gguf" else spec.repo_id.split("/", 1)[1]
    return f"{name}-{bits}bit" if quantize else name


def pull(model: str, *, gguf_file: str | None = None, convert: bool = False, quantize: bool = False,
         bits: int = 4, group_size: int = 64, dtype: str | None = None, output: str | Path | None = None,
         force: bool = False, progress=None) -> "PullResult":
    """Download (or refresh) a hub model into the HF cache; with `convert`, also write an MLX folder.

    The hub is always asked (unless HF_HUB_OFFLINE, where a complete cached copy is enough).
    convert/quantize/bits/group_size/dtype/force/progress go to `llama_mlx.convert.convert`;
    output defaults to weights/<repo name>[-<bits>bit] (a GGUF: its file stem).
    """
    from .convert import convert as run_convert
    from .hub import PullResult, fetch, parse_hub_id

    spec = parse_hub_id(model, gguf_file)
    if spec is None:
        raise ModelNotFoundError(f"{model}: not a Hugging Face id (expected org/name or org/name:QUANT)")
    path, kind, files = fetch(spec, refresh=True)
    folder = path.parent if kind == "gguf" else path
    size = sum((folder / f).stat().st_size for f in files if (folder / f).is_file())
    result = PullResult(spec, path, files, size)
    if convert or quantize:
        dst = Path(output) if output is not None else _weights_dir() / default_name(spec, path, quantize=quantize,
                                                                                   bits=bits)
        result.converted = run_convert(path, dst, quantize=quantize, bits=bits, group_size=group_size, dtype=dtype,
                                       force=force, progress=progress)
    return result
