"""Distributed inference: ranks launched by `mlx.launch --backend ring` over loopback.

Oracle: the same checkpoint in one plain process (float32 logits within 1e-4, greedy text
identical). Memory: each rank's MLX peak while loading, against the checkpoint's size on disk.
"""

from __future__ import annotations

import json
import math
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from llama_mlx import generate, make_sampler
from llama_mlx.checkpoints.base import expected_shapes
from llama_mlx.checkpoints.plan import Item
from llama_mlx.checkpoints.writer import write_weights
from llama_mlx.distributed import plan
from llama_mlx.errors import ShardError
from llama_mlx.loading import load

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "dist_worker.py"
LAUNCH = Path(sys.executable).parent / "mlx.launch"
SMOLLM2 = ROOT / "weights" / "SmolLM2-135M-Instruct"
PROMPT_IDS = [1, 5, 9, 3, 7, 11, 2, 4, 6, 8, 10, 12]
MiB = 1 << 20
# Beyond its shard a rank holds the replicated RMSNorm vectors and the ring backend's buffers.
SLACK = 1 * MiB

TINY = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
            intermediate_size=512, vocab_size=510, tie_word_embeddings=False, rope_factor=8.0)


@pytest.fixture(scope="module")
def tiny_float(tmp_path_factory) -> Path:
    """A random float32 MLX folder of real Llama structure (untied head; 510 rows: 4 ranks split unevenly)."""
    from benchmarks.random_model import _write_tokenizer, shape_config

    folder = tmp_path_factory.mktemp("tiny-f32")
    config = shape_config(TINY)
    mx.random.seed(0)

    def make(name, shape):
        if len(shape) == 1:
            return lambda: {name: 1 + 0.1 * mx.random.normal(shape)}
        return lambda: {name: mx.random.normal(shape) / math.sqrt(shape[1])}

    write_weights(folder, [Item(n, [(n, s, mx.float32)], make(n, s), math.prod(s))
                           for n, s in expected_shapes(config).items()])
    _write_tokenizer(folder)
    (folder / "config.json").write_text(json.dumps({**config, "bos_token_id": 1, "eos_token_id": 2}))
    return folder


@pytest.fixture(scope="module")
def tiny_q4(tmp_path_factory) -> Path:
    """The same shape, 4-bit (group 64) with float32 scales and a tied quantized embedding."""
    from benchmarks.random_model import write_random_model

    return write_random_model(tmp_path_factory.mktemp("q4") / "tiny-q4", {**TINY, "tie_word_embeddings": True},
                              bits=4, group_size=64, dtype="float32")


def _free_ports(n: int) -> int:
    """A base port with n free ports after it (other test runs on this machine may hold some)."""
    for _ in range(50):
        base = random.randrange(20000, 60000 - n)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


