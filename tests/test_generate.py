"""The generation engine against independent references: full forwards without a cache,
hand-built distributions, and Meta's reference `sample_top_p`."""

import mlx.core as mx
import numpy as np
import pytest
import torch

from llama_mlx.cache import PromptCache, make_prompt_cache
from llama_mlx.config import config_from_meta_params
from llama_mlx.generate import generate_step
from llama_mlx.model import Model, ModelArgs
from llama_mlx.sample import apply_min_p, apply_top_k, apply_top_p, make_sampler
from conftest import compiled_decode_steps
from oracles import TINY_META_PARAMS, greedy_without_cache, tiny_random_model

PARAMS = dict(TINY_META_PARAMS, dim=128)  # head_dim 32: also valid for a quantized KV cache


@pytest.fixture(scope="module")
def model():
    return tiny_random_model(PARAMS)


PROMPT = [int(t) for t in np.random.default_rng(11).integers(0, 256, size=9)]




@pytest.fixture(scope="module")
def reference(model):
    return greedy_without_cache(model, PROMPT, 64)


@pytest.mark.parametrize(
    "options",
    [
        {"compiled": True},
        {},
        {"max_kv_size": 128},  # rotating cache, window larger than prompt + answer
        {"prefill_step_size": 4},  # chunked prefill
        {"max_kv_size": 128, "prefill_step_size": 2},
    ],
    ids=["compiled", "uncompiled", "rotating", "chunked-prefill", "rotating-chunked"],
)
def test_greedy_equals_full_forward_loop(model, reference, options, monkeypatch):
    options = dict(options)
    if options.pop("compiled", False):
        compiled_decode_steps(monkeypatch)
    out = [t for t, _ in generate_step(mx.array(PROMPT), model, max_tokens=64, **options)]
    assert out == reference


def test_logprobs_are_normalised_log_softmax(model):
    _, logprobs = next(generate_step(mx.array(PROMPT), model, max_tokens=1))
    full = model(mx.array([PROMPT]))[0, -1]
    np.testing.assert_allclose(np.array(logprobs), np.array(full - mx.logsumexp(full)), atol=1e-5)


def test_quantized_kv_cache_stays_close(model):
    tokens = [int(t) for t in np.random.default_rng(3).integers(0, 256, size=40)]
    full = np.array(model(mx.array([tokens])))[0]
    cache = make_prompt_cache(len(model.layers), kv_bits=8, kv_group_size=32)
    got = [np.array(model(mx.array([tokens[:8]]), cache))[0]]
    got += [np.array(model(mx.array([[t]]), cache))[0] for t in tokens[8:]]
    err = np.abs(np.concatenate(got) - full).max() / np.abs(full).max()
    assert err < 0.1  # measured 0.078 of the largest logit: 8-bit keys and values, group 32


def test_quantized_kv_attention_equals_attention_over_dequantized_cache():
    from llama_mlx.cache import QuantizedKVCache

    cache = QuantizedKVCache(bits=4, group_size=32)
    q = mx.random.normal((1, 4, 3, 32), key=mx.random.key(0))  # 4 query heads share 2 KV heads
    k, v = (mx.random.normal((1, 2, 10, 32), key=mx.random.key(i)) for i in (1, 2))
    kq, vq = cache.update_and_fetch(k, v)
    got = cache.attention(q, kq, vq, 32**-0.5, "causal")
    kd, vd = (mx.dequantize(*t, group_size=32, bits=4) for t in (kq, vq))
    want = mx.fast.scaled_dot_product_attention(q, kd, vd, scale=32**-0.5, mask="causal")
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-5)


def test_rotating_cache_past_its_window_keeps_going(model):
    out = [t for t, _ in generate_step(mx.array(PROMPT), model, max_tokens=48, max_kv_size=24)]
    chunked = [t for t, _ in generate_step(mx.array(PROMPT), model, max_tokens=48, max_kv_size=24, prefill_step_size=3)]
    assert len(out) == 48 and out == chunked
    # Until the window fills, rotating equals plain.
    assert out[:24 - len(PROMPT)] == greedy_without_cache(model, PROMPT, 24 - len(PROMPT))


# --- prompt caches ---------------------------------------------------------------------------


def next_logits(model, cache, tokens):
    return np.array(model(mx.array([tokens]), cache)[0, -1])


