"""`llama-mlx serve`'s sampling defaults (issue 31 item 8) and four protocol fixes (item 10), on real server
processes serving tiny random models with Meta's tokenizer, driven by the official `openai`, `anthropic` and
`ollama` clients. Oracles: greedy generation in this process (llama_mlx.generate) on the same folder, the
same request with temperature 0, the clients' own error classes and parsers, json.loads, and
/v1/messages/count_tokens for the prompt's whole length."""

import json
import os

import anthropic
import numpy as np
import ollama
import openai
import pytest
from test_server import KEY, WEATHER, Server

from llama_mlx.generate import stream_generate
from llama_mlx.loading import load

PROMPT = list(range(1000, 1016))  # token ids of Meta's vocabulary
N = 8
AUTH = {"Authorization": f"Bearer {KEY}"}
# The folders served: the tiny random model with generation_config.json saying greedy, saying hot, saying
# nonsense, and none.
CONFIGS = {"greedy": {"temperature": 0.0}, "hot": {"temperature": 1.5, "top_p": 0.95},
           "odd": {"temperature": -1, "top_p": 0}, "plain": None}
TOOL = {"name": "get_weather", "description": "Current weather", "input_schema": WEATHER["function"]["parameters"]}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_meta_checkpoint) -> dict:
    base = tmp_path_factory.mktemp("defaults")
    out = {}
    for name, config in CONFIGS.items():
        folder = base / name
        folder.mkdir()
        for f in tiny_meta_checkpoint.iterdir():  # (hard links: a model's files may not lead out of it)
            os.link(f, folder / f.name)
        if config is not None:
            (folder / "generation_config.json").write_text(json.dumps(config))
        out[name] = folder
    return out


@pytest.fixture(scope="module")
def srv(tmp_path_factory, folders):
    """The folders, "greedy" the default, with --top-p 0.5 for every model's requests that set none."""
    s = Server(tmp_path_factory.mktemp("serve-defaults"), "--api-key", KEY, "--top-p", "0.5",
               *(a for name in ("hot", "odd", "plain") for a in ("--model", str(folders[name]))),
               model=folders["greedy"])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def oai(srv):
    return srv.openai()


@pytest.fixture(scope="module")
def expected(folders) -> str:
    """The tiny model's greedy text after PROMPT, in this process."""
    model, tokenizer = load(folders["greedy"])
    return "".join(r.text for r in stream_generate(model, tokenizer, PROMPT, N))


# -- item 8: sampling defaults


def test_each_model_samples_with_its_own_defaults(oai):
    """A request without temperature / top_p takes its model's generation_config.json, else Meta's 0.6
    (never 1.0; values out of range there count as unset); serve's --top-p stands in for every model's
    top_p; a request's own values win."""
    for model, temp in (("greedy", 0.0), ("hot", 1.5), ("odd", 0.6), ("plain", 0.6)):
        r = oai.responses.create(model=model, input="hi", max_output_tokens=2)
        assert (model, r.temperature, r.top_p) == (model, temp, 0.5)
    r = oai.responses.create(model="hot", input="hi", max_output_tokens=2, temperature=0.3, top_p=0.8)
    assert (r.temperature, r.top_p) == (0.3, 0.8)


def test_a_greedy_model_is_greedy_in_every_api(srv, oai, expected):
    """The "greedy" model's requests without temperature decode as this process's greedy run does
    (completions from token ids), and as the same request at temperature 0 in every API (a model sampled
    at 1.0, the old default, answers otherwise: its random weights spread the probability wide)."""
    for _ in range(2):
        r = oai.completions.create(model="greedy", prompt=PROMPT, max_tokens=N)
        assert r.choices[0].text == expected
    chat = dict(model="greedy", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=N)
    assert (oai.chat.completions.create(**chat).choices[0].message.content
            == oai.chat.completions.create(**chat, temperature=0).choices[0].message.content)
    resp = dict(model="greedy", input="Tell me a story.", max_output_tokens=N)
    assert oai.responses.create(**resp).output_text == oai.responses.create(**resp, temperature=0).output_text
    claude = srv.anthropic()
    msg = dict(model="greedy", max_tokens=N, messages=[{"role": "user", "content": "Tell me a story."}])
    assert (claude.messages.create(**msg).content[0].text
            == claude.messages.create(**msg, extra_body={"temperature": 0}).content[0].text)
    oll = ollama.Client(host=srv.url, headers=AUTH, timeout=120)
    gen = dict(model="greedy", prompt="Tell me a story.", stream=False)
    assert (oll.generate(**gen, options={"num_predict": N}).response
            == oll.generate(**gen, options={"num_predict": N, "temperature": 0}).response)
    talk = dict(model="greedy", messages=[{"role": "user", "content": "Tell me a story."}], stream=False)
    assert (oll.chat(**talk, options={"num_predict": N}).message.content
            == oll.chat(**talk, options={"num_predict": N, "temperature": 0}).message.content)


