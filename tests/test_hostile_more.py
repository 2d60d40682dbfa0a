"""Hostile files and absurd values, second battery (issue 12, classes 6, 7, 8 and 10): bombs, hub cache
escapes, silent garbage, errors that were not named. Helpers from test_hostile."""

from __future__ import annotations

import json
import math
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from llama_mlx.checkpoints import read_checkpoint
from llama_mlx.errors import CheckpointError
from test_hostile import (
    assert_bounded_error,
    gguf_string,
    llama_kvs,
    run_bounded,
)

ALIGN = 32
# GGML type ids and (elements, bytes) per block
TYPES = {"F32": (0, 1, 4), "F16": (1, 1, 2), "Q8_0": (8, 32, 34), "Q4_K": (12, 256, 144)}


def _nbytes(kind: str, shape) -> int:
    _, per, nbytes = TYPES[kind]
    return math.prod(shape) // per * nbytes


def write_gguf(path: Path, tensors: list[tuple[str, tuple, str, int]], data: bytes, kvs=None) -> Path:
    """A GGUF with `tensors` (name, numpy shape, type, offset into the data section) and `data`."""
    kvs = llama_kvs() if kvs is None else kvs
    table = b""
    for name, shape, kind, offset in tensors:
        table += gguf_string(name) + struct.pack("<I", len(shape)) + b"".join(
            struct.pack("<Q", d) for d in reversed(shape)) + struct.pack("<IQ", TYPES[kind][0], offset)
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)) + b"".join(kvs) + table
    head += b"\0" * (-len(head) % ALIGN)
    path.write_bytes(head + data)
    return path


def tiled(tensors: list[tuple[str, tuple, str]]) -> tuple[list, int]:
    """Offsets of `tensors` laid end to end as llama.cpp writes them, and the data size."""
    out, at = [], 0
    for name, shape, kind in tensors:
        out.append((name, shape, kind, at))
        at += (_nbytes(kind, shape) + ALIGN - 1) // ALIGN * ALIGN
    return out, at


# 6. Bombs: GGUF tensors tile the data section ------------------------------------------------------------

def test_gguf_tensors_sharing_bytes_are_refused(tmp_path):
    shape = (8, 256)
    n = _nbytes("Q4_K", shape)
    path = write_gguf(tmp_path / "shared.gguf", [(f"blk.{i}.ffn_up.weight", shape, "Q4_K", 0) for i in range(3)],
                      b"\0" * n)
    with pytest.raises(CheckpointError, match="overlaps the tensor before it") as e:
        read_checkpoint(path)
    assert str(path) in str(e.value)


def test_gguf_f32_bytes_in_an_f16_slot_are_refused(tmp_path):
    # F16 declared, F32 written (twice the bytes): the next tensor starts past the F16 slot
    a = np.ones((4, 32), np.float32).tobytes()
    tensors = [("a.weight", (4, 32), "F16", 0), ("b.weight", (4, 32), "F32", len(a))]
    path = write_gguf(tmp_path / "f32.gguf", tensors, a + a)
    with pytest.raises(CheckpointError, match="leaves a gap") as e:
        read_checkpoint(path)
    assert "b.weight" in str(e.value)
    # ... or, the last tensor, bytes left over at the end of the file
    path = write_gguf(tmp_path / "last.gguf", [("a.weight", (4, 32), "F16", 0)], a)
    with pytest.raises(CheckpointError, match="bytes follow the last tensor 'a.weight'"):
        read_checkpoint(path)


BOMB_CHILD = """
from llama_mlx.checkpoints import read_checkpoint
def load():
    ckpt = read_checkpoint(sys.argv[1])
    held = [t.read() for t in ckpt.tensors.values()]
report(load)
"""


