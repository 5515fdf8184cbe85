"""Bad input: each kind gets a 4xx with a clear message in OpenAI's error shape, and good requests
running at the same time finish exactly as they do alone."""

import asyncio
import json

import httpx
import pytest

from jaxinfer.server import ServerSettings, create_app
from tests.server_fixtures import MODEL_NAME, live_server, shared_stack

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]


def chat(**fields):
    return {"model": MODEL_NAME, "messages": USER, "max_tokens": 4, **fields}


def comp(**fields):
    return {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 4, **fields}


# (name, route, body (dict or raw bytes), status, param, words the message must contain)
BAD_INPUTS = [
    ("bad JSON", COMP, b'{"prompt": "hi", ', 400, None, "not valid JSON"),
    ("invalid UTF-8", COMP, b'{"prompt": "\xff\xfe"}', 400, None, "JSON"),
    ("array body", COMP, b"[1, 2]", 400, None, "JSON object"),
    ("empty body", CHAT, b"", 400, None, "JSON object"),
    ("prompt of wrong type", COMP, comp(prompt=5), 400, "prompt", "list of token ids"),
    ("max_tokens as string", COMP, comp(max_tokens="5"), 400, "max_tokens", "integer"),
    ("negative max_tokens", CHAT, chat(max_tokens=-1), 400, "max_tokens", "greater than or equal to 1"),
    ("huge max_tokens", COMP, comp(max_tokens=10**12), 400, "max_tokens", "maximum context length"),
    ("max_completion_tokens too big", CHAT, chat(max_completion_tokens=300), 400, "max_tokens",
     "maximum context length"),
    ("unknown model", CHAT, chat(model="gpt-5"), 404, "model", "does not exist"),
    ("empty messages", CHAT, chat(messages=[]), 400, "messages", "at least 1"),
    ("messages not a list", CHAT, chat(messages="hello"), 400, "messages", "valid list"),
    ("empty prompt", COMP, comp(prompt=""), 400, "prompt", "empty"),
    ("empty prompt list", COMP, comp(prompt=[]), 400, "prompt", "empty"),
    ("empty token-id list in a batch", COMP, comp(prompt=[[1, 2], []]), 400, "prompt", "empty"),
    ("missing prompt", COMP, {"model": MODEL_NAME}, 400, "prompt", "Field required"),
    ("n too large", CHAT, chat(n=17), 400, "n", "less than or equal to 16"),
    ("n zero", COMP, comp(n=0), 400, "n", "greater than or equal to 1"),
    ("stop of numbers", COMP, comp(stop=[1, 2]), 400, "stop", "string or a list"),
    ("empty stop string", CHAT, chat(stop=["ok", ""]), 400, "stop", "non-empty"),
    ("too many stop strings", COMP, comp(stop=[f"s{i}" for i in range(17)]), 400, "stop", "at most 16"),
    ("logprobs out of range", COMP, comp(logprobs=21), 400, "logprobs", "less than or equal to 20"),
    ("top_logprobs out of range", CHAT, chat(logprobs=True, top_logprobs=-1), 400, "top_logprobs",
     "greater than or equal to 0"),
    ("top_logprobs without logprobs", CHAT, chat(top_logprobs=2), 400, "top_logprobs", "requires logprobs"),
    ("negative temperature", CHAT, chat(temperature=-0.5), 400, "temperature", "greater than or equal to 0"),
    ("NaN temperature", COMP, b'{"prompt": "hi", "temperature": NaN}', 400, "temperature", "finite"),
    ("top_p zero", COMP, comp(top_p=0), 400, "top_p", "greater than 0"),
    ("presence penalty too large", CHAT, chat(presence_penalty=2.5), 400, "presence_penalty", "2"),
    ("repetition penalty zero", COMP, comp(repetition_penalty=0), 400, "repetition_penalty", "greater than 0"),
    ("seed beyond int64", COMP, comp(seed=2**64), 400, "seed", "less than or equal to"),
    ("min_tokens above max_tokens", COMP, comp(min_tokens=10), 400, "min_tokens", "max_tokens"),
    ("prompt too long", COMP, comp(prompt=list(range(1, 300))), 400, "prompt", "maximum context length"),
    ("negative token id", COMP, comp(prompt=[5, -1]), 400, "prompt", "token ids"),
    ("token id beyond vocab", COMP, comp(prompt=[[5, 6], [7, 10**6]]), 400, "prompt[1]", "outside the vocabulary"),
    ("stop token id beyond vocab", COMP, comp(stop_token_ids=[10**6]), 400, "stop_token_ids", "vocabulary"),
    ("logit_bias key not a token id", COMP, comp(logit_bias={"cat": 1}), 400, "logit_bias", "token ids"),
    ("logit_bias value too large", CHAT, chat(logit_bias={"5": 1000}), 400, "logit_bias.5",
     "less than or equal to 100"),
    ("unknown role", CHAT, chat(messages=[{"role": "wizard", "content": "x"}]), 400, "messages[0].role", "user"),
    ("missing content", CHAT, chat(messages=[{"role": "user"}]), 400, "messages[0].content", "Field required"),
    ("assistant without content", CHAT, chat(messages=[{"role": "assistant", "content": None}]), 400,
     "messages[0]", "needs content or tool_calls"),
    ("content of wrong type", CHAT, chat(messages=[{"role": "user", "content": 7}]), 400, "messages[0].content",
     "string or a list"),
    ("image content part", CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     400, "messages[0].content", "string or a list"),
    ("tool message without id", CHAT, chat(messages=[{"role": "tool", "content": "42"}]), 400,
     "messages[0].tool_call_id", "Field required"),
    ("message not an object", CHAT, chat(messages=["hi"]), 400, "messages[0]", "must be a JSON object like"),
    ("two structured output constraints", CHAT, chat(response_format={"type": "json_object"}, guided_regex="a+"),
     400, "guided_regex", "response_format, guided_regex"),
    ("json_schema without a schema", CHAT, chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
     400, "response_format", "needs json_schema.schema"),
    ("guided_json that is not JSON", COMP, comp(guided_json="{nope"), 400, "guided_json", "not valid JSON"),
    ("empty structured_outputs", CHAT, chat(structured_outputs={}), 400, "structured_outputs", "exactly one"),
    ("structural_tag response_format", CHAT, chat(response_format={"type": "structural_tag"}), 400,
     "response_format", "needs structures and triggers"),
    ("unknown response_format type", CHAT, chat(response_format={"type": "grammar"}), 400,
     "response_format.type", "'json_schema'"),
    ("tools the template cannot render", CHAT,
     chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}], tool_choice="required"), 400,
     "tools", "does not support tools"),
    ("auto tool choice without a parser", CHAT,
     chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tool_choice", "--enable-auto-tool-choice"),
    ("tool_choice without tools", CHAT, chat(tool_choice="required"), 400, "tool_choice", "needs tools"),
    ("named tool that is not offered", CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}],
                                                 tool_choice={"type": "function", "function": {"name": "g"}}),
     400, "tool_choice", "not among"),
    ("tool call arguments that are not JSON", CHAT, chat(messages=[{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]), 400,
     "messages[0].tool_calls[0].function", "JSON text"),
    ("max_tokens 0 without echo", COMP, comp(max_tokens=0), 400, "max_tokens", "only allowed with echo"),
    ("stream_options without stream", CHAT, chat(stream_options={"include_usage": True}), 400, "stream_options",
     "stream is true"),
    ("reserved template variable", CHAT, chat(chat_template_kwargs={"messages": []}), 400, "chat_template_kwargs",
     "cannot be set"),
    ("prompt_logprobs while streaming", COMP, comp(prompt_logprobs=1, stream=True), 400, "prompt_logprobs",
     "not available when stream"),
    ("prompt_logprobs out of range", CHAT, chat(prompt_logprobs=21), 400, "prompt_logprobs", "less than or equal"),
    ("too many prompts", COMP, comp(prompt=["a"] * 65), 400, "prompt", "at most 64"),
    ("bool where a number belongs", COMP, comp(temperature=True), 400, "temperature", "number"),
]


