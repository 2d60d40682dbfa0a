"""Tool calling: prompts with tools against transformers' own `apply_chat_template(..., tools=...)` with
Meta's real Llama 3.1 / 3.2 / 3.3 Instruct templates (fetched by tests/assets.py), Meta's tiktoken path
against the same and against a golden string written from the Llama 3.1 prompt format, and reply parsing."""

import json
import re
from datetime import datetime
from functools import cache

import assets
import pytest
from test_tokenizer_corpus import llama3, smollm2

from llama_mlx.errors import TokenizerError
from llama_mlx.tokenizer import load_tokenizer
from llama_mlx.tools import (
    CUSTOM_TOOLS_PREAMBLE,
    ToolCallStream,
    apply_tool_chat_template,
    may_be_tool_call,
    normalize_messages,
    parse_tool_calls,
    supports_tools,
    tools_for_choice,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "description": "The local time of a zone, é ünïcode.",
                 "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}},
}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "São Paulo"}}}

CHATS = [
    [{"role": "user", "content": "  What is the weather in Paris?  "}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Weather in Paris?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
        {"role": "assistant", "content": "It is sunny."},
        {"role": "user", "content": "And the time there?"},
    ],
    [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "tool_calls": [CALL]},
        {"role": "tool", "content": {"temp": 21, "sky": "clear"}},
    ],
]


# The asset's tokenizer.json has Llama 3.0's names; 3.1 renamed five reserved tokens (facts file).
LLAMA31_NAMES = {128004: "<|finetune_right_pad_id|>", 128005: "<|step_id|>", 128008: "<|eom_id|>",
                 128010: "<|python_tag|>", 128011: "<|image|>"}


@cache
def llama31_tokenizer_json() -> str:
    spec = json.loads(assets.TOKENIZER_JSON.read_text(encoding="utf-8"))
    for token in spec["added_tokens"]:
        token["content"] = LLAMA31_NAMES.get(token["id"], token["content"])
    return json.dumps(spec)


@cache
def transformers_llama3():
    """The oracle: Meta's tokenizer in transformers, the chat template given per call (`chat_template=`)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(llama31_tokenizer_json()), bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
    )


def _ids(out):
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@cache
def hf_llama3_with(template: str):
    from tokenizers import Tokenizer

    from llama_mlx.tokenizer import HFTokenizer

    return HFTokenizer(Tokenizer.from_str(llama31_tokenizer_json()), bos_token="<|begin_of_text|>",
                       eos_token="<|eot_id|>", chat_template=template)


# Meta's templates, as llama.cpp vendors them; 3.1's and 3.3's are the same file.
REAL_TEMPLATES = {"3.1": assets.LLAMA31_TEMPLATE, "3.2": assets.LLAMA32_TEMPLATE, "3.3": assets.LLAMA33_TEMPLATE}
META_LAYOUT = ("3.1", "3.3")  # the layout Meta's tiktoken path writes
BUILTINS = {"builtin_tools": ["brave_search", "wolfram_alpha", "code_interpreter"]}


@cache
def real_template(version: str) -> str:
    return REAL_TEMPLATES[version].read_text(encoding="utf-8")


def openai_shape(messages):
    """The messages as an OpenAI client sends them: call arguments as a JSON string, no content beside calls."""
    out = []
    for m in messages:
        if "tool_calls" in m:
            calls = [{**c, "function": {**c["function"], "arguments": json.dumps(c["function"]["arguments"])}}
                     for c in m["tool_calls"]]
            m = {**m, "content": None, "tool_calls": calls}
        out.append(m)
    return out


def check_real_template(version, messages, tools, **kwargs):
    """Our ids for `messages` (as given and in the OpenAI shape) equal transformers' with Meta's real
    template, on an HF tokenizer carrying that template and, for the 3.1 layout, on Meta's tiktoken one."""
    template = real_template(version)
    ours = [hf_llama3_with(template)] + ([llama3()] if version in META_LAYOUT else [])
    for gen in (True, False):
        expected = _ids(transformers_llama3().apply_chat_template(
            messages, chat_template=template, tools=tools, add_generation_prompt=gen, **kwargs))
        for tokenizer in ours:
            for shape in (messages, openai_shape(messages)):
                assert apply_tool_chat_template(tokenizer, shape, tools, add_generation_prompt=gen, **kwargs) == expected
    return llama3().decode(expected)