def test_saved_prompt_cache_reloads_to_same_next_token_logits(model, tmp_path):
    history = PROMPT + [5, 17, 99, 3]
    pc = PromptCache(model)
    todo = pc.prepare(history + [42])
    assert todo == history + [42]
    model(mx.array([todo[:-1]]), pc.cache)
    pc.record(history)
    pc.save(tmp_path / "chat.safetensors", metadata={"note": "x"})

    loaded, meta = PromptCache.load(model, tmp_path / "chat.safetensors")
    assert meta == {"note": "x"} and loaded.tokens == history
    assert loaded.prepare(history + [42]) == [42]  # nothing but the new token is prefilled
    fresh = make_prompt_cache(len(model.layers))
    want = next_logits(model, fresh, history + [42])
    np.testing.assert_allclose(next_logits(model, loaded.cache, [42]), want, atol=1e-5)


@pytest.mark.parametrize("options", [{"max_kv_size": 128}, {"kv_bits": 8, "kv_group_size": 32}],
                         ids=["rotating", "quantized"])
def test_every_cache_kind_saves_and_reloads_through_its_state(model, tmp_path, options):
    history = PROMPT + [5, 17, 99, 3]
    pc = PromptCache(model, **options)
    model(mx.array([history]), pc.cache)
    pc.record(history)
    pc.save(tmp_path / "c.safetensors")
    loaded, meta = PromptCache.load(model, tmp_path / "c.safetensors")
    assert meta == {} and loaded.tokens == history and loaded.options == pc.options
    assert [type(c) for c in loaded.cache] == [type(c) for c in pc.cache]
    assert [c.meta_state for c in loaded.cache] == [c.meta_state for c in pc.cache]
    got = next_logits(model, loaded.cache, [42])
    np.testing.assert_allclose(got, next_logits(model, pc.cache, [42]), atol=1e-5)
    if "max_kv_size" in options:  # inside its window, a rotating cache is exact: the full forward is the oracle
        np.testing.assert_allclose(got, np.array(model(mx.array([history + [42]]))[0, -1]), atol=1e-4)


def test_compiled_step_writes_the_cache_through_its_public_api(model):
    from llama_mlx import backends

    cache = make_prompt_cache(len(model.layers))
    step = backends.CompiledStep(model, cache, backends.MaskedDecoder)
    assert step.kind == "compiled"
    model(mx.array([PROMPT]), cache)
    logits = step(mx.array([[7]]))
    assert cache[0].offset == len(PROMPT) + 1 and cache[0].keys is not None
    want = model(mx.array([PROMPT + [7]]))[:, -1, :]
    np.testing.assert_allclose(np.array(logits), np.array(want), atol=1e-4)
    # Prompt caches of other kinds, and the CPU row, run the model's own graph.
    assert backends.decode_step(model, make_prompt_cache(len(model.layers), max_kv_size=64)).kind == "graph"
    assert backends.decode_step(model, cache).kind == "graph"


def test_a_compiled_step_never_keeps_its_model_alive(monkeypatch):
    import gc
    import weakref

    from llama_mlx.backends import GRAPHS

    m = Model(ModelArgs.from_dict(config_from_meta_params(PARAMS)))
    mx.eval(m.parameters())
    before = len(GRAPHS)
    compiled_decode_steps(monkeypatch)
    out = [t for t, _ in generate_step(mx.array(PROMPT), m, max_tokens=4)]
    assert len(out) == 4 and len(GRAPHS) == before + 1
    assert not [k for k in vars(m) if "decode" in k]  # nothing hung on the model
    ref = weakref.ref(m)
    del m
    gc.collect()
    assert ref() is None and len(GRAPHS) == before


def test_the_rows_step_runs_the_decode(model, reference, monkeypatch):
    from llama_mlx import backends

    cache = make_prompt_cache(len(model.layers))
    calls = []
    row_step = backends.decode_step

    def decode_step(m, c):
        inner = row_step(m, c)

        def step(tokens):
            calls.append(tokens.shape)
            return inner(tokens)

        return step

    monkeypatch.setattr(backends, "decode_step", decode_step)
    out = [t for t, _ in generate_step(mx.array(PROMPT), model, max_tokens=8, prompt_cache=cache)]
    assert out == reference[:8] and calls == [(1, 1)] * 8


def test_a_cache_left_inconsistent_by_an_interrupt_starts_over(model):
    pc = PromptCache(model)
    model(mx.array([PROMPT]), pc.cache)
    pc.cache[-1].trim(3)  # as if a Ctrl-C landed between two layers of a forward pass
    pc.record(PROMPT)
    assert pc.tokens == [] and pc.offset == 0
    assert pc.prepare(PROMPT) == PROMPT


def test_keep_prefix_cuts_back_to_the_shared_tokens(model):
    pc = PromptCache(model)
    model(mx.array([PROMPT]), pc.cache)
    pc.record(PROMPT)
    assert pc.keep_prefix(PROMPT[:4] + [0, 0]) == 4 and pc.offset == 4 and pc.tokens == PROMPT[:4]


