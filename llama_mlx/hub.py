"""Hugging Face hub ids: `org/name` (and `org/name:Q4_K_M` or a .gguf file name for GGUF repos) to local files.

Files come through `huggingface_hub` into the shared Hugging Face cache ($HF_HOME/hub), the one
mlx-lm and transformers use, and only those the layout needs: config, safetensors (+ index),
generation config, tokenizer files and chat template; for a GGUF repo, one .gguf file.

A cached snapshot is used with no network call at all when it is complete. Complete means:
- if huggingface_hub kept the repo's file listing for that commit (trees/<commit>.json), every
  file this module would download is in the snapshot; and always
- the layout is whole: config.json, every shard named by model.safetensors.index.json (else a
  model*.safetensors), and tokenizer.json or tokenizer.model; for GGUF, the chosen .gguf file.
Files count only when their snapshot link reaches a blob: huggingface_hub writes a blob under a
temporary name and links it only once it is whole. `pull` always asks the hub, to refresh.

HF_TOKEN (or a `huggingface-cli login` token), HF_HOME, HF_ENDPOINT and HF_HUB_OFFLINE are
huggingface_hub's own and are honoured. The library never prints: progress bars stay off unless
the caller (the CLI, on a terminal) turns them on with `show_progress(True)`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import HubError, ModelNotFoundError

__all__ = ["HubModel", "PullResult", "cache_dir", "fetch", "is_hub_id", "model_spec", "parse_hub_id",
           "resolve", "show_progress"]

_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)(?::(?P<pick>[^/:\s]+))?$")
INDEX = "model.safetensors.index.json"
WANTED = ("config.json", "generation_config.json", INDEX, "preprocessor_config.json")  # (the last: vision models)
_progress = False


@dataclass(frozen=True)
class HubModel:
    """A parsed hub id: the repo and, for GGUF repos, a quant tag (Q4_K_M) or a .gguf file name."""

    repo_id: str
    pick: str | None = None

    def __str__(self) -> str:
        return f"{self.repo_id}:{self.pick}" if self.pick else self.repo_id

    @property
    def gguf_file(self) -> str | None:
        return self.pick if self.pick and self.pick.lower().endswith(".gguf") else None

    @property
    def quant(self) -> str | None:
        return self.pick if self.pick and not self.gguf_file else None


@dataclass
class PullResult:
    """What `pull` fetched (and converted)."""

    model: HubModel
    path: Path  # the snapshot folder, or the .gguf file in it
    files: list[str] = field(default_factory=list)
    size_bytes: int = 0
    converted: object | None = None  # llama_mlx.convert.ConvertResult when asked to convert


def show_progress(enabled: bool) -> None:
    """Let huggingface_hub draw its progress bars while this module downloads (off by default)."""
    global _progress
    _progress = bool(enabled)


def parse_hub_id(model: str, gguf_file: str | None = None) -> HubModel | None:
    """`org/name`, `org/name:Q4_K_M` or `org/name:file.gguf` as a HubModel; None if it is not such an id."""
    text = str(model)
    m = _ID.match(text)
    if m is None or m.group("repo").endswith((".gguf", ".safetensors", ".pth", ".json")) or ".." in m.group("repo"):
        return None
    pick = m.group("pick")
    if gguf_file:
        if pick and pick != gguf_file:
            raise ModelNotFoundError(f"{text}: both a quant tag and --gguf-file {gguf_file} given; name one")
        pick = gguf_file
    return HubModel(m.group("repo"), pick)


def is_hub_id(model: str) -> bool:
    """Whether `model` is spelled as a hub id (whether or not such a repo exists)."""
    return parse_hub_id(model) is not None


def model_spec(model: str | None, gguf_file: str | None) -> str | None:
    """Fold a --gguf-file option into the model name: `org/name` -> `org/name:FILE`, folder -> folder/FILE."""
    if not gguf_file or model is None:
        if gguf_file:
            raise ModelNotFoundError(f"--gguf-file {gguf_file}: needs --model (a Hugging Face id or a folder)")
        return model
    if Path(model).expanduser().is_dir():
        return str(Path(model).expanduser() / gguf_file)
    spec = parse_hub_id(model, gguf_file)
    if spec is None:
        raise ModelNotFoundError(f"--gguf-file {gguf_file}: {model} is neither a folder nor a Hugging Face id")
    return str(spec)


def cache_dir() -> Path:
    """The Hugging Face hub cache ($HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


# --------------------------------------------------------------------------------------------
# Choosing files


def _tokenizer_files() -> tuple[str, ...]:
    from .checkpoints.hf import TOKENIZER_FILES

    return TOKENIZER_FILES


def _ggufs(files: list[str]) -> list[str]:
    return sorted(f for f in files if f.lower().endswith(".gguf"))


def _quant_tag(filename: str) -> str:
    """The quant tag a GGUF file name carries: Llama-3.2-1B-Instruct-Q4_K_M.gguf -> Q4_K_M."""
    stem = Path(filename).name[: -len(".gguf")]
    return re.split(r"[-.]", stem)[-1] if re.search(r"[-.]", stem) else stem


def _choose_gguf(repo_id: str, files: list[str], pick: str | None) -> str:
    ggufs = _ggufs(files)
    if pick and pick.lower().endswith(".gguf"):
        hits = [f for f in ggufs if f == pick or Path(f).name == pick]
    elif pick:
        tag = pick.lower()
        hits = [f for f in ggufs if tag in (_quant_tag(f).lower(), Path(f).name[:-5].lower())
                or re.search(rf"(^|[-.]){re.escape(tag)}([-.]|$)", Path(f).name[:-5].lower())]
    else:
        hits = ggufs
    if len(hits) == 1:
        return hits[0]
    choices = ", ".join(f"{_quant_tag(f)} ({f})" for f in ggufs) or "none"
    if not hits:
        if not ggufs:
            raise ModelNotFoundError(f"{repo_id}: has no .gguf file, so {pick!r} cannot pick one")
        raise ModelNotFoundError(f"{repo_id}: no .gguf file matches {pick!r}; the repo has: {choices}")
    raise ModelNotFoundError(f"{repo_id}: {len(hits)} .gguf files match; pick one with {repo_id}:TAG or "
                             f"--gguf-file: {', '.join(f'{_quant_tag(f)} ({f})' for f in hits)}")


def select_files(repo_id: str, files: list[str], pick: str | None = None) -> tuple[str, list[str]]:
    """('safetensors' | 'gguf', the files of `files` (a repo listing) that the layout needs)."""
    top = [f for f in files if "/" not in f]
    if pick or ("config.json" not in top and _ggufs(top)):
        return "gguf", [_choose_gguf(repo_id, top, pick)]
    if "config.json" not in top:
        what = "config.json + safetensors, or a .gguf file"
        raise ModelNotFoundError(f"{repo_id}: not a model llama-mlx can read (expected {what})")
    weights = [f for f in top if f.startswith("model") and f.endswith(".safetensors")] or \
        [f for f in top if f.endswith(".safetensors")]
    if not weights:
        raise ModelNotFoundError(f"{repo_id}: has config.json but no .safetensors weights "
                                 "(a PyTorch-only or Meta-only repo; download it and convert it locally)")
    wanted = set(WANTED) | set(_tokenizer_files())
    return "safetensors", sorted([f for f in top if f in wanted] + weights)


_COMMIT = re.compile(r"[0-9a-f]{40}")


def _snapshot_of(folder: Path) -> tuple[Path, Path] | None:
    """(the snapshot folder, its repo's blobs folder) of a folder in the HF cache layout, else None."""
    for p in (folder, *folder.parents):
        if p.parent.name == "snapshots":
            return p, p.parent.parent / "blobs"
    return None


def _contained(folder: Path, name: str) -> None:
    """A snapshot's file is a link into its own repo's blobs/ or a file inside the snapshot, else HubError
    (a hand-made or tampered cache must not make us open files elsewhere)."""
    where = _snapshot_of(folder)
    if where is None:
        return
    snap, blobs = (os.path.realpath(p) for p in where)
    real = os.path.realpath(folder / name)
    if not any(real.startswith(root + os.sep) for root in (blobs, snap)):
        raise HubError(f"{folder / name}: the Hugging Face cache links it outside its repository's blobs "
                       f"({real[:200]})")


def _present(folder: Path, name: str) -> bool:
    _contained(folder, name)
    return (folder / name).is_file()  # follows the snapshot link to its blob


def _layout_complete(folder: Path, kind: str, files: list[str]) -> bool:
    if kind == "gguf":
        return all(_present(folder, f) for f in files)
    if not _present(folder, "config.json"):
        return False
    if _present(folder, INDEX):
        try:
            shards = set(json.loads((folder / INDEX).read_text()).get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError):
            return False
        if not shards or not all(_present(folder, s) for s in shards):
            return False
    elif not any(f.endswith(".safetensors") and _present(folder, f) for f in files):
        return False
    return _present(folder, "tokenizer.json") or _present(folder, "tokenizer.model")


def _result_path(folder: Path, kind: str, files: list[str]) -> Path:
    return folder / files[0] if kind == "gguf" else folder


# --------------------------------------------------------------------------------------------
# Resolving


def resolve(model: str | HubModel, *, refresh: bool = False) -> Path:
    """The local snapshot folder (or .gguf file) of a hub id, downloaded into the HF cache if needed.

    A complete cached snapshot is returned without any network call unless `refresh`. Raises
    HubError (a ModelNotFoundError) with one line naming the id when offline and not cached,
    when the hub cannot be reached, for gated or missing repos, and for ambiguous GGUF picks.
    """
    return fetch(model if isinstance(model, HubModel) else _parse(model), refresh=refresh)[0]


def _parse(model: str) -> HubModel:
    spec = parse_hub_id(model)
    if spec is None:
        raise ModelNotFoundError(f"{model}: not a Hugging Face id (expected org/name or org/name:QUANT)")
    return spec


def fetch(spec: HubModel, *, refresh: bool) -> tuple[Path, str, list[str]]:
    from huggingface_hub import is_offline_mode

    if not refresh or is_offline_mode():
        cached = _from_cache(spec, authoritative=is_offline_mode())
        if cached is not None:
            return cached
    if is_offline_mode():
        raise HubError(f"{spec}: not in the Hugging Face cache ({cache_dir()}) and HF_HUB_OFFLINE is set; "
                       "unset it to download, or name a local model")
    return _download(spec)


def _cached_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of the repo's main revision (no network), or None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    try:
        # allow_patterns=[]: only locate the snapshot here; completeness is judged below.
        folder = Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=[]))
    except IncompleteSnapshotError as e:  # pragma: no cover - not raised with no patterns
        folder = Path(e.snapshot_path)
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    # refs/main names the snapshot: only a commit hash, naming a folder of the repo's own snapshots/
    snapshots = Path(os.path.realpath(cache_dir() / f"models--{repo_id.replace('/', '--')}" / "snapshots"))
    if not _COMMIT.fullmatch(folder.name) or ".." in folder.parts or \
            Path(os.path.realpath(folder)).parent != snapshots:
        raise HubError(f"{repo_id}: the Hugging Face cache's ref names {str(folder)[:200]!r}, not a commit "
                       f"snapshot of the repository ({snapshots})")
    return folder


