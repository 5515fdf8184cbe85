"""The official `openai` client, unmodified, against `jaxinfer serve`'s app on loopback."""

import httpx
import openai
import pytest

from tests.server_fixtures import MODEL_NAME
from tests.server_fixtures import client, engine_left_idle, stack  # noqa: F401 (fixtures)

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a capital city."}]


@pytest.fixture(autouse=True)
def _idle_after_each_test(engine_left_idle):
    pass


def test_models_lists_every_served_name(client, stack):
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL_NAME, "alias"]
    assert client.models.retrieve("alias").id == "alias"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_completion_matches_engine_tokens(client, stack):
    r = client.completions.create(model=MODEL_NAME, prompt="The quick brown fox", max_tokens=12, temperature=0)
    [choice] = r.choices
    assert r.object == "text_completion" and r.model == MODEL_NAME
    tok = stack.engine.tokenizer
    prompt_ids = tok.encode("The quick brown fox")
    assert r.usage.prompt_tokens == len(prompt_ids)
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 12
    else:
        assert choice.finish_reason == "stop" and r.usage.completion_tokens < 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # The same request through token ids gives the same text.
    again = client.completions.create(model="alias", prompt=prompt_ids, max_tokens=12, temperature=0)
    assert again.choices[0].text == choice.text and again.model == "alias"


def test_streamed_completion_equals_unstreamed(client):
    kwargs = dict(model=MODEL_NAME, prompt="Once upon a time", max_tokens=20, temperature=0)
    whole = client.completions.create(**kwargs).choices[0]
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    assert [c.choices[0].finish_reason for c in chunks][-1] == whole.finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_chat_streamed_equals_unstreamed_with_usage(client):
    whole = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=16, temperature=0)
    assert whole.choices[0].message.role == "assistant" and whole.object == "chat.completion"
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_uses_the_template(client, stack):
    r = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_completion_tokens=4, temperature=0)
    rendered = stack.engine.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(stack.engine.tokenizer.encode(rendered, add_special_tokens=False))
    assert r.usage.completion_tokens <= 4


def test_n2_and_seed_reproducibility(client):
    kwargs = dict(model=MODEL_NAME, messages=CHAT, max_tokens=24, temperature=1.0, n=2, seed=1234)
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    other = client.chat.completions.create(**{**kwargs, "seed": 99})
    assert [c.message.content for c in other.choices] != [c.message.content for c in a.choices]
    # The two choices use different seeds (seed + index), so they differ.
    assert a.choices[0].message.content != a.choices[1].message.content
    comp = dict(model=MODEL_NAME, prompt="Hello", max_tokens=16, temperature=0.8, seed=7, n=2)
    assert ([c.text for c in client.completions.create(**comp).choices]
            == [c.text for c in client.completions.create(**comp).choices])


def test_streaming_n2_over_two_prompts(client):
    kwargs = dict(model=MODEL_NAME, prompt=["Paris is", "Berlin is"], max_tokens=10, temperature=0.7, seed=3, n=2)
    whole = client.completions.create(**kwargs)
    assert sorted(c.index for c in whole.choices) == [0, 1, 2, 3]
    texts = {i: "" for i in range(4)}
    finishes = {}
    for chunk in client.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                assert c.index not in finishes
                finishes[c.index] = c.finish_reason
    assert texts == {c.index: c.text for c in whole.choices}
    assert finishes == {c.index: c.finish_reason for c in whole.choices}