def test_trim_then_regenerate_equals_generating_from_shorter_prompt(model):
    pc = PromptCache(model)
    long_prompt = PROMPT + [1, 2, 3, 4, 5, 6]
    model(mx.array([pc.prepare(long_prompt + [7])[:-1]]), pc.cache)
    pc.record(long_prompt)
    assert pc.trim(6) == 6 and pc.tokens == PROMPT and pc.offset == len(PROMPT)
    todo = pc.prepare(PROMPT)  # the last prompt token must be re-run for its logits
    assert todo == PROMPT[-1:] and pc.offset == len(PROMPT) - 1
    out = [t for t, _ in generate_step(mx.array(todo), model, max_tokens=32, prompt_cache=pc.cache)]
    assert out == greedy_without_cache(model, PROMPT, 32)


# --- sampling --------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible(model):
    def run(seed):
        sampler = make_sampler(temp=1.0, top_p=0.95, seed=seed)
        return [t for t, _ in generate_step(mx.array(PROMPT), model, max_tokens=24, sampler=sampler)]

    assert run(3) == run(3)
    assert run(3) != run(4)


def hand_built_logprobs():
    probs = np.array([[0.40, 0.25, 0.15, 0.10, 0.05, 0.03, 0.02]], dtype=np.float32)
    perm = np.array([3, 0, 6, 1, 5, 2, 4])  # shuffled so order is not a hint
    return mx.log(mx.array(probs[:, perm])), perm


@pytest.mark.parametrize(
    "kwargs, allowed_ranks",
    [
        ({"top_k": 2}, {0, 1}),
        ({"top_p": 0.7}, {0, 1, 2}),  # 0.40 + 0.25 < 0.7: the third is needed
        ({"top_p": 0.6}, {0, 1}),  # 0.40 + 0.25 passes 0.6
        ({"min_p": 0.3}, {0, 1, 2}),  # p >= 0.3 * 0.40 = 0.12
        ({"top_k": 3, "min_p": 0.5}, {0, 1}),
    ],
)
def test_filters_never_sample_outside_the_allowed_set(kwargs, allowed_ranks):
    logprobs, perm = hand_built_logprobs()
    allowed = {int(np.where(perm == r)[0][0]) for r in allowed_ranks}
    sampler = make_sampler(temp=5.0, seed=0, **kwargs)  # hot: without filters, all would appear
    draws = [int(sampler(logprobs)[0]) for _ in range(400)]
    assert set(draws) == allowed
    unfiltered = make_sampler(temp=5.0, seed=0)
    assert len({int(unfiltered(logprobs)[0]) for _ in range(400)}) == 7


def test_filter_functions_match_definitions():
    logprobs, perm = hand_built_logprobs()
    kept = lambda lp: set(np.where(np.isfinite(np.array(lp))[0])[0].tolist())
    rank = {int(np.where(perm == r)[0][0]): r for r in range(7)}
    assert {rank[i] for i in kept(apply_top_k(logprobs, 3))} == {0, 1, 2}
    assert {rank[i] for i in kept(apply_top_p(logprobs, 0.85))} == {0, 1, 2, 3}
    assert {rank[i] for i in kept(apply_min_p(logprobs, 0.2))} == {0, 1, 2, 3}


def test_meta_order_matches_meta_sample_top_p():
    from llama.generation import sample_top_p

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 50)).astype(np.float32) * 3
    temperature, top_p = 0.6, 0.9
    for row in range(6):
        key = mx.random.key(row)
        u = float(mx.random.uniform(shape=(1,), key=mx.random.split(key)[1])[0])

        # Meta's function, with multinomial's draw made with the same uniform number u.
        def multinomial(p, num_samples):
            cdf = torch.cumsum(p, -1)
            return (cdf <= u * cdf[..., -1:]).sum(-1, keepdim=True).clamp(max=p.shape[-1] - 1)

        probs = torch.softmax(torch.tensor(logits[row : row + 1]) / temperature, dim=-1)
        original = torch.multinomial
        torch.multinomial = multinomial
        try:
            want = int(sample_top_p(probs, top_p)[0, 0])
        finally:
            torch.multinomial = original
        sampler = make_sampler(temp=temperature, top_p=top_p, order="meta", seed=row)
        lp = mx.array(logits[row : row + 1])
        got = int(sampler(lp - mx.logsumexp(lp, axis=-1, keepdims=True))[0])
        assert got == want


# --- stop conditions, with Meta's real tokenizer and a scripted model output -----------------


@pytest.fixture(scope="module")
def llama3(tokenizer_model_path):
    from llama_mlx.tokenizer import Llama3Tokenizer

    return Llama3Tokenizer(tokenizer_model_path)


