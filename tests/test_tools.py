"""Tool calling: prompts with tools against transformers' own `apply_chat_template(..., tools=...)`,
Meta's tiktoken path against golden strings written from the Llama 3.1 prompt format, and reply parsing."""

import json
from functools import lru_cache

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
    tools_for_choice,
)

# A Llama 3.1 Instruct style tool template, written for this test from the prompt format (system block with
# Environment / Cutting Knowledge / Today Date, custom tools in the first user turn after the preamble, a tool
# result as `ipython` through tojson, one call per assistant turn as {"name", "parameters"}). It is not a copy
# of Meta's template: content from other repositories is not committed here.
LLAMA31_STYLE_TEMPLATE = """{{- bos_token }}
{%- set date_string = date_string if date_string is defined else "26 Jul 2024" %}
{%- set tools_in_user_message = tools_in_user_message if tools_in_user_message is defined else true %}
{%- if custom_tools is defined and custom_tools is not none %}{% set tools = custom_tools %}{% endif %}
{%- set fmt = 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' %}
{%- if messages[0]['role'] == 'system' %}
{%- set sys_text = messages[0]['content'] | trim %}{% set rest = messages[1:] %}
{%- else %}{% set sys_text = "" %}{% set rest = messages %}{% endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}
{%- if builtin_tools is defined or tools is not none %}{{ 'Environment: ipython\\n' }}{% endif %}
{%- if builtin_tools is defined %}{{ 'Tools: ' ~ (builtin_tools | reject('equalto', 'code_interpreter') | join(', ')) ~ '\\n\\n' }}{% endif %}
{{- 'Cutting Knowledge Date: December 2023\\nToday Date: ' ~ date_string ~ '\\n\\n' }}
{%- if tools is not none and not tools_in_user_message %}
{{- 'You have access to the following functions. To call a function, please respond with JSON for a function call.' ~ fmt ~ 'Do not use variables.\\n\\n' }}
{%- for t in tools %}{{ t | tojson(indent=4) ~ '\\n\\n' }}{% endfor %}
{%- endif %}
{{- sys_text ~ '<|eot_id|>' }}
{%- if tools is not none and tools_in_user_message %}
{{- '<|start_header_id|>user<|end_header_id|>\\n\\nGiven the following functions, please respond with a JSON for a function call with its proper arguments that best answers the given prompt.\\n\\n' ~ fmt ~ 'Do not use variables.\\n\\n' }}
{%- for t in tools %}{{ t | tojson(indent=4) ~ '\\n\\n' }}{% endfor %}
{{- (rest[0]['content'] | trim) ~ '<|eot_id|>' }}{% set rest = rest[1:] %}
{%- endif %}
{%- for m in rest %}
{%- if 'tool_calls' in m %}
{%- set f = m.tool_calls[0].function %}
{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- if builtin_tools is defined and f.name in builtin_tools %}
{{- '<|python_tag|>' ~ f.name ~ '.call(' }}{% for k, v in f.arguments | items %}{{ k ~ '="' ~ v ~ '"' }}{% if not loop.last %}, {% endif %}{% endfor %}{{ ')' }}
{%- else %}
{{- '{"name": "' ~ f.name ~ '", "parameters": ' ~ (f.arguments | tojson) ~ '}' }}
{%- endif %}
{{- '<|eom_id|>' if builtin_tools is defined else '<|eot_id|>' }}
{%- elif m.role in ['tool', 'ipython'] %}
{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' ~ (m.content | tojson if m.content is string or m.content is mapping else m.content) ~ '<|eot_id|>' }}
{%- else %}
{{- '<|start_header_id|>' ~ m.role ~ '<|end_header_id|>\\n\\n' ~ (m.content | trim) ~ '<|eot_id|>' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"""

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
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}

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


@lru_cache(maxsize=None)
def llama31_tokenizer_json() -> str:
    spec = json.loads(assets.TOKENIZER_JSON.read_text(encoding="utf-8"))
    for token in spec["added_tokens"]:
        token["content"] = LLAMA31_NAMES.get(token["id"], token["content"])
    return json.dumps(spec)


