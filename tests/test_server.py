"""`llama-mlx serve` as a real process on a free loopback port, driven by the official `openai` and
`anthropic` clients and raw HTTP. Oracles: transformers' tokenizer and chat template for the usage
counts, jsonschema for structured output, the same request alone for concurrency, the server's own
non-streamed answer for the streamed one (temperature 0).

Most servers run a tiny random model: `tiny-smol` (SmolLM2's tokenizer, template and end tokens) or
`tiny` (Meta's tokenizer, Llama 3.1's tool prompts). SmolLM2 itself answers where a real model's
answer or cost is the claim (structured output, the prefix cache's time to first token)."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import anthropic
import httpx2 as httpx
import jsonschema
import mlx.core as mx
import openai
import pytest

from llama_mlx.engine import PrefixCachePool
from llama_mlx.model import Model, ModelArgs

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "weights" / "SmolLM2-135M-Instruct"
SMOL = MODEL.name  # what requests to the real SmolLM2 name it (an unknown name is a 404)
NAME = "tiny-smol"  # the tiny model with SmolLM2's tokenizer (conftest.tiny_smol_checkpoint)
META = "tiny"  # the tiny Meta-tokenizer model's folder name
CLI = Path(sys.executable).parent / "llama-mlx"
KEY = "test-key-123"
SECRET = "zebra-quartz-7781"  # appears in prompts: must never reach the log
T0 = {"temperature": 0}  # this anthropic client has no temperature argument
META_CACHE_BOUND = 450_000  # two ~180-token caches of the tiny model (1 KB a position in float32), never three

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, tmp: Path, *args: str, model: Path = MODEL, env: Optional[dict] = None):
        from llama_mlx.resolve import ensure_default_model

        assert ensure_default_model() == MODEL  # a fresh clone converts it on first use
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"server-{self.port}.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([str(CLI), "serve", "--model", str(model), "--port", str(self.port), *args],
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 90
        while time.time() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError("server did not come up:\n" + self.log_path.read_text())

    def openai(self) -> openai.OpenAI:
        """The official OpenAI client on this server, with the test key."""
        return openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, timeout=300)

    def anthropic(self, **options) -> anthropic.Anthropic:
        """The official Anthropic client on this server, with the test key."""
        return anthropic.Anthropic(base_url=self.url, api_key=KEY, max_retries=0, **options)

    def stats(self) -> dict:
        return httpx.get(self.url + "/v1/internal/stats", headers={"Authorization": f"Bearer {KEY}"}).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_smol_checkpoint):
    s = Server(tmp_path_factory.mktemp("serve"), "--api-key", KEY, "--max-concurrency", "3", "--queue-size", "8",
               "--max-body-bytes", "1000000", model=tiny_smol_checkpoint)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """The real SmolLM2 (the default model)."""
    s = Server(tmp_path_factory.mktemp("serve-smol"), "--api-key", KEY)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def small(tmp_path_factory, tiny_smol_checkpoint):
    s = Server(tmp_path_factory.mktemp("serve1"), "--max-concurrency", "1", "--queue-size", "1",
               "--shutdown-timeout", "60", model=tiny_smol_checkpoint)  # (the SIGTERM test drains)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def oai(server):
    return server.openai()


@pytest.fixture(scope="module")
def meta_server(tmp_path_factory, tiny_meta_checkpoint):
    """A tiny random model with Meta's tokenizer: Llama 3.1's tool prompts (SmolLM2's template ignores tools)."""
    s = Server(tmp_path_factory.mktemp("serve-meta"), "--api-key", KEY, "--prompt-cache-bytes", str(META_CACHE_BOUND),
               model=tiny_meta_checkpoint)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def meta_oai(meta_server):
    return meta_server.openai()


@pytest.fixture(scope="module")
def hf():
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(MODEL))


def hf_chat_len(hf, messages) -> int:
    ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return len(ids)


def stop_bias(server) -> dict:
    """logit_bias banning SmolLM2's stop tokens (<|endoftext|>, <|im_end|>), so answers run to max_tokens."""
    return {"0": -100, "2": -100}


def chat(oai, content, model=NAME, **kw):
    return oai.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                       **{"temperature": 0, **kw})