def _cached_listing(repo_id: str, folder: Path) -> list[str] | None:
    """The repo's full file listing, if huggingface_hub kept it for this commit; else None."""
    from huggingface_hub import get_cached_repo_tree

    try:
        return [f.path for f in get_cached_repo_tree(repo_id, revision=folder.name)]
    except Exception:  # no listing kept (older huggingface_hub, or a cache laid out by hand)
        return None


def _from_cache(spec: HubModel, *, authoritative: bool) -> tuple[Path, str, list[str]] | None:
    folder = _cached_snapshot(spec.repo_id)
    if folder is None:
        return None
    listing = _cached_listing(spec.repo_id, folder)
    files = listing if listing is not None else sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    try:
        kind, chosen = select_files(spec.repo_id, files, spec.pick)
    except ModelNotFoundError:
        if authoritative or listing is not None:
            raise  # offline, or the kept listing is the repo's own: the hub would say the same
        return None  # a partial cache may hide files the hub has: ask it
    if _layout_complete(folder, kind, chosen):
        return _result_path(folder, kind, chosen), kind, chosen
    return None


@contextlib.contextmanager
def _progress_bars():
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if _progress or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


def _download(spec: HubModel) -> tuple[Path, str, list[str]]:
    from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download

    timeout = float(constants.HF_HUB_ETAG_TIMEOUT)
    with _hub_errors(spec):
        info = HfApi().model_info(spec.repo_id, timeout=timeout)
        files = [s.rfilename for s in info.siblings or []]
        kind, chosen = select_files(spec.repo_id, files, spec.pick)
        with _progress_bars():
            if kind == "gguf":
                path = Path(hf_hub_download(spec.repo_id, chosen[0], etag_timeout=timeout))
                folder = path.parent
            else:
                folder = Path(snapshot_download(spec.repo_id, allow_patterns=chosen, etag_timeout=timeout))
    if not _layout_complete(folder, kind, chosen):
        raise HubError(f"{spec}: the download in {folder} is incomplete (missing weights or tokenizer files)")
    return _result_path(folder, kind, chosen), kind, chosen


