"""Structured output requests reach the engine as the StructuredOutputsParams they mean: OpenAI's
response_format, vLLM's guided_* fields and structured_outputs object, on both endpoints; two
constraints at once are a 400 naming both."""

import json

import pytest

from jaxinfer.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams
from jaxinfer.tokenizer import Tokenizer
from tests.server_fake import ScriptedFront, post
from tests.server_fixtures import train_tokenizer

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"enum": ["x", "y"]}},
          "required": ["a"]}
USER = [{"role": "user", "content": "hi"}]

# (request fields, the StructuredOutputsParams the engine must get)
CASES = [
    ({"response_format": {"type": "json_object"}}, StructuredOutputsParams(json_object=True)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA, "strict": True}}},
     StructuredOutputsParams(json=SCHEMA)),
    ({"guided_json": SCHEMA}, StructuredOutputsParams(json=SCHEMA)),
    ({"guided_json": json.dumps(SCHEMA)}, StructuredOutputsParams(json=SCHEMA)),
    ({"guided_regex": r"\d{3}-[a-z]+"}, StructuredOutputsParams(regex=r"\d{3}-[a-z]+")),
    ({"guided_choice": ["yes", "no"]}, StructuredOutputsParams(choice=("yes", "no"))),
    ({"guided_grammar": 'root ::= "a" | "b"'}, StructuredOutputsParams(grammar='root ::= "a" | "b"')),
    ({"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}},
     StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)),
    ({"structured_outputs": {"choice": ["a", "b"]}}, StructuredOutputsParams(choice=("a", "b"))),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}},
      "structured_outputs": {"disable_any_whitespace": True}},
     StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)),
    ({"guided_choice": ["a"], "structured_outputs": {"disable_any_whitespace": False}},
     StructuredOutputsParams(choice=("a",))),
    ({"response_format": {"type": "text"}}, None),
    ({}, None),
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(directory)
    return Tokenizer.from_directory(directory)


@pytest.mark.parametrize("fields,expected", CASES, ids=[json.dumps(c[0])[:40] for c in CASES])
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_constraint_reaches_the_engine(tokenizer, route, fields, expected):
    front = ScriptedFront(tokenizer, '{"a": 1}')
    body = {"messages": USER} if route.endswith("chat/completions") else {"prompt": "hi"}
    r = post(front, route, {**body, "max_tokens": 20, **fields})
    assert r.status_code == 200, r.text
    assert front.params.structured_outputs == expected


def test_the_whole_sampling_params(tokenizer):
    front = ScriptedFront(tokenizer, "yes")
    r = post(front, "/v1/chat/completions", {"messages": USER, "max_tokens": 7, "temperature": 0.5, "seed": 3,
                                             "guided_choice": ["yes", "no"], "stream": True})
    assert r.status_code == 200
    assert front.params == SamplingParams(temperature=0.5, seed=3, max_tokens=7,
                                          output_kind=RequestOutputKind.DELTA,
                                          structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))


@pytest.mark.parametrize("fields,names", [
    ({"response_format": {"type": "json_object"}, "guided_json": SCHEMA}, ["response_format", "guided_json"]),
    ({"guided_regex": "a+", "guided_choice": ["a"]}, ["guided_regex", "guided_choice"]),
    ({"guided_grammar": "root ::= 'a'", "structured_outputs": {"regex": "a"}}, ["guided_grammar", "structured_outputs"]),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, ["regex", "choice"]),
])
def test_two_constraints_are_a_400(tokenizer, fields, names):
    front = ScriptedFront(tokenizer)
    for route, body in [("/v1/chat/completions", {"messages": USER}), ("/v1/completions", {"prompt": "hi"})]:
        r = post(front, route, {**body, **fields})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert all(n in error["message"] for n in names), error
        assert error["type"] == "invalid_request_error"
    assert front.requests == []


def test_forced_tool_choice_and_a_constraint_are_a_400(tokenizer):
    plain = Tokenizer(tokenizer.backend, tokenizer.special_tokens, "{% for m in messages %}{{ m.content }}"
                      "{% endfor %}{{ tools | length }}")
    tools = [{"type": "function", "function": {"name": "f"}}]
    r = post(ScriptedFront(plain), "/v1/chat/completions", {"messages": USER, "tools": tools,
                                                            "tool_choice": "required", "guided_regex": "a"})
    assert r.status_code == 400
    assert "guided_regex, tool_choice" in r.json()["error"]["message"]


@pytest.mark.parametrize("schema", ["[1, 2]", "not json", 5])
def test_bad_schemas_are_a_400(tokenizer, schema):
    r = post(ScriptedFront(tokenizer), "/v1/completions", {"prompt": "hi", "guided_json": schema})
    assert r.status_code == 400 and r.json()["error"]["param"] == "guided_json"
