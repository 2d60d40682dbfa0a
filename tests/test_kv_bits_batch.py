"""Quantized KV caches (`kv_bits`) batched, in `BatchEngine` / `batch_generate` and `llama-mlx serve
--kv-bits`. Oracle: mlx-lm's own `QuantizedKVCache` on the same folder, fed each sequence alone,
token by token along the tokens we produced (teacher forcing): every log-probability must match
that, while the float cache's differ by far more (the cache really is quantized)."""

from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import mlx.core as mx
import numpy as np
import pytest

import llama_mlx
from llama_mlx.batch import BatchEngine
from test_server import Server

BITS, GROUP = 4, 32


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from benchmarks.random_model import write_random_model

    return write_random_model(tmp_path_factory.mktemp("kvq") / "tiny", "tiny", dtype="float32")


@pytest.fixture(scope="module")
def theirs(folder):
    import mlx_lm

    return mlx_lm.load(str(folder))[0]


def forced(model, prompt, tokens, bits):
    """mlx-lm's log-probabilities of `tokens` after `prompt`, one token a step over its quantized
    (or, bits None, float) KV cache."""
    from mlx_lm.models.cache import KVCache, QuantizedKVCache

    cache = [QuantizedKVCache(group_size=GROUP, bits=bits) if bits else KVCache() for _ in model.layers]
    out, seq = [], prompt + tokens
    for i, t in enumerate(seq[:-1]):
        logits = model(mx.array([[t]]), cache=cache)[0, -1]
        if i >= len(prompt) - 1:
            out.append(np.array(logits - mx.logsumexp(logits)))
    return np.stack(out)


def ids(seed, n):
    return [int(t) for t in np.random.default_rng(seed).integers(3, 250, size=n)]


def test_batched_quantized_kv_equals_mlx_lm_alone(folder, theirs):
    """Four sequences over 4-bit KV caches: one alone, two arriving together (prefilled as one
    forward), one joining mid-stream, rows leaving at their own lengths."""
    ours, tokenizer = llama_mlx.load(folder)
    eng = BatchEngine(ours, tokenizer, kv_bits=BITS, kv_group_size=GROUP, prefill_chunk=8)
    specs = [(ids(1, 5), 12), (ids(2, 17), 8), (ids(3, 30), 14), (ids(4, 9), 10)]
    logprobs: dict = {}

    def step():
        for r, resp in eng.step():
            logprobs.setdefault(r.uid, []).append(np.array(resp.logprobs))

    reqs = [eng.submit(specs[0][0], max_tokens=specs[0][1], stop_tokens=())]
    for _ in range(3):
        step()
    reqs += [eng.submit(p, max_tokens=n, stop_tokens=()) for p, n in specs[1:3]]
    for _ in range(4):
        step()
    reqs.append(eng.submit(specs[3][0], max_tokens=specs[3][1], stop_tokens=()))
    while eng.has_work():
        step()
    assert eng.max_prefill_rows == 2 and eng.max_rows >= 3 and eng.multi_row_steps > 0
    for (p, n), r in zip(specs, reqs):
        assert len(r.tokens) == n
        got = np.stack(logprobs[r.uid])
        np.testing.assert_allclose(got, forced(theirs, p, r.tokens, BITS), atol=1e-4)
        assert np.abs(got - forced(theirs, p, r.tokens, None)).max() > 0.05  # not the float cache


def greedy(model, prompt, n, eos):
    """mlx-lm's greedy tokens over its quantized KV cache, one token a step, up to a stop token."""
    from mlx_lm.models.cache import QuantizedKVCache

    cache = [QuantizedKVCache(group_size=GROUP, bits=BITS) for _ in model.layers]
    for t in prompt[:-1]:
        model(mx.array([[t]]), cache=cache)
    out, t = [], prompt[-1]
    while len(out) < n:
        t = int(mx.argmax(model(mx.array([[t]]), cache=cache)[0, -1]))
        if t in eos:
            break
        out.append(t)
    return out


def test_serve_kv_bits_batches_and_equals_mlx_lm(folder, theirs, tmp_path):
    """`serve --kv-bits 4` in a memory budget that holds about 2,000 positions of its 4-bit KV
    cache beside the weights: the startup line says the context that fits, a longer prompt gets a
    400 saying so and one within it an answer; three concurrent requests decode together (batch
    rows > 1) and each answer is mlx-lm's greedy answer over its own quantized cache."""
    import mlx_lm
    from mlx.utils import tree_flatten

    from llama_mlx.cache import QuantizedKVCache

    ours, _ = llama_mlx.load(folder)
    weights = sum(v.nbytes for _, v in tree_flatten(ours.parameters()))
    probe = [QuantizedKVCache(BITS, GROUP) for _ in ours.layers]  # a real 4-bit cache of 256 positions
    ours(mx.array([ids(9, 256)]), probe)
    per_token = sum(a.nbytes for c in probe for a in c.keys + c.values) / probe[0].keys[0].shape[2]
    budget = int((weights + 2000 * per_token) / 0.9)
    s = Server(tmp_path, "--kv-bits", str(BITS), "--kv-group-size", str(GROUP), "--decode-concurrency", "4",
               "--memory-budget", str(budget), model=folder)
    try:
        line = next(ln for ln in s.log_path.read_text().splitlines() if "serving on" in ln)
        fitted = int(line.split("context ")[1].split(" tokens")[0].replace(",", ""))
        # (a request joining the batch holds its prefill buffer and its row at once: about half)
        assert 900 <= fitted <= 2000 and "what fits in memory" in line, line
        assert s.stats()["fit"]["context"] == fitted
        too_long = httpx.post(s.url + "/v1/completions", timeout=60,
                              json={"prompt": ids(13, fitted), "max_tokens": 1})
        assert too_long.status_code == 400 and "fits in memory holds" in too_long.json()["error"]["message"]
        fits = httpx.post(s.url + "/v1/completions", timeout=60,
                          json={"prompt": ids(13, fitted - 1), "max_tokens": 1, "temperature": 0})
        assert fits.status_code == 200, fits.text
        specs = [(ids(10, 6), 10), (ids(11, 21), 12), (ids(12, 13), 8)]

        def ask(spec):
            r = httpx.post(s.url + "/v1/completions", timeout=120, json={
                "prompt": spec[0], "max_tokens": spec[1], "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        with ThreadPoolExecutor(3) as pool:
            texts = list(pool.map(ask, specs))
        assert s.stats()["batch"]["max_rows"] > 1
    finally:
        s.stop()
    tokenizer = mlx_lm.load(str(folder))[1]
    for (p, n), text in zip(specs, texts):
        want = greedy(theirs, p, n, set(tokenizer.eos_token_ids))
        assert text == tokenizer.decode(want) and want