@lru_cache(maxsize=None)
def transformers_llama3(template: str):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(llama31_tokenizer_json()), bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>", chat_template=template,
    )


def _ids(out):
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def hf_llama3_with(template: str):
    from tokenizers import Tokenizer

    from llama_mlx.tokenizer import HFTokenizer

    return HFTokenizer(Tokenizer.from_str(llama31_tokenizer_json()), bos_token="<|begin_of_text|>",
                       eos_token="<|eot_id|>", chat_template=template)


@pytest.mark.parametrize("chat", range(len(CHATS)))
@pytest.mark.parametrize("kwargs", [{}, {"tools_in_user_message": False, "date_string": "01 Jan 2025"}])
def test_jinja_tools_match_transformers(chat, kwargs):
    oracle = transformers_llama3(LLAMA31_STYLE_TEMPLATE)
    ours = hf_llama3_with(LLAMA31_STYLE_TEMPLATE)
    messages = CHATS[chat]
    for gen in (True, False):
        expected = _ids(oracle.apply_chat_template(messages, tools=[WEATHER, TIME], add_generation_prompt=gen, **kwargs))
        assert apply_tool_chat_template(ours, messages, [WEATHER, TIME], add_generation_prompt=gen, **kwargs) == expected
        # Meta's tiktoken tokenizer has no template: the same layout, written in Python
        assert apply_tool_chat_template(llama3(), messages, [WEATHER, TIME], add_generation_prompt=gen, **kwargs) == expected


def test_builtin_tools_match_transformers():
    messages = [
        {"role": "user", "content": "Search the news."},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {
            "name": "brave_search", "arguments": '{"query": "news today"}'}}]},
        {"role": "ipython", "content": "headline"},
    ]
    kwargs = {"builtin_tools": ["brave_search", "wolfram_alpha", "code_interpreter"]}
    oracle = transformers_llama3(LLAMA31_STYLE_TEMPLATE)
    expected = _ids(oracle.apply_chat_template(normalize_messages(messages), add_generation_prompt=True, **kwargs))
    assert apply_tool_chat_template(llama3(), messages, **kwargs) == expected
    assert apply_tool_chat_template(hf_llama3_with(LLAMA31_STYLE_TEMPLATE), messages, **kwargs) == expected
    text = llama3().decode(expected)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                           "Environment: ipython\nTools: brave_search, wolfram_alpha\n\n"
                           "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>")
    assert ('<|start_header_id|>assistant<|end_header_id|>\n\n<|python_tag|>brave_search.call(query="news today")'
            "<|eom_id|><|start_header_id|>ipython<|end_header_id|>\n\n\"headline\"<|eot_id|>") in text


def test_openai_string_arguments_render_as_objects():
    oracle = transformers_llama3(LLAMA31_STYLE_TEMPLATE)
    with_dict = CHATS[2]
    with_string = [dict(m) for m in with_dict]
    with_string[2] = {"role": "assistant", "content": None, "tool_calls": [
        {**CALL, "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]}
    expected = _ids(oracle.apply_chat_template(with_dict, tools=[WEATHER], add_generation_prompt=True))
    assert apply_tool_chat_template(llama3(), with_string, [WEATHER]) == expected
    assert apply_tool_chat_template(hf_llama3_with(LLAMA31_STYLE_TEMPLATE), with_string, [WEATHER]) == expected


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
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'
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
    '[get_weather(city="Paris")]',
    "[get_weather(city='Paris')]",
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
])
def test_may_be_tool_call_holds(text):
    assert may_be_tool_call(text)


@pytest.mark.parametrize("text", [
    "The", "Hello {", '{"city": "Paris"', '{ "x', '{1', "[1", "[link]", "[ link] x", "brave search",
    '{"name": "f", "parameters": {}} then', '{"name": "f", "other": 1}',
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
