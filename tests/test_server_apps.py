"""The apps' endpoints of `llama-mlx serve` (OpenAI's embeddings and Responses, ollama's API) on a real
server process (a tiny random model with Meta's tokenizer, offline), driven by the official `openai` and
`ollama` clients. Oracles: `llama_mlx.embed` in-process on the same checkpoint (itself held to
transformers in test_embed.py), jsonschema, the server's own non-streamed answer for the streamed one
(temperature 0), Meta's tokenizer for the token counts."""

import base64
import json

import httpx2 as httpx
import jsonschema
import numpy as np
import pytest

import llama_mlx
from test_server import KEY, Server

AUTH = {"Authorization": f"Bearer {KEY}"}
NAME = "tiny"  # the served folder's name


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_meta_checkpoint):
    home = tmp_path_factory.mktemp("hf-home")
    s = Server(tmp_path_factory.mktemp("serve-apps"), "--api-key", KEY, model=tiny_meta_checkpoint,
               env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(home)})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def oai(srv):
    return srv.openai()


@pytest.fixture(scope="module")
def local(tiny_meta_checkpoint):
    return llama_mlx.load(str(tiny_meta_checkpoint))


# -- embeddings


def test_openai_embeddings_equal_the_library(oai, local):
    texts = ["The cat sat on the mat.", "Embeddings", "A longer sentence than the others, to pad the batch."]
    want = np.array(llama_mlx.embed(*local, texts))
    got = oai.embeddings.create(model=NAME, input=texts)  # the client asks for base64 and decodes it
    assert [d.index for d in got.data] == [0, 1, 2]
    np.testing.assert_allclose(np.array([d.embedding for d in got.data]), want, atol=1e-5)
    tok = local[1]
    n = sum(len(tok.encode(t, bos=True)) for t in texts)
    assert got.usage.prompt_tokens == got.usage.total_tokens == n
    floats = oai.embeddings.create(model=NAME, input=texts[1], encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, want[1], atol=1e-5)
    ids = tok.encode(texts[0], bos=True)
    by_ids = oai.embeddings.create(model=NAME, input=[ids], encoding_format="float")
    np.testing.assert_allclose(by_ids.data[0].embedding, want[0], atol=1e-5)
    last = oai.embeddings.create(model=NAME, input=texts[:1], encoding_format="float", extra_body={"pooling": "last"})
    np.testing.assert_allclose(last.data[0].embedding, np.array(llama_mlx.embed(*local, texts[:1], pooling="last"))[0],
                               atol=1e-5)
    cut = oai.embeddings.create(model=NAME, input=texts[:1], encoding_format="float", dimensions=8).data[0].embedding
    np.testing.assert_allclose(cut, want[0][:8] / np.linalg.norm(want[0][:8]), atol=1e-5)
    many = [f"sentence number {i}" + "!" * i for i in range(11)]  # more than one call's worth on the engine
    got = oai.embeddings.create(model=NAME, input=many, encoding_format="float")
    np.testing.assert_allclose(np.array([d.embedding for d in got.data]), np.array(llama_mlx.embed(*local, many)),
                               atol=1e-5)


def test_embeddings_errors_are_json(srv):
    def post(body):
        return httpx.post(srv.url + "/v1/embeddings", json=body, headers=AUTH, timeout=60)

    for body, status, param in [({"input": ""}, 400, "input"), ({"input": []}, 400, "input"),
                                ({"input": [[1, 10**7]]}, 400, "input"), ({"input": {"a": 1}}, 400, "input"),
                                ({}, 400, "input"), ({"input": "x", "encoding_format": "hex"}, 400, "encoding_format"),
                                ({"input": "x", "pooling": "cls"}, 400, "pooling")]:
        r = post(body)
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"]["param"] == param
    raw = base64.b64decode(post({"input": "x", "encoding_format": "base64"}).json()["data"][0]["embedding"])
    assert len(raw) == 4 * 128  # the tiny model's 128 float32 values


# -- OpenAI Responses


WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                               "unit": {"type": "string", "enum": ["c", "f"]}},
                               "required": ["city", "unit"], "additionalProperties": False}}
CHAT_WEATHER = {"type": "function", "function": {k: WEATHER_TOOL[k] for k in ("name", "description", "parameters")}}


