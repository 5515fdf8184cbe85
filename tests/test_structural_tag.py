"""Structural tags (vLLM's `structural_tag`): free text in which a trigger opens a tagged region
whose body must be JSON of the tag's schema. The grammar is judged on strings through
llguidance's matcher over a real tokenizer; the server takes `response_format:
structural_tag` and vLLM's `structured_outputs.structural_tag`, and a served request with one
runs on the real engine."""

import json

import llguidance
import pytest

from jaxinfer.engine.structured import structural_tag_grammar
from jaxinfer.sampling_params import StructuredOutputsParams
from jaxinfer.tokenizer import Tokenizer
from tests.server_fake import ScriptedFront, post
from tests.server_fixtures import client, stack, train_tokenizer  # noqa: F401 (fixtures)

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
           "additionalProperties": False}
TAG = {"structures": [{"begin": "<function=get_weather>", "schema": WEATHER, "end": "</function>"},
                      {"begin": "<function=get_time>", "schema": {"type": "object"}, "end": "</function>"}],
       "triggers": ["<function="]}


@pytest.fixture(scope="module")
def ll_tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    train_tokenizer(directory)
    tok = Tokenizer.from_directory(directory)
    return llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=tok.vocab_size)


def accepts(ll_tokenizer, grammar: str, text: str) -> bool:
    """Whether the grammar matches the whole text (consumed as tokens, then ended)."""
    matcher = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    return matcher.consume_tokens(ll_tokenizer.tokenize_str(text)) and matcher.is_accepting()


@pytest.mark.parametrize("text, ok", [
    ("Just text, no call at all.", True),
    ('Let me check. <function=get_weather>{"city": "Paris"}</function> Done.', True),
    ('<function=get_time>{}</function><function=get_weather>{"city": "Oslo"}</function>', True),
    ('<function=get_weather>{"town": "Paris"}</function>', False),  # not the schema
    ('<function=get_weather>{"city": "Paris"}', False),  # never closed
    ("<function=unknown>{}</function>", False),  # a trigger must start a known structure
])
def test_grammar_accepts_exactly_the_tagged_text(ll_tokenizer, text, ok):
    assert accepts(ll_tokenizer, structural_tag_grammar(json.dumps(TAG)), text) is ok


@pytest.mark.parametrize("spec, match", [
    ("{not json", "not valid JSON"),
    (json.dumps({"structures": [], "triggers": ["<f"]}), "non-empty"),
    (json.dumps({"structures": [{"begin": "<g>", "schema": {}, "end": "</g>"}], "triggers": ["<f"]}), "no trigger"),
    (json.dumps({"structures": [{"begin": "<f>", "end": 3}], "triggers": ["<f"]}), "'begin' and 'end'"),
])
def test_bad_structural_tags_are_named(spec, match):
    with pytest.raises(ValueError, match=match):
        structural_tag_grammar(spec)
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(structural_tag="{}", regex="a")


def test_server_fields_reach_the_engine(tmp_path):
    train_tokenizer(tmp_path)
    front = ScriptedFront(Tokenizer.from_directory(tmp_path), "hello")
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
    r = post(front, "/v1/chat/completions", {**body, "response_format": {"type": "structural_tag", **TAG}})
    assert r.status_code == 200, r.json()
    assert json.loads(front.params.structured_outputs.structural_tag) == TAG
    r = post(front, "/v1/chat/completions", {**body, "structured_outputs": {"structural_tag": json.dumps(TAG)}})
    assert r.status_code == 200 and json.loads(front.params.structured_outputs.structural_tag) == TAG
    r = post(front, "/v1/chat/completions", {**body, "response_format": {"type": "structural_tag"}})
    assert r.status_code == 400 and "structures and triggers" in r.json()["error"]["message"]


def test_served_request_runs_on_the_engine(client, ll_tokenizer):
    """The real engine compiles the tag and generates under it; whatever it writes is accepted."""
    out = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Weather?"}],
                                         max_tokens=12, temperature=0.0,
                                         response_format={"type": "structural_tag", **TAG})
    text = out.choices[0].message.content
    assert out.choices[0].finish_reason in ("length", "stop")
    if out.choices[0].finish_reason == "stop":
        assert accepts(ll_tokenizer, structural_tag_grammar(json.dumps(TAG)), text)
    bad = {"structures": [{"begin": "<g>", "schema": {}, "end": "</g>"}], "triggers": ["<f"]}
    with pytest.raises(Exception, match="no trigger"):
        client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=4, response_format={"type": "structural_tag", **bad})
