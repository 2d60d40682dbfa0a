"""The apps' endpoints of `llama-mlx serve` (OpenAI's embeddings and Responses, ollama's API) on a real
server process (a tiny random model with Meta's tokenizer, offline), driven by the official `openai` and
`ollama` clients. Oracles: `llama_mlx.embed` in-process on the same checkpoint (itself held to
transformers in test_embed.py), jsonschema, the server's own non-streamed answer for the streamed one
(temperature 0), Meta's tokenizer for the token counts."""

import base64
import json
import os
from unittest import mock

import httpx2 as httpx
import jsonschema
import numpy as np
import openai
import pytest

import llama_mlx
from test_server import KEY, Server

AUTH = {"Authorization": f"Bearer {KEY}"}
NAME = "tiny"  # the served folder's name


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_meta_checkpoint):
    home = tmp_path_factory.mktemp("hf-home")
    with mock.patch.dict(os.environ, {"HF_HUB_OFFLINE": "1", "HF_HOME": str(home)}):
        s = Server(tmp_path_factory.mktemp("serve-apps"), "--api-key", KEY, model=tiny_meta_checkpoint)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def oai(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=300)


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


def test_embeddings_errors_are_json(srv):
    def post(body):
        return httpx.post(srv.url + "/v1/embeddings", json=body, headers=AUTH, timeout=60)

    for body, status, param in [({"input": ""}, 400, "input"), ({"input": []}, 400, "input"),
                                ({"input": [[1, 10**7]]}, 400, "input"), ({"input": {"a": 1}}, 400, "input"),
                                ({}, 422, "input"), ({"input": "x", "encoding_format": "hex"}, 400, "encoding_format"),
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

    for body, status, param in [({"input": 5}, 422, "input"), ({"input": []}, 422, "input"),
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