def stream_chat(oai, content, model=NAME, **kw):
    chunks = list(oai.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                              temperature=0, stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


# -- endpoints


def test_health_and_models(server, oai):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    first = oai.models.list().data[0]  # the default model first, then what `llama-mlx list` shows
    assert first.id == NAME and first.loaded is True


def test_chat_stream_equals_non_stream_and_usage_is_real(server, oai, hf):
    question = f"Name three colours. ({SECRET})"
    full = chat(oai, question, max_tokens=12, logprobs=True, top_logprobs=2)
    text, chunks = stream_chat(oai, question, max_tokens=12, stream_options={"include_usage": True})
    assert full.choices[0].message.content and text == full.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [full.choices[0].finish_reason]
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage is not None
    assert full.usage.prompt_tokens == usage.prompt_tokens == hf_chat_len(hf, [{"role": "user", "content": question}])
    assert full.usage.completion_tokens == usage.completion_tokens
    # one log-probability per generated token, a stop token excepted
    content = full.choices[0].logprobs.content
    assert len(content) == full.usage.completion_tokens - (full.choices[0].finish_reason == "stop")
    assert "".join(e.token for e in content) == full.choices[0].message.content
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.logprob - 1e-4 for e in content)


def test_max_tokens_and_stop(oai):
    r = chat(oai, "Count from one to twenty in words.", max_completion_tokens=20, logit_bias=stop_bias(None))
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 20
    words = r.choices[0].message.content
    cut = words.split()[3]
    s = chat(oai, "Count from one to twenty in words.", max_tokens=20, stop=[cut], logit_bias=stop_bias(None))
    assert s.choices[0].finish_reason == "stop" and cut not in s.choices[0].message.content
    assert words.startswith(s.choices[0].message.content)


def test_completions_stream_and_not(server, oai, hf):
    prompt = "The capital of France is"
    full = oai.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, logprobs=1)
    parts = list(oai.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                        stream_options={"include_usage": True}))
    assert "".join(p.choices[0].text for p in parts if p.choices) == full.choices[0].text != ""
    assert full.usage.prompt_tokens == parts[-1].usage.prompt_tokens == len(hf(prompt)["input_ids"])
    assert full.usage.completion_tokens == 12 and len(full.choices[0].logprobs.tokens) <= 12


def test_messages_both_ways(server, hf):
    client = server.anthropic()
    msgs = [{"role": "user", "content": "Say hello politely."}]
    r = client.messages.create(model=NAME, max_tokens=16, extra_body=T0, system="Be brief.", messages=msgs)
    assert r.type == "message" and r.content[0].type == "text" and r.stop_reason in ("end_turn", "max_tokens")
    assert r.usage.input_tokens + r.usage.cache_read_input_tokens == hf_chat_len(
        hf, [{"role": "system", "content": "Be brief."}, *msgs])
    with client.messages.stream(model=NAME, max_tokens=16, extra_body=T0, system="Be brief.", messages=msgs) as s:
        streamed = "".join(s.text_stream)
        final = s.get_final_message()
    assert streamed == r.content[0].text and final.usage.output_tokens == r.usage.output_tokens
    # the raw event sequence
    with httpx.stream("POST", server.url + "/v1/messages", headers={"x-api-key": KEY}, timeout=60,
                      json={"model": NAME, "max_tokens": 8, "messages": msgs, "stream": True}) as resp:
        events = [line[7:] for line in resp.iter_lines() if line.startswith("event: ")]
    assert events[0] == "message_start" and events[-2:] == ["message_delta", "message_stop"]
    assert {"content_block_start", "content_block_delta", "content_block_stop"} <= set(events)


# -- tools and structured output


