"""`llama-mlx info` figures against the weights on disk, read independently (GGUF reader, safetensors headers)."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest


def command() -> list[str]:
    exe = Path(sys.executable).with_name("llama-mlx")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "llama_mlx_cli.main"]


def run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "NO_COLOR")}
    return subprocess.run([*command(), *map(str, args)], capture_output=True, text=True, env=env, timeout=600)


def info_json(*args: str) -> dict:
    r = run("info", "--json", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def safetensors_headers(folder: Path) -> dict[str, dict]:
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        tensors.update(header)
    return tensors


def kv_bytes(layers: int, kv_heads: int, head_dim: int, tokens: int, elem: int) -> int:
    return 2 * layers * kv_heads * head_dim * tokens * elem


def gguf_value(reader, key):
    field = reader.fields[key]
    return field.parts[field.data[0]][0]


@pytest.fixture(scope="module")
def cache_itemsize(default_model):
    """Bytes per KV-cache element, as a real forward pass stores them (activations' dtype)."""
    import mlx.core as mx

    from llama_mlx import load
    from llama_mlx.cache import make_prompt_cache

    model, _ = load(default_model, dtype="float16")  # (its converted folder: the GGUF loads 5x slower)
    cache = make_prompt_cache(len(model.layers))
    model(mx.array([[1, 2]]), cache)
    return cache[0].keys.dtype.size


def test_info_on_the_gguf_agrees_with_the_file(smollm2_gguf_path, cache_itemsize):
    import gguf

    reader = gguf.GGUFReader(str(smollm2_gguf_path))
    d = info_json("--model", smollm2_gguf_path, "--context", 4096, "--dtype", "float16")
    assert d["format"] == "gguf"
    assert d["parameters"] == sum(int(t.n_elements) for t in reader.tensors)
    assert d["size_on_disk"] == smollm2_gguf_path.stat().st_size
    assert d["context_length"] == int(gguf_value(reader, "llama.context_length"))
    layers = int(gguf_value(reader, "llama.block_count"))
    kv_heads = int(gguf_value(reader, "llama.attention.head_count_kv"))
    head_dim = int(gguf_value(reader, "llama.embedding_length")) // int(gguf_value(reader, "llama.attention.head_count"))
    assert (d["layers"], d["kv_heads"], d["head_dim"]) == (layers, kv_heads, head_dim)
    assert d["quantization"]["bits"] == 4 and d["quantization"]["group_size"] == 32  # Q4_1: 4 bits, blocks of 32
    assert d["memory"]["kv_cache"] == kv_bytes(layers, kv_heads, head_dim, 4096, cache_itemsize)
    assert d["memory"]["total"] == d["memory"]["weights"] + d["memory"]["kv_cache"]


def test_info_on_the_default_model_agrees_with_its_folder(smollm2_gguf_path, cache_itemsize):
    d = info_json("--dtype", "float16")  # the default model (fetched and converted on first use)
    folder = Path(d["path"])
    assert folder.is_dir() and d["format"] in ("mlx", "hf")
    config = json.loads((folder / "config.json").read_text())
    headers = safetensors_headers(folder)

    # Size on disk: every file of the folder.
    assert d["size_on_disk"] == sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    # Weights: the tensor bytes of the safetensors files; parameters: logical (unpacked) element counts.
    tensor_bytes = sum(h["data_offsets"][1] - h["data_offsets"][0] for h in headers.values())
    assert d["tensor_bytes"] == tensor_bytes
    assert d["memory"]["weights"] == tensor_bytes  # loaded as stored (float16)
    quant = config["quantization"]
    params = 0
    for name, h in headers.items():
        module, _, kind = name.rpartition(".")
        if kind in ("scales", "biases"):
            continue
        n = 1
        for dim in h["shape"]:
            n *= dim
        if module + ".scales" in headers:
            bits = quant.get(module, {}).get("bits", quant["bits"]) if isinstance(quant.get(module), dict) \
                else quant["bits"]
            n = n * 32 // bits
        params += n
    assert d["parameters"] == params
    assert d["parameters"] == info_json("--model", smollm2_gguf_path)["parameters"]  # the same model
    assert d["context_length"] == config["max_position_embeddings"]
    assert d["quantization"]["bits"] == quant["bits"]
    assert d["memory"]["kv_cache"] == kv_bytes(config["num_hidden_layers"], config["num_key_value_heads"],
                                               config["head_dim"], config["max_position_embeddings"], cache_itemsize)

    # The table shows the same figures.
    r = run("info", "--dtype", "float16")
    assert r.returncode == 0, r.stderr
    assert f"{d['parameters']:,}" in r.stdout
    assert f"{d['size_on_disk']:,} bytes" in r.stdout
    assert "4-bit" in r.stdout and "8,192 tokens" in r.stdout
    assert "\x1b[" not in r.stdout


def test_quantized_kv_cache_estimate(smollm2_gguf_path):
    d = info_json("--model", smollm2_gguf_path, "--context", 1024, "--kv-bits", 8, "--kv-group-size", 64,
                  "--dtype", "float32")
    per_layer = d["kv_heads"] * d["head_dim"] * 1024
    assert d["memory"]["kv_cache"] == 2 * d["layers"] * (per_layer + 2 * (per_layer // 64) * 4)