def sse_events(srv, body) -> list[dict]:
    """The raw events of a streamed request, each checked against the event name it came with."""
    events, name = [], None
    with httpx.stream("POST", srv.url + "/v1/responses", json={**body, "stream": True}, headers=AUTH,
                      timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                assert event["type"] == name
                events.append(event)
    return events


def validate_events(events):
    from openai.types.responses import ResponseStreamEvent
    from pydantic import TypeAdapter

    adapter = TypeAdapter(ResponseStreamEvent)
    for event in events:
        adapter.validate_python(event)  # every field the SDK's types require, of its type
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


def test_responses_text_both_ways(srv, oai):
    from openai.types.responses import Response

    kw = dict(model=NAME, input="Say hello.", instructions="You are terse.", max_output_tokens=8, temperature=0)
    raw = httpx.post(srv.url + "/v1/responses", json=kw, headers=AUTH, timeout=120).json()
    Response.model_validate(raw)
    r = oai.responses.create(**kw)
    assert r.id.startswith("resp_") and r.object == "response" and r.model == "tiny"
    (item,) = r.output
    assert item.type == "message" and item.id.startswith("msg_") and item.role == "assistant"
    chat = oai.chat.completions.create(model=NAME, messages=[{"role": "system", "content": "You are terse."},
                                                            {"role": "user", "content": "Say hello."}],
                                       max_tokens=8, temperature=0)
    assert r.output_text == chat.choices[0].message.content == raw["output"][0]["content"][0]["text"]
    u = r.usage
    assert (u.input_tokens, u.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)
    assert u.total_tokens == u.input_tokens + u.output_tokens
    if chat.choices[0].finish_reason == "length":
        assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    else:
        assert r.status == "completed"

    events = sse_events(srv, kw)
    validate_events(events)
    kinds = [e["type"] for e in events]
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * len(deltas),
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     f"response.{r.status}"]
    final = events[-1]["response"]
    assert "".join(deltas) == events[-4]["text"] == final["output"][0]["content"][0]["text"] == r.output_text
    assert final["usage"]["output_tokens"] == u.output_tokens and final["id"].startswith("resp_")
    with oai.responses.create(**kw, stream=True) as stream:  # the client reads the same stream
        texts = [e.delta for e in stream if e.type == "response.output_text.delta"]
    assert "".join(texts) == r.output_text


def test_responses_function_call_out_and_output_in(srv, oai):
    kw = dict(model=NAME, input="What is the weather in Paris?", tools=[WEATHER_TOOL], tool_choice="required",
              max_output_tokens=60, temperature=0)
    r = oai.responses.create(**kw)
    (call,) = r.output
    assert call.type == "function_call" and call.id.startswith("fc_") and call.call_id.startswith("call_")
    assert call.name == "get_weather" and r.status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER_TOOL["parameters"])

    events = sse_events(srv, kw)
    validate_events(events)
    done = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert [(d["name"], d["arguments"]) for d in done] == [("get_weather", call.arguments)]
    assert not [e for e in events if e["type"] == "response.output_text.delta"]
    assert events[-1]["type"] == "response.completed" and events[-1]["response"]["output"][0]["type"] == "function_call"

    follow = [{"role": "user", "content": "What is the weather in Paris?"}, call.model_dump(exclude_none=True),
              {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp": 18}'}]
    again = oai.responses.create(model=NAME, input=follow, tools=[WEATHER_TOOL], max_output_tokens=4, temperature=0)
    chat = oai.chat.completions.create(model=NAME, tools=[CHAT_WEATHER], max_tokens=4, temperature=0, messages=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"id": call.call_id, "type": "function",
                                              "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": '{"temp": 18}'}])
    assert again.usage.input_tokens == chat.usage.prompt_tokens


def test_responses_json_schema(oai):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["answer", "n"], "additionalProperties": False}
    r = oai.responses.create(model=NAME, input="Answer in JSON.", max_output_tokens=60, temperature=0,
                             text={"format": {"type": "json_schema", "name": "a", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(r.output_text), schema)
    assert r.text.format.type == "json_schema"


def test_responses_errors(srv):
    def post(body):
        return httpx.post(srv.url + "/v1/responses", json=body, headers=AUTH, timeout=60)

    for body, status, param in [({"input": 5}, 400, "input"), ({"input": []}, 400, "input"),
                                ({"input": "x", "previous_response_id": "resp_1"}, 400, "previous_response_id"),
                                ({"input": "x", "tools": [{"type": "web_search"}]}, 400, "tools"),
                                ({"input": [{"type": "input_image", "image_url": "x"}]}, 400, "input"),
                                ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, 400, "input"),
                                ({"input": "x", "text": {"format": {"type": "xml"}}}, 400, "text.format"),
                                ({"input": "x", "max_output_tokens": 0}, 400, "max_output_tokens"),
                                ({"input": "x", "temperature": 3}, 400, "temperature")]:
        r = post(body)
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"]["param"] == param, r.text


# -- ollama's API


SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["answer", "n"], "additionalProperties": False}
T0_8 = {"temperature": 0, "num_predict": 8}


