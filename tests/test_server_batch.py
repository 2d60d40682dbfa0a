"""`llama-mlx serve` with continuous batching, a KV cap and speculative decoding, as a real process.
Oracles: each request sent alone to the same server (a batch of one row) for the batched answers,
the batched server's answer for the speculative one (greedy speculation must not change it), the
model's config for the KV bytes a request needs. The model is the tiny random one with Meta's
tokenizer: what is checked is how rows are decoded together, not what the answers say."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from test_server import Server

# Meta's end tokens barred: answers run to max_tokens, so rows leave at the steps their lengths say.
BIAS = {"128001": -100, "128008": -100, "128009": -100}


@pytest.fixture(scope="module")
def batched(tmp_path_factory, tiny_meta_checkpoint):
    s = Server(tmp_path_factory.mktemp("batch"), "--decode-concurrency", "4", "--max-concurrency", "4",
               model=tiny_meta_checkpoint)
    yield s
    s.stop()


def ask(server, prompt, max_tokens, path="/v1/completions"):
    r = httpx.post(server.url + path, timeout=300, json={"prompt": prompt, "max_tokens": max_tokens,
                                                         "temperature": 0, "logit_bias": BIAS})
    assert r.status_code == 200, r.text
    return r.json()


def test_joining_mid_stream_equals_alone(batched):
    """A long stream runs; three requests of other prompt lengths and answer lengths join it while
    it decodes (and each other's prefill); every answer equals the same request sent alone."""
    long = ("Write a long story about a lighthouse keeper.", 160)
    others = [("Hi", 8), ("List the planets of the solar system, from the closest to the sun outwards.", 12),
              ("Name a colour.", 4)]
    results, ended, threads = {}, {}, []

    def run(i, prompt, n, delay):
        time.sleep(delay)
        results[i] = ask(batched, prompt, n)["choices"][0]["text"]
        ended[i] = time.monotonic()

    with httpx.stream("POST", batched.url + "/v1/completions", timeout=300, json={
            "prompt": long[0], "max_tokens": long[1], "temperature": 0, "logit_bias": BIAS, "stream": True}) as r:
        texts = []
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            texts.append(json.loads(line[6:])["choices"][0]["text"])
            if len(texts) == 4:  # mid-stream: the others join now, a little apart
                threads = [threading.Thread(target=run, args=(i, p, n, 0.1 * i)) for i, (p, n) in enumerate(others)]
                for t in threads:
                    t.start()
        results["long"] = "".join(texts)
        long_ended = time.monotonic()
    for t in threads:
        t.join(300)
    stats = batched.stats()["batch"]
    assert stats["max_rows"] > 1 and stats["multi_row_steps"] > 0, stats
    print(f"the others ended {[round(long_ended - ended[i], 2) for i in ended]} s before the long one; {stats}")
    assert all(ended[i] < long_ended for i in range(len(others)))  # each joined and left while it ran
    alone = {i: ask(batched, p, n)["choices"][0]["text"] for i, (p, n) in enumerate(others)}
    alone["long"] = ask(batched, *long)["choices"][0]["text"]
    assert results == alone
    assert all(results.values())


def test_batched_chat_with_logprobs_and_schema_equals_alone(batched):
    """Rows with their own logits processors (a JSON schema, penalties) and log-probabilities, decoded
    together, answer as they do alone."""
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
              "required": ["city"], "additionalProperties": False}
    bodies = [
        {"messages": [{"role": "user", "content": "Name a city as JSON."}], "max_tokens": 24,
         "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}},
        {"messages": [{"role": "user", "content": "Say something about rain."}], "max_tokens": 8,
         "logprobs": True, "top_logprobs": 3},
        {"messages": [{"role": "user", "content": "Count to ten."}], "max_tokens": 8, "frequency_penalty": 1.0},
    ]

    def send(body):
        r = httpx.post(batched.url + "/v1/chat/completions", timeout=300, json={**body, "temperature": 0})
        assert r.status_code == 200, r.text
        c = r.json()["choices"][0]
        return c["message"]["content"], c["logprobs"]

    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(send, bodies))
    alone = [send(b) for b in bodies]
    assert [t for t, _ in together] == [t for t, _ in alone]
    json.loads(together[0][0])
    got, want = together[1][1]["content"], alone[1][1]["content"]
    assert [e["token"] for e in got] == [e["token"] for e in want] and len(got[0]["top_logprobs"]) == 3
    assert all(abs(a["logprob"] - b["logprob"]) < 1e-3 for a, b in zip(got, want))


def bytes_per_token(model) -> int:
    """Keys and values of every layer, float32 (the CPU backend's compute dtype), for one position."""
    c = json.loads((model / "config.json").read_text())
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * head_dim * 4


PROMPT = list(range(1000, 1020))  # 20 tokens


def kv_cap(model) -> int:
    """One request of 20 + 20 positions (and its 256-position prefill buffer) fits; two do not."""
    return (20 + 20 + 256) * bytes_per_token(model)


def test_kv_cap_refuses_what_never_fits_and_queues_what_fits(tmp_path, tiny_meta_checkpoint):
    s = Server(tmp_path, "--max-kv-bytes", str(kv_cap(tiny_meta_checkpoint)), "--prompt-cache-bytes", "0",
               model=tiny_meta_checkpoint)
    try:
        r = httpx.post(s.url + "/v1/completions", timeout=60,
                       json={"prompt": PROMPT, "max_tokens": 100, "temperature": 0})
        assert r.status_code == 503 and r.json()["error"]["code"] == "kv_capacity_exceeded"
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda _: ask(s, PROMPT, 20), range(2)))
        assert [a["usage"]["completion_tokens"] for a in answers] == [20, 20]
        assert answers[0]["choices"][0]["text"] == answers[1]["choices"][0]["text"]
        deadline = time.time() + 10  # the rows are dropped at the worker's next step
        while (s.stats()["batch"]["kv_bytes"] or s.stats()["completed"] < 2) and time.time() < deadline:
            time.sleep(0.05)
        stats = s.stats()
        assert stats["batch"]["max_rows"] == 1 and stats["completed"] == 2, stats  # the second waited
        assert stats["batch"]["kv_bytes"] == 0  # both rows left: nothing held
    finally:
        s.stop()


def test_prompt_lookup_server_equals_plain(batched, tmp_path, tiny_meta_checkpoint):
    """--prompt-lookup 3: requests run alone, speculatively; greedy answers equal the batched server's."""
    prompt = "Copy this line twice: the quick brown fox jumps over the lazy dog. the quick brown fox"
    plain = ask(batched, prompt, 24)["choices"][0]["text"]
    s = Server(tmp_path, "--prompt-lookup", "3", model=tiny_meta_checkpoint)
    try:
        assert s.stats()["speculative"] == ["prompt_lookup"] and not s.stats()["batch"]["enabled"]
        assert ask(s, prompt, 24)["choices"][0]["text"] == plain
        # /metrics counts the drafts checked and accepted (a copy-heavy prompt: some were drafted)
        metrics = {}
        for family in text_string_to_metric_families(httpx.get(s.url + "/metrics").text):
            for sample in family.samples:
                metrics[sample.name] = metrics.get(sample.name, 0) + sample.value
        drafted = metrics["llama_mlx_speculative_drafted_tokens_total"]
        assert drafted > 0 and 0 <= metrics["llama_mlx_speculative_accepted_tokens_total"] <= drafted
    finally:
        s.stop()