@pytest.mark.parametrize("version", REAL_TEMPLATES)
@pytest.mark.parametrize("chat", range(len(CHATS)))
@pytest.mark.parametrize("kwargs", [{}, {"tools_in_user_message": False, "date_string": "01 Jan 2025"}])
def test_real_templates_match_transformers(version, chat, kwargs):
    if version == "3.2":
        kwargs = {"date_string": "26 Jul 2024", **kwargs}  # 3.2's default date is today's: test_llama32_dates_today
    text = check_real_template(version, CHATS[chat], [WEATHER, TIME], **kwargs)
    assert "Environment: ipython\n" in text and "é ünïcode" in text
    if any("tool_calls" in m for m in CHATS[chat]):
        assert ('<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": '
                '{"city": "São Paulo"}}<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n') in text


def test_real_templates_render_tool_turns_without_tools():
    for version in REAL_TEMPLATES:
        text = check_real_template(version, CHATS[3], None, date_string="26 Jul 2024")
        assert "Environment" not in text and 'ipython<|end_header_id|>\n\n{"temp": 21, "sky": "clear"}' in text


@pytest.mark.parametrize("version", REAL_TEMPLATES)
def test_real_templates_builtin_tools_match_transformers(version):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Search the news."},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {
            "name": "brave_search", "arguments": {"query": "news today"}}}]},
        {"role": "ipython", "content": "headline"},
        {"role": "assistant", "tool_calls": [CALL]},
        {"role": "tool", "content": {"temp": 21}},
    ]
    for tools in (None, [WEATHER]):
        text = check_real_template(version, messages, tools, date_string="02 Feb 2025", **BUILTINS)
    if version in META_LAYOUT:  # 3.2's template knows no built-in tools
        assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                               "Environment: ipython\nTools: brave_search, wolfram_alpha\n\n"
                               "Cutting Knowledge Date: December 2023\nToday Date: 02 Feb 2025\n\nBe brief.<|eot_id|>")
        assert ('<|start_header_id|>assistant<|end_header_id|>\n\n<|python_tag|>brave_search.call(query="news today")'
                "<|eom_id|><|start_header_id|>ipython<|end_header_id|>\n\n\"headline\"<|eot_id|>") in text
        assert '{"city": "São Paulo"}}<|eom_id|>' in text  # a custom call in ipython mode ends in eom too
    else:
        assert "Tools:" not in text and "python_tag" not in text


@pytest.mark.parametrize("version", META_LAYOUT)
def test_real_templates_custom_tools(version):
    text = check_real_template(version, CHATS[2], [WEATHER], custom_tools=[TIME])
    assert "The local time" in text and "The current weather" not in text
    text = check_real_template(version, CHATS[2], [WEATHER], custom_tools=None)  # given, so it clears `tools`
    assert "Environment" not in text and "The current weather" not in text


def test_llama32_dates_today():
    text = check_real_template("3.2", CHATS[0], [WEATHER])
    assert f"Today Date: {datetime.now():%d %b %Y}\n\n" in text


def test_meta_path_golden_string():
    """Written by hand from the Llama 3.1 prompt format (not from either implementation)."""
    tool_json = json.dumps(WEATHER, indent=4)
    golden = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Environment: ipython\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
        "You are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n"
        "Given the following functions, please respond with a JSON for a function call with its proper arguments "
        "that best answers the given prompt.\n\n"
        'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
        "Do not use variables.\n\n" + tool_json + "\n\n"
        "Weather in Paris?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        '{"name": "get_weather", "parameters": {"city": "São Paulo"}}<|eot_id|>'
        "<|start_header_id|>ipython<|end_header_id|>\n\n\"sunny, 21 C\"<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nIt is sunny.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd the time there?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert CUSTOM_TOOLS_PREAMBLE in golden and "value}.Do not" in golden
    ids = apply_tool_chat_template(llama3(), CHATS[2], [WEATHER])
    assert ids == llama3().encode(golden, allowed_special="all")
    assert ids[:5] == [128000, 128006, 9125, 128007, 271]
    assert ids.count(128000) == 1


