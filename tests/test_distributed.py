"""Distributed inference: ranks launched by `mlx.launch --backend ring` over loopback.

Oracle: the same checkpoint in one plain process (float32 logits within 1e-4, greedy text
identical; the CLI's chat and server alike). Memory: each rank's MLX peak while loading, against
the checkpoint's size on disk.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
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
CLI = Path(sys.executable).parent / "llama-mlx"
SMOLLM2 = ROOT / "weights" / "SmolLM2-135M-Instruct"
PROMPT_IDS = [1, 5, 9, 3, 7, 11, 2, 4, 6, 8, 10, 12]
MiB = 1 << 20
# Beyond its shard a rank holds the replicated RMSNorm vectors and the ring backend's buffers.
SLACK = 1 * MiB

TINY = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
            intermediate_size=512, vocab_size=510, tie_word_embeddings=False, rope_factor=8.0)


def _random_float32(folder: Path, config: dict, seed: int) -> None:
    # Norms near 1, matrices scaled by 1/sqrt(fan-in): random weights whose activations stay finite.
    mx.random.seed(seed)

    def make(name, shape):
        if len(shape) == 1:
            return lambda: {name: 1 + 0.1 * mx.random.normal(shape)}
        return lambda: {name: mx.random.normal(shape) / math.sqrt(shape[1])}

    write_weights(folder, [Item(n, [(n, s, mx.float32)], make(n, s), math.prod(s))
                           for n, s in expected_shapes(config).items()])


@pytest.fixture(scope="module")
def tiny_float(tmp_path_factory) -> Path:
    """A random float32 MLX folder of real Llama structure (untied head; 510 rows: 4 ranks split unevenly)."""
    from benchmarks.random_model import _write_tokenizer, shape_config

    folder = tmp_path_factory.mktemp("tiny-f32")
    config = shape_config(TINY)
    _random_float32(folder, config, seed=0)
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


def launch_command(n: int, *command: str) -> list[str]:
    return [str(LAUNCH), "--hosts", "127.0.0.1", "-n", str(n), "--backend", "ring",
            "--starting-port", str(_free_ports(n)), "--", *command]


ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def launch(n: int, model: Path, mode: str, out: Path, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    cmd = launch_command(n, sys.executable, str(WORKER), str(model), mode, str(out), *args)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT)
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
        plan(config, 2, pipeline=False)
    message = str(e.value)
    assert "\n" not in message
    assert "9 attention heads and 3 KV heads must both divide by 2" in message
    assert "works with 1 or 3 ranks" in message and "--pipeline" in message
    assert plan(config, 3).n_heads == 3 and plan(config, 3).n_kv_heads == 1
    with pytest.raises(ShardError, match="at least 31 layers; the model has 30"):
        plan(config, 31, pipeline=True)
    # Automatic: the heads where they divide, else the layers, and why.
    assert plan(config, 3).mode == "tensor" and plan(config, 3).fallback is None
    auto = plan(config, 2)
    assert auto.mode == "pipeline" and auto.layers == range(15)
    assert auto.fallback == "9 attention heads and 3 KV heads must both divide by 2"
    with pytest.raises(ShardError, match="not by heads .* nor by layers \\(it has 30"):
        plan(config, 31)
    # Launched with --tensor-parallel: every rank refuses before reading weights, one line on
    # stderr (rank 0's), and the ranks exit 1.
    run = Launched(tmp_path, 2, "generate", "--model", str(SMOLLM2), "--raw", "Hi", "--tensor-parallel")
    _, out, err = run.wait(120)
    assert out == "" and "exited with code 1" in err  # (mlx.launch itself exits 0 whatever its ranks do)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {SMOLLM2}: {message.split(': ', 1)[1]}"]
    assert "pipeline parallel chosen" not in err


# -- the CLI under mlx.launch: rank 0 reads the input, the others follow its jobs (llama_mlx.lockstep)


class Launched:
    """`mlx.launch ... -- llama-mlx ARGS` in the background, its output in files. Its stdin stays open
    (mlx.launch forwards it to every rank, and at end of file it would spin on it)."""

    def __init__(self, out: Path, n: int, *args: str, stdin: str = ""):
        out.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = out / "launch.out", out / "launch.err"
        with open(self.out_path, "w") as o, open(self.err_path, "w") as e:
            self.proc = subprocess.Popen(launch_command(n, str(CLI), *args), stdin=subprocess.PIPE, stdout=o,
                                         stderr=e, env=ENV, cwd=ROOT, text=True)
        self.proc.stdin.write(stdin)
        self.proc.stdin.flush()

    def ranks(self) -> dict[int, int]:
        """{rank: pid} of the launcher's children (each rank's shell execs the command)."""
        found = {}
        try:
            for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
                for pid in (task / "children").read_text().split():
                    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                    rank = [int(v[9:]) for v in env if v.startswith(b"MLX_RANK=")]
                    if rank:
                        found[rank[0]] = int(pid)
        except OSError:  # it (or a rank) just ended
            pass
        return found

    def wait(self, timeout: float) -> tuple[int, str, str]:
        try:
            rc = self.proc.wait(timeout)
        finally:
            self.kill()
        return rc, self.out_path.read_text(), self.err_path.read_text()

    def kill(self) -> None:
        """Whatever still runs (after a failure): the ranks first, as the launcher does not outlive them."""
        if self.proc.poll() is None:
            for pid in self.ranks().values():
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.kill()
            self.proc.wait()
        self.proc.stdin.close()


CHAT_STATS = re.compile(r"[\d.]+s to first token · prompt (\d+) tok at [\d.]+ tok/s \((\d+) cached\) · (\d+) tok at "
                        r"[\d.]+ tok/s · context (\d+)/\d+")
CHAT_SCRIPT = "What is the capital of France?\nAnd of Italy?\n/undo\n/retry\n"


def chat_answers(stdout: str) -> list[tuple[str, tuple]]:
    """(answer, (prompt tokens, cached, generated, context)) for each answer: the line before its stats line."""
    lines = stdout.splitlines()
    return [(re.sub(r"^(>>> )+", "", lines[i - 1]), m.groups())
            for i, m in enumerate(CHAT_STATS.search(line) for line in lines) if m]


def chat_alone_and_launched(tmp_path: Path, args: list[str], launched: list[str], more: str):
    """CHAT_SCRIPT through `llama-mlx ARGS` alone, and through 2 ranks with `launched` options and
    `more` lines after it; both must exit 0. Returns (the single run, the ranks' stdout, stderr)."""
    run = Launched(tmp_path, 2, *args, *launched, stdin=CHAT_SCRIPT + more)
    try:
        single = subprocess.run([str(CLI), *args], input=CHAT_SCRIPT, capture_output=True, text=True, env=ENV,
                                cwd=ROOT, timeout=120)
        rc, out, err = run.wait(120)
    finally:
        run.kill()
    assert rc == 0 and "exited with code" not in err and "killed" not in err, err
    assert single.returncode == 0, single.stderr
    return single, out, err


def test_chat_two_ranks_pipeline_equals_single_process(tmp_path, tiny_chat):
    """Rank 0 reads the piped turns, /undo and /retry; every answer runs on both ranks (pipeline: each
    rank a half of the layers). Text and cache use equal the single-process chat's: the ranks agree on
    the prefix they reuse, so nothing is prefilled again on either. (The random model with SmolLM2's
    tokenizer and template: SmolLM2's own layers split in test_smollm2_pipeline_two_ranks_greedy_text_printed_once.)"""
    args = ["chat", "--model", str(tiny_chat), "--temp", "0", "--max-tokens", "5"]
    single, out, err = chat_alone_and_launched(tmp_path, args, ["--pipeline"], "/save talk\n/exit\n")
    expected = chat_answers(single.stdout)
    assert len(expected) == 3 and expected[0][0], single.stdout
    assert expected[2][0] == expected[0][0] and expected[2][1][0] == "1"  # /retry: all but one token cached
    assert chat_answers(out) == expected, out
    assert out.count("llama-mlx chat ·") == 1 and "split over 2 ranks (pipeline parallel)" in out  # rank 0 alone
    errors = [line for line in err.splitlines() if "error:" in line]
    assert errors == ["error: /save is not available under mlx.launch (each rank's KV cache holds only its shard)"]
    assert not (ROOT / "talk").exists()


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory) -> Path:
    """A random float32 model whose heads split in two (SmolLM2's do not), with SmolLM2's tokenizer
    and chat template, for the CLI's tensor-parallel chat."""
    from benchmarks.random_model import shape_config

    folder = tmp_path_factory.mktemp("tiny-chat")
    config = shape_config({**TINY, "vocab_size": 49152, "tie_word_embeddings": True})
    _random_float32(folder, config, seed=1)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        (folder / name).write_bytes((SMOLLM2 / name).read_bytes())
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_chat_two_ranks_tensor_parallel_equals_single_process(tmp_path, tiny_chat):
    """The chat split by tensor parallelism (each rank a half of every layer's heads and MLP) gives
    the single-process chat's answers and cache use through turns, /undo and /retry."""
    args = ["chat", "--model", str(tiny_chat), "--temp", "0", "--max-tokens", "6"]
    single, out, _ = chat_alone_and_launched(tmp_path, args, [], "/exit\n")
    expected = chat_answers(single.stdout)
    assert len(expected) == 3 and expected[2][1][1] != "0", single.stdout  # /retry reused the cache
    assert chat_answers(out) == expected, out
    assert out.count("llama-mlx chat ·") == 1 and "split over 2 ranks (tensor parallel)" in out


