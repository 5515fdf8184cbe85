"""Structured output end to end: the real engine on the tiny model behind the live server, read
by the official openai client. Every json_schema answer parses and validates against its schema,
guided_choice answers are one of the choices, guided_regex answers match in full, and
tool_choice "required" yields calls to the offered tools with valid arguments."""

import dataclasses
import json
import re

import jsonschema
import openai
import pytest

from jaxinfer.tokenizer import Tokenizer
from jaxinfer.server import ServerSettings, create_app
from tests.server_fixtures import MODEL_NAME, live_server
from tests.server_fixtures import client, engine_left_idle, stack  # noqa: F401 (fixtures)

# Strings, arrays and numbers are bounded so a random model's answer always fits in max_tokens.
SCHEMAS = {
    "flat": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                              "unit": {"enum": ["celsius", "fahrenheit"]}},
             "required": ["city", "unit"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "person": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                                    "age": {"type": "integer", "minimum": 0, "maximum": 120}},
                   "required": ["name", "age"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3}},
        "required": ["person", "tags"], "additionalProperties": False},
    "array_of_objects": {"type": "object", "properties": {"items": {
        "type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99},
                                             "ok": {"type": "boolean"}},
            "required": ["id", "ok"], "additionalProperties": False}}},
        "required": ["items"], "additionalProperties": False},
    "optional_fields": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                                         "shade": {"type": "string", "maxLength": 8},
                                                         "bright": {"type": "boolean"}},
                        "required": ["color"], "additionalProperties": False},
}
USER = [{"role": "user", "content": "Answer in JSON."}]
MAX_TOKENS = 160
# JSON's free whitespace is off: a random model, free to, pads with whitespace until max_tokens
# (vLLM's `structured_outputs.disable_any_whitespace`, which applies to response_format too).
COMPACT = {"structured_outputs": {"disable_any_whitespace": True}}
# The test checkpoint's context is 256 tokens: tools are listed by name only.
NAMES_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\\ntools: ' }}{% for t in tools %}{{ t.function.name + ' ' }}"
    "{% endfor %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(autouse=True)
def _idle_after_each_test(engine_left_idle):
    pass


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_answers_validate(client, name):
    schema = SCHEMAS[name]
    fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
    answers = []
    for temperature, seed in [(0.0, None), (1.0, 1), (1.0, 2)]:
        r = client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=MAX_TOKENS, n=2,
                                           temperature=temperature, seed=seed, response_format=fmt,
                                           extra_body=COMPACT)
        answers += [(c.finish_reason, c.message.content) for c in r.choices]
    r = client.completions.create(model=MODEL_NAME, prompt="JSON:", max_tokens=MAX_TOKENS, temperature=0.7, seed=3,
                                  extra_body={"guided_json": schema, **COMPACT})
    answers.append((r.choices[0].finish_reason, r.choices[0].text))
    for finish_reason, text in answers:
        assert finish_reason == "stop", (finish_reason, text)
        jsonschema.validate(json.loads(text), schema)


def test_json_object_answers_parse(client):
    # Nothing bounds a free JSON object's strings, so a random model may run out of tokens inside
    # one; every answer that ends on its own must be a JSON object.
    finished = []
    for temperature, seed in [(0.3, 1), (0.5, 2), (0.5, 3)]:
        r = client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=MAX_TOKENS, n=2,
                                           temperature=temperature, seed=seed, response_format={"type": "json_object"},
                                           extra_body=COMPACT)
        for c in r.choices:
            assert c.message.content.startswith("{"), c.message.content
            if c.finish_reason == "stop":
                finished.append(json.loads(c.message.content))
    assert len(finished) >= 2 and all(isinstance(f, dict) for f in finished)


def test_guided_choice(client):
    choices = ["yes", "no", "maybe later"]
    r = client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=16, n=4, temperature=1.0, seed=5,
                                       extra_body={"guided_choice": choices})
    assert all(c.message.content in choices for c in r.choices), [c.message.content for c in r.choices]
    r = client.completions.create(model=MODEL_NAME, prompt="Pick:", max_tokens=16, temperature=0,
                                  extra_body={"structured_outputs": {"choice": choices}})
    assert r.choices[0].text in choices


@pytest.mark.parametrize("pattern", [r"[0-9]{3}-[a-z]{2,4}", r"(red|green|blue) #[0-9a-f]{6}"])
def test_guided_regex(client, pattern):
    r = client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=32, n=3, temperature=1.0, seed=6,
                                       extra_body={"guided_regex": pattern})
    for c in r.choices:
        assert re.fullmatch(pattern, c.message.content), c.message.content
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=USER, max_tokens=32, temperature=0,
                                                 stream=True, extra_body={"guided_regex": pattern}))
    assert re.fullmatch(pattern, "".join(c.choices[0].delta.content or "" for c in chunks))


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                         "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"utc_offset": {"type": "integer", "minimum": -12, "maximum": 14}},
        "required": ["utc_offset"], "additionalProperties": False}}},
]


def test_tool_choice_required_calls_offered_tools(stack):
    # The test checkpoint's template has no tools; serve the same engine with a tool-use template.
    app = create_app(stack.front, ServerSettings(served_model_names=(MODEL_NAME,)))
    tok = app.state.serving.info.tokenizer
    app.state.serving.info = dataclasses.replace(
        app.state.serving.info, tokenizer=Tokenizer(tok.backend, tok.special_tokens, NAMES_TEMPLATE))
    parameters = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    with live_server(app) as server, openai.OpenAI(base_url=server.base_url + "/v1", api_key="x",
                                                   max_retries=0) as client:
        for seed in range(3):
            r = client.chat.completions.create(model=MODEL_NAME, messages=USER, tools=TOOLS, tool_choice="required",
                                               max_tokens=MAX_TOKENS, temperature=1.0, seed=seed, extra_body=COMPACT)
            [choice] = r.choices
            assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
            for call in choice.message.tool_calls:
                jsonschema.validate(json.loads(call.function.arguments), parameters[call.function.name])
        r = client.chat.completions.create(model=MODEL_NAME, messages=USER, tools=TOOLS, max_tokens=MAX_TOKENS,
                                           tool_choice={"type": "function", "function": {"name": "get_time"}},
                                           extra_body=COMPACT)
        [call] = r.choices[0].message.tool_calls
        assert call.function.name == "get_time"
        jsonschema.validate(json.loads(call.function.arguments), parameters["get_time"])