def test_completion_logprobs(client, stack):
    r = client.completions.create(model=MODEL_NAME, prompt="Numbers like", max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0.0 and 3 <= len(top) <= 4
        # Greedy: the sampled token is the most likely one.
        assert logprob == pytest.approx(max(top.values()), abs=1e-5)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_chat_logprobs_and_top_logprobs(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 2 and item.logprob <= 0
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob, abs=1e-5)
        assert item.bytes == list(item.token.encode())
    streamed = [c.choices[0].logprobs for c in client.chat.completions.create(
        model=MODEL_NAME, messages=CHAT, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2, stream=True)
        if c.choices and c.choices[0].logprobs]
    assert [t.token for lp in streamed for t in lp.content] == [t.token for t in content]


def test_stop_string_ends_text(client):
    kwargs = dict(model=MODEL_NAME, prompt="The quick", max_tokens=30, temperature=0,
                  extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs).choices[0].text
    # A two-character stop string first seen a few characters in.
    stop = next(whole[i:i + 2] for i in range(3, len(whole) - 2) if whole.find(whole[i:i + 2]) == i)
    r = client.completions.create(stop=[stop, "never-seen"], **kwargs).choices[0]
    assert r.finish_reason == "stop" and r.text == whole[:whole.index(stop)]
    assert r.model_extra["stop_reason"] == stop
    streamed = "".join(c.choices[0].text for c in client.completions.create(stop=stop, stream=True, **kwargs))
    assert streamed == r.text


def test_echo_prepends_prompt(client):
    r = client.completions.create(model=MODEL_NAME, prompt="Echo me", max_tokens=3, temperature=0, echo=True)
    plain = client.completions.create(model=MODEL_NAME, prompt="Echo me", max_tokens=3, temperature=0)
    assert r.choices[0].text == "Echo me" + plain.choices[0].text


def test_echo_with_logprobs_scores_the_prompt(client, stack):
    prompt = "The quick brown fox"
    prompt_ids = stack.engine.tokenizer.encode(prompt)
    kwargs = dict(model=MODEL_NAME, prompt=prompt, max_tokens=4, temperature=0, logprobs=2, echo=True)
    r = client.completions.create(**kwargs).choices[0]
    lp = r.logprobs
    assert len(lp.tokens) == len(prompt_ids) + 4 and r.text.startswith(prompt)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset)
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks) == r.text
    assert [t for c in chunks for t in c.choices[0].logprobs.tokens] == lp.tokens
    assert [x for c in chunks for x in c.choices[0].logprobs.text_offset] == lp.text_offset


def test_prompt_logprobs_score_what_generation_sampled(client):
    """Scoring prompt + greedy continuation gives the continuation the logprobs it was sampled with."""
    first = client.completions.create(model=MODEL_NAME, prompt=[5, 60, 61, 62], max_tokens=6, temperature=0,
                                      logprobs=0, extra_body={"ignore_eos": True,
                                                              "return_tokens_as_token_ids": True}).choices[0]
    generated = first.logprobs.token_logprobs
    ids = [5, 60, 61, 62] + [int(t.removeprefix("token_id:")) for t in first.logprobs.tokens]
    scored = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=1, temperature=0,
                                       extra_body={"prompt_logprobs": 3}).choices[0].model_extra["prompt_logprobs"]
    assert scored[0] is None and len(scored) == len(ids)
    for position, expected in zip(range(4, len(ids)), generated):
        entry = scored[position][str(ids[position])]
        assert entry["logprob"] == pytest.approx(expected, abs=2e-3)
        assert entry["rank"] == 1  # greedy picked the most likely token
    chat = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=1,
                                          extra_body={"prompt_logprobs": 0})
    assert chat.model_extra["prompt_logprobs"][0] is None
    assert len(chat.model_extra["prompt_logprobs"]) == chat.usage.prompt_tokens


def test_max_tokens_omitted_fills_the_context(client, stack):
    r = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, temperature=0,
                                       extra_body={"ignore_eos": True, "min_tokens": 0})
    assert r.usage.total_tokens == stack.engine.max_model_len
    assert r.choices[0].finish_reason == "length"


def test_api_key_is_required_when_set(stack):
    from jaxinfer.server import ServerSettings, create_app
    from tests.server_fixtures import live_server

    app = create_app(stack.front, ServerSettings(served_model_names=(MODEL_NAME,), api_key="s3cret"))
    with live_server(app) as server:
        good = openai.OpenAI(base_url=server.base_url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=2).choices
        for key in ("wrong", "s3cret-and-more", "S3CRET", "s3cre"):
            bad = openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0)
            with pytest.raises(openai.AuthenticationError) as e:
                bad.models.list()
            assert e.value.body["code"] == "invalid_api_key"
        r = httpx.post(server.base_url + "/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        # Outside /v1, probes need no key.
        assert httpx.get(server.base_url + "/health").status_code == 200