@pytest.fixture(scope="module")
def big_vocab_model():
    params = dict(TINY_META_PARAMS, vocab_size=128256)
    m = Model(ModelArgs.from_dict(config_from_meta_params({**params, "use_scaled_rope": False})))
    m.args.max_position_embeddings = 48  # a tiny context, to reach its end
    mx.eval(m.parameters())
    return m


def scripted(script: list[int], prompt_len: int):
    """A logits processor that forces the model to emit `script`, one token per step."""

    def process(tokens, logits):
        i = tokens.size - prompt_len
        forced = mx.full(logits.shape, -1e9, logits.dtype)
        return forced.at[:, script[min(i, len(script) - 1)]].add(2e9)

    return process


def run(model, tok, script, prompt="Hi", **kwargs):
    from llama_mlx.generate import stream_generate

    ids = tok.encode(prompt, bos=True)
    responses = list(stream_generate(model, tok, ids, logits_processors=[scripted(script, len(ids))], **kwargs))
    return responses


def test_stop_token_ends_with_reason_stop_and_no_stop_text(big_vocab_model, llama3):
    script = llama3.encode("Paris is lovely.") + [llama3.special_tokens["<|eot_id|>"]] + llama3.encode(" more")
    out = run(big_vocab_model, llama3, script, max_tokens=20)
    assert out[-1].finish_reason == "stop"
    assert "".join(r.text for r in out) == "Paris is lovely."
    assert all(r.finish_reason is None for r in out[:-1])


@pytest.mark.parametrize("stop_id", ["<|eom_id|>", "<|end_of_text|>"])
def test_other_llama3_stop_tokens(big_vocab_model, llama3, stop_id):
    script = llama3.encode("ok") + [llama3.special_tokens[stop_id]]
    out = run(big_vocab_model, llama3, script, max_tokens=10)
    assert out[-1].finish_reason == "stop" and "".join(r.text for r in out) == "ok"


def test_stop_string_split_across_tokens_is_never_streamed(big_vocab_model, llama3):
    text = "alpha beta###END gamma"
    script = llama3.encode(text)
    # The stop string spans several tokens: check the split really is across tokens.
    pieces = [llama3.decode([t]) for t in script]
    assert "###END" not in pieces and any(p.endswith("#") for p in pieces)
    out = run(big_vocab_model, llama3, script, max_tokens=20, stop=["###END"])
    streamed = [r.text for r in out]
    assert "".join(streamed) == "alpha beta"
    assert all("#" not in s for s in streamed)
    assert out[-1].finish_reason == "stop"


def test_partial_stop_string_is_released_when_it_does_not_complete(big_vocab_model, llama3):
    script = llama3.encode("a##b and more")
    out = run(big_vocab_model, llama3, script, max_tokens=len(script), stop=["###"])
    assert "".join(r.text for r in out) == "a##b and more"
    assert out[-1].finish_reason == "length"


def test_max_tokens_gives_reason_length(big_vocab_model, llama3):
    out = run(big_vocab_model, llama3, llama3.encode(" one two three four five six"), max_tokens=3)
    assert len(out) == 3 and out[-1].finish_reason == "length"


def test_context_limit(big_vocab_model, llama3):
    from llama_mlx.errors import ContextLengthError

    with pytest.raises(ContextLengthError, match="48"):
        run(big_vocab_model, llama3, [1], prompt="word " * 60)
    ids = llama3.encode("Hi", bos=True)
    out = run(big_vocab_model, llama3, llama3.encode(" go" * 100), max_tokens=500)
    assert out[-1].finish_reason == "context"
    assert len(ids) + len(out) == 48


def test_smollm2_greedy_matches_mlx_lm_token_for_token(smollm2_gguf_path, tmp_path_factory):
    import mlx_lm
    from mlx_lm.generate import generate_step as mlx_lm_generate_step

    from llama_mlx import load
    from llama_mlx.convert import convert

    folder = tmp_path_factory.mktemp("smollm2") / "SmolLM2-f32"
    # float32 scales: mlx-lm then computes in float32 as we do on the CPU, so ties cannot differ.
    convert(smollm2_gguf_path, folder, dtype="float32")
    ours, tokenizer = load(folder)
    theirs, their_tokenizer = mlx_lm.load(str(folder))
    # A brief system prompt in place of SmolLM2's default one: 13 fewer tokens to prefill, twice.
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours of the rainbow."}]
    ids = tokenizer.apply_chat_template(messages)
    assert ids == their_tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    # 10 tokens: each costs ~0.3 s per runtime on this CPU; the answer's first words already differ at a tie.
    want = [t for t, _ in mlx_lm_generate_step(mx.array(ids), theirs, max_tokens=10)]
    got = [t for t, _ in generate_step(mx.array(ids), ours, max_tokens=10)]
    assert got == want
    assert len(set(got)) > 5  # a real answer, not a degenerate loop