def test_serve_temp_overrides_the_models_default(tmp_path_factory, folders, expected):
    """serve --temp 0 makes the "hot" model (temperature 1.5 in its generation_config.json) greedy for
    requests that set none; a request's own temperature still wins."""
    s = Server(tmp_path_factory.mktemp("serve-temp"), "--api-key", KEY, "--temp", "0", model=folders["hot"])
    try:
        oai = s.openai()
        assert oai.completions.create(model="hot", prompt=PROMPT, max_tokens=N).choices[0].text == expected
        r = oai.responses.create(model="hot", input="hi", max_output_tokens=2)
        assert (r.temperature, r.top_p) == (0.0, 0.95)
        assert oai.responses.create(model="hot", input="hi", max_output_tokens=2, temperature=0.9).temperature == 0.9
    finally:
        s.stop()


# -- item 10a: malformed bodies are 400s in each API's shape


def test_malformed_bodies_are_400_bad_requests(srv, oai):
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="greedy", messages=[{"role": "user", "content": "hi"}],
                                    temperature="hot", max_tokens=2)
    assert e.value.status_code == 400
    assert e.value.body["type"] == "invalid_request_error" and e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="greedy", prompt={"not": "a prompt"}, max_tokens=2)
    assert e.value.status_code == 400 and e.value.body["param"] == "prompt"
    with pytest.raises(anthropic.BadRequestError) as e:
        srv.anthropic().messages.create(model="greedy", max_tokens=2, messages="hi")
    assert e.value.status_code == 400
    assert e.value.body == {"type": "error", "error": {"type": "invalid_request_error",
                                                       "message": "'messages' must be a non-empty list"}}


# -- item 10b: an image a tool returned


def test_an_image_in_a_tool_result_is_refused_by_a_text_model(srv):
    png = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")
    messages = [{"role": "user", "content": "Show me the weather map."},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                                   "input": {"city": "Paris", "unit": "c"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [
                    {"type": "text", "text": "the map:"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}}]}]}]
    with pytest.raises(anthropic.BadRequestError) as e:
        srv.anthropic().messages.create(model="greedy", max_tokens=2, tools=[TOOL], messages=messages)
    assert e.value.status_code == 400 and "takes no images" in e.value.body["error"]["message"]


# -- item 10c: a forced tool call cut by max_tokens


def test_a_forced_call_cut_by_max_tokens_is_a_partial_call(srv, oai):
    """Cut by max_tokens, a forced call comes back as a call whose arguments parse (OpenAI: finish_reason
    "length", streamed or not; Anthropic: a tool_use block, stop_reason "max_tokens"), never as text."""
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    kw = dict(model="greedy", messages=messages, tools=[WEATHER], tool_choice=NAMED)
    whole = oai.chat.completions.create(**kw, max_tokens=60)
    assert whole.choices[0].finish_reason == "tool_calls"
    cut_at = whole.usage.completion_tokens - 4  # inside the arguments
    r = oai.chat.completions.create(**kw, max_tokens=cut_at)
    choice = r.choices[0]
    assert choice.finish_reason == "length" and not choice.message.content
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments), dict)
    chunks = list(oai.chat.completions.create(**kw, max_tokens=cut_at, stream=True))
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    deltas = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
    assert [(d.function.name, d.function.arguments) for d in deltas] == [("get_weather", call.function.arguments)]
    assert chunks[-1].choices[0].finish_reason == "length"
    claude = srv.anthropic()
    akw = dict(model="greedy", max_tokens=cut_at, tools=[TOOL], tool_choice={"type": "tool", "name": "get_weather"},
               messages=messages)
    m = claude.messages.create(**akw)
    assert m.stop_reason == "max_tokens" and [b.type for b in m.content] == ["tool_use"]
    assert m.content[0].name == "get_weather" and m.content[0].input == json.loads(call.function.arguments)
    with claude.messages.stream(**akw) as s:
        final = s.get_final_message()
    assert final.stop_reason == "max_tokens"
    assert [(b.type, b.name, b.input) for b in final.content] == [("tool_use", "get_weather", m.content[0].input)]
    # The Responses API: an incomplete function_call item (max_output_tokens), streamed or not.
    rtool = {"type": "function", **WEATHER["function"]}
    rkw = dict(model="greedy", input=messages, tools=[rtool], tool_choice={"type": "function", "name": "get_weather"},
               max_output_tokens=cut_at)
    resp = oai.responses.create(**rkw)
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    assert [(o.type, o.name, o.status) for o in resp.output] == [("function_call", "get_weather", "incomplete")]
    assert json.loads(resp.output[0].arguments) == json.loads(call.function.arguments)
    events = list(oai.responses.create(**rkw, stream=True))
    assert events[-1].type == "response.incomplete"
    assert [(o.type, o.arguments) for o in events[-1].response.output] == [("function_call", resp.output[0].arguments)]