def test_forced_tool_call_openai(meta_oai):
    """tool_choice naming a function constrains the reply to {"name", "parameters"} of it; the server's
    parser turns that generated text into tool_calls, streamed (held back, never as content) or not.
    The prompt is Llama 3.1's with the tool (Meta's real template through transformers, the oracle)."""
    from test_tools import real_template, transformers_llama3

    oai = meta_oai
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    choice = {"type": "function", "function": {"name": "get_weather"}}
    raw = oai.chat.completions.with_raw_response.create(model=META, messages=messages, tools=[WEATHER],
                                                        tool_choice=choice, temperature=0, max_tokens=60)
    assert "x-llama-mlx-warning" not in raw.headers
    r = raw.parse()
    expected = transformers_llama3().apply_chat_template(messages, chat_template=real_template("3.1"), tools=[WEATHER],
                                                         add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(expected["input_ids"] if hasattr(expected, "keys") else expected)
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    (call,) = r.choices[0].message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    chunks = list(oai.chat.completions.create(model=META, messages=messages, tools=[WEATHER], tool_choice=choice,
                                              temperature=0, max_tokens=60, stream=True))
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)
    deltas = [t for c in chunks for t in (c.choices[0].delta.tool_calls or [])]
    assert [(d.function.name, d.function.arguments) for d in deltas] == [("get_weather", call.function.arguments)]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the call and its result go back in: rendered, answered
    follow = messages + [r.choices[0].message.model_dump(exclude_none=True),
                         {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 18}'}]
    again = oai.chat.completions.create(model=META, messages=follow, tools=[WEATHER], temperature=0, max_tokens=8)
    assert again.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_tools_auto_plain_text_is_released(meta_oai):
    oai = meta_oai
    q = "Write one short sentence about cats."
    kw = dict(model=META, messages=[{"role": "user", "content": q}], tools=[WEATHER], temperature=0, max_tokens=16)
    r = oai.chat.completions.create(**kw)
    chunks = list(oai.chat.completions.create(**kw, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    if r.choices[0].message.tool_calls:  # the model may call the tool by itself: then both must agree
        assert chunks[-1].choices[0].finish_reason == "tool_calls" and not text
    else:
        assert text == r.choices[0].message.content != ""


def test_forced_tool_use_anthropic(meta_server):
    client = meta_server.anthropic()
    tool = {"name": "get_weather", "description": "Current weather", "input_schema": WEATHER["function"]["parameters"]}
    kw = dict(model=META, max_tokens=60, extra_body=T0, tools=[tool],
              tool_choice={"type": "tool", "name": "get_weather"},
              messages=[{"role": "user", "content": "Weather in Oslo?"}])
    r = client.messages.create(**kw)
    (block,) = [b for b in r.content if b.type == "tool_use"]
    assert r.stop_reason == "tool_use" and block.name == "get_weather"
    jsonschema.validate(block.input, tool["input_schema"])
    with client.messages.stream(**kw) as s:
        final = s.get_final_message()
    assert [(b.name, b.input) for b in final.content if b.type == "tool_use"] == [(block.name, block.input)]
    result = client.messages.create(model=META, max_tokens=8, extra_body=T0, tools=[tool], messages=[
        *kw["messages"], {"role": "assistant", "content": [b.model_dump() for b in r.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block.id, "content": "cold"}]}])
    assert result.type == "message"


def test_tools_the_template_ignores_are_never_pretended(server, oai):
    """SmolLM2's template drops tools: a forced tool_choice is a 400 naming tool_choice (OpenAI, streamed
    or not, and Anthropic's any/tool); with "auto" the answer is the plain answer without the tools,
    no tool calls parsed, marked by a warning header."""
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as e:
                oai.chat.completions.create(model=NAME, messages=messages, tools=[WEATHER], tool_choice=choice,
                                            temperature=0, max_tokens=20, stream=stream)
            assert e.value.status_code == 400 and e.value.param == "tool_choice"
            assert "chat template ignores tools" in e.value.message
    client = server.anthropic()
    tool = {"name": "get_weather", "description": "Current weather", "input_schema": WEATHER["function"]["parameters"]}
    for choice in ({"type": "any"}, {"type": "tool", "name": "get_weather"}):
        with pytest.raises(anthropic.BadRequestError) as e:
            client.messages.create(model=NAME, max_tokens=20, extra_body=T0, tools=[tool], tool_choice=choice,
                                   messages=messages)
        assert e.value.status_code == 400 and "chat template ignores tools" in str(e.value)
    plain = oai.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=4)
    raw = oai.chat.completions.with_raw_response.create(model=NAME, messages=messages, tools=[WEATHER],
                                                        temperature=0, max_tokens=4)
    assert raw.headers["x-llama-mlx-warning"].startswith("tools ignored")
    r = raw.parse()
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content == plain.choices[0].message.content
    assert r.usage.prompt_tokens == plain.usage.prompt_tokens
    raw = client.messages.with_raw_response.create(model=NAME, max_tokens=4, extra_body=T0, tools=[tool],
                                                   messages=messages)
    assert raw.headers["x-llama-mlx-warning"].startswith("tools ignored")
    assert [b.type for b in raw.parse().content] == ["text"]


def test_json_schema_output_validates(smol):
    # (SmolLM2: a real model closes its JSON; a random one may ramble on inside a string)
    oai = smol.openai()
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
    r = chat(oai, "Describe a person.", SMOL, max_tokens=60, response_format=fmt, temperature=0.8, seed=1).choices[0]
    jsonschema.validate(json.loads(r.message.content), schema)
    text, _ = stream_chat(oai, "Give me JSON.", SMOL, max_tokens=60, response_format={"type": "json_object"})
    assert isinstance(json.loads(text), dict)


# -- errors and safety


def test_errors(server, oai):
    url, auth = server.url, {"Authorization": f"Bearer {KEY}"}

    def post(path, body=None, content=None, headers=auth):
        typed = {"Content-Type": "application/json"} if content is not None else {}  # httpx types json= itself
        return httpx.post(url + path, json=body, content=content, headers={**headers, **typed}, timeout=30)

    msgs = [{"role": "user", "content": "hi"}]
    r = post("/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = post("/v1/chat/completions", {"messages": msgs, "n": 9})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    assert post("/v1/chat/completions", {"messages": msgs}, headers={}).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=url, api_key="wrong", max_retries=0).messages.create(
            model=NAME, max_tokens=4, messages=msgs)
    r = post("/v1/nothing", {})
    assert r.status_code == 404 and "error" in r.json()
    r = post("/v1/chat/completions", content=b'{"messages": "' + b"x" * 1_100_000 + b'"}')
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = post("/v1/chat/completions", {"messages": msgs, "temperature": "hot"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    assert post("/v1/chat/completions", {"messages": "hi"}).status_code == 400
    assert post("/v1/chat/completions", {"messages": msgs, "response_format": {"type": "xml"}}).status_code == 400
    r = post("/v1/messages", {"messages": msgs})  # max_tokens is required
    assert r.status_code == 400 and r.json()["type"] == "error"
    long = post("/v1/completions", {"prompt": list(range(100, 9000)), "max_tokens": 4})
    assert long.status_code == 400 and long.json()["error"]["code"] == "context_length_exceeded"
    assert "access-control-allow-origin" not in httpx.options(
        url + "/v1/chat/completions", headers={"Origin": "http://evil.example",
                                               "Access-Control-Request-Method": "POST"}).headers
    assert chat(oai, "still alive?", max_tokens=2).usage.completion_tokens >= 1  # the server lives on


def test_disconnect_cancels_generation(server, oai):
    before = server.stats()["cancelled"]
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60, json={"messages": [{"role": "user", "content": "Tell a long story."}],
                                        "max_tokens": 5000, "logit_bias": stop_bias(server), "stream": True}) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
    deadline = time.time() + 30
    while (server.stats()["active"] or server.stats()["cancelled"] == before) and time.time() < deadline:
        time.sleep(0.1)
    stats = server.stats()
    assert stats["active"] == 0 and stats["cancelled"] == before + 1
    start = time.perf_counter()
    assert chat(oai, "Hi", max_tokens=4).usage.completion_tokens >= 1
    assert time.perf_counter() - start < 10


def test_concurrent_answers_equal_answers_alone(meta_oai):
    # (batching, not the text: the tiny model)
    def ask(p):
        return meta_oai.chat.completions.create(model=META, messages=[{"role": "user", "content": p}], temperature=0,
                                                max_tokens=16).choices[0].message.content

    prompts = ["What is 2+2?", "Name a fruit.", "Describe the sea in one line."]
    alone = [ask(p) for p in prompts]
    with ThreadPoolExecutor(len(prompts) * 2) as pool:
        together = list(pool.map(ask, prompts * 2))
    assert together == alone * 2


def _system(tag: str, rules: int = 14) -> str:
    return f"You are assistant {tag}. " + " ".join(f"Rule {i}: answer {tag} questions with care." for i in range(rules))


def test_prefix_cache_reuse_and_ttft(smol, hf):
    # (SmolLM2: a real prefill's cost, against which a cached prefix's time to first token is measured)
    system, oai = _system("alpha", rules=8), smol.openai()  # (101 tokens: ~8x the warm turn's new ones)

    def ask(messages):
        start, ttft = time.perf_counter(), None
        chunks = []
        for c in oai.chat.completions.create(model=SMOL, messages=messages, temperature=0, max_tokens=4, stream=True,
                                             stream_options={"include_usage": True}):
            if ttft is None and c.choices and c.choices[0].delta.content:
                ttft = time.perf_counter() - start
            chunks.append(c)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return ttft, chunks[-1].usage, text

    first = [{"role": "system", "content": system}, {"role": "user", "content": "Hello?"}]
    cold_ttft, cold, answer = ask(first)
    assert cold.prompt_tokens_details.cached_tokens == 0 and cold.prompt_tokens > 90
    warm_ttft, warm, _ = ask([first[0], {"role": "user", "content": "Who are you?"}])
    system_len = hf_chat_len(hf, [first[0]]) - 6  # the system turn, less the (generation) headers
    assert warm.prompt_tokens_details.cached_tokens >= system_len
    assert warm_ttft * 3 < cold_ttft, (warm_ttft, cold_ttft)
    grown = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And then?"}]
    _, grew, _ = ask(grown)
    assert grew.prompt_tokens == hf_chat_len(hf, grown) and grew.prompt_tokens_details.cached_tokens > cold.prompt_tokens - 4


def test_prefix_cache_is_bounded_and_lru(meta_server, meta_oai):
    # (the cache's bookkeeping, not the model's text: the tiny model, ~177-token prompts)
    def ask(tag):
        r = meta_oai.chat.completions.create(model=META, temperature=0, max_tokens=2, messages=[
            {"role": "system", "content": _system(tag)}, {"role": "user", "content": "ok?"}])
        stats = meta_server.stats()["prompt_cache"]
        assert stats["bytes"] <= stats["max_bytes"] == META_CACHE_BOUND
        return r.usage.prompt_tokens_details.cached_tokens

    evictions = meta_server.stats()["prompt_cache"]["evictions"]
    assert [ask(t) for t in ("bravo", "charlie", "delta")] == [0, 0, 0]
    assert meta_server.stats()["prompt_cache"]["evictions"] > evictions
    assert ask("delta") > 120  # most recent: kept
    assert ask("bravo") == 0  # least recently used: evicted


def test_pool_bound_unit():
    """The pool on a small random model: bytes never above the bound, least recently used out first."""
    mx.random.seed(0)
    model = Model(ModelArgs(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            vocab_size=300, tie_word_embeddings=True))
    from llama_mlx.generate import generate_step

    def filled(pool, tokens):
        pc = pool.take(tokens)
        todo = pc.prepare(tokens)
        for _ in generate_step(mx.array(todo), model, max_tokens=1, prompt_cache=pc.cache):
            pass
        pc.record(tokens)
        return pc

    one = filled(PrefixCachePool(model, 1 << 30), list(range(40))).nbytes
    pool = PrefixCachePool(model, 2 * one)
    for start in (0, 100, 200):
        pool.give_back(filled(pool, list(range(start, start + 40))))
        assert pool.nbytes <= 2 * one
    assert pool.stats()["entries"] == 2 and pool.evictions == 1
    assert pool.take(list(range(0, 40))).tokens == []  # evicted: a fresh cache
    assert pool.take(list(range(200, 241))).tokens == list(range(200, 240))  # kept, handed out whole


def test_prompts_are_not_logged(server):
    assert SECRET not in server.log_path.read_text()


# -- queue bound and shutdown (a server with one slot and one waiting place)


def _slow(server, max_tokens=4000):
    return httpx.stream("POST", server.url + "/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": "Tell a story."}], "max_tokens": max_tokens,
        "logit_bias": stop_bias(server), "stream": True})


