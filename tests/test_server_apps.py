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
    got = oai.embeddings.create(model="m", input=texts)  # the client asks for base64 and decodes it
    assert [d.index for d in got.data] == [0, 1, 2]
    np.testing.assert_allclose(np.array([d.embedding for d in got.data]), want, atol=1e-5)
    tok = local[1]
    n = sum(len(tok.encode(t, bos=True)) for t in texts)
    assert got.usage.prompt_tokens == got.usage.total_tokens == n
    floats = oai.embeddings.create(model="m", input=texts[1], encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, want[1], atol=1e-5)
    ids = tok.encode(texts[0], bos=True)
    by_ids = oai.embeddings.create(model="m", input=[ids], encoding_format="float")
    np.testing.assert_allclose(by_ids.data[0].embedding, want[0], atol=1e-5)
    last = oai.embeddings.create(model="m", input=texts[:1], encoding_format="float", extra_body={"pooling": "last"})
    np.testing.assert_allclose(last.data[0].embedding, np.array(llama_mlx.embed(*local, texts[:1], pooling="last"))[0],
                               atol=1e-5)
    cut = oai.embeddings.create(model="m", input=texts[:1], encoding_format="float", dimensions=8).data[0].embedding
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
