"""vLLM's `cache_salt` request field reaches the engine in the prompt (the engine keys its prefix
cache by it: tests/test_prefix_cache*.py); an empty salt is a 400."""

import pytest

from jaxinfer.tokenizer import Tokenizer
from tests.server_fake import ScriptedFront, post
from tests.server_fixtures import train_tokenizer

ROUTES = {"/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}]},
          "/v1/completions": {"prompt": "hi"}}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(directory)
    return Tokenizer.from_directory(directory)


@pytest.mark.parametrize("route", ROUTES)
def test_salt_reaches_the_engine_prompt(tokenizer, route):
    front = ScriptedFront(tokenizer, "ok")
    assert post(front, route, {**ROUTES[route], "max_tokens": 4, "cache_salt": "tenant-a"}).status_code == 200
    assert front.requests[-1][0]["cache_salt"] == "tenant-a"
    assert post(front, route, {**ROUTES[route], "max_tokens": 4}).status_code == 200
    assert "cache_salt" not in front.requests[-1][0]


@pytest.mark.parametrize("route", ROUTES)
def test_empty_salt_is_a_400(tokenizer, route):
    r = post(ScriptedFront(tokenizer, "ok"), route, {**ROUTES[route], "cache_salt": ""})
    assert r.status_code == 400 and "cache_salt" in r.text
