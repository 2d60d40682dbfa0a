"""The benchmark tooling runs end to end on a tiny random model. No timing is asserted: benchmarks are not tests."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from benchmarks import random_model as R
from llama_mlx import benchmark as B

ROOT = Path(__file__).resolve().parent.parent
METRICS = ("prompt_tps", "generation_tps", "ttft_s", "peak_memory_gb", "load_s")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return R.write_random_model(tmp_path_factory.mktemp("bench") / "tiny", "tiny", dtype="float32")


def test_random_folder_is_the_same_model_in_both_runtimes(tiny_folder):
    import mlx_lm

    from llama_mlx.loading import load

    config = json.loads((tiny_folder / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 4}
    assert config["tie_word_embeddings"] is True
    ours, _ = load(tiny_folder)
    theirs, _ = mlx_lm.load(str(tiny_folder))
    tokens = mx.array([B.random_prompt(config["vocab_size"], 12, seed=3)])
    a, b = ours(tokens), theirs(tokens)
    assert a.shape == b.shape == (1, 12, config["vocab_size"])
    assert bool(mx.all(mx.isfinite(a)))
    np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-3, rtol=1e-3)


def test_random_folder_reused_and_guarded(tiny_folder, tmp_path):
    assert R.write_random_model(tiny_folder, "tiny", dtype="float32") == tiny_folder  # same settings: reused
    with pytest.raises(FileExistsError):
        R.write_random_model(tiny_folder, "tiny", dtype="float32", seed=1)
    sharded = R.write_random_model(tmp_path / "sharded", "tiny", dtype="float32", max_shard_bytes=20_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1


def test_real_shapes():
    one = R.shape_config("1b")
    assert (one["hidden_size"], one["num_hidden_layers"], one["num_attention_heads"], one["num_key_value_heads"],
            one["intermediate_size"], one["vocab_size"]) == (2048, 16, 32, 8, 8192, 128256)
    assert one["tie_word_embeddings"] and one["rope_scaling"]["factor"] == 32.0
    eight = R.shape_config("8b")
    assert (eight["hidden_size"], eight["num_hidden_layers"], eight["intermediate_size"]) == (4096, 32, 14336)
    assert not eight["tie_word_embeddings"] and eight["rope_scaling"]["factor"] == 8.0
    names = {name for name, _, _ in R._param_specs(eight, 4, 64)}  # lazily built: nothing is computed
    assert "lm_head.scales" in names and "model.layers.31.mlp.down_proj.biases" in names


def test_vs_mlx_lm_script_end_to_end(tmp_path):
    out = tmp_path / "results"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "vs_mlx_lm.py"), "--models", "tiny", "-p", "16", "-g", "8",
           "-n", "1", "--positions", "32,64", "--decode-steps", "4", "--out", str(out), "--work", str(tmp_path / "work"),
           "--tag", "test"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md, png, js = (out / f"vs_mlx_lm-test{ext}" for ext in (".md", ".png", ".json"))
    assert md.is_file() and png.is_file() and js.is_file()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = md.read_text()
    assert "| tiny |" in text and "Decode cost as the context grows" in text
    run = json.loads(js.read_text())
    (model,) = run["models"]
    assert "error" not in model
    for key in METRICS:
        r = model["ratios"][key]
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("median", "min", "max"))
    for runtime in ("llama-mlx", "mlx-lm"):
        assert sorted(int(p) for p in model["decode_ms"][runtime]) == [32, 64]
    assert run["device"]["device"] and run["device"]["mlx"]


def test_bench_command_json(tiny_folder):
    cmd = [sys.executable, "-c", "from llama_mlx_cli.main import app; app()", "bench", "--model", str(tiny_folder),
           "--prompt-tokens", "16", "-g", "8", "-n", "1", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = json.loads(proc.stdout)
    for key in METRICS:
        assert math.isfinite(d[key]) and d[key] > 0, key
    assert d["prompt_tokens"] == 16 and d["generation_tokens"] == 8 and d["trials"] == 1
    assert len(d["per_trial"]) == 1 and d["device"]["mlx"]


def test_decode_probe_script_end_to_end(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "decode_probe.py"), "--models", "tiny", "-p", "16", "-g", "6",
           "--no-parity"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("tiny:")]
    assert len(lines) == 2 and all("tok/s" in line and "async_eval" in line for line in lines)


def test_bench_defaults_sized_to_the_cpu_with_progress(tiny_folder):
    """`llama-mlx bench` as a newcomer runs it on a CPU: sizes for the CPU (by device, not model: the
    tiny model keeps the suite quick), said once with how to ask for more, and progress on stderr
    while it runs (the first line long before it ends)."""
    cmd = [sys.executable, "-c", "from llama_mlx_cli.main import app; app()", "bench", "--model", str(tiny_folder),
           "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stderr.readline()
    running_after_first_line = proc.poll() is None
    out, rest = proc.communicate(timeout=600)
    err = first + rest
    assert proc.returncode == 0, err[-3000:]
    assert running_after_first_line
    assert first.startswith("On this CPU: prompt 128 tokens, 32 generated, 2 trials")
    assert "--prompt-tokens 512 -g 128 -n 3" in first
    lines = err.splitlines()
    for i in (1, 2):
        started = lines.index(f"Trial {i}/2: load, warm up, prefill and generate…")
        assert lines[started + 1].startswith(f"trial {i}/2: prompt ")  # that trial's figures follow it
    d = json.loads(out)
    assert (d["prompt_tokens"], d["generation_tokens"], d["trials"]) == (128, 32, 2)
