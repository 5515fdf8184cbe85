"""vLLM's /tokenize and /detokenize, and scoring a prompt with echo and max_tokens 0, on the live
server, against the tokenizer and the engine's own prompt logprobs."""

import math

import httpx
import openai
import pytest

from tests.server_fixtures import MODEL_NAME, shared_stack

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a capital city."}]


@pytest.fixture(scope="module")
def stack():
    return shared_stack()


@pytest.fixture(scope="module")
def http(stack):
    with httpx.Client(base_url=stack.url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def client(stack):
    with openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def test_tokenize_prompt_and_messages(http, stack):
    tok = stack.engine.tokenizer
    r = http.post("/tokenize", json={"model": MODEL_NAME, "prompt": "Paris is the capital of France."}).json()
    assert r["tokens"] == tok.encode("Paris is the capital of France.")
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == 256 and r["token_strs"] is None
    r = http.post("/tokenize", json={"messages": CHAT, "return_token_strs": True}).json()
    rendered = tok.apply_chat_template(CHAT, add_generation_prompt=True)
    assert r["tokens"] == tok.encode(rendered, add_special_tokens=False)
    assert r["token_strs"] == tok.convert_ids_to_tokens(r["tokens"])
    assert http.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": rendered}


@pytest.mark.parametrize("body,param", [({"prompt": "a", "messages": CHAT}, "prompt"), ({}, "prompt"),
                                         ({"prompt": "a", "model": "gpt-4"}, "model")])
def test_tokenize_bad_input(http, body, param):
    r = http.post("/tokenize", json=body)
    assert r.status_code in (400, 404) and r.json()["error"]["param"] == param


def test_detokenize_checks_the_vocabulary(http, stack):
    r = http.post("/detokenize", json={"tokens": [1, stack.engine.model_config.vocab_size]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"


def test_echo_with_max_tokens_zero_scores_the_prompt(client, stack):
    prompt = "The quick brown fox jumps over the lazy dog."
    ids = stack.engine.tokenizer.encode(prompt)
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    [choice] = r.choices
    assert choice.text == prompt and r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None
    # The same numbers as the engine's prompt_logprobs, asked for the vLLM way.
    reference = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=1,
                                          extra_body={"prompt_logprobs": 1}).choices[0].model_extra["prompt_logprobs"]
    expected = [None] + [entry[str(t)]["logprob"] for t, entry in zip(ids[1:], reference[1:])]
    assert lp.token_logprobs[0] is None
    assert all(math.isclose(a, b, abs_tol=1e-5) for a, b in zip(lp.token_logprobs[1:], expected[1:]))
    # Streamed: one chunk with the prompt, nothing generated.
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=0, echo=True, stream=True,
                                            stream_options={"include_usage": True}))
    assert [c.choices[0].text for c in chunks if c.choices] == [prompt]
    assert chunks[-1].usage.completion_tokens == 0
    assert stack.wait_idle() == 0.0