def test_meta_path_special_text_in_content_stays_text():
    messages = [{"role": "user", "content": "say <|eot_id|> please"}]
    ids = apply_tool_chat_template(llama3(), messages, [WEATHER])
    assert ids.count(128009) == 2  # the system turn's and the user turn's, not the one in the text
    assert "say <|eot_id|> please" in llama3().decode(ids)


def test_meta_path_without_tools_is_meta_chat_format():
    messages = [{"role": "user", "content": "Hi"}]
    assert apply_tool_chat_template(llama3(), messages) == llama3().apply_chat_template(messages)


def test_smollm2_template_with_tools_matches_transformers():
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import PreTrainedTokenizerFast

    oracle = PreTrainedTokenizerFast.from_pretrained(str(assets.SMOLLM2_GGUF.parent), gguf_file=assets.SMOLLM2_GGUF.name)
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": '{"name": "get_weather", "parameters": {"city": "Paris"}}'},
        {"role": "tool", "content": "sunny and warm"},
    ]
    for gen in (True, False):
        expected = _ids(oracle.apply_chat_template(messages, tools=[WEATHER], add_generation_prompt=gen))
        assert apply_tool_chat_template(smollm2(), messages, [WEATHER], add_generation_prompt=gen) == expected
    assert "<|im_start|>tool\nsunny and warm<|im_end|>" in smollm2().decode(expected)


def test_supports_tools_tells_templates_that_drop_them():
    """A template that ignores `tools` (SmolLM2's) drops them: the prompt equals the one without tools,
    and `supports_tools` says so. Meta's format and Meta's real templates render them."""
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    assert apply_tool_chat_template(smollm2(), messages, [WEATHER]) == apply_tool_chat_template(smollm2(), messages)
    assert not supports_tools(smollm2())
    assert supports_tools(llama3())
    for version in REAL_TEMPLATES:
        assert supports_tools(hf_llama3_with(real_template(version)))
    from test_tokenizer_corpus import smollm2_metadata

    def smollm2_with(template):
        return load_tokenizer(gguf_metadata={**smollm2_metadata(), "tokenizer.chat_template": template})

    assert not supports_tools(smollm2_with("{% if tools %}{{ raise_exception('no tools') }}{% endif %}x"))
    assert supports_tools(smollm2_with("{% for t in tools or [] %}{{ t.function.name }}{% endfor %}x"))


def test_llama31_vocabulary_whose_template_ignores_tools_gets_llama31_layout():
    """Our own Llama 3 template (written into converted folders) ignores `tools`; on a Llama 3.1
    vocabulary the tools are rendered in Llama 3.1's layout instead: Meta's real 3.1 template's prompt."""
    from llama_mlx.tokenizer.chat_format import LLAMA3_CHAT_TEMPLATE

    tokenizer = hf_llama3_with(LLAMA3_CHAT_TEMPLATE)
    assert supports_tools(tokenizer)
    for chat in CHATS[:2]:
        expected = _ids(transformers_llama3().apply_chat_template(
            chat, chat_template=real_template("3.1"), tools=[WEATHER, TIME], add_generation_prompt=True))
        assert apply_tool_chat_template(tokenizer, chat, [WEATHER, TIME]) == expected
    # without tools, the template itself
    assert apply_tool_chat_template(tokenizer, CHATS[0]) == tokenizer.apply_chat_template(CHATS[0])


def test_tools_for_choice():
    assert tools_for_choice([WEATHER, TIME], "auto") == [WEATHER, TIME]
    assert tools_for_choice([WEATHER, TIME], "required") == [WEATHER, TIME]
    assert tools_for_choice([WEATHER, TIME], "none") is None
    assert tools_for_choice([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}}) == [TIME]
    with pytest.raises(ValueError):
        tools_for_choice([WEATHER], {"type": "function", "function": {"name": "nope"}})


