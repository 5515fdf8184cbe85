"""The app over a scripted fake engine: exact stream framing, overload and engine failures, and
all-or-nothing admission, without compiling a model."""

import asyncio
import json
from types import SimpleNamespace

import httpx
import pytest

from jaxinfer.engine.async_engine import EngineDeadError, QueueFullError
from jaxinfer.engine.metrics import EngineMetrics
from jaxinfer.outputs import CompletionOutput, RequestOutput
from jaxinfer.sampling_params import RequestOutputKind
from jaxinfer.tokenizer import Tokenizer
from jaxinfer.server import ServerSettings, create_app
from tests.server_fixtures import train_tokenizer


class FakeFront:
    """Answers each request with its prompt's token ids reversed, one token per output.

    failure: None, "queue_full", "dead", "refuse" (a ValueError at admission), "refuse_second"
      (the second prompt of a request is refused), or "mid_stream" (the engine dies after 2 tokens).
    """

    def __init__(self, tokenizer, failure=None):
        self.engine = SimpleNamespace(
            tokenizer=tokenizer, max_model_len=256, model_config=SimpleNamespace(vocab_size=tokenizer.vocab_size),
            metrics=EngineMetrics(), model=SimpleNamespace(path="fake"),
            scheduler=SimpleNamespace(num_running=0, num_waiting=0), block_manager=SimpleNamespace(usage=0.0))
        self.failure = failure
        self.closed_early: list[str] = []

    async def call(self, fn):
        if self.failure == "dead":
            raise EngineDeadError("engine stopped: RuntimeError('device lost')")
        return fn(self.engine)

    async def generate(self, prompt, params, request_id, *, priority=0):
        if self.failure == "queue_full":
            raise QueueFullError("the engine already holds 1024 requests")
        if self.failure == "dead":
            raise EngineDeadError("engine stopped: RuntimeError('device lost')")
        if self.failure == "refuse" or (self.failure == "refuse_second" and request_id.endswith("-1")):
            raise ValueError("temperature must be in [0, inf), got -1.0")
        ids = list(reversed(prompt["prompt_token_ids"]))[:params.max_tokens]
        finished = False
        try:
            for k in range(len(ids)):
                await asyncio.sleep(0.001)
                if self.failure == "mid_stream" and k == 2:
                    raise EngineDeadError("engine stopped: RuntimeError('device lost')")
                last = k == len(ids) - 1
                if params.output_kind == RequestOutputKind.FINAL_ONLY and not last:
                    continue
                new = ids[k:k + 1] if params.output_kind == RequestOutputKind.DELTA else ids[:k + 1]
                text = "".join(self.engine.tokenizer.decode([t]) for t in new)
                outputs = [CompletionOutput(index=i, text=text, token_ids=new,
                                            finish_reason="length" if last else None) for i in range(params.n)]
                yield RequestOutput(request_id, prompt.get("prompt"), prompt["prompt_token_ids"], outputs,
                                    finished=last)
            finished = True
        finally:
            if not finished:
                self.closed_early.append(request_id)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(directory)
    return Tokenizer.from_directory(directory)


def request(front, method, path, settings=ServerSettings(served_model_names=("fake",)), **kwargs):
    app = create_app(front, settings)

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def events(response) -> list[str]:
    assert response.headers["content-type"].startswith("text/event-stream")
    body = response.text
    assert body.endswith("\n\n")
    blocks = body[:-2].split("\n\n")
    assert all(b.startswith("data: ") and "\n" not in b for b in blocks), blocks
    return [b[len("data: "):] for b in blocks]


def test_completion_stream_framing(tokenizer):
    ids = [40, 41, 42, 43]
    r = request(FakeFront(tokenizer), "POST", "/v1/completions",
                json={"model": "fake", "prompt": ids, "max_tokens": 3, "stream": True,
                      "stream_options": {"include_usage": True}})
    data = events(r)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert [c["choices"][0]["text"] for c in chunks[:-1]] == [tokenizer.decode([t]) for t in (43, 42, 41)]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None, None, "length"]
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        "prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("cmpl-")


