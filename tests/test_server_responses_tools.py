"""Tools on /v1/responses through the official openai client, over a scripted engine: calls read
out of the text become `function_call` items (auto with the hermes parser, required, a named
function), a streamed response carries them as the Responses API's events, and a follow-up
with `function_call_output` items renders the calls and results for the model's next turn."""

import asyncio
import json

import openai
import pytest

from jaxinfer.sampling_params import StructuredOutputsParams
from tests.server_fake import ScriptedFront, asgi_client, post
from tests.test_server_tools import AUTO, CALLS, HERMES_TEXT, tokenizer  # noqa: F401 (fixture)

WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                          "required": ["city"]}}
TIME = {"type": "function", "name": "get_time",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}


def respond(front, stream=False, **body):
    settings = body.pop("settings", {})

    async def go():
        async with asgi_client(front, **settings) as http:
            client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="x", http_client=http, max_retries=0)
            if stream:
                return [event async for event in await client.responses.create(stream=True, **body)]
            return await client.responses.create(**body)

    return asyncio.run(go())


def calls_of(response):
    return [(item.name, json.loads(item.arguments)) for item in response.output if item.type == "function_call"]


def test_auto_tool_calls_become_function_call_items(tokenizer):
    front = ScriptedFront(tokenizer, HERMES_TEXT)
    r = respond(front, model="fake", input="Weather in Paris, and the time in Tokyo?", tools=[WEATHER, TIME],
                settings=AUTO)
    assert [item.type for item in r.output] == ["message", "function_call", "function_call"]
    assert r.output[0].content[0].text == "Let me look."
    assert calls_of(r) == CALLS
    call_ids = [item.call_id for item in r.output[1:]]
    assert len(set(call_ids)) == 2 and all(cid.startswith("call_") for cid in call_ids)
    assert [t.name for t in r.tools] == ["get_weather", "get_time"] and r.tool_choice == "auto"
    assert "<tools>" in front.prompt and '"name": "get_weather"' in front.prompt  # the template got the tools
    # parallel_tool_calls false keeps the first call.
    r = respond(front, model="fake", input="Weather?", tools=[WEATHER, TIME], parallel_tool_calls=False, settings=AUTO)
    assert calls_of(r) == CALLS[:1]


def test_required_and_named_choices_constrain_the_output(tokenizer):
    front = ScriptedFront(tokenizer, json.dumps([{"name": "get_time", "parameters": {"tz": "UTC"}}]))
    r = respond(front, model="fake", input="Time?", tools=[WEATHER, TIME], tool_choice="required")
    assert calls_of(r) == [("get_time", {"tz": "UTC"})]
    assert isinstance(front.params.structured_outputs, StructuredOutputsParams)
    front = ScriptedFront(tokenizer, '{"city": "Oslo"}')
    r = respond(front, model="fake", input="Weather?", tools=[WEATHER, TIME],
                tool_choice={"type": "function", "name": "get_weather"})
    assert calls_of(r) == [("get_weather", {"city": "Oslo"})]
    assert front.params.structured_outputs.json == WEATHER["parameters"]
    # "none": the tools stay out of the prompt and the text is the answer.
    front = ScriptedFront(tokenizer, HERMES_TEXT)
    r = respond(front, model="fake", input="Weather?", tools=[WEATHER], tool_choice="none", settings=AUTO)
    assert [item.type for item in r.output] == ["message"] and "<tools>" not in front.prompt


def test_streamed_function_calls(tokenizer):
    front = ScriptedFront(tokenizer, HERMES_TEXT)
    events = respond(front, stream=True, model="fake", input="Weather?", tools=[WEATHER, TIME], settings=AUTO)
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert kinds.count("response.function_call_arguments.done") == 2
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert arguments == "".join(json.dumps(a) for _, a in CALLS)
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert [i.type for i in done] == ["message", "function_call", "function_call"]
    assert calls_of(events[-1].response) == CALLS
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_function_call_outputs_continue_the_conversation(tokenizer):
    front = ScriptedFront(tokenizer, '{"city": "Oslo"}')

    async def go():  # one app throughout: the store that previous_response_id reads is the app's
        async with asgi_client(front, **AUTO) as http:
            client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="x", http_client=http, max_retries=0)
            first = await client.responses.create(model="fake", input="Weather in Oslo?", tools=[WEATHER],
                                                  tool_choice={"type": "function", "name": "get_weather"})
            [call] = first.output
            front.reply = "It is 3 degrees in Oslo."
            second = await client.responses.create(
                model="fake", previous_response_id=first.id, tools=[WEATHER],
                input=[{"type": "function_call_output", "call_id": call.call_id, "output": "3C, cloudy"}])
            prompt = front.prompt
            # The same history given as explicit input items renders the same prompt.
            third = await client.responses.create(model="fake", tools=[WEATHER], input=[
                {"role": "user", "content": "Weather in Oslo?"},
                {"type": "function_call", "call_id": call.call_id, "name": "get_weather",
                 "arguments": call.arguments},
                {"type": "function_call_output", "call_id": call.call_id, "output": "3C, cloudy"}])
            return second, prompt, third

    second, prompt, third = asyncio.run(go())
    assert second.output_text == "It is 3 degrees in Oslo."
    # The stored call and its result are both in the prompt, in order, as the template writes them.
    assert prompt.index('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}') \
        < prompt.index("<tool_response>\n3C, cloudy\n</tool_response>")
    assert third.output_text == second.output_text and front.prompt == prompt


@pytest.mark.parametrize("body, match", [
    ({"tool_choice": "required"}, "needs tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "not among"),
    ({"tools": [WEATHER], "input": [{"type": "function_call", "call_id": "c", "name": "get_weather",
                                     "arguments": "{not json"}]}, "not JSON"),
    ({"tools": [WEATHER]}, "enable-auto-tool-choice"),
])
def test_bad_tool_requests_are_400(tokenizer, body, match):
    front = ScriptedFront(tokenizer, "x")
    r = post(front, "/v1/responses", {"model": "fake", "input": "hi", **body})
    assert r.status_code == 400 and match in r.json()["error"]["message"], r.json()
    assert not front.requests
