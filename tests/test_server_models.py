"""`llama-mlx serve` with several models, `n` choices, count_tokens and /metrics, as real processes
driven by the official `openai` and `anthropic` clients. Oracles: each model's own greedy run in this
process (llama_mlx.generate), the same request with n=1, the server's own /v1/messages usage for
count_tokens, and prometheus_client's parser (an independent one) for /metrics."""

import json
import threading
import time

import anthropic
import httpx2 as httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_server import KEY, MODEL, SMOL as NAME, Server

from llama_mlx.generate import stream_generate
from llama_mlx.loading import load

TINY = "tiny"
PROMPT = list(range(1000, 1016))  # token ids both vocabularies hold


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_meta_checkpoint):
    """A weights folder holding the default model and the tiny Meta-tokenizer one (what `llama-mlx list` shows)."""
    folder = tmp_path_factory.mktemp("home")
    (folder / NAME).symlink_to(MODEL)
    (folder / TINY).symlink_to(tiny_meta_checkpoint)
    return folder


def hf_cache(tmp_path_factory, repo_id: str, folder) -> dict:
    """The environment of a Hugging Face cache holding `folder` as `repo_id`, laid out as huggingface_hub
    does (blobs, a snapshot of links, refs/main), with no hub to reach (a closed port)."""
    import hashlib
    import os
    import socket

    hf = tmp_path_factory.mktemp("hf")
    repo = hf / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in folder.iterdir():
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    return {"HF_HOME": str(hf), "HF_ENDPOINT": f"http://127.0.0.1:{closed}", "HF_HUB_DISABLE_TELEMETRY": "1"}


HUB_ID = "test-org/tiny-hub"


@pytest.fixture(scope="module")
def one(tmp_path_factory, home, tiny_meta_checkpoint):
    """The default model preloaded, any listed model on request, at most one loaded at a time; the
    tiny model is also in the Hugging Face cache as HUB_ID."""
    s = Server(tmp_path_factory.mktemp("serve-models"), "--api-key", KEY, "--max-loaded-models", "1",
               env={"LLAMA_MLX_HOME": str(home), **hf_cache(tmp_path_factory, HUB_ID, tiny_meta_checkpoint)})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def oai(one):
    return one.openai()


def loaded(server) -> dict:
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.text
    return {m["id"]: m["loaded"] for m in r.json()["data"]}


def greedy(path, ids, n) -> str:
    model, tokenizer = load(path)
    return "".join(r.text for r in stream_generate(model, tokenizer, ids, n))


def test_two_models_by_name_and_lru_eviction(one, oai, tiny_meta_checkpoint):
    """Each model answers by name as it does alone in this process; with --max-loaded-models 1 the
    idle one is unloaded when the other loads (the /v1/models flags say so) and loads again on use;
    an unknown name is a 404 model_not_found in both APIs' shapes."""
    expected = {NAME: greedy(MODEL, PROMPT, 8), TINY: greedy(tiny_meta_checkpoint, PROMPT, 8)}
    assert loaded(one)[NAME] is True and loaded(one)[TINY] is False
    got = {}
    for name in (TINY, NAME, TINY):
        r = oai.completions.create(model=name, prompt=PROMPT, max_tokens=8, temperature=0)
        assert r.model == name
        got.setdefault(name, r.choices[0].text)
        assert r.choices[0].text == expected[name]
        flags = loaded(one)
        assert flags[name] is True and flags[NAME if name == TINY else TINY] is False, flags
    assert got == expected
    by_path = oai.completions.create(model=str(tiny_meta_checkpoint), prompt=PROMPT, max_tokens=8, temperature=0)
    assert by_path.model == TINY and by_path.choices[0].text == expected[TINY]  # the same model, not a second
    assert loaded(one)[HUB_ID] is False  # listed from the Hugging Face cache
    by_id = oai.completions.create(model=HUB_ID, prompt=PROMPT, max_tokens=8, temperature=0)
    assert by_id.model == HUB_ID and by_id.choices[0].text == expected[TINY]  # the same weights
    with pytest.raises(openai.NotFoundError) as e:  # not in the cache: never downloaded at request time
        oai.completions.create(model="test-org/not-cached", prompt=PROMPT, max_tokens=2)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert e.value.code == "model_not_found" and "gpt-4o" in e.value.message
    with pytest.raises(anthropic.NotFoundError) as e:
        one.anthropic().messages.create(
            model="no-such/model", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["error"]["type"] == "not_found_error"
    stats = one.stats()
    assert stats["registry"]["unloads"] >= 4 and set(stats["models"]) == {HUB_ID}


def test_count_tokens_equals_messages_usage(one):
    """count_tokens counts the prompt /v1/messages runs: system, messages and tools (rendered by the
    Meta-tokenizer model's template) included."""
    client = one.anthropic()
    tool = {"name": "get_weather", "description": "Current weather in a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    cases = [dict(model=NAME, system="You are terse.", messages=[{"role": "user", "content": "Count to 3 please."}]),
             dict(model=TINY, system="Use tools.", tools=[tool],
                  messages=[{"role": "user", "content": "Weather in Oslo, right now?"}])]
    for kw in cases:
        counted = client.messages.count_tokens(**kw).input_tokens
        without_tools = client.messages.count_tokens(**{k: v for k, v in kw.items() if k != "tools"}).input_tokens
        usage = client.messages.create(max_tokens=2, extra_body={"temperature": 0}, **kw).usage
        assert counted == usage.input_tokens + usage.cache_read_input_tokens
        assert usage.cache_read_input_tokens == 0  # a prompt not seen before: nothing came from the cache
        if "tools" in kw:
            assert counted > without_tools + 20  # the tool's definition is in the prompt
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="nope", messages=[{"role": "user", "content": "hi"}])


