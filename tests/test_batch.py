"""Continuous batching against independent paths: each batched sequence must equal the same request
run alone, by `stream_generate` / `generate` on real SmolLM2 and by full no-cache forwards on a tiny
random float32 model, with sequences joining mid-stream, leaving at different steps, and waiting
under a KV memory cap."""

import mlx.core as mx
import numpy as np
import pytest

import llama_mlx
from llama_mlx import LlamaMLXError, batch_generate
from llama_mlx.batch import BatchEngine, KVCapacityError
from llama_mlx.cache import BatchKVCache
from llama_mlx.cache import KVCache
from llama_mlx.generate import generate, stream_generate
from llama_mlx.sample import make_logits_processors, make_sampler
from oracles import TINY_META_PARAMS, greedy_without_cache, tiny_random_model

SMOLLM2 = "weights/SmolLM2-135M-Instruct"
CHUNK = 8  # small prefill chunks, so a newcomer's prefill spans several of the others' decode steps


@pytest.fixture(scope="module")
def smol():
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / SMOLLM2
    model, tokenizer = llama_mlx.load(path)
    return model, tokenizer


@pytest.fixture(scope="module")
def tiny():
    return tiny_random_model(dict(TINY_META_PARAMS, dim=128))


def rand_ids(seed, n):
    return [int(t) for t in np.random.default_rng(seed).integers(0, 256, size=n)]


def test_batch_cache_rows_see_what_they_would_alone(tiny):
    """One batched step over rows of lengths 0, 3 and 11 gives each row the logits of its own
    cache-free forward (float32: to rounding)."""
    prompts = [rand_ids(1, 1), rand_ids(2, 4), rand_ids(3, 12)]
    batch = [BatchKVCache() for _ in tiny.layers]
    for p in prompts:
        cache = [KVCache() for _ in tiny.layers]
        if len(p) > 1:
            tiny(mx.array([p[:-1]]), cache)
        for b, c in zip(batch, cache):
            b.add(c.keys, c.values, c.offset)
    assert batch[0].lengths == [0, 3, 11]
    logits = tiny(mx.array([[p[-1]] for p in prompts]), batch)[:, -1]
    for b, p in enumerate(prompts):
        want = tiny(mx.array([p]))[0, -1]
        np.testing.assert_allclose(np.array(logits[b]), np.array(want), atol=1e-4, rtol=1e-4)
    # Padding is masked: dropping the longest row (capacity shrinks) changes nothing for the others.
    for c in batch:
        c.keep([1, 0])
    assert batch[0].lengths == [4, 1]
    nxt = [7, 9]
    logits = tiny(mx.array([[t] for t in nxt]), batch)[:, -1]
    for b, (p, t) in enumerate([(prompts[1], 7), (prompts[0], 9)]):
        want = tiny(mx.array([p + [t]]))[0, -1]
        np.testing.assert_allclose(np.array(logits[b]), np.array(want), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["graph", "rows", "rows-kernel"])
def test_tiny_join_and_leave_equals_no_cache_greedy(tiny, smol, variant, monkeypatch, backend_row):
    """The batched step as the model's graph, as the one compiled graph GPUs run (over whole
    buffers, each row writing at its own position), and as CUDA's (2-7 rows run as 8, attention
    by the decode kernel: here MLX ops doing what its docstring says) all equal cache-free greedy
    decoding."""
    backend_row({"graph": "cpu", "rows": "metal", "rows-kernel": "cuda"}[variant])
    if variant == "rows-kernel":
        from cuda_reference import attention

        from llama_mlx.backends import cuda

        monkeypatch.setattr(cuda.decoder, "rows_supported", lambda model: True)
        monkeypatch.setattr(cuda.kernels, "decode_attention", attention)
    _, tokenizer = smol
    eng = BatchEngine(tiny, tokenizer, prefill_chunk=5)
    assert eng._rows_step.kind == variant
    specs = [(rand_ids(10, 3), 9), (rand_ids(11, 17), 4), (rand_ids(12, 1), 12), (rand_ids(13, 30), 7)]
    reqs, alone = [], []
    for i, (p, n) in enumerate(specs):
        reqs.append(eng.submit(p, max_tokens=n, stop_tokens=()))
        for _ in range(2 + i):
            eng.step()
            alone.append(eng.solo is not None)
    while eng.has_work():
        eng.step()
        alone.append(eng.solo is not None)
    for (p, n), r in zip(specs, reqs):
        assert r.finish_reason == "length"
        assert r.tokens == greedy_without_cache(tiny, p, n)
    # The first ran alone on its own cache, then in the batch; the last one left ran alone again.
    assert alone[1] and not all(alone) and alone.index(False) < len(alone) - 1 - alone[::-1].index(False) + 1
    assert any(alone[alone.index(False):]) and eng.max_rows >= 2