def test_the_budget_closes_an_open_string_before_its_object(tokenizer_model_path):
    """With the budget nearly spent, `{"city": "Par` goes on with the string's closing quote and the
    object's brace, whatever the model would rather write: the text parses (json.loads)."""
    from llama_mlx.structured import json_logits_processor
    from llama_mlx.tokenizer import load_tokenizer

    import mlx.core as mx

    tok = load_tokenizer(tokenizer_model_path)
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
              "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    stops = {int(tok.eos_id), *map(int, tok.stop_tokens)}
    for seed in range(3):
        proc = json_logits_processor(tok, fmt, max_tokens=12)
        history = [128000] + tok.encode('{"city": "Par', bos=False)
        proc(mx.array(history[:1]), mx.zeros((1, tok.vocab_size)))  # (the first call sees the prompt)
        rng = np.random.default_rng(seed)
        for _ in range(4):
            logits = proc(mx.array(history), mx.array(rng.normal(size=(1, tok.vocab_size)).astype(np.float32)))
            token = int(mx.argmax(logits[0]).item())
            if token in stops:
                break
            history.append(token)
        text = tok.decode(history[1:])
        assert json.loads(text)["city"].startswith("Par"), text


# -- item 10d: Anthropic's input_tokens leave out what the prefix cache read


def test_anthropic_input_tokens_leave_out_the_cached_prefix(srv):
    claude = srv.anthropic()
    system = "You are a terse weather assistant. " * 8
    kw = dict(model="greedy", max_tokens=2, system=system, messages=[{"role": "user", "content": "Rome?"}])
    total = claude.messages.count_tokens(model="greedy", system=system, messages=kw["messages"]).input_tokens
    claude.messages.create(**kw)  # the prompt's KV is kept by the prefix cache
    again = claude.messages.create(**kw).usage
    assert again.cache_read_input_tokens > 16
    assert again.input_tokens + again.cache_read_input_tokens == total
    with claude.messages.stream(**kw) as s:
        start = next(e for e in s if e.type == "message_start").message.usage
        s.get_final_message()
    assert start.cache_read_input_tokens > 16
    assert start.input_tokens == total - start.cache_read_input_tokens
    assert claude.messages.count_tokens(model="greedy", system=system, messages=kw["messages"]).input_tokens == total


def test_an_image_in_a_tool_result_reaches_a_vision_model(tmp_path_factory):
    """Served by a vision model, a tool_result's image is read with the user turn after the results: the
    answer is what this process generates for that conversation with that image (two images, two
    answers: it was dropped before)."""
    import base64
    import io

    import llama_mlx
    from mllama_oracle import write_tiny_folder
    from PIL import Image
    from test_server_vision import png

    folder = tmp_path_factory.mktemp("mllama") / "tiny-vision"
    write_tiny_folder(folder)
    s = Server(tmp_path_factory.mktemp("serve-vision-tool"), "--api-key", KEY, model=folder)
    try:
        claude = s.anthropic(timeout=300)
        model, processor = llama_mlx.load(str(folder))
        answers = {}
        for seed in (1, 2):
            result = [{"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                   "data": base64.b64encode(png(seed)).decode()}}]
            r = claude.messages.create(model="tiny-vision", max_tokens=N, extra_body={"temperature": 0}, messages=[
                {"role": "user", "content": "What is in front of you?"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "camera", "input": {}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": result}]}])
            call = {"id": "toolu_1", "type": "function", "function": {"name": "camera", "arguments": {}}}
            local = [{"role": "user", "content": "What is in front of you?"},
                     {"role": "assistant", "content": '{"name": "camera", "parameters": {}}', "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": "toolu_1", "content": ""},
                     {"role": "user", "content": [{"type": "image"}]}]
            answers[seed] = llama_mlx.generate(model, processor, local, N, images=[Image.open(io.BytesIO(png(seed)))])
            assert r.content[0].text == answers[seed], seed
        assert answers[1] != answers[2]
    finally:
        s.stop()