@pytest.fixture(scope="module")
def oll(srv):
    import ollama

    return ollama.Client(host=srv.url, headers=AUTH, timeout=120)


def test_ollama_version_tags_ps_show(srv, oll, tiny_meta_checkpoint):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    version = httpx.get(srv.url + "/api/version", headers=AUTH).json()["version"]
    assert [int(p) for p in version.split(".")] >= [0, 5, 0]
    (listed,) = [m for m in oll.list().models if m.model == NAME]
    assert listed.size > 0 and listed.details.family == "llama" and listed.details.quantization_level == "Q4"
    (loaded,) = oll.ps().models
    assert loaded.model == NAME and loaded.context_length == 131072 and loaded.size > 0
    shown = oll.show(NAME)
    assert shown.capabilities == ["completion", "tools"]  # Meta's format renders tools
    info = shown.modelinfo
    config = json.loads((tiny_meta_checkpoint / "config.json").read_text())
    with torch.device("meta"):  # transformers counts the parameters of the same shape
        reference = LlamaForCausalLM(LlamaConfig(**config))
    assert info["general.parameter_count"] == sum(p.numel() for p in reference.parameters())
    assert info["general.architecture"] == "llama" and info["llama.context_length"] == 131072
    assert (info["llama.embedding_length"], info["llama.block_count"], info["llama.attention.head_count_kv"]) == (
        config["hidden_size"], config["num_hidden_layers"], config["num_key_value_heads"])
    assert shown.details.parameter_size.endswith("M") and 'stop "<|eot_id|>"' in shown.parameters


def test_ollama_chat_both_ways_and_format(srv, oll, oai):
    messages = [{"role": "user", "content": "Say hello."}]
    r = oll.chat(model=NAME, messages=messages, options=T0_8, stream=False)
    want = oai.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0)
    assert r.message.role == "assistant" and r.message.content == want.choices[0].message.content
    assert r.done and r.done_reason == want.choices[0].finish_reason
    assert (r.prompt_eval_count, r.eval_count) == (want.usage.prompt_tokens, want.usage.completion_tokens)
    parts = list(oll.chat(model=NAME, messages=messages, options=T0_8, stream=True))
    assert "".join(p.message.content for p in parts) == r.message.content
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True] and parts[-1].eval_count == r.eval_count
    # a request without "stream" is streamed, as ollama's are: one JSON object a line
    raw = httpx.post(srv.url + "/api/chat", json={"model": NAME, "messages": messages, "options": T0_8},
                     headers=AUTH, timeout=60)
    assert raw.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in raw.text.splitlines()]
    assert "".join(x["message"]["content"] for x in lines) == r.message.content and lines[-1]["done"]

    j = oll.chat(model=NAME, messages=[{"role": "user", "content": "Answer in JSON."}], format=SCHEMA,
                 options={"temperature": 0, "num_predict": 60}, stream=False)
    jsonschema.validate(json.loads(j.message.content), SCHEMA)
    streamed = "".join(p.message.content for p in oll.chat(model=NAME, format=SCHEMA, stream=True, options={
        "temperature": 0, "num_predict": 60}, messages=[{"role": "user", "content": "Answer in JSON."}]))
    assert streamed == j.message.content


