"""/v1/responses through the official openai client on the live server: text out, usage, the
streamed event sequence, previous_response_id over the bounded store, and the 404 for an
unknown id."""

import openai
import pytest

from tests.server_fixtures import MODEL_NAME
from tests.server_fixtures import client, engine_left_idle, stack  # noqa: F401 (fixtures)


@pytest.fixture(autouse=True)
def _idle_after_each_test(engine_left_idle):
    pass


def prompt_tokens(stack, messages) -> int:
    tok = stack.engine.tokenizer
    return len(tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False))


def test_response_matches_chat(client, stack):
    r = client.responses.create(model=MODEL_NAME, input="Name a capital city.", instructions="You are terse.",
                                max_output_tokens=12, temperature=0)
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a capital city."}]
    chat = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=12, temperature=0)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == MODEL_NAME
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == prompt_tokens(stack, messages) == chat.usage.prompt_tokens
    assert r.usage.output_tokens == chat.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    finished = chat.choices[0].finish_reason
    assert r.status == ("incomplete" if finished == "length" else "completed")
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens"
    [item] = r.output
    assert item.type == "message" and item.role == "assistant" and item.content[0].type == "output_text"


def test_streamed_events(client):
    kwargs = dict(model=MODEL_NAME, input=[{"role": "user", "content": "Once upon a time"}],
                  max_output_tokens=16, temperature=0)
    whole = client.responses.create(**kwargs)
    events = list(client.responses.create(stream=True, **kwargs))
    kinds = [e.type for e in events]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[4:4 + len(deltas)] == ["response.output_text.delta"] * len(deltas) and deltas
    end = "response.incomplete" if whole.status == "incomplete" else "response.completed"
    assert kinds[4 + len(deltas):] == ["response.output_text.done", "response.content_part.done",
                                       "response.output_item.done", end]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    [done] = [e for e in events if e.type == "response.output_text.done"]
    assert "".join(deltas) == whole.output_text == done.text
    final = events[-1].response
    assert final.output_text == whole.output_text and final.usage.output_tokens == whole.usage.output_tokens
    assert client.responses.retrieve(final.id).output_text == whole.output_text


def test_previous_response_continues_the_conversation(client, stack):
    first = client.responses.create(model=MODEL_NAME, input="Paris is the capital of", instructions="Be brief.",
                                    max_output_tokens=6, temperature=0)
    second = client.responses.create(model=MODEL_NAME, input="And Berlin?", previous_response_id=first.id,
                                     max_output_tokens=6, temperature=0)
    # The instructions are not carried over; the earlier turns are.
    expected = [{"role": "user", "content": "Paris is the capital of"},
                {"role": "assistant", "content": first.output_text},
                {"role": "user", "content": "And Berlin?"}]
    assert second.usage.input_tokens == prompt_tokens(stack, expected)
    assert second.previous_response_id == first.id


def test_unknown_previous_response_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model=MODEL_NAME, input="hi", previous_response_id="resp_nope", max_output_tokens=2)
    error = e.value.body
    assert error["param"] == "previous_response_id" and "resp_nope" in error["message"]
    assert error["type"] == "invalid_request_error" and error["code"] == "previous_response_not_found"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_nope")


def test_store_false_and_eviction(client, stack):
    r = client.responses.create(model=MODEL_NAME, input="hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    store = stack.app.state.responses
    limit = store.max_entries
    kept = client.responses.create(model=MODEL_NAME, input="hi", max_output_tokens=2)
    store.max_entries = 2  # a small bound for the test, restored below
    try:
        for _ in range(3):
            client.responses.create(model=MODEL_NAME, input="hi", max_output_tokens=2)
        assert len(store) == 2
        with pytest.raises(openai.NotFoundError):
            client.responses.create(model=MODEL_NAME, input="more", previous_response_id=kept.id,
                                    max_output_tokens=2)
    finally:
        store.max_entries = limit