def test_n_choices_greedy_seeded_and_streamed(one, oai):
    """n=3 greedy gives three choices equal to n=1, decoded together (the batch ran 3 rows); with a
    temperature and a seed, two calls give the same choices (which differ from each other); streamed
    chunks carry each choice's index and rebuild the same texts; usage counts the prompt once. (The
    batching, not the text: the tiny model.)"""
    messages = [{"role": "user", "content": "Write a line about the sea."}]
    single = oai.chat.completions.create(model=TINY, messages=messages, max_tokens=6, temperature=0)
    three = oai.chat.completions.create(model=TINY, messages=messages, max_tokens=6, temperature=0, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert [c.message.content for c in three.choices] == [single.choices[0].message.content] * 3
    assert three.usage.prompt_tokens == single.usage.prompt_tokens
    assert three.usage.completion_tokens == 3 * single.usage.completion_tokens
    assert one.stats()["models"][TINY]["batch"]["max_rows"] >= 3
    kw = dict(model=TINY, messages=messages, max_tokens=6, temperature=1.0, seed=7, n=3)
    a, b = (oai.chat.completions.create(**kw) for _ in range(2))
    texts = [c.message.content for c in a.choices]
    assert texts == [c.message.content for c in b.choices] and len(set(texts)) > 1
    streamed = {0: "", 1: "", 2: ""}
    usage = None
    for chunk in oai.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
        usage = chunk.usage or usage
    assert [streamed[i] for i in range(3)] == texts
    assert usage.completion_tokens == a.usage.completion_tokens and usage.prompt_tokens == a.usage.prompt_tokens
    legacy = oai.completions.create(model=TINY, prompt="The sea is", max_tokens=4, temperature=0, n=2)
    assert legacy.choices[0].text == legacy.choices[1].text and [c.index for c in legacy.choices] == [0, 1]
    parts = {0: "", 1: ""}
    for chunk in oai.completions.create(model=TINY, prompt="The sea is", max_tokens=4, temperature=0, n=2,
                                        stream=True):
        for c in chunk.choices:
            parts[c.index] += c.text
    assert parts == {0: legacy.choices[0].text, 1: legacy.choices[1].text}
    r = httpx.post(one.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": TINY, "messages": messages, "n": 9})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def scrape(server, headers=None) -> dict:
    r = httpx.get(server.url + "/metrics", headers=headers if headers is not None else
                  {"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_move_by_what_requests_reported(one, oai):
    """/metrics parses with prometheus_client's parser; its token counters move by exactly the usage the
    requests reported (OpenAI's, Anthropic's and the Responses API's), its request counter by the
    requests sent; it needs the API key."""
    assert httpx.get(one.url + "/metrics").status_code == 401
    oai.completions.create(model=TINY, prompt="warm", max_tokens=1, temperature=0)  # the tiny model loaded
    before = scrape(one)
    m = (("model", TINY),)
    r1 = oai.completions.create(model=TINY, prompt="Metrics are", max_tokens=5, temperature=0)
    r2 = oai.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "Hi there"}], max_tokens=4,
                                     temperature=0, n=2)
    usage = None
    for chunk in oai.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "Say yes"}],
                                             max_tokens=3, temperature=0, stream=True,
                                             stream_options={"include_usage": True}):
        usage = chunk.usage or usage
    m3 = one.anthropic().messages.create(
        model=TINY, max_tokens=3, messages=[{"role": "user", "content": "Say no"}])
    r4 = oai.responses.create(model=TINY, input="Say maybe", max_output_tokens=3, temperature=0)
    after = scrape(one)

    def delta(name, labels=m):
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    prompt = r1.usage.prompt_tokens + r2.usage.prompt_tokens + usage.prompt_tokens + \
        m3.usage.input_tokens + m3.usage.cache_read_input_tokens + r4.usage.input_tokens
    generated = r1.usage.completion_tokens + r2.usage.completion_tokens + usage.completion_tokens + \
        m3.usage.output_tokens + r4.usage.output_tokens
    assert delta("llama_mlx_prompt_tokens_total") == prompt
    assert delta("llama_mlx_generation_tokens_total") == generated
    assert delta("llama_mlx_time_to_first_token_seconds_count") == 6  # one a generation: n=2 is two
    assert delta("llama_mlx_prefix_cache_hits_total") + delta("llama_mlx_prefix_cache_misses_total") == 6
    assert delta("llama_mlx_time_to_first_token_seconds_bucket", (("le", "+Inf"),) + m) == 6
    ok = (("endpoint", "/v1/chat/completions"), ("method", "POST"), ("status", "200"))
    assert delta("llama_mlx_requests_total", ok) == 2
    assert after[("llama_mlx_model_loaded", m)] == 1 and after[("llama_mlx_model_weights_bytes", m)] > 1e6
    assert ("llama_mlx_requests_waiting", m) in after