def test_ollama_tools_in_and_calls_out(oll, oai):
    import ollama

    from llama_mlx.api_ollama import _ollama_calls
    from llama_mlx.tools import parse_tool_calls

    history = [{"role": "user", "content": "What is the weather in Paris?"},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}}]},
               {"role": "tool", "content": '{"temp": 18}', "tool_name": "get_weather"}]
    # ollama's client keeps only type, description, enum and items of each property: a tool it sends whole
    properties = {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}}
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                             "parameters": {"type": "object", "required": ["city", "unit"],
                                                            "properties": properties}}}
    r = oll.chat(model=NAME, messages=history, tools=[tool], options=T0_8, stream=False)
    want = oai.chat.completions.create(model=NAME, tools=[tool], max_tokens=8, temperature=0, messages=[
        history[0], {"role": "assistant", "tool_calls": [{"id": "call_0_0", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_0_0", "content": '{"temp": 18}', "name": "get_weather"}])
    assert r.prompt_eval_count == want.usage.prompt_tokens
    # A reply that is a call comes back as ollama's tool_calls (the random model will not make one by itself).
    reply = parse_tool_calls('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}', [CHAT_WEATHER])
    message = ollama.Message(role="assistant", content="", tool_calls=_ollama_calls(reply.tool_calls))
    assert message.tool_calls[0].function.arguments == {"city": "Paris", "unit": "c"}


def test_ollama_generate(oll, oai):
    r = oll.generate(model=NAME, prompt="Say hi.", options=T0_8, stream=False)
    want = oai.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Say hi."}], max_tokens=8,
                                       temperature=0)
    assert r.response == want.choices[0].message.content and r.done
    assert r.context[:r.prompt_eval_count] and len(r.context) <= r.prompt_eval_count + r.eval_count
    streamed = list(oll.generate(model=NAME, prompt="Say hi.", options=T0_8, stream=True))
    assert "".join(p.response for p in streamed) == r.response and streamed[-1].context == r.context
    raw = oll.generate(model=NAME, prompt="Once upon a time", raw=True, options=T0_8, stream=False)
    plain = oai.completions.create(model=NAME, prompt="Once upon a time", max_tokens=8, temperature=0)
    assert raw.response == plain.choices[0].text and raw.prompt_eval_count == plain.usage.prompt_tokens
    more = oll.generate(model=NAME, prompt="And then?", context=r.context, options=T0_8, stream=False)
    assert more.prompt_eval_count > len(r.context)
    # seed -1 is ollama's "a random seed", not an error; greedy is still greedy
    random_seed = oll.generate(model=NAME, prompt="Say hi.", options={**T0_8, "seed": -1}, stream=False)
    assert random_seed.response == r.response


def test_ollama_embed(oll, local):
    texts = ["The cat sat on the mat.", "Embeddings"]
    got = oll.embed(model=NAME, input=texts)
    np.testing.assert_allclose(np.array(got.embeddings), np.array(llama_mlx.embed(*local, texts)), atol=1e-5)
    assert got.prompt_eval_count == sum(len(local[1].encode(t, bos=True)) for t in texts)
    legacy = oll.embeddings(model=NAME, prompt=texts[0]).embedding
    np.testing.assert_allclose(legacy, np.array(llama_mlx.embed(*local, texts[:1], normalize=False))[0], atol=1e-4)


def test_ollama_pull_offline_and_errors(srv, oll):
    import ollama

    with pytest.raises(ollama.ResponseError, match="test-org/absent.*HF_HUB_OFFLINE"):
        list(oll.pull("test-org/absent", stream=True))
    with pytest.raises(ollama.ResponseError, match="not a Hugging Face id") as e:
        oll.pull("llama3.2", stream=False)
    assert e.value.status_code == 400
    with pytest.raises(ollama.ResponseError) as e:
        oll.chat(model="no-such-model", messages=[{"role": "user", "content": "x"}], stream=False)
    assert e.value.status_code == 404
    for path, body, status in [("chat", {"messages": "x"}, 400), ("chat", {"messages": [], "keep_alive": "soon"}, 400),
                               ("generate", {"prompt": "x", "options": {"temperature": "hot"}}, 400),
                               ("generate", {"prompt": "x", "format": "xml"}, 400),
                               ("embed", {"input": 5}, 400), ("show", {"model": "no-such-model"}, 404)]:
        r = httpx.post(f"{srv.url}/api/{path}", json=body, headers=AUTH, timeout=60)
        assert r.status_code == status and list(r.json()) == ["error"], (path, body, r.text)
    # what the server refuses before any handler runs is in ollama's shape too
    refused = [httpx.post(srv.url + "/api/chat", content=b"{}", headers={**AUTH, "Content-Type": "text/plain"}),
               httpx.get(srv.url + "/api/tags", headers={"Authorization": "Bearer wrong"}),
               httpx.delete(srv.url + "/api/delete", headers=AUTH)]
    assert [r.status_code for r in refused] == [415, 401, 404]
    assert all(list(r.json()) == ["error"] and isinstance(r.json()["error"], str) for r in refused)


def test_ollama_keep_alive_load_and_unload(oll):
    import datetime as dt

    oll.generate(model=NAME, prompt="", keep_alive="10m")
    (m,) = oll.ps().models
    left = (m.expires_at - dt.datetime.now(dt.timezone.utc)).total_seconds()
    assert 500 < left <= 601
    assert oll.generate(model=NAME, prompt="", keep_alive=0).done_reason == "unload"
    assert not oll.ps().models
    assert oll.generate(model=NAME, prompt="", keep_alive=-1).done_reason == "load"
    (m,) = oll.ps().models
    assert m.expires_at.year == 9999