@pytest.mark.parametrize("variant", ["graph", "rows"])
def test_burst_prefills_as_one_forward_and_equals_no_cache_greedy(tiny, smol, variant, backend_row):
    """Five requests arriving together beside a running one: their prompts (1 to 23 tokens, one
    warm-started from a prompt cache) prefill as the rows of one forward a chunk, each row joining
    the decode batch when its own prompt is done, while the running one keeps decoding; every
    sequence equals cache-free greedy decoding."""
    _, tokenizer = smol
    backend_row({"graph": "cpu", "rows": "metal"}[variant])
    eng = BatchEngine(tiny, tokenizer, prefill_chunk=6)
    first = eng.submit(rand_ids(40, 5), max_tokens=14, stop_tokens=())
    for _ in range(2):
        eng.step()
    assert eng.solo is not None
    warm_prompt = rand_ids(45, 13)
    warm = [KVCache() for _ in tiny.layers]
    tiny(mx.array([warm_prompt[:7]]), warm)
    specs = [(rand_ids(41, 9), 6), (rand_ids(42, 23), 9), (rand_ids(43, 1), 5), (rand_ids(44, 4), 11)]
    burst = [eng.submit(p, max_tokens=n, stop_tokens=()) for p, n in specs]
    burst.append(eng.submit(warm_prompt, max_tokens=8, stop_tokens=(), prompt_cache=warm))
    specs.append((warm_prompt, 8))
    joined, first_tokens = [], []
    while eng.has_work():
        before = len(first.tokens)
        eng.step()
        first_tokens.append(len(first.tokens) - before)
        joined.append(sum(r in eng.running or r.done for r in burst))
    assert eng.max_prefill_rows == 5
    assert 0 < joined[0] < 5 and 5 in joined  # the short prompts joined before the 23-token one was done
    assert all(first_tokens[:4])  # the running one got a token every step of the burst's prefill
    assert first.tokens == greedy_without_cache(tiny, rand_ids(40, 5), 14)
    for (p, n), r in zip(specs, burst):
        assert r.finish_reason == "length"
        assert r.tokens == greedy_without_cache(tiny, p, n)


def test_memory_cap_bounds_a_burst(tiny, smol):
    """Three requests at once under a cap that holds two prefilling together: the first two
    prefill as one forward, the third after them, and the KV buffers never exceed the cap."""
    _, tokenizer = smol
    bpt = BatchEngine(tiny, tokenizer).bytes_per_token
    # Reservations of 15, 23 and 17 positions; two prefilling rows count 256 positions each:
    # two need 2 * 23 + 512 = 558 positions, three 3 * 23 + 768 = 837.
    cap = 600 * bpt
    specs = [(rand_ids(50, 9), 6), (rand_ids(51, 9), 14), (rand_ids(52, 9), 8)]
    eng = BatchEngine(tiny, tokenizer, max_kv_bytes=cap, prefill_chunk=4)
    reqs = [eng.submit(p, max_tokens=n, stop_tokens=()) for p, n in specs]
    while eng.has_work():
        eng.step()
        assert eng.kv_bytes() <= cap
        assert len(eng.prefilling) <= 2
        if reqs[2] in eng.prefilling:
            assert reqs[0] in eng.running and reqs[1] in eng.running
    assert eng.max_prefill_rows == 2
    for (p, n), r in zip(specs, reqs):
        assert r.tokens == greedy_without_cache(tiny, p, n)


def test_copies_of_a_prompt_prefill_once(tiny, smol):
    """One prompt submitted several times at once (a request's n choices) prefills once, as one row
    (beside another prompt: a forward of two rows, not five), each copy joining the batch with a copy
    of its KV; a copy queued once the prefill has begun joins it; when the row's first request is
    cancelled mid-prefill a copy takes its row. Alone, the copies prefill as a single sequence.
    Every sequence equals cache-free greedy decoding."""
    _, tokenizer = smol
    eng = BatchEngine(tiny, tokenizer, prefill_chunk=4)
    prompt, other = rand_ids(60, 11), rand_ids(61, 6)
    copies = [eng.submit(prompt, max_tokens=n, stop_tokens=()) for n in (5, 7, 6, 5)]
    lone = eng.submit(other, max_tokens=6, stop_tokens=())
    eng.step()
    assert len(eng.prefilling) == 5 and eng.max_prefill_rows == 2
    copies[0].cancel()
    copies.append(eng.submit(prompt, max_tokens=3, stop_tokens=()))
    eng.step()
    assert copies[-1] in eng.prefilling and copies[0] not in eng.prefilling
    while eng.has_work():
        eng.step()
    assert eng.max_prefill_rows == 2 and copies[0].finish_reason == "cancelled"
    for r, n in zip(copies[1:], (7, 6, 5, 3)):
        assert r.tokens == greedy_without_cache(tiny, prompt, n)
    assert lone.tokens == greedy_without_cache(tiny, other, 6)

    eng = BatchEngine(tiny, tokenizer, prefill_chunk=4)
    copies = [eng.submit(prompt, max_tokens=n, stop_tokens=()) for n in (4, 6, 5)]
    while eng.has_work():
        eng.step()
    assert eng.max_prefill_rows == 0 and eng.max_rows == 3  # one sequence prefilled, three decoded
    for r, n in zip(copies, (4, 6, 5)):
        assert r.tokens == greedy_without_cache(tiny, prompt, n)