def bomb_gguf(path: Path, layers: int) -> Path:
    """A consistent Llama GGUF (hidden 2048) whose every quantized tensor is the same 2.4 MB of Q4_K blocks."""
    hidden = 2048
    kvs = llama_kvs(**{"llama.embedding_length": hidden, "llama.attention.head_count": 16,
                       "llama.block_count": layers, "llama.feed_forward_length": hidden})
    square = (hidden, hidden)
    tensors = [("token_embd.weight", (256, hidden), "Q4_K", 0), ("output.weight", (256, hidden), "Q4_K", 0),
               ("output_norm.weight", (hidden,), "F32", 0)]
    for i in range(layers):
        tensors += [(f"blk.{i}.{m}.weight", square, "Q4_K", 0)
                    for m in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")]
        tensors += [(f"blk.{i}.{m}.weight", (hidden,), "F32", 0) for m in ("attn_norm", "ffn_norm")]
    return write_gguf(path, tensors, b"\0" * _nbytes("Q4_K", square), kvs)


def test_a_small_gguf_whose_layers_share_bytes_loads_in_bounded_memory(tmp_path):
    # 32 layers of seven 2048x2048 Q4_K matrices over the same 2.4 MB: 600 MB of weights from a 2.4 MB file
    path = bomb_gguf(tmp_path / "bomb.gguf", 32)
    assert path.stat().st_size < 3 << 20
    result = run_bounded(BOMB_CHILD, path)
    assert_bounded_error(result, "CheckpointError", str(path), "overlaps", seconds=10)


# 6. Bombs: templates whose filters would make gigabytes, or chains that run for seconds ------------------

SHARED = "{% set a = 'x' * 4000000 %}{% set l = [a] * 300 %}"  # 300 references to one 4 MB text


@pytest.mark.parametrize("template", [
    SHARED + "{{ l|join }}",
    SHARED + "{{ l|tojson }}",
    SHARED + "{{ l|string }}",
    SHARED + "{{ l }}",
    SHARED + "{{ 'y' ~ l }}",
    SHARED + "{{ ''.join(l) }}",
    SHARED + "{{ {'k': l}|tojson(indent=2) }}",
    SHARED + "{{ l|map('upper')|join }}",
])
def test_template_filters_check_their_output_size_before_making_it(template):
    result = run_bounded(TEMPLATE_TEXT_CHILD, template)
    assert_bounded_error(result, "ChatTemplateLimitError", "chat template", "past the size bound", seconds=8)
    assert result["maxrss_mb"] < 200, result  # the 1.2 GB text is never made


TEMPLATE_TEXT_CHILD = """
from llama_mlx.tokenizer.chat_template import render_chat_template
report(lambda: render_chat_template(sys.argv[1], [{"role": "user", "content": "hi"}], True))
"""


def test_a_filter_chain_stops_at_the_time_bound(monkeypatch):
    from llama_mlx.errors import ChatTemplateLimitError
    from llama_mlx.tokenizer import chat_template

    monkeypatch.setattr(chat_template, "MAX_SECONDS", 1.0)  # the bound is checked inside the filters too

    template = "{% for i in range(300) %}{{ (range(60000)|list)|sort(reverse=true)|first }}{% endfor %}"
    t0 = time.monotonic()
    with pytest.raises(ChatTemplateLimitError, match="seconds"):
        chat_template.render_chat_template(template, [{"role": "user", "content": "hi"}], True)
    assert time.monotonic() - t0 < 3  # each sort takes ~50 ms; unbounded, 300 take 20 s


def test_ordinary_filters_still_render():
    from llama_mlx.tokenizer.chat_template import render_chat_template

    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    out = render_chat_template("{{ messages|map(attribute='content')|join(', ') }}|{{ messages[0]|tojson }}|"
                               "{{ messages|length }}|{{ [1, 2]|string }}", messages, False)
    assert out == 'hi, yo|{"role": "user", "content": "hi"}|2|[1, 2]'


# 6. Bombs: saved sessions (size cap, linear trimming) ---------------------------------------------------

def _session(context: int, tokenizer):
    from types import SimpleNamespace

    from llama_mlx.chat import ChatSession

    model = SimpleNamespace(layers=[None] * 2, args=SimpleNamespace(max_position_embeddings=context))
    return ChatSession(model, tokenizer, system="Be brief.", max_tokens=16)


def _reference_fit(session) -> int:
    """fit as it was: drop the oldest exchange and encode the whole conversation again, until it fits."""
    limit, start, dropped = session.context_limit, session._first_turn(), 0
    reserve = min(session.max_tokens, limit // 2)
    while True:
        n = len(session.tokenizer.apply_chat_template(session.messages, add_generation_prompt=True))
        if n + reserve <= limit or len(session.messages) - start <= 1:
            return dropped
        del session.messages[start]
        if len(session.messages) - start > 1 and session.messages[start]["role"] == "assistant":
            del session.messages[start]
        dropped += 1


@pytest.fixture(scope="module")
def llama3_tokenizer():
    import assets
    from llama_mlx.tokenizer import load_tokenizer

    return load_tokenizer(assets.TOKENIZER_JSON)


def test_trimming_a_long_session_encodes_it_a_logarithmic_number_of_times(llama3_tokenizer):
    tok = llama3_tokenizer
    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(150):
        messages += [{"role": "user", "content": f"question {i} " * (1 + i % 7)},
                     {"role": "assistant", "content": f"answer {i}"}]
    messages.append({"role": "user", "content": "last?"})
    for context in (300, 1500):
        session = _session(context, tok)
        session.messages = [dict(m) for m in messages]
        session._rebuild()
        calls = []
        real = tok.apply_chat_template

        def counting(*args, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)

        tok.apply_chat_template = counting
        try:
            dropped = session.fit()
        finally:
            del tok.apply_chat_template
        reference = _session(context, tok)
        reference.messages = [dict(m) for m in messages]
        assert dropped == _reference_fit(reference), context
        assert session.messages == reference.messages
        assert len(session.prompt_tokens()) + 16 <= context
        assert len(calls) < 40, (context, len(calls))  # was one encode of the whole conversation per drop


def test_a_session_file_past_the_size_cap_is_refused_unread(tmp_path, monkeypatch, llama3_tokenizer):
    from llama_mlx import chat
    from llama_mlx.chat import SessionFileError

    monkeypatch.setattr(chat, "MAX_SESSION_BYTES", 4096)
    path = tmp_path / "big.json"
    path.write_text(json.dumps({"format": chat.SESSION_FORMAT, "messages": [{"role": "user", "content": "x" * 8000}]}))
    with pytest.raises(SessionFileError, match="larger than") as e:
        _session(4096, llama3_tokenizer).load(path)
    assert str(path) in str(e.value)


# 10. Errors that were not named ---------------------------------------------------------------------------

def test_a_session_nested_100k_deep_is_a_named_error(tmp_path, llama3_tokenizer):
    from llama_mlx.chat import SessionFileError

    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(SessionFileError, match="nested too deep") as e:
        _session(4096, llama3_tokenizer).load(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("block, end, depth", [("{% if true %}", "{% endif %}", 120),
                                               ("{% for i in [1] %}", "{% endfor %}", 25)])
def test_templates_nested_past_pythons_limits_are_named(block, end, depth):
    from llama_mlx.errors import ChatTemplateLimitError
    from llama_mlx.tokenizer.chat_template import render_chat_template

    with pytest.raises(ChatTemplateLimitError, match="nests too deep"):
        render_chat_template(block * depth + "x" + end * depth, [{"role": "user", "content": "hi"}], True)


# 7. Hub cache escapes ---------------------------------------------------------------------------------------

HUB_CHILD = """
import json, sys
try:
    from llama_mlx.hub import resolve
    print(json.dumps({"path": str(resolve(sys.argv[1]))}))
except Exception as e:
    print(json.dumps({"error": type(e).__name__, "message": str(e)}))
"""


def _resolve_offline(hf_home: Path, repo_id: str) -> dict:
    import os
    import subprocess
    import sys

    from test_hostile import REPO

    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", HUB_CHILD, repo_id], capture_output=True, text=True, env=env,
                          timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def hub_repo(tmp_path):
    from test_hostile import write_tiny_hf
    from test_hub import lay_out_repo

    tiny = write_tiny_hf(tmp_path / "tiny")
    snapshot = lay_out_repo(tmp_path / "hf", "org/tiny",
                            {n: tiny / n for n in ("config.json", "model.safetensors", "tokenizer.json")})
    assert _resolve_offline(tmp_path / "hf", "org/tiny") == {"path": str(snapshot)}
    return tmp_path / "hf", snapshot


@pytest.mark.parametrize("ref", ["..", "../../models--org--other/snapshots/" + "a" * 40, "main-but-not-a-hash"])
def test_a_ref_that_is_not_a_commit_hash_is_refused(hub_repo, ref):
    hf_home, snapshot = hub_repo
    repo = snapshot.parent.parent
    other = hf_home / "hub" / "models--org--other" / "snapshots" / ("a" * 40)
    other.mkdir(parents=True)
    (repo / "snapshots" / ref).mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(ref)
    result = _resolve_offline(hf_home, "org/tiny")
    assert result.get("error") == "HubError" and "not a commit snapshot" in result["message"], result


def test_a_snapshot_file_linked_outside_the_repos_blobs_is_refused(hub_repo, tmp_path):
    hf_home, snapshot = hub_repo
    outside = tmp_path / "outside.json"
    outside.write_text((snapshot / "config.json").read_text())
    (snapshot / "config.json").unlink()
    (snapshot / "config.json").symlink_to(outside)
    result = _resolve_offline(hf_home, "org/tiny")
    assert result.get("error") == "HubError" and "outside its repository's blobs" in result["message"], result
    assert str(snapshot / "config.json") in result["message"]


# 8. Silent garbage: sampling options ---------------------------------------------------------------------

@pytest.mark.parametrize("values, name", [
    ({"presence_penalty": float("nan")}, "presence_penalty"),
    ({"frequency_penalty": float("inf")}, "frequency_penalty"),
    ({"repetition_penalty": float("nan")}, "repetition_penalty"),
    ({"temp": float("nan")}, "temperature"),
    ({"top_p": float("-inf")}, "top_p"),
    ({"logit_bias": {3: float("nan")}}, "logit_bias"),
])
def test_non_finite_sampling_parameters_are_argument_errors(values, name):
    from llama_mlx.errors import ArgumentError
    from llama_mlx.sample import SamplingParams, make_penalties, make_repetition_penalty

    with pytest.raises(ArgumentError, match=name):
        SamplingParams(**values)
    with pytest.raises(ArgumentError, match=name):
        SamplingParams.from_dict(values)
    with pytest.raises(ArgumentError):
        make_penalties(float("nan"), 0.0)
    with pytest.raises(ArgumentError):
        make_repetition_penalty(float("nan"))


def test_tiny_temperatures_sample_greedily():
    import mlx.core as mx

    from llama_mlx.sample import SamplingParams, make_sampler

    logits = mx.array([[0.0, 1.0, 0.5, -2.0]])
    for temp in (1e-300, 1e-30, 1e-6):
        sampler = make_sampler(temp, seed=0)
        assert sampler.greedy, temp
        assert SamplingParams(temp=temp).greedy
        assert [int(sampler(logits)[0]) for _ in range(5)] == [1] * 5
    assert not make_sampler(0.5, seed=0).greedy


# 8. Silent garbage: non-finite block scales ---------------------------------------------------------------

@pytest.mark.parametrize("kind, at, value", [("Q8_0", 0, np.nan), ("Q8_0", 0, np.inf), ("Q4_K", 0, np.inf),
                                             ("Q4_K", 2, -np.inf), ("Q6_K", 208, np.nan)])
def test_non_finite_block_scales_are_refused_naming_the_tensor(tmp_path, kind, at, value):
    from llama_mlx.checkpoints import gguf_quants
    from llama_mlx.checkpoints.gguf_lazy import gguf_tensors
    from llama_mlx.gguf_file import GGUFTensorInfo

    per, nbytes = gguf_quants.BLOCKS[kind]
    shape = (4, 2 * per)
    blocks = np.random.default_rng(0).integers(0, 256, (8, nbytes), dtype=np.uint8)
    for b in blocks:  # finite scales everywhere ...
        b[at:at + 2] = np.frombuffer(np.float16(0.5).tobytes(), np.uint8)
        if kind == "Q4_K":
            b[2:4] = np.frombuffer(np.float16(0.25).tobytes(), np.uint8)
        if kind == "Q6_K":
            b[208:210] = np.frombuffer(np.float16(0.5).tobytes(), np.uint8)
    blocks[5, at:at + 2] = np.frombuffer(np.float16(value).tobytes(), np.uint8)  # ... but in block 5
    path = tmp_path / "w.bin"
    path.write_bytes(blocks.tobytes())
    info = GGUFTensorInfo("blk.0.ffn_up.weight", shape, kind, 0)
    tensors = gguf_tensors(path, info, "model.layers.0.mlp.up_proj.weight")
    with pytest.raises(CheckpointError, match="NaN or infinite scale") as e:
        tensors["model.layers.0.mlp.up_proj.weight"].read()
    assert "blk.0.ffn_up.weight" in str(e.value) and str(path) in str(e.value) and "block 5" in str(e.value)
    blocks[5, at:at + 2] = blocks[4, at:at + 2]
    path.write_bytes(blocks.tobytes())
    tensors = gguf_tensors(path, info, "model.layers.0.mlp.up_proj.weight")
    assert tensors["model.layers.0.mlp.up_proj.weight"].read().shape[0] == 4  # finite: reads
