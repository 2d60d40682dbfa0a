"""response_format by constrained decoding: random-weight sampling always yields JSON that parses and
validates (checked with the jsonschema package), on SmolLM2's HF vocabulary and Meta's tiktoken one."""

import json
from functools import lru_cache

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
from test_tokenizer_corpus import llama3, smollm2

from llama_mlx.generate import stream_generate
from llama_mlx.model import Model, ModelArgs
from llama_mlx.sample import make_sampler
from llama_mlx.structured import ResponseFormatError, grammar_for_response_format, json_logits_processor

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"type": "string", "enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "zip": {"type": "integer"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}
STRICT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
SEEDS = range(5)


@lru_cache(maxsize=None)
def random_model():
    mx.random.seed(0)
    args = ModelArgs(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                     vocab_size=smollm2().vocab_size, tie_word_embeddings=True)
    model = Model(args)
    mx.eval(model.parameters())
    return model


def _sample(response_format, seed, max_tokens=160):
    tok = smollm2()
    prompt = tok.apply_chat_template([{"role": "user", "content": "Answer in JSON."}])
    proc = json_logits_processor(tok, response_format, max_tokens=max_tokens)
    responses = list(stream_generate(random_model(), tok, prompt, max_tokens,
                                     sampler=make_sampler(temp=1.0, seed=seed), logits_processors=[proc]))
    return "".join(r.text for r in responses), responses[-1]


@pytest.mark.parametrize("seed", SEEDS)
def test_json_object_always_parses(seed):
    text, last = _sample({"type": "json_object"}, seed)
    assert last.finish_reason == "stop" and last.token in smollm2().stop_tokens
    assert isinstance(json.loads(text), dict)


def test_json_object_is_not_only_empty():
    # the random model must have produced something beyond "{}" in some seed, or the test above proves little
    assert any(len(_sample({"type": "json_object"}, seed)[0]) > 2 for seed in SEEDS)


@pytest.mark.parametrize("seed", SEEDS)
def test_strict_schema_always_validates(seed):
    text, last = _sample(STRICT, seed, max_tokens=200)
    assert last.finish_reason == "stop"
    value = json.loads(text)
    jsonschema.validate(value, SCHEMA)
    assert value["role"] in ("admin", "user", "guest") and isinstance(value["age"], int)


def _walk(tok, response_format, text):
    """Feed the tokens of `text` through the processor, checking each was allowed; return it."""
    proc = json_logits_processor(tok, response_format)
    prompt = [tok.bos_id or 0]
    ids = tok.encode(text)
    logits = mx.zeros((1, tok.vocab_size))
    for n, t in enumerate(ids + [None]):
        out = np.array(proc(mx.array(prompt + ids[:n]), logits)[0])
        if t is not None:
            assert np.isfinite(out[t]), f"token {t} ({tok.decode([t])!r}) after {tok.decode(ids[:n])!r} was masked"
    return proc, out


@pytest.mark.parametrize("tok", [llama3, smollm2], ids=["meta-tiktoken", "smollm2-hf"])
def test_mask_allows_a_valid_document_then_only_stop_tokens(tok):
    tok = tok()
    doc = {"name": "Ada", "age": 36, "role": "admin", "tags": ["x", "yz"], "address": {"city": "London", "zip": 1}}
    proc, last = _walk(tok, STRICT, json.dumps(doc))
    assert proc.is_complete
    assert set(np.flatnonzero(np.isfinite(last)).tolist()) <= set(tok.stop_tokens) | {tok.eos_id}
    assert np.isfinite(last[tok.eos_id])
    # a wrong value is masked: "role" must be one of the enum
    proc = json_logits_processor(tok, STRICT)
    prefix = tok.encode('{"name": "Ada", "age": 36, "role": "')
    proc(mx.array([0]), mx.zeros((1, tok.vocab_size)))  # the first call sees the prompt alone
    out = np.array(proc(mx.array([0] + prefix), mx.zeros((1, tok.vocab_size)))[0])
    assert not np.isfinite(out[tok.encode("boss")[0]]) and np.isfinite(out[tok.encode("admin")[0]])


def test_response_format_errors_and_text():
    assert json_logits_processor(smollm2(), None) is None
    assert json_logits_processor(smollm2(), {"type": "text"}) is None
    assert grammar_for_response_format({"type": "json_object"})
    for bad in ({"type": "xml"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": {"schema": 3}}, "json"):
        with pytest.raises(ResponseFormatError):
            json_logits_processor(smollm2(), bad)
