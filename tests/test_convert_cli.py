"""`llama-mlx convert`: progress and summary; every bad input is one clear stderr line and exit 1."""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import test_checkpoints_support as S
from llama_mlx.checkpoints import writer

import torch
REPO = Path(__file__).resolve().parent.parent


def cli(*args, env=None):
    from llama_mlx_cli.main import app

    return CliRunner().invoke(app, ["convert", *map(str, args)], env=env)


def assert_one_line_error(result, *words):
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def sd():
    return S.meta_state_dict(seed=20)


@pytest.fixture(scope="module")
def sources(tmp_path_factory, sd):
    root = tmp_path_factory.mktemp("sources")
    S.write_meta(root / "meta", sd, shards=2, tokenizer=False)
    S.write_gguf(root / "tiny.gguf", sd, S.TINY_PARAMS)
    hf = root / "hf"
    hf.mkdir()
    import mlx.core as mx

    from llama_mlx.checkpoints import read_checkpoint

    ckpt = read_checkpoint(root / "tiny.gguf")  # an HF-named folder, written by hand (no tokenizer needed)
    mx.save_safetensors(str(hf / "model.safetensors"), {k: t.read() for k, t in ckpt.tensors.items()})
    config = {k: v for k, v in ckpt.config.items() if k != "rope_traditional"}
    (hf / "config.json").write_text(json.dumps(config))
    return root


def test_progress_bar_and_summary(sources, tmp_path):
    r = cli(sources / "tiny.gguf", tmp_path / "out", "-q", env={"FORCE_COLOR": "1", "COLUMNS": "120"})
    assert r.exit_code == 0, r.stderr
    for word in ("Parameters", "131.4K", "Bits per weight", "Size on disk", "Time", "4-bit, group size 64"):
        assert word in r.stdout
    assert "Converting" in r.stderr and "21/21" in r.stderr and "model.norm.weight" in r.stderr  # last tensor


def _bad_inputs(root: Path, tmp: Path) -> dict:
    """name -> (source path, words the error line must hold)."""
    cases = {}

    def meta_copy(name):
        d = tmp / name
        d.mkdir()
        for f in (root / "meta").iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        return d

    d = meta_copy("no-params")
    (d / "params.json").unlink()
    cases["missing params.json"] = (d, [str(d / "params.json"), "missing"])
    d = meta_copy("bad-params")
    (d / "params.json").write_text('{"dim": 64,')
    cases["malformed params.json"] = (d, [str(d / "params.json"), "malformed JSON"])
    d = meta_copy("shape")
    (d / "params.json").write_text(json.dumps({**S.TINY_PARAMS, "multiple_of": 256}))  # implies width 256, not 192
    cases["shape mismatch (Meta)"] = (d, ["consolidated.00.pth", "gate_proj", "[192, 64]", "[256, 64]"])
    d = meta_copy("cut-pth")
    data = (d / "consolidated.01.pth").read_bytes()
    (d / "consolidated.01.pth").write_bytes(data[: len(data) * 2 // 3])
    cases["truncated .pth"] = (d, [str(d / "consolidated.01.pth"), "truncated or corrupt"])
    d = meta_copy("junk-pth")
    (d / "consolidated.00.pth").write_bytes(os.urandom(4096))
    cases["corrupt .pth"] = (d, [str(d / "consolidated.00.pth"), "truncated or corrupt"])
    d = meta_copy("evil")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, d / "consolidated.00.pth")
    cases["pickle with a callable"] = (d, [str(d / "consolidated.00.pth"), "refused", "system"])

    def hf_copy(name):
        d = tmp / name
        d.mkdir()
        for f in (root / "hf").iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        return d

    d = hf_copy("no-config")
    (d / "config.json").unlink()
    cases["missing config.json"] = (d, [str(d / "config.json"), "missing"])
    d = hf_copy("bad-config")
    (d / "config.json").write_text("{not json")
    cases["malformed config.json"] = (d, [str(d / "config.json"), "malformed JSON"])
    d = hf_copy("config-no-heads")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["num_attention_heads"]
    (d / "config.json").write_text(json.dumps(cfg))
    cases["config.json without a key"] = (d, [str(d / "config.json"), "num_attention_heads"])
    d = hf_copy("hf-shape")
    cfg["num_attention_heads"], cfg["hidden_size"] = 4, 128
    (d / "config.json").write_text(json.dumps(cfg))
    cases["shape mismatch (HF)"] = (d, [str(d / "model.safetensors"), "model.embed_tokens.weight", "[256, 128]"])
    d = hf_copy("cut-st")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases["truncated .safetensors"] = (d, [str(d / "model.safetensors"), "truncated or corrupt"])
    d = hf_copy("junk-st")
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 40) + b"{" * 40)
    cases["corrupt .safetensors"] = (d, [str(d / "model.safetensors"), "truncated or corrupt"])

    data = (root / "tiny.gguf").read_bytes()
    for name, blob, words in [
        ("cut.gguf", data[: len(data) - 1000], ["truncated", "extends past the end"]),
        ("header.gguf", data[:300], ["truncated GGUF header"]),
        ("junk.gguf", b"NOPE" + os.urandom(100), ["not a GGUF file"]),
    ]:
        (tmp / name).write_bytes(blob)
        cases[f"bad gguf {name}"] = (tmp / name, [str(tmp / name), *words])
    # Q5_1 is supported now (test_gguf_quants.py); MXFP4 is a type no MLX affine grid holds
    S.write_gguf(tmp / "fp4.gguf", S.meta_state_dict(seed=21), S.TINY_PARAMS, {"ffn_down": "MXFP4"})
    cases["unsupported GGUF type"] = (tmp / "fp4.gguf", [str(tmp / "fp4.gguf"), "unsupported GGUF tensor type MXFP4"])
    cases["no such path"] = (tmp / "nowhere", [str(tmp / "nowhere"), "no such file or folder"])
    return cases


def test_each_bad_input_is_one_clear_line(sources, tmp_path):
    bad, outs = tmp_path / "bad", tmp_path / "out"
    bad.mkdir()
    outs.mkdir()
    for name, (src, words) in _bad_inputs(sources, bad).items():
        out = outs / name.replace(" ", "_")
        try:
            assert_one_line_error(cli(src, out), *words)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None
    assert list(outs.iterdir()) == []  # nothing written, not even a temporary folder


def test_existing_output_without_force(sources, tmp_path):
    (tmp_path / "out").mkdir()
    assert_one_line_error(cli(sources / "tiny.gguf", tmp_path / "out"), str(tmp_path / "out"), "already exists",
                          "--force")
    assert cli(sources / "tiny.gguf", tmp_path / "out", "--force").exit_code == 0


def test_full_disk(sources, tmp_path, monkeypatch):
    def no_space(path, items, on_item):
        with open(path, "wb") as f:
            f.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(writer, "_write_shard", no_space)
    out = tmp_path / "out"
    assert_one_line_error(cli(sources / "tiny.gguf", out), str(out), "model.safetensors", "No space left on device")
    assert list(tmp_path.iterdir()) == []  # neither the target nor its temporary folder


def test_write_failure_from_the_os(sources, tmp_path):
    """A real failing write (file size limit) in a real `llama-mlx convert` process."""
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))\n"
            "from llama_mlx_cli.main import app\n"
            "sys.argv = ['llama-mlx', 'convert', sys.argv[1], sys.argv[2]]\n"
            "app()\n")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", code, str(sources / "tiny.gguf"), str(out)], capture_output=True,
                       text=True, cwd=REPO)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {out}: cannot write model.safetensors: File too large")
    assert list(tmp_path.iterdir()) == []