def test_queue_full_is_503(small):
    with _slow(small) as a:
        lines = a.iter_lines()  # (kept: a line iterator freed closes the connection, which cancels the job)
        next(lines)
        with _slow(small) as b:  # waits
            assert b.status_code == 200
            deadline = time.time() + 5
            while small.stats()["waiting"] < 1 and time.time() < deadline:
                time.sleep(0.05)
            assert small.stats()["active"] == 1
            r = httpx.post(small.url + "/v1/chat/completions", timeout=30,
                           json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            assert r.status_code == 503 and r.json()["error"]["type"] == "overloaded_error"
    deadline = time.time() + 60  # a cancel lands between tokens (or prefill chunks)
    while small.stats()["active"] + small.stats()["waiting"] and time.time() < deadline:
        time.sleep(0.1)
    assert small.stats()["active"] + small.stats()["waiting"] == 0


def test_sigterm_finishes_in_flight_then_exits_0(small):
    result = {}

    def request():
        result["r"] = httpx.post(small.url + "/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": "Tell a story."}], "max_tokens": 24, "temperature": 0,
            "logit_bias": stop_bias(small)}).json()

    t = threading.Thread(target=request)
    t.start()
    deadline = time.time() + 10
    while small.stats()["active"] == 0 and time.time() < deadline:
        time.sleep(0.02)
    small.proc.send_signal(signal.SIGTERM)
    t.join(60)
    assert small.proc.wait(60) == 0
    assert result["r"]["usage"]["completion_tokens"] == 24 and result["r"]["choices"][0]["finish_reason"] == "length"