def test_rendering_errors():
    with pytest.raises(ValueError, match="one tool call"):
        apply_tool_chat_template(llama3(), [{"role": "user", "content": "x"},
                                            {"role": "assistant", "tool_calls": [CALL, CALL]}], [WEATHER])
    no_content = [{"role": "user", "content": "x"}, {"role": "tool", "content": None}]
    with pytest.raises(ValueError, match="needs 'content'"):  # the real template fails on it too
        apply_tool_chat_template(llama3(), no_content, [WEATHER])
    with pytest.raises(TokenizerError):
        apply_tool_chat_template(hf_llama3_with(real_template("3.1")), no_content, [WEATHER])
    with pytest.raises(ValueError, match="not JSON"):
        normalize_messages([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}])
    no_template = load_tokenizer(gguf_metadata={**__import__("test_tokenizer_corpus").smollm2_metadata(),
                                                "tokenizer.chat_template": ""})
    with pytest.raises(TokenizerError):
        apply_tool_chat_template(no_template, [{"role": "user", "content": "x"}], [WEATHER])


# -- parsing


def _ids_counter():
    n = iter(range(100))
    return lambda: f"call_{next(n)}"


def _calls(reply):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in reply.tool_calls]


@pytest.mark.parametrize("text", [
    '{"name": "get_weather", "parameters": {"city": "Paris"}}',
    '  {"name": "get_weather", "arguments": {"city": "Paris"}}\n',
    '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
    '<|python_tag|>{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}<|eom_id|>',
    '{"name": "get_weather", "parameters": "{\\"city\\": \\"Paris\\"}"}',
    '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
    '[get_weather(city="Paris")]',
    "[get_weather(city='Paris')]",
    '[get_weather(city="Paris")]<|eot_id|>',
])
def test_parse_one_call(text):
    reply = parse_tool_calls(text, [WEATHER, TIME], make_id=_ids_counter())
    assert _calls(reply) == [("get_weather", {"city": "Paris"})]
    assert reply.content is None and reply.finish_reason() == "tool_calls"
    call = reply.tool_calls[0]
    assert call == {"id": "call_0", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    assert reply.message() == {"role": "assistant", "content": None, "tool_calls": [call]}


def test_parse_several_calls_and_literals():
    text = '[get_weather(city="Paris", unit="celsius"), get_time(), get_time(zone="CET", n=-2, x=[1, 2.5], ok=True, d={"a": None}, j=null)]'
    assert _calls(parse_tool_calls(text)) == [
        ("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {}),
        ("get_time", {"zone": "CET", "n": -2, "x": [1, 2.5], "ok": True, "d": {"a": None}, "j": None}),
    ]
    text = '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}'
    assert _calls(parse_tool_calls(text, [WEATHER, TIME])) == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    text = '[{"name": "get_weather", "parameters": {"city": "Oslo"}}, {"name": "get_time", "parameters": {}}]'
    assert _calls(parse_tool_calls(text)) == [("get_weather", {"city": "Oslo"}), ("get_time", {})]
    ids = [c["id"] for c in parse_tool_calls(text).tool_calls]
    assert len(set(ids)) == 2 and all(i.startswith("call_") for i in ids)


def test_parse_builtin_calls():
    reply = parse_tool_calls('<|python_tag|>brave_search.call(query="news today")<|eom_id|>')
    assert _calls(reply) == [("brave_search", {"query": "news today"})]
    assert _calls(parse_tool_calls('wolfram_alpha.call(query="2+2")')) == [("wolfram_alpha", {"query": "2+2"})]
    code = "<|python_tag|>import math\nprint(math.pi)"
    assert _calls(parse_tool_calls(code)) == [("code_interpreter", {"code": "import math\nprint(math.pi)"})]


@pytest.mark.parametrize("version", REAL_TEMPLATES)
def test_parse_calls_as_real_templates_write_them(version):
    """A reply written as the template writes an assistant call (JSON `{"name", "parameters"}`, built-ins as
    `<|python_tag|>name.call(...)` ending in <|eom_id|>) parses back to that call, whole or streamed."""
    brave = {"type": "function", "function": {"name": "brave_search", "arguments": {"query": "news «today»"}}}
    for call, kwargs in ((CALL, {}), (CALL, BUILTINS), (brave, BUILTINS)):
        messages = [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [call]}]
        text = transformers_llama3().apply_chat_template(
            messages, chat_template=real_template(version), tools=[WEATHER], tokenize=False, date_string="x", **kwargs)
        written = text.rsplit("<|start_header_id|>assistant<|end_header_id|>\n\n", 1)[1]
        expected = [(call["function"]["name"], call["function"]["arguments"])]
        for reply in (written, re.sub(r"<\|eo[mt]_id\|>$", "", written)):
            assert _calls(parse_tool_calls(reply, [WEATHER])) == expected, reply
            stream = ToolCallStream([WEATHER])
            assert "".join(stream.feed(reply[i:i + 3]) for i in range(0, len(reply), 3)) == ""  # all held back
            held, parsed = stream.finish()
            assert held == "" and _calls(parsed) == expected
    if version in META_LAYOUT:
        assert written == '<|python_tag|>brave_search.call(query="news «today»")<|eom_id|>'
    else:  # 3.2's template writes every call as JSON
        assert written == '{"name": "brave_search", "parameters": {"query": "news «today»"}}<|eot_id|>'


@pytest.mark.parametrize("text", [
    "The weather in Paris is sunny.",
    "",
    '{"city": "Paris"}',
    '{"name": "Bob", "age": 3}',
    "[1, 2, 3]",
    "[link](http://x.org)",
    '[get_weather(city=open("/etc/passwd").read())]',
    "[get_weather(__import__('os').system('echo hi'))]",
    '[get_weather(city="Paris") + 1]',
    'Sure! {"name": "get_weather", "parameters": {"city": "Paris"}}',
    '{"name": "get_weather", "parameters": {"city": "Paris"}} and more text',
    'os.call(cmd="rm")',
])
def test_plain_text_is_no_call(text):
    reply = parse_tool_calls(text, [WEATHER])
    assert reply.tool_calls == [] and reply.content == text and reply.finish_reason("length") == "length"


def test_unknown_function_is_text_when_tools_given():
    text = '{"name": "launch_rockets", "parameters": {}}'
    assert parse_tool_calls(text, [WEATHER]).tool_calls == []
    assert _calls(parse_tool_calls(text)) == [("launch_rockets", {})]


# -- streaming


@pytest.mark.parametrize("text", [
    "", "  ", "<|pyth", "<|python_tag|>", '{', '{"', '{"na', '{"name": "get_w', '{"name": "get_weather", "parameters": {"ci',
    '{"type": "function", "na', "[", "[get_", "[get_weather(ci", '[get_weather(city="Par', "brave_sea",
    'brave_search.call(query="x', '[{"name": "get_weather"', '{"name": "f", "parameters": {}}; {"na',
    '[{"name": "f", "parameters": {}}, {"name": "g", "parameters": {}}]', '{"name": "f", "parameters": {}}<|e',
    '{"name": "f", "parameters": {}} <|eom_id|>', '[{"name": "f", "parameters": {}}]<|eot_id|>',
])
def test_may_be_tool_call_holds(text):
    assert may_be_tool_call(text)


@pytest.mark.parametrize("text", [
    "The", "Hello {", '{"city": "Paris"', '{ "x', '{1', "[1", "[link]", "[ link] x", "brave search",
    '{"name": "f", "parameters": {}} then', '{"name": "f", "other": 1}',
    '{"name": "f", "parameters": {}}]', '[{"name": "f", "parameters": {}}] x', '{"name": "f", "parameters": {}}<|eot_id|>x',
])
def test_may_be_tool_call_releases(text):
    assert not may_be_tool_call(text)


def test_stream_holds_a_call_and_releases_text():
    stream = ToolCallStream([WEATHER], make_id=_ids_counter())
    pieces = ['{"name": ', '"get_weather", ', '"parameters": {"city": ', '"Paris"}}']
    assert [stream.feed(p) for p in pieces] == ["", "", "", ""]
    held, reply = stream.finish()
    assert held == "" and _calls(reply) == [("get_weather", {"city": "Paris"})]

    stream = ToolCallStream([WEATHER])
    out = [stream.feed(p) for p in ["Th", "e sky", " is blue."]]
    assert out == ["Th", "e sky", " is blue."]
    assert stream.finish() == ("", parse_tool_calls("The sky is blue."))

    stream = ToolCallStream([WEATHER])
    out = [stream.feed(p) for p in ["[", "1, 2]"]]
    assert out == ["", "[1, 2]"]

    stream = ToolCallStream([WEATHER])  # looked like a call to the end, but is not one
    assert stream.feed('{"name": "nobody", "parameters": {}}') == ""
    held, reply = stream.finish()
    assert held == '{"name": "nobody", "parameters": {}}' and reply.tool_calls == []