def _transport_errors() -> tuple[type[BaseException], ...]:
    try:
        from httpx2 import TransportError
    except ImportError:  # pragma: no cover - huggingface_hub on plain httpx
        from httpx import TransportError
    return (TransportError,)


@contextlib.contextmanager
def _hub_errors(spec: HubModel):
    """huggingface_hub's and the network's exceptions as one HubError line naming the id."""
    import os

    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = constants.ENDPOINT.rstrip("/")
    page = f"{endpoint}/{spec.repo_id}"
    unreachable = f"{spec}: cannot reach the Hugging Face hub at {endpoint}"
    try:
        yield
    except GatedRepoError:
        has_token = bool(os.environ.get("HF_TOKEN"))
        raise HubError(
            f"{spec}: a gated model: accept its licence on {page} while logged in, then "
            + ("check that HF_TOKEN is a token of that account" if has_token else
               f"set HF_TOKEN to an access token of that account ({endpoint}/settings/tokens)")) from None
    except RevisionNotFoundError:
        raise HubError(f"{spec}: the hub has no such revision of this repo") from None
    except RepositoryNotFoundError:
        raise HubError(f"{spec}: no such file or folder here, and no such model on the Hugging Face hub "
                       "(if it is private or gated, set HF_TOKEN)") from None
    except HfHubHTTPError as e:
        code = getattr(e.response, "status_code", None)
        if code in (401, 403):
            raise HubError(f"{spec}: the Hugging Face hub refused access (HTTP {code}): accept the licence on "
                           f"{page} if it has one, and set HF_TOKEN to an access token") from None
        raise HubError(f"{spec}: the Hugging Face hub answered HTTP {code}: {str(e).splitlines()[0]}") from None
    except OfflineModeIsEnabled:
        raise HubError(f"{spec}: not in the Hugging Face cache and HF_HUB_OFFLINE is set") from None
    except LocalEntryNotFoundError:  # the hub failed mid-way and the cache cannot stand in
        raise HubError(f"{unreachable}, and the files are not in the cache ({cache_dir()})") from None
    except _transport_errors() as e:
        why = str(e).strip() or type(e).__name__
        raise HubError(f"{unreachable} ({why}); check the connection, or set HF_HUB_OFFLINE=1 to use "
                       "only cached models") from None