def test_chat_stream_sends_roles_first(tokenizer):
    r = request(FakeFront(tokenizer), "POST", "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "n": 2, "stream": True})
    chunks = [json.loads(d) for d in events(r)[:-1]]
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [{"role": "assistant", "content": ""}] * 2
    assert [c["choices"][0]["index"] for c in chunks[:2]] == [0, 1]
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[2:])
    assert sorted(c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]) == [0, 1]


@pytest.mark.parametrize("stream", [False, True])
def test_full_queue_is_503_with_retry_after(tokenizer, stream):
    r = request(FakeFront(tokenizer, "queue_full"), "POST", "/v1/completions",
                json={"prompt": "hi", "stream": stream})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] == "server_error" and "overloaded" in r.json()["error"]["message"]


def test_dead_engine_is_503_everywhere(tokenizer):
    front = FakeFront(tokenizer, "dead")
    for method, path, kwargs in [("GET", "/health", {}), ("GET", "/metrics", {}),
                                 ("POST", "/v1/completions", {"json": {"prompt": "hi"}})]:
        r = request(front, method, path, **kwargs)
        assert r.status_code == 503 and "device lost" in r.json()["error"]["message"]
    assert request(FakeFront(tokenizer), "GET", "/health").status_code == 200


def test_engine_refusal_is_400_naming_the_field(tokenizer):
    r = request(FakeFront(tokenizer, "refuse"), "POST", "/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "temperature"


def test_failure_mid_stream_is_an_error_event(tokenizer):
    r = request(FakeFront(tokenizer, "mid_stream"), "POST", "/v1/completions",
                json={"prompt": [5, 6, 7, 8, 9], "max_tokens": 5, "stream": True})
    data = events(r)
    assert r.status_code == 200 and data[-1] == "[DONE]"
    error = json.loads(data[-2])["error"]
    assert error["type"] == "server_error" and "device lost" in error["message"]
    assert len(data) == 4  # two tokens, the error, [DONE]


def test_admission_is_all_or_nothing(tokenizer):
    front = FakeFront(tokenizer, "refuse_second")
    r = request(front, "POST", "/v1/completions", json={"prompt": [[5, 6, 7, 8], [9, 10]], "max_tokens": 4})
    assert r.status_code == 400
    assert len(front.closed_early) == 1 and front.closed_early[0].endswith("-0")


TOOLS_TEMPLATE = ("{% if tools %}{% for t in tools %}<tool>{{ t.function.name }}</tool>{% endfor %}{% endif %}"
                  "{% for m in messages %}{{ m.role }}: {{ m.content or '' }}"
                  "{% for c in m.tool_calls or [] %}[call {{ c.function.name }}]{% endfor %}\n{% endfor %}")


def test_tools_reach_a_template_that_renders_them(tokenizer):
    with_tools = Tokenizer(tokenizer.backend, tokenizer.special_tokens, TOOLS_TEMPLATE)
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None,
                 "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    settings = ServerSettings(served_model_names=("fake",), enable_auto_tool_choice=True, tool_call_parser="hermes")
    r = request(FakeFront(with_tools), "POST", "/v1/chat/completions", settings,
                json={"messages": messages, "tools": tools, "tool_choice": "auto", "max_tokens": 1})
    assert r.status_code == 200, r.text
    rendered = with_tools.apply_chat_template(messages, tools=tools)
    assert "<tool>get_weather</tool>" in rendered and "[call get_weather]" in rendered
    assert r.json()["usage"]["prompt_tokens"] == len(with_tools.encode(rendered, add_special_tokens=False))


def test_chat_without_a_template_is_400(tokenizer):
    plain = Tokenizer(tokenizer.backend, tokenizer.special_tokens, None)
    r = request(FakeFront(plain), "POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]
    assert request(FakeFront(plain), "POST", "/v1/completions", json={"prompt": "x"}).status_code == 200


def test_metrics_render_from_a_fake(tokenizer):
    front = FakeFront(tokenizer)
    front.engine.metrics.record_finished("stop", 0.4)
    r = request(front, "GET", "/metrics")
    assert 'vllm:request_success_total{finished_reason="stop",model_name="fake"} 1.0' in r.text
    assert 'vllm:e2e_request_latency_seconds_bucket{le="0.5",model_name="fake"} 1.0' in r.text