@pytest.fixture(scope="module")
def kept(tmp_path_factory, home):
    """No bound on loaded models; idle ones unloaded after 2 seconds."""
    s = Server(tmp_path_factory.mktemp("serve-keep"), "--keep-alive", "2s", env={"LLAMA_MLX_HOME": str(home)})
    yield s
    s.stop()


def test_stream_goes_on_while_another_model_loads_and_keep_alive(kept):
    """A stream of the default model keeps coming while the tiny model loads (its chunks arrive
    between the tiny request's start and its answer); then each idle model is unloaded about 2
    seconds after its last use, not before, and loads again when asked for."""
    stamps, first_chunk = [], threading.Event()

    def stream():
        with httpx.stream("POST", kept.url + "/v1/completions", timeout=300, json={
                "model": NAME, "prompt": "Tell a long story.", "max_tokens": 60, "temperature": 0,
                "logit_bias": {"0": -100, "2": -100}, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    stamps.append(time.monotonic())
                    first_chunk.set()

    t = threading.Thread(target=stream)
    t.start()
    assert first_chunk.wait(120)
    assert loaded(kept)[TINY] is False
    start = time.monotonic()
    r = httpx.post(kept.url + "/v1/completions", timeout=300,
                   json={"model": TINY, "prompt": PROMPT, "max_tokens": 2, "temperature": 0})
    done = time.monotonic()
    assert r.status_code == 200, r.text
    t.join(300)
    ended = time.monotonic()
    during = [s for s in stamps if start < s < done]
    gaps = [b - a for a, b in zip(stamps, stamps[1:]) if start <= b and a <= done]
    # (the tiny load takes ~0.7 s here, a SmolLM2 token 0.2-0.35 s: a stream held up by the load would
    # show one chunk in that window at most, and a gap as long as the load)
    assert len(stamps) > 50 and len(during) >= 2 and max(gaps) < 1.0, (len(during), max(gaps), done - start)
    while loaded(kept)[TINY]:
        assert time.monotonic() - done < 15, "keep-alive never unloaded the tiny model"
        time.sleep(0.1)
    assert time.monotonic() - done > 1.7  # its last use ended at `done`: 2 s idle, not less
    while loaded(kept)[NAME]:  # the default model too, once idle as long
        assert time.monotonic() - ended < 15, "keep-alive never unloaded the default model"
        time.sleep(0.1)
    assert httpx.get(kept.url + "/health").json()["status"] == "ok"
    again = httpx.post(kept.url + "/v1/completions", timeout=300,
                       json={"model": TINY, "prompt": PROMPT, "max_tokens": 2, "temperature": 0})
    assert again.json()["choices"][0]["text"] == r.json()["choices"][0]["text"]
    assert json.loads(httpx.get(kept.url + "/v1/internal/stats").text)["registry"]["unloads"] >= 2


def test_registry_byte_budget_evicts_the_least_recently_used_idle_model(tmp_path, tiny_meta_checkpoint):
    """ModelRegistry in this process over real engines: with room for one model's bytes, loading a
    second unloads the least recently used idle one (and it loads again on use); a model larger than
    the whole budget and an unknown name are refused; keep-alive 0 unloads a model once idle, but
    never one that nothing could load again."""
    import asyncio
    import shutil

    from llama_mlx.engine import Engine, GenerationRequest
    from llama_mlx.registry import ModelRegistry, RegistryBusyError, UnknownModelError
    from llama_mlx.sample import SamplingParams

    a, b = tiny_meta_checkpoint, shutil.copytree(tiny_meta_checkpoint, tmp_path / "tiny-copy")
    registry = ModelRegistry(lambda p: Engine(lambda: load(p), max_concurrency=1))

    async def answer(name) -> list[int]:
        engine = await registry.engine(name)
        job = engine.submit(GenerationRequest(prompt=PROMPT, max_tokens=3, params=SamplingParams(temp=0)))
        return [e.token async for e in job]

    def flags() -> dict:
        return {i.name: i.loaded for i in registry.list(listed=False)}

    async def main():
        assert (await registry.engine(str(a))).batch.steps == 0  # loaded for a request: no warm-up before it
        first = await answer(str(a))
        info = registry.list(listed=False)[0]
        registry.max_bytes = info.loaded_bytes + info.size_bytes - 1  # one model, never two
        assert await answer(str(b)) == first  # the same weights
        assert flags() == {str(a): False, str(b): True}
        assert await answer(str(a)) == first and flags() == {str(a): True, str(b): False}
        assert registry.unloads == 2
        registry.max_bytes = info.size_bytes // 2
        with pytest.raises(RegistryBusyError):
            await registry.engine(str(b))
        with pytest.raises(UnknownModelError):
            await registry.engine(str(tmp_path / "nothing-here"))
        registry.max_bytes, registry.keep_alive = None, 0
        await asyncio.sleep(1.1)  # past the hand-off grace
        assert await registry.sweep() == [str(a)] and not any(flags().values())
        # An engine nothing could load again (create_app(engine), mlx.launch's) is never unloaded.
        preloaded = pinned.add("one", None, engine=Engine(lambda: load(a), max_concurrency=1))
        assert preloaded.wait_ready() and preloaded.batch.steps > 0  # a preloaded model warms up
        await asyncio.sleep(1.1)
        assert await pinned.sweep() == [] and await pinned.unload("one") is False
        assert (await pinned.engine(None)).ready

    pinned = ModelRegistry(keep_alive=0)
    try:
        asyncio.run(main())
    finally:
        registry.close()
        pinned.close()


def test_serve_refuses_bad_model_options_in_one_line(tmp_path):
    """A keep-alive that is no duration, and more preloaded models than --max-loaded-models, are one
    line each and exit 2, before anything loads or listens."""
    import subprocess
    import sys
    from pathlib import Path

    cli = Path(sys.executable).parent / "llama-mlx"
    for args, words in ((["--keep-alive", "soon"], "--keep-alive"),
                        (["-M", str(MODEL), "-M", str(MODEL), "--max-loaded-models", "1"], "--max-loaded-models")):
        r = subprocess.run([str(cli), "serve", "--port", "1", *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_registry_serves_a_loaded_model_while_another_waits_for_room(tmp_path, tiny_meta_checkpoint):
    """With room for one model and that one busy, a request for a second model waits (nothing idle to
    unload), yet the busy model's own requests are answered at once; once it is idle the second loads."""
    import asyncio
    import shutil

    from llama_mlx.engine import Engine, GenerationRequest
    from llama_mlx.registry import ModelRegistry
    from llama_mlx.sample import SamplingParams

    a, b = str(tiny_meta_checkpoint), str(shutil.copytree(tiny_meta_checkpoint, tmp_path / "tiny-copy"))
    registry = ModelRegistry(lambda p: Engine(lambda: load(p), max_concurrency=2), max_loaded=1)

    async def main():
        engine = await registry.engine(a)
        long = engine.submit(GenerationRequest(prompt=PROMPT, max_tokens=100_000, params=SamplingParams(temp=0)))
        await long.__anext__()  # running
        waiting = asyncio.create_task(registry.engine(b))
        await asyncio.sleep(1.5)  # past the hand-off grace: only the running job keeps `a` loaded
        assert not waiting.done()
        again = await asyncio.wait_for(registry.engine(a), 1.0)  # not behind the load that waits
        assert again is engine
        long.cancel()
        second = await asyncio.wait_for(waiting, 60)
        assert second is not engine and {i.name: i.loaded for i in registry.list(listed=False)} == {a: False, b: True}

    try:
        asyncio.run(main())
    finally:
        registry.close()
