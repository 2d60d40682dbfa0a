"""The backend table: a row forced by LLAMA_MLX_BACKEND, and the Metal row's wired memory as mlx-lm sets it."""

import os

import mlx.core as mx
import pytest

from llama_mlx import backends
from llama_mlx.errors import ArgumentError
from llama_mlx.generate import stream_generate
from oracles import TINY_META_PARAMS, greedy_without_cache, tiny_random_model
from test_cli_errors import assert_one_line_error, run

RECOMMENDED = 48 << 30


@pytest.fixture
def wiring(monkeypatch):
    """A device that recommends a working set (as Metal's does), with `mx.set_wired_limit` recorded."""
    calls, limit = [], [5 << 30]

    def set_wired_limit(n):
        calls.append(n)
        old, limit[0] = limit[0], n
        return old

    info = mx.device_info()
    monkeypatch.setattr(mx, "device_info", lambda: dict(info, max_recommended_working_set_size=RECOMMENDED))
    monkeypatch.setattr(mx, "set_wired_limit", set_wired_limit)
    return calls


def test_the_metal_row_wires_memory_as_mlx_lm_does(wiring, backend_row):
    from mlx_lm.generate import wired_limit as mlx_lm_wired_limit

    model = tiny_random_model(TINY_META_PARAMS)
    with mlx_lm_wired_limit(model):
        inside = list(wiring)
    want = list(wiring)
    wiring.clear()
    backend_row("metal")
    with backends.wired_limit(model):
        assert wiring == inside == [RECOMMENDED]
    assert wiring == want == [RECOMMENDED, 5 << 30]


@pytest.mark.parametrize("row, wired", [("metal", True), ("cpu", False), ("cuda", False)])
def test_stream_generate_wires_memory_on_the_metal_row_alone(wiring, backend_row, tiny_meta, row, wired):
    """Under the Metal row (run here on the CPU: fused projections, the model's graph) the answer is
    cache-free greedy decoding's, generated with the limit raised, and the limit is restored."""
    model, tokenizer = tiny_meta
    backend_row(row)
    ids = tokenizer.encode("The capital of France is", bos=True)
    tokens, during = [], []
    for r in stream_generate(model, tokenizer, ids, 6):
        tokens.append(r.token)
        during.append(list(wiring))
    assert tokens == greedy_without_cache(model, ids, 6)[: len(tokens)] and len(tokens) >= 3
    assert during[0] == ([RECOMMENDED] if wired else [])
    assert wiring == ([RECOMMENDED, 5 << 30] if wired else [])


@pytest.fixture(scope="module")
def tiny_meta(tiny_meta_checkpoint):
    import llama_mlx

    return llama_mlx.load(tiny_meta_checkpoint)


def test_the_env_var_forces_a_row(monkeypatch):
    for name, row in (("metal", backends.METAL), ("cpu", backends.CPU), ("CUDA", backends.CUDA)):
        monkeypatch.setenv("LLAMA_MLX_BACKEND", name)
        assert backends.current() is row
    monkeypatch.delenv("LLAMA_MLX_BACKEND")
    assert backends.current() is backends.CPU  # this machine's own
    monkeypatch.setenv("LLAMA_MLX_BACKEND", "tpu")
    with pytest.raises(ArgumentError, match="LLAMA_MLX_BACKEND"):
        backends.current()
    with pytest.raises(ArgumentError, match="unknown backend"):
        backends.use("tpu")


def test_an_unknown_backend_is_one_line_from_the_cli(monkeypatch):
    monkeypatch.setenv("LLAMA_MLX_BACKEND", "tpu")
    assert os.environ["LLAMA_MLX_BACKEND"] == "tpu"
    assert_one_line_error(run("generate", "-m", "1", "hi"), 1, "LLAMA_MLX_BACKEND", "tpu")


def test_prompt_lookup_is_on_by_default_where_the_row_says(backend_row):
    """chat and single-stream serve draft by prompt lookup by default on GPU rows (a failed check
    costs about a step there), not on the CPU's (a check of k + 1 positions costs ~k + 1 steps);
    --prompt-lookup 0 turns it off."""
    from llama_mlx_cli.common import DEFAULT_PROMPT_LOOKUP, GenerationOptions, default_prompt_lookup

    for name, want in (("cpu", None), ("metal", DEFAULT_PROMPT_LOOKUP), ("cuda", DEFAULT_PROMPT_LOOKUP)):
        backend_row(name)
        assert default_prompt_lookup() == want, name
        assert backends.lookup_by_default() == (want is not None)
    assert backends.CPU.check_cost > 5 * backends.METAL.check_cost
    assert GenerationOptions(prompt_lookup=0).speculative_kwargs() == {}
    assert GenerationOptions(prompt_lookup=3).speculative_kwargs()["prompt_lookup"] == 3
