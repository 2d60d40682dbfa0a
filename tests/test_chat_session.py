"""The library chat session grows its ids turn by turn; they must equal the full chat template's.

Oracles: Meta's reference ChatFormat (llama/tokenizer.py) for Llama 3; for SmolLM2 the Jinja template
rendered over the whole conversation, and transformers' own GGUF tokenizer.
"""

import os
from types import SimpleNamespace

import assets
import pytest

from llama_mlx.chat import ChatSession, NothingToRetryError, NothingToUndoError
from llama_mlx.tokenizer import load_tokenizer

# Scripted replies (no digits: transformers' GGUF loader does not isolate them as SmolLM2 does).
REPLIES = [
    "Paris is the capital of France.",
    "  Berlin, of course.\n",
    "Madrid!",
    "I'd say Rome — or Roma, in Italian.",
    "Tokyo. 🗼",
    "Ottawa; many guess Toronto.",
    "Canberra <|eot_id|> is the answer <|im_end|> here.",
    "Lisbon",
    "Vienna\n\nis lovely.",
    "Athens.",
]
QUESTIONS = [
    "What is the capital of France?",
    "And of Germany?",
    "Spain?",
    "  Italy? ",
    "Japan?",
    "Canada?",
    "Australia? <|start_header_id|>",
    "Portugal?",
    "Austria?\n",
    "Greece?",
]


def stub_model():
    """Enough of a model for a session that never generates (scripted replies)."""
    return SimpleNamespace(layers=[None] * 2, args=SimpleNamespace(max_position_embeddings=8192))


def converse(session, check):
    """Ten turns with a system change, an /undo and a /retry, calling `check` after each step."""
    for i, (question, reply) in enumerate(zip(QUESTIONS, REPLIES)):
        session.add_user(question)
        check(session, generation_prompt=True)
        session.add_assistant(reply)
        check(session, generation_prompt=False)
        if i == 3:
            session.set_system("You are terse.")
            check(session, generation_prompt=False)
        if i == 5:
            session.undo()
            check(session, generation_prompt=False)
            session.add_user("Canada, again?")
            session.add_assistant("Ottawa.")
            check(session, generation_prompt=False)
        if i == 7:
            assert session.retry() == "Portugal?"
            check(session, generation_prompt=True)
            session.add_assistant("Lisbon, again.")
            check(session, generation_prompt=False)
    assert session.exchanges() == 10
    assert session.messages[0] == {"role": "system", "content": "You are terse."}


def test_llama3_turns_equal_meta_chat_format():
    from llama.tokenizer import ChatFormat as MetaChatFormat
    from llama.tokenizer import Tokenizer as MetaTokenizer

    meta = MetaChatFormat(MetaTokenizer(str(assets.TOKENIZER_MODEL)))
    checked = []

    def check(session, generation_prompt):
        expected = meta.encode_dialog_prompt(session.messages)  # Meta's always ends with the assistant header
        if generation_prompt:
            assert session.prompt_tokens() == expected
        else:
            assert session.tokens == expected[:-4] and expected[-4:] == [128006, 78191, 128007, 271]
        checked.append(len(expected))

    for path in (assets.TOKENIZER_MODEL, assets.TOKENIZER_JSON):  # tiktoken, and the HF backend
        session = ChatSession(stub_model(), load_tokenizer(path), system="Be brief.")
        converse(session, check)
        assert session.full_encodes == 0
    assert len(checked) > 40


@pytest.fixture(scope="module")
def transformers_smollm2():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(assets.SMOLLM2_GGUF.parent), gguf_file=assets.SMOLLM2_GGUF.name)


def test_smollm2_turns_equal_the_whole_template(transformers_smollm2):
    from llama_mlx.tokenizer.chat_template import render_chat_template

    tok = load_tokenizer(assets.SMOLLM2_GGUF)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    steps = []

    def check(session, generation_prompt):
        ids = session.prompt_tokens() if generation_prompt else session.tokens
        text = render_chat_template(tok.chat_template, session.messages, generation_prompt,
                                    bos_token=tok.bos_token, eos_token=tok.eos_token)
        assert tok.decode(ids) == text
        assert ids == tok.apply_chat_template(session.messages, add_generation_prompt=generation_prompt)
        if not any(name in m["content"] for m in session.messages for name in tok.special_tokens):
            expected = transformers_smollm2.apply_chat_template(session.messages, tokenize=True,
                                                                add_generation_prompt=generation_prompt)
            expected = expected["input_ids"] if hasattr(expected, "keys") else expected
            assert ids == list(expected)
            steps.append("transformers")
        steps.append(generation_prompt)

    # No system prompt at first: the template's own default one stands until /system sets one.
    session = ChatSession(stub_model(), tok)
    converse(session, check)
    # One turn cannot be appended: the reply "  Berlin..." makes the generation prompt's "\n" and its
    # leading spaces one token, so that turn re-encodes the conversation (counted); every other appends.
    assert session.full_encodes == 1
    assert steps.count("transformers") >= 10 and steps.count(True) >= 10


