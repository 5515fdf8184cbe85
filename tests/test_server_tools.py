"""Tool calling: the parsers on text (whole and streamed in every split), and the chat endpoint
over a scripted engine read by the official openai client: tool_calls with ids, finish_reason
"tool_calls", streamed deltas, tool_choice none / auto / required / named, parallel_tool_calls,
and tool-call history rendered by a Qwen-style template."""

import asyncio
import json
import random
import re

import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState

from jaxinfer.sampling_params import StructuredOutputsParams
from jaxinfer.tokenizer import Tokenizer
from jaxinfer.server.tool_parsers import PARSERS, ToolCallStream
from jaxinfer.server.protocol import Tool
from jaxinfer.server.tool_parsers.forced import NamedToolParser, RequiredToolParser
from jaxinfer.server.tools import required_schema
from tests.server_fake import ScriptedFront, asgi_client, post
from tests.server_fixtures import train_tokenizer

# A tool-use template in the style of Qwen2.5's: tools as JSON lines in a system block, calls as
# <tool_call> blocks whose arguments are objects, tool results as user turns.
QWEN_STYLE_TEMPLATE = (
    "{%- if tools %}{{ '<|im_start|>system\\n<tools>' }}{%- for tool in tools %}{{ '\\n' }}"
    "{{ tool.function | tojson }}{%- endfor %}{{ '\\n</tools><|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}"
    "{{ '<|im_start|>assistant\\n' + message.content }}"
    "{%- for call in message.tool_calls %}{{ '<tool_call>\\n{\"name\": \"' + call.function.name + "
    "'\", \"arguments\": ' }}{{ call.function.arguments | tojson }}{{ '}\\n</tool_call>' }}{%- endfor %}"
    "{{ '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{ '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["c", "f"]}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"type": "string"}}}}}
TOOLS = [WEATHER, TIME]
USER = [{"role": "user", "content": "Weather in Paris, and the time in Tokyo?"}]
CALLS = [("get_weather", {"city": "Paris", "unit": "c"}), ("get_time", {"tz": "Asia/Tokyo"})]

HERMES_TEXT = "Let me look.<tool_call>\n" + "</tool_call>\n<tool_call>\n".join(
    json.dumps({"name": n, "arguments": a}) + "\n" for n, a in CALLS) + "</tool_call>"
TEXTS = {
    "hermes": (HERMES_TEXT, "Let me look."),
    "llama3_json": ("<|python_tag|>" + "; ".join(json.dumps({"name": n, "parameters": a}) for n, a in CALLS), None),
    "mistral": ("Sure.[TOOL_CALLS]" + json.dumps([{"name": n, "arguments": a} for n, a in CALLS]), "Sure."),
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(directory)
    plain = Tokenizer.from_directory(directory)
    return Tokenizer(plain.backend, plain.special_tokens, QWEN_STYLE_TEMPLATE)


def streamed(parser, text, rng, max_calls=None):
    """Feeds `text` in random pieces; returns (content, [(id, name, arguments)], deltas)."""
    stream, deltas, i = ToolCallStream(parser, max_calls), [], 0
    while i < len(text):
        k = rng.randint(1, 7)
        deltas += stream.feed(text[i:i + k], final=i + k >= len(text))
        i += k
    calls = {}
    for d in deltas:
        for c in d.get("tool_calls", []):
            if "id" in c:
                assert c["index"] not in calls and c["function"]["arguments"] == ""
                calls[c["index"]] = [c["id"], c["function"]["name"], ""]
            else:
                assert set(c) == {"index", "function"} and set(c["function"]) == {"arguments"}
                calls[c["index"]][2] += c["function"]["arguments"]
    return "".join(d.get("content", "") for d in deltas), [tuple(c) for c in calls.values()], deltas


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_parser_whole_and_streamed(name):
    text, content = TEXTS[name]
    parser = PARSERS[name]()
    got_content, calls = parser.extract(text)
    assert got_content == content
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == CALLS
    for seed in range(30):
        s_content, s_calls, _ = streamed(parser, text, random.Random(seed))
        assert (s_content or None) == content
        assert [(n, json.loads(a)) for _, n, a in s_calls] == CALLS
        assert len({i for i, _, _ in s_calls}) == len(CALLS)


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_parser_leaves_plain_text_alone(name):
    parser = PARSERS[name]()
    text = "The weather is {mild} today; no tools needed [really] <tool> please."
    assert parser.extract(text) == (text, [])
    content, calls, _ = streamed(parser, text, random.Random(0))
    assert content == text and calls == []


def test_parser_rejects_a_broken_call():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'
    assert PARSERS["hermes"]().extract(text) == (text, [])


def test_mistral_named_calls_and_ids():
    parser = PARSERS["mistral"]()
    text = '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "c"}[TOOL_CALLS]get_time[ARGS]{"tz": "Asia/Tokyo"}'
    content, calls = parser.extract(text)
    assert content is None and [(c["name"], json.loads(c["arguments"])) for c in calls] == CALLS
    assert all(re.fullmatch(r"[A-Za-z0-9]{9}", parser.new_id()) for _ in range(20))


def test_forced_parsers():
    text = json.dumps([{"name": n, "parameters": a} for n, a in CALLS])
    assert [(c["name"], json.loads(c["arguments"])) for c in RequiredToolParser().extract(text)[1]] == CALLS
    _, calls, _ = streamed(NamedToolParser("get_time"), '{"tz": "Asia/Tokyo"}', random.Random(1))
    assert [(n, json.loads(a)) for _, n, a in calls] == [CALLS[1]]


def chat(front, body, **settings):
    async def go():
        async with asgi_client(front, **settings) as http:
            client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="x", http_client=http, max_retries=0)
            if body.get("stream"):
                return [chunk async for chunk in await client.chat.completions.create(**body)]
            return await client.chat.completions.create(**body)

    return asyncio.run(go())


AUTO = dict(enable_auto_tool_choice=True, tool_call_parser="hermes")


def test_auto_tool_calls(tokenizer):
    front = ScriptedFront(tokenizer, HERMES_TEXT)
    r = chat(front, dict(model="fake", messages=USER, tools=TOOLS, max_tokens=500), **AUTO)
    [choice] = r.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me look."
    calls = choice.message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == CALLS
    assert all(c.type == "function" and c.id for c in calls) and len({c.id for c in calls}) == 2
    # The tools reached the prompt, as the template writes them.
    listed = re.search(r"<tools>\n(.*)\n</tools>", front.prompt, re.S).group(1).split("\n")
    assert [json.loads(line) for line in listed] == [t["function"] for t in TOOLS]
    assert front.params.structured_outputs is None


def test_auto_tool_calls_streamed(tokenizer):
    front = ScriptedFront(tokenizer, HERMES_TEXT, chunk=2)
    chunks = chat(front, dict(model="fake", messages=USER, tools=TOOLS, max_tokens=500, stream=True), **AUTO)
    state = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(chunk)
    final = state.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls" and final.message.content == "Let me look."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in final.message.tool_calls] == CALLS
    # Per call: one delta with its id and name (arguments empty), then argument fragments only.
    deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    firsts = [d.tool_calls[0] for d in deltas if d.tool_calls[0].id]
    assert [(f.index, f.function.name, f.function.arguments) for f in firsts] == [(0, "get_weather", ""),
                                                                                     (1, "get_time", "")]
    assert len(deltas) > 6, "arguments should arrive in several fragments"
    assert all(d.tool_calls[0].function.name is None for d in deltas if not d.tool_calls[0].id)


def test_parallel_tool_calls_false_keeps_one(tokenizer):
    front = ScriptedFront(tokenizer, HERMES_TEXT)
    body = dict(model="fake", messages=USER, tools=TOOLS, max_tokens=500, parallel_tool_calls=False)
    r = chat(front, body, **AUTO)
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["get_weather"]
    chunks = chat(front, {**body, "stream": True}, **AUTO)
    names = [t.function.name for c in chunks if c.choices and c.choices[0].delta.tool_calls
             for t in c.choices[0].delta.tool_calls if t.id]
    assert names == ["get_weather"]


def test_tool_choice_none_drops_the_tools(tokenizer):
    front = ScriptedFront(tokenizer, HERMES_TEXT)
    r = chat(front, dict(model="fake", messages=USER, tools=TOOLS, tool_choice="none", max_tokens=500), **AUTO)
    assert r.choices[0].message.content == HERMES_TEXT and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "stop"
    assert "<tools>" not in front.prompt
    assert front.prompt == tokenizer.apply_chat_template(USER)


def test_required_goes_through_structured_output(tokenizer):
    reply = json.dumps([{"name": n, "parameters": a} for n, a in CALLS])
    front = ScriptedFront(tokenizer, reply)
    body = dict(model="fake", messages=USER, tools=TOOLS, tool_choice="required", max_tokens=500)
    r = chat(front, body)  # no --enable-auto-tool-choice needed
    assert [(c.function.name, json.loads(c.function.arguments)) for c in r.choices[0].message.tool_calls] == CALLS
    assert r.choices[0].finish_reason == "tool_calls"
    expected = {"type": "array", "minItems": 1, "items": {"anyOf": [
        {"type": "object", "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                                          "parameters": t["function"]["parameters"]},
         "required": ["name", "parameters"], "additionalProperties": False} for t in TOOLS]}}
    assert front.params.structured_outputs == StructuredOutputsParams(json=expected)
    assert "<tools>" in front.prompt
    chat(front, {**body, "parallel_tool_calls": False})
    assert front.params.structured_outputs == StructuredOutputsParams(json={**expected, "maxItems": 1})
    chunks = chat(front, {**body, "stream": True})
    state = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(chunk)
    final = state.get_final_completion().choices[0]
    assert [(c.function.name, json.loads(c.function.arguments)) for c in final.message.tool_calls] == CALLS


def test_named_function_goes_through_structured_output(tokenizer):
    front = ScriptedFront(tokenizer, json.dumps(CALLS[0][1]))
    body = dict(model="fake", messages=USER, tools=TOOLS, max_tokens=500,
                tool_choice={"type": "function", "function": {"name": "get_weather"}})
    r = chat(front, body)
    [call] = r.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == CALLS[0]
    assert front.params.structured_outputs == StructuredOutputsParams(json=WEATHER["function"]["parameters"])
    chunks = chat(front, {**body, "stream": True})
    firsts = [t for c in chunks if c.choices and c.choices[0].delta.tool_calls
              for t in c.choices[0].delta.tool_calls if t.id]
    assert [(t.function.name, t.function.arguments) for t in firsts] == [("get_weather", "")]
    args = "".join(t.function.arguments or "" for c in chunks if c.choices and c.choices[0].delta.tool_calls
                   for t in c.choices[0].delta.tool_calls if not t.id)
    assert json.loads(args) == CALLS[0][1]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_required_schema_hoists_defs():
    ref_tool = Tool.model_validate({"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"p": {"$ref": "#/$defs/P"}}, "$defs": {"P": {"type": "integer"}}}}})
    schema = required_schema([ref_tool], parallel=True)
    assert schema["$defs"] == {"P": {"type": "integer"}}
    assert "$defs" not in schema["items"]["anyOf"][0]["properties"]["parameters"]


@pytest.mark.parametrize("name", ["llama3_json", "mistral"])
def test_other_parsers_through_the_server(tokenizer, name):
    text, content = TEXTS[name]
    front = ScriptedFront(tokenizer, text)
    r = chat(front, dict(model="fake", messages=USER, tools=TOOLS, max_tokens=500),
             enable_auto_tool_choice=True, tool_call_parser=name)
    assert r.choices[0].message.content == content
    assert [(c.function.name, json.loads(c.function.arguments)) for c in r.choices[0].message.tool_calls] == CALLS
    # Their markers are special tokens, which the text must keep.
    assert front.params.skip_special_tokens is False


def test_tool_call_history_renders(tokenizer):
    history = USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
            for n, a in CALLS]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "21:00"}]
    front = ScriptedFront(tokenizer, "It is 18 C in Paris and 21:00 in Tokyo.")
    r = chat(front, dict(model="fake", messages=history, tools=TOOLS, max_tokens=500), **AUTO)
    assert r.choices[0].message.content == "It is 18 C in Paris and 21:00 in Tokyo."
    blocks = re.findall(r"<tool_call>\n(.*?)\n</tool_call>", front.prompt)
    assert [json.loads(b) for b in blocks] == [{"name": n, "arguments": a} for n, a in CALLS]
    assert re.findall(r"<tool_response>\n(.*?)\n</tool_response>", front.prompt) == ["18 C", "21:00"]


def test_auto_needs_the_server_flags(tokenizer):
    r = post(ScriptedFront(tokenizer), "/v1/chat/completions", {"messages": USER, "tools": TOOLS})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    assert "--enable-auto-tool-choice" in r.json()["error"]["message"]


def test_settings_check_the_parser():
    from jaxinfer.server import ServerSettings

    with pytest.raises(ValueError, match="tool_call_parser"):
        ServerSettings(enable_auto_tool_choice=True)
    with pytest.raises(ValueError, match="hermes"):
        ServerSettings(tool_call_parser="nope")