BRIEF = {"role": "system", "content": "Be brief."}  # shorter than SmolLM2's default system prompt: fewer tokens to prefill
PROMPTS = [
    [BRIEF, {"role": "user", "content": "Hi"}],
    [BRIEF, {"role": "user", "content": "Tell me a long story about a dragon who loves mathematics and a brave knight."}],
    [BRIEF, {"role": "user", "content": "What is 2+2?"}],
    [BRIEF, {"role": "user", "content": "List three colours."}],
]


def alone_tokens(model, tokenizer, prompt, n, **kw):
    return [r.token for r in stream_generate(model, tokenizer, prompt, n, prefill_step_size=CHUNK, **kw)]


def test_smollm2_joining_mid_stream_equals_alone(smol):
    """Four requests (different prompt lengths, max_tokens, samplers, processors, stop strings) join
    at different steps, prefill while the others decode, leave at different steps; each gives the
    tokens and text `stream_generate` gives it alone."""
    model, tokenizer = smol
    options = [
        dict(max_tokens=12),  # ends on the end-of-turn token, after 9
        dict(max_tokens=5, logits_processors=make_logits_processors(repetition_penalty=1.3)),
        dict(max_tokens=8, stop=[" math"]),  # "The answer to this classic math problem ...": stops at the 6th
        dict(max_tokens=4, seed=3),
    ]

    def kwargs(o, engine):
        o = dict(o)
        seed = o.pop("seed", None)
        if seed is not None:
            o["sampler"] = make_sampler(temp=0.8, seed=seed)
        if not engine:
            o.pop("max_tokens")
        return o

    eng = BatchEngine(model, tokenizer, prefill_chunk=CHUNK)
    reqs, overlapped = [], 0
    for i, (p, o) in enumerate(zip(PROMPTS, options)):
        reqs.append(eng.submit(p, **kwargs(o, True)))
        for _ in range(3):
            events = eng.step()
            overlapped += bool(events and eng.prefilling)
    while eng.has_work():
        eng.step()
    assert overlapped > 0  # running streams got tokens while a newcomer was still prefilling
    ends = set()
    for p, o, r in zip(PROMPTS, options, reqs):
        want = list(stream_generate(model, tokenizer, p, o["max_tokens"], prefill_step_size=CHUNK,
                                    **kwargs(o, False)))
        assert r.tokens == [w.token for w in want]
        assert r.text == "".join(w.text for w in want)
        assert r.finish_reason == want[-1].finish_reason
        ends.add(r.finished)
    assert reqs[0].finish_reason == "stop" and len(reqs[0].tokens) < 12
    assert reqs[2].finish_reason == "stop" and "math" not in reqs[2].text
    assert len(ends) == 4


def test_batch_generate_texts_equal_generate_alone(tiny_smol_checkpoint):
    # (the batch_generate API against generate, not SmolLM2's text: the tiny model on SmolLM2's template)
    model, tokenizer = llama_mlx.load(tiny_smol_checkpoint)
    # Two rows of 18 and 24 prompt tokens (the four-row mix is the test above's, on the engine itself).
    prompts = [PROMPTS[0], PROMPTS[2]]
    result = batch_generate(model, tokenizer, prompts, max_tokens=[3, 5], prefill_chunk=CHUNK)
    assert len(result.texts) == 2
    for p, n, text, tokens, stats in zip(prompts, [3, 5], result.texts, result.tokens, result.stats):
        assert text == generate(model, tokenizer, p, n, prefill_step_size=CHUNK)
        assert stats.generation_tokens == len(tokens) <= n
        assert stats.prompt_tokens == len(tokenizer.apply_chat_template(p, add_generation_prompt=True))
        assert stats.time_to_first_token > 0 and stats.finish_reason in ("stop", "length")
    assert result.generation_tps > 0