def test_a_template_that_rewrites_earlier_turns_falls_back_and_counts_it(tmp_path):
    # The template numbers the last turn differently from the others: the prefix is not a prefix.
    tok = load_tokenizer(assets.SMOLLM2_GGUF)
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}{% if loop.last %} (latest){% endif %}\n"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    session = ChatSession(stub_model(), tok)
    session.add_user("Hi")
    session.add_assistant("Hello")
    session.add_user("Bye")
    assert session.full_encodes >= 2
    assert session.tokens == tok.apply_chat_template(session.messages, add_generation_prompt=False)
    assert session.prompt_tokens() == tok.apply_chat_template(session.messages, add_generation_prompt=True)
    session.undo()
    assert session.tokens == tok.apply_chat_template(session.messages, add_generation_prompt=False)


def test_commands_without_anything_to_act_on_raise_named_errors():
    session = ChatSession(stub_model(), load_tokenizer(assets.TOKENIZER_MODEL), system="S")
    with pytest.raises(NothingToUndoError):
        session.undo()
    with pytest.raises(NothingToRetryError):
        session.retry()
    with pytest.raises(NothingToRetryError):
        next(session.respond())
    assert session.messages == [{"role": "system", "content": "S"}]


@pytest.fixture(scope="module")
def smollm2_model():
    from llama_mlx import load

    return load(str(assets.SMOLLM2_GGUF.parents[3] / "weights" / "SmolLM2-135M-Instruct"))


def test_real_model_cache_holds_the_whole_template(smollm2_model, tmp_path):
    model, tok = smollm2_model
    from llama_mlx.sample import make_sampler

    # 5 tokens an answer: the bookkeeping is the same for a cut answer (~0.4 s a token on this CPU).
    session = ChatSession(model, tok, system="Answer in a few words.", max_tokens=5, sampler=make_sampler(0.0))
    questions = ["What is the capital of France?", "And of Germany?", "Which one is bigger?"]
    held = []
    for question in questions:
        session.add_user(question)
        responses = list(session.respond())
        # only the new turn was prefilled: the whole cache of the last turn was reused
        assert responses[-1].cached_tokens >= len(held) - 1
        assert responses and session.last.response is responses[-1]
        whole = tok.apply_chat_template(session.messages, add_generation_prompt=False)
        # The cache holds a prefix of the template's ids: all of it but what was never fed.
        held = session.cache.tokens
        assert held == whole[: len(held)] and len(whole) - len(held) <= 3
        assert session.tokens == whole
    # A closed stream (an interruption) keeps the partial answer and a consistent cache.
    session.add_user("Tell me a long story about a dragon.")
    stream = session.respond()
    for _ in range(3):
        next(stream)
    stream.close()
    assert session.last.interrupted and session.messages[-1]["role"] == "assistant"
    whole = tok.apply_chat_template(session.messages, add_generation_prompt=False)
    assert session.cache.tokens == whole[: len(session.cache.tokens)]
    # stop_requested stops it too; /retry then reuses the cached prompt.
    session.retry()
    list(session.respond(stop_requested=lambda: True))
    assert session.last.interrupted and session.last.response.generation_tokens == 1
    session.retry()
    list(session.respond())
    assert session.last.response.prompt_tokens <= 2
    # Save and load: the same transcript and cache.
    path = session.save(tmp_path / "talk.safetensors")
    again = ChatSession(model, tok, max_tokens=10, sampler=make_sampler(0.0))
    again.load(path)
    assert again.messages == session.messages and again.cache.tokens == session.cache.tokens
    assert again.tokens == tok.apply_chat_template(session.messages, add_generation_prompt=False)