@pytest.mark.parametrize("mode", ["pipeline", "tensor"])
def test_serve_two_ranks_openai_client_then_sigterm(tmp_path, tiny_chat, mode):
    """`serve` under 2 ranks, by layers or by heads, of a random model with SmolLM2's tokenizer and
    template (the real model's layers split in test_chat_two_ranks_pipeline_equals_single_process):
    answers at temperature 0 (plain, streamed over a cached prefix, and after a stream the client
    dropped) equal the plain model's; SIGTERM to rank 0 ends every rank, exit 0."""
    import httpx2 as httpx
    import openai
    from test_server import free_port

    folder = tiny_chat
    model, tokenizer = load(folder, distributed=False)

    def oracle(messages):
        return generate(model, tokenizer, messages, max_tokens=6, sampler=make_sampler(0.0))

    first = [{"role": "user", "content": "What is the capital of France?"}]
    follow_up = [*first, {"role": "assistant", "content": oracle(first)}, {"role": "user", "content": "And of Italy?"}]
    expected = oracle(first), oracle(follow_up)
    port = free_port()
    run = Launched(tmp_path, 2, "serve", "--model", str(folder), "--port", str(port),
                   *(["--pipeline"] if mode == "pipeline" else []))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            assert run.proc.poll() is None, run.err_path.read_text()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        stats = httpx.get(url + "/v1/internal/stats").json()
        assert stats["ranks"] == 2 and stats["max_concurrency"] == 1 and not stats["batch"]["enabled"], stats
        oai = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        r = oai.chat.completions.create(model=folder.name, messages=first, temperature=0, max_tokens=6)
        assert r.choices[0].message.content == expected[0]
        chunks = list(oai.chat.completions.create(model=folder.name, messages=follow_up, temperature=0, max_tokens=6,
                                                  stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected[1]
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 30  # the first exchange, on both ranks
        dropped = oai.chat.completions.create(model=folder.name, temperature=0, max_tokens=200, stream=True,
                                              messages=[{"role": "user", "content": "Tell a long story."}])
        for i, _ in enumerate(dropped):
            if i == 2:
                break
        dropped.close()  # rank 0 sees the client gone and stops every rank at the same token
        r = oai.chat.completions.create(model=folder.name, messages=first, temperature=0, max_tokens=6)
        assert r.choices[0].message.content == expected[0]
        for _ in range(50):  # (the worker counts a job just after its last event went out)
            stats = httpx.get(url + "/v1/internal/stats").json()
            if stats["active"] == 0:
                break
            time.sleep(0.1)
        assert stats["completed"] == 3 and stats["cancelled"] == 1, stats
        ranks = run.ranks()
        assert sorted(ranks) == [0, 1]
        os.kill(ranks[0], signal.SIGTERM)
        rc, _, err = run.wait(60)
    finally:
        run.kill()
    assert rc == 0 and "exited with code" not in err and "killed" not in err, err
    assert "one request at a time, no batching across ranks" in err
    for pid in ranks.values():
        assert not Path(f"/proc/{pid}").exists()


@pytest.fixture(scope="module")
def tiny_nine_heads(tmp_path_factory) -> Path:
    """A random float32 model with SmolLM2's head counts (9 attention, 3 KV: no split in two) and its tokenizer."""
    from benchmarks.random_model import shape_config

    folder = tmp_path_factory.mktemp("tiny-nine")
    config = shape_config({**TINY, "hidden_size": 144, "num_hidden_layers": 2, "num_attention_heads": 9,
                           "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True})
    _random_float32(folder, config, seed=2)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        (folder / name).write_bytes((SMOLLM2 / name).read_bytes())
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_generate_two_ranks_picks_pipeline_by_itself(tmp_path, tiny_nine_heads):
    """No flag: SmolLM2's 9 heads (here on a random model of its head counts) do not split over 2 ranks,
    so its layers do; said once on stderr."""
    prompt = "The capital of France is"
    run = Launched(tmp_path, 2, "generate", "--model", str(tiny_nine_heads), "--raw", prompt, "--max-tokens", "6")
    rc, out, err = run.wait(120)
    assert rc == 0 and "exited with code" not in err, err
    model, tokenizer = load(tiny_nine_heads, distributed=False)
    assert out == generate(model, tokenizer, prompt, max_tokens=6, sampler=make_sampler(0.0)) + "\n"
    assert [line for line in err.splitlines() if "parallel" in line] == [
        "pipeline parallel chosen: tensor parallel over 2 ranks does not divide (9 attention heads and 3 KV heads "
        "must both divide by 2); each rank holds a range of the model's layers instead"]


def test_pipeline_flag_without_launch_is_refused_in_one_line():
    proc = subprocess.run([str(CLI), "generate", "--pipeline", "hi"], capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [(
        "error: --pipeline splits the model over the ranks of mlx.launch; this is one process: drop --pipeline, "
        "or start the command with mlx.launch (see 'llama-mlx generate --help')")]
    proc = subprocess.run([str(CLI), "chat", "--pipeline", "--tensor-parallel"], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "error: --pipeline and --tensor-parallel exclude each other: give one of them (see 'llama-mlx chat --help')"]