@pytest.fixture(scope="module")
def stack():
    return shared_stack()


@pytest.fixture(autouse=True)
def engine_left_idle(stack):
    yield
    assert stack.wait_idle() == 0.0


def post(client, route, body):
    if isinstance(body, bytes):
        return client.post(route, content=body, headers={"content-type": "application/json"})
    return client.post(route, json=body)


def check_error(response, status, param, words):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words.lower() in error["message"].lower(), error["message"]
    assert error["param"] == param, error
    assert error["type"] == ("invalid_request_error" if status in (400, 404) else error["type"])


@pytest.mark.parametrize("name,route,body,status,param,words", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_a_clear_4xx(stack, name, route, body, status, param, words):
    with httpx.Client(base_url=stack.url) as client:
        check_error(post(client, route, body), status, param, words)


GOOD = [
    (COMP, comp(prompt="The quick brown fox", max_tokens=24, temperature=0)),
    (COMP, comp(prompt=[[5, 9, 33], [40, 41]], max_tokens=16, temperature=0.9, seed=11, n=2)),
    (CHAT, chat(max_tokens=24, temperature=0)),
    (CHAT, chat(max_tokens=20, temperature=1.0, seed=5, stop=["e"], logprobs=True, top_logprobs=1)),
]


async def run_good(client, route, body, stream):
    """The texts (by choice index) and finish reasons a good request produces."""
    body = {**body, "stream": stream}
    texts, finishes = {}, {}
    if not stream:
        r = await client.post(route, json=body)
        assert r.status_code == 200, r.text
        for c in r.json()["choices"]:
            texts[c["index"]] = c["text"] if route == COMP else c["message"]["content"]
            finishes[c["index"]] = c["finish_reason"]
        return texts, finishes
    async with client.stream("POST", route, json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for c in json.loads(line[6:])["choices"]:
                piece = c["text"] if route == COMP else c["delta"].get("content", "")
                texts[c["index"]] = texts.get(c["index"], "") + piece
                if c["finish_reason"]:
                    finishes[c["index"]] = c["finish_reason"]
    return texts, finishes


def test_bad_requests_leave_concurrent_good_ones_unchanged(stack):
    async def main():
        async with httpx.AsyncClient(base_url=stack.url, timeout=60) as client:
            alone = [await run_good(client, route, body, stream) for route, body in GOOD for stream in (False, True)]
            bad = [post(client, route, body) for _ in range(3) for _, route, body, *_ in BAD_INPUTS]
            good = [run_good(client, route, body, stream) for route, body in GOOD for stream in (False, True)]
            results = await asyncio.gather(*good, *bad)
            return alone, results[:len(good)], results[len(good):]

    alone, together, bad = asyncio.run(main())
    assert together == alone
    # Streamed and unstreamed runs of one request agree too.
    assert alone[0::2] == alone[1::2]
    statuses = [r.status_code for r in bad]
    assert all(400 <= s < 500 for s in statuses), statuses


def test_oversized_bodies_get_413(stack):
    app = create_app(stack.front, ServerSettings(served_model_names=(MODEL_NAME,), max_body_bytes=4096))
    big = json.dumps(comp(prompt="x" * 5000)).encode()
    with live_server(app) as server, httpx.Client(base_url=server.base_url) as client:
        check_error(post(client, COMP, big), 413, None, "larger than the server's limit")

        def chunks():  # no Content-Length: the limit must hold while reading
            for i in range(0, len(big), 1000):
                yield big[i:i + 1000]

        r = client.post(COMP, content=chunks(), headers={"content-type": "application/json"})
        assert "content-length" not in r.request.headers
        check_error(r, 413, None, "larger than the server's limit")
        assert client.post(COMP, json=comp(prompt="x" * 100)).status_code == 200


def test_routes_and_methods(stack):
    with httpx.Client(base_url=stack.url) as client:
        check_error(client.get(COMP), 405, None, "method not allowed")
        check_error(client.get("/v1/engines"), 404, None, "no route")
        r = client.post(COMP, content=b"prompt=hi", headers={"content-type": "application/x-www-form-urlencoded"})
        check_error(r, 400, None, "application/json")