def launch(n: int, model: Path, mode: str, out: Path, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [str(LAUNCH), "--hosts", "127.0.0.1", "-n", str(n), "--backend", "ring",
           "--starting-port", str(_free_ports(n)), "--",
           sys.executable, str(WORKER), str(model), mode, str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    for tb in sorted(out.glob("*.traceback")):
        pytest.fail(f"{tb.name}:\n{tb.read_text()}")
    return proc


def ranks(out: Path, n: int) -> list[tuple[dict, dict]]:
    return [(dict(np.load(out / f"rank{r}.npz")), json.loads((out / f"rank{r}.json").read_text())) for r in range(n)]


def single_logits(folder: Path) -> np.ndarray:
    model, _ = load(folder, distributed=False)
    return np.array(model(mx.array([PROMPT_IDS])).astype(mx.float32))


def checkpoint_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def check_ranks(out: Path, n: int, oracle: np.ndarray, folder: Path) -> None:
    results = ranks(out, n)
    for data, stats in results:
        assert stats["size"] == n
        assert np.abs(data["logits"] - oracle).max() < 1e-4
        # The cache path (chunked prefill, then single tokens) gives the same logits.
        assert np.abs(data["cached"] - oracle).max() < 1e-4
        assert data["greedy"].tolist() == results[0][0]["greedy"].tolist()
        # Unseeded sampling: the same token on every rank (the random state is synchronized).
        assert data["sampled"].tolist() == results[0][0]["sampled"].tolist()
        share = checkpoint_bytes(folder) / n
        assert 0.9 * share <= stats["load_peak"] <= share + SLACK, (stats, share)
    assert results[0][0]["greedy"].tolist() == oracle_greedy(folder)


def oracle_greedy(folder: Path) -> list[int]:
    from llama_mlx import generate_step

    model, _ = load(folder, distributed=False)
    return [t for t, _ in generate_step(mx.array(PROMPT_IDS), model, max_tokens=8, sampler=make_sampler(0.0))]


@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
def test_two_ranks_float32_logits_match_single_process(tiny_float, tmp_path, mode):
    proc = launch(2, tiny_float, mode, tmp_path)
    assert proc.returncode == 0, proc.stderr
    check_ranks(tmp_path, 2, single_logits(tiny_float), tiny_float)
    layers = [stats["layers"] for _, stats in ranks(tmp_path, 2)]
    assert layers == ([2, 2] if mode == "pipeline" else [4, 4])


def test_two_ranks_tensor_parallel_quantized(tiny_q4, tmp_path):
    proc = launch(2, tiny_q4, "tensor", tmp_path)
    assert proc.returncode == 0, proc.stderr
    check_ranks(tmp_path, 2, single_logits(tiny_q4), tiny_q4)


def test_four_ranks_tensor_parallel_uneven_vocabulary(tiny_float, tmp_path):
    # 510 vocabulary rows over 4 ranks: 128, 128, 128, 126 (the last shard padded for the gather).
    proc = launch(4, tiny_float, "tensor", tmp_path, "--logits-only", timeout=150)
    assert proc.returncode == 0, proc.stderr
    oracle = single_logits(tiny_float)
    for data, stats in ranks(tmp_path, 4):
        assert np.abs(data["logits"] - oracle).max() < 1e-4
        assert np.abs(data["cached"] - oracle).max() < 1e-4
        assert stats["load_peak"] <= checkpoint_bytes(tiny_float) / 4 + SLACK


def test_smollm2_pipeline_two_ranks_greedy_text_printed_once(tmp_path):
    prompt = "The capital of France is"
    proc = launch(2, SMOLLM2, "pipeline", tmp_path, "--tokens", "10", "--text", prompt, "--text-only")
    assert proc.returncode == 0, proc.stderr
    model, tokenizer = load(SMOLLM2, distributed=False)
    expected = generate(model, tokenizer, prompt, max_tokens=10, sampler=make_sampler(0.0))
    assert "Paris" in expected
    assert proc.stdout.count("<<") == 1  # rank 1 printed nothing
    assert f"<<{expected}>>" in proc.stdout
    for r in range(2):
        stats = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert stats["layers"] == 15
        share = checkpoint_bytes(SMOLLM2) / 2
        assert 0.9 * share <= stats["load_peak"] <= share + SLACK, stats


def test_smollm2_two_way_tensor_parallel_refused_in_one_line(tmp_path):
    config = json.loads((SMOLLM2 / "config.json").read_text())
    with pytest.raises(ShardError) as e:
        plan(config, 2)
    message = str(e.value)
    assert "\n" not in message
    assert "9 attention heads and 3 KV heads must both divide by 2" in message
    assert "works with 1 or 3 ranks" in message and "pipeline" in message
    assert plan(config, 3).n_heads == 3 and plan(config, 3).n_kv_heads == 1
    with pytest.raises(ShardError, match="at least 31 layers; the model has 30"):
        plan(config, 31, pipeline=True)
    # Launched: the load refuses before reading weights, one line on stderr, from rank 0 only.
    proc = launch(2, SMOLLM2, "tensor", tmp_path)
    assert "exited with code 1" in proc.stderr  # (mlx.launch itself exits 0 whatever its ranks do)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {SMOLLM2}: {message.split(': ', 1)[1]}"]
    assert sorted(p.name for p in tmp_path.glob("*.error")) == ["rank0.error", "rank1.error"]