def test_memory_cap_queues_third_and_is_never_exceeded(tiny, smol):
    _, tokenizer = smol
    probe = BatchEngine(tiny, tokenizer)
    bpt = probe.bytes_per_token
    # Prompts of 9 tokens, answers of 6, 14 and 8: reservations of 15, 23 and 17 positions. Two fit
    # beside one prefill (2 * 23 + 256 = 302 positions); a third does not (3 * 23 + 256 = 325).
    cap = 302 * bpt
    specs = [(rand_ids(20, 9), 6), (rand_ids(21, 9), 14), (rand_ids(22, 9), 8)]
    eng = BatchEngine(tiny, tokenizer, max_kv_bytes=cap, prefill_chunk=4)
    reqs = [eng.submit(p, max_tokens=n, stop_tokens=()) for p, n in specs]
    peak, third_waited = 0, False
    while eng.has_work():
        eng.step()
        live = sum(a.nbytes for c in eng.live_caches() for a in (c.keys, c.values) if a is not None)
        peak = max(peak, live)
        assert live <= cap
        if reqs[2].started is None and len(eng.running) == 2:
            third_waited = True
        if reqs[2].started is not None:
            assert reqs[0].done  # the third only started once the first had finished
    assert third_waited and peak > 0
    for (p, n), r in zip(specs, reqs):
        assert r.tokens == greedy_without_cache(tiny, p, n)


def test_request_that_never_fits_is_refused(tiny, smol):
    _, tokenizer = smol
    eng = BatchEngine(tiny, tokenizer, max_kv_bytes=100 * BatchEngine(tiny, tokenizer).bytes_per_token)
    with pytest.raises(KVCapacityError) as err:
        eng.submit(rand_ids(1, 200), max_tokens=10, stop_tokens=())
    assert isinstance(err.value, LlamaMLXError)
    assert not eng.has_work()


def test_cancel_and_threaded_serve(tiny, smol):
    """A server's shape: a worker thread runs `serve`, other threads submit and iterate handles."""
    _, tokenizer = smol
    eng = BatchEngine(tiny, tokenizer, prefill_chunk=4)
    eng.start()
    try:
        keep = eng.submit(rand_ids(30, 6), max_tokens=10, stop_tokens=())
        dropped = eng.submit(rand_ids(31, 6), max_tokens=200, stop_tokens=())
        for i, r in enumerate(dropped):
            if i == 2:
                dropped.cancel()
        got = [r.token for r in keep]
    finally:
        eng.close(10)
    assert dropped.finish_reason == "cancelled" and 3 <= len(dropped.tokens) < 200
    assert got == keep.tokens == greedy_without_cache(tiny, rand_ids(30, 6), 10)


def test_compiled_batch_step_takes_few_shapes(tiny, smol, backend_row):
    """Under a compiled batch step (the Metal row: traced per buffer shape), ten requests of random
    prompt and answer lengths, joining at random steps and leaving at their own, hold the batch's
    buffers in a few bucketed shapes (rows 1, 2, 4 or 8; capacity in whole 256-position steps)
    rather than one per batch size and request mix; `warm_up` runs exactly those shapes first,
    and every sequence equals cache-free greedy decoding."""
    backend_row("metal")
    _, tokenizer = smol
    rng = np.random.default_rng(5)
    eng = BatchEngine(tiny, tokenizer, max_batch=8, prefill_chunk=16)
    assert eng.bucketed
    warmed = eng.warm_up(capacities=(256,))
    assert warmed == 4  # rows 1, 2, 4, 8 at capacity 256
    specs = [(rand_ids(60 + i, int(rng.integers(1, 40))), int(rng.integers(1, 12))) for i in range(10)]
    reqs, shapes, sizes = [], set(), set()
    for p, n in specs:
        reqs.append(eng.submit(p, max_tokens=n, stop_tokens=()))
        for _ in range(int(rng.integers(0, 3))):
            eng.step()
            if eng.solo is None and eng.cache[0].keys is not None:
                shapes.add((eng.cache[0].keys.shape[0], eng.cache[0].keys.shape[2]))
                sizes.add(len(eng.running))
    while eng.has_work():
        eng.step()
        if eng.solo is None and eng.cache[0].keys is not None:
            shapes.add((eng.cache[0].keys.shape[0], eng.cache[0].keys.shape[2]))
            sizes.add(len(eng.running))
    assert len(sizes) >= 4 and shapes <= {(1, 256), (2, 256), (4, 256), (8, 256)}, (sizes, shapes)
    for (p, n), r in zip(specs, reqs):
        assert r.tokens == greedy_without_cache(tiny, p, n)
