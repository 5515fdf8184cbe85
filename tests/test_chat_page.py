"""The chat page at `/`, driven in headless Chromium against live servers on loopback.

The page's streamed replies are checked against the same requests sent through the official
`openai` client unstreamed at temperature 0, its error box against the server's own error body,
and its stop button against a scripted engine that reports when its stream is closed.
"""

import asyncio
import tempfile
import threading
import time
from types import SimpleNamespace

import openai
import pytest
from playwright.sync_api import expect, sync_playwright

from jaxinfer.engine.metrics import EngineMetrics
from jaxinfer.outputs import CompletionOutput, RequestOutput
from jaxinfer.tokenizer import Tokenizer
from jaxinfer.server import ServerSettings, create_app
from tests.server_fixtures import MODEL_NAME, live_server, train_tokenizer
from tests.server_fixtures import client, stack  # noqa: F401 (fixtures)

CHROMIUM = "/usr/bin/chromium"
# Headless, no sandbox (CI runs as root), and no calls home: with those on, Chromium keeps
# trying hosts this machine cannot reach.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 20_000

# Records every text the assistant bubbles show, in order. The page replaces a bubble's text node
# on each delta, so each added text node is one state the reader saw.
WATCH_RENDERS = """() => {
  window.renders = [];
  new MutationObserver((records) => {
    for (const r of records)
      for (const n of r.addedNodes)
        if (n.nodeType === Node.TEXT_NODE && n.parentElement.closest('.msg.assistant')) window.renders.push(n.data);
  }).observe(document.getElementById('messages'), {childList: true, subtree: true});
}"""




@pytest.fixture(scope="module")
def browser_context():
    # The system Chromium, never a downloaded one; a fresh profile so no state leaks between runs.
    with tempfile.TemporaryDirectory(prefix="jaxinfer-chromium-") as profile, sync_playwright() as p:
        context = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True,
                                                       args=CHROMIUM_FLAGS)
        context.set_default_timeout(TIMEOUT_MS)
        yield context
        context.close()


@pytest.fixture
def page(browser_context):
    page = browser_context.new_page()
    console_errors = []
    page.on("pageerror", lambda e: console_errors.append(str(e)))
    yield page
    page.close()
    assert not console_errors, f"the page raised: {console_errors}"


def wait_idle(stack) -> float:
    # The stack's helper runs its own event loop; Playwright's sync API owns this thread's loop.
    result = []
    t = threading.Thread(target=lambda: result.append(stack.wait_idle()))
    t.start()
    t.join()
    return result[0]


def open_chat(page, url, *, system="", temperature="0", max_tokens="24", top_p="1"):
    page.goto(url + "/")
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    page.fill("#system", system)
    page.fill("#temperature", temperature)
    page.fill("#max_tokens", max_tokens)
    page.fill("#top_p", top_p)


def say(page, text):
    page.fill("#input", text)
    page.press("#input", "Enter")


def test_page_is_self_contained(stack, page):
    requested = []
    page.on("request", lambda r: requested.append(r.url))
    open_chat(page, stack.url)
    # Works offline: every request the page makes goes back to the server that served it.
    assert requested and all(u.startswith(stack.url + "/") for u in requested), requested
    assert page.locator("#model option").all_inner_texts() == [MODEL_NAME, "alias"]
    assert "256" in page.inner_text("#model_info")  # the test engine's max_model_len


def test_streamed_replies_equal_unstreamed_client_answers(stack, client, page):
    open_chat(page, stack.url, system="You are terse.")
    page.select_option("#model", MODEL_NAME)
    page.evaluate(WATCH_RENDERS)
    conversation = [{"role": "system", "content": "You are terse."}]
    for turn, question in enumerate(["Name a capital city.", "And another one?"]):
        say(page, question)
        reply = page.locator(".msg.assistant").nth(turn)
        expect(reply).to_have_attribute("data-state", "done")
        shown = reply.locator(".text").inner_text()
        # The same conversation so far, answered by an independent path: unstreamed, temperature 0.
        conversation.append({"role": "user", "content": question})
        whole = client.chat.completions.create(model=MODEL_NAME, messages=conversation, max_tokens=24,
                                               temperature=0, top_p=1).choices[0]
        assert whole.message.content, "the reference answer is empty, so the comparison would prove nothing"
        assert shown == whole.message.content
        assert reply.get_attribute("data-finish-reason") == whole.finish_reason
        conversation.append({"role": "assistant", "content": whole.message.content})
    renders = page.evaluate("window.renders")
    # The reply grew on screen through several partial states, each a prefix of the final text.
    first = [r for r in renders if conversation[2]["content"].startswith(r)]
    assert len(set(first)) > 2, renders
    assert page.locator(".msg.user").all_inner_texts() == [
        "user\nName a capital city.", "user\nAnd another one?"]
    assert wait_idle(stack) == 0.0


def test_server_error_is_shown(stack, client, page):
    open_chat(page, stack.url, top_p="5")
    say(page, "Hello")
    expect(page.locator("#error")).to_be_visible()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hello"}],
                                       max_tokens=24, temperature=0, top_p=5)
    assert page.inner_text("#error") == e.value.response.json()["error"]["message"]
    # The failed turn is not kept: the text goes back into the box for a retry.
    assert page.locator(".msg").count() == 0
    assert page.input_value("#input") == "Hello"
    expect(page.locator("#send")).to_be_enabled()


class EndlessFront:
    """A scripted engine whose streamed answers never end by themselves: one token every 20 ms
    until the request is closed, which it records (the server closes it when the client leaves)."""

    def __init__(self, tokenizer):
        self.engine = SimpleNamespace(
            tokenizer=tokenizer, max_model_len=256, model_config=SimpleNamespace(vocab_size=tokenizer.vocab_size),
            metrics=EngineMetrics(), model=SimpleNamespace(path="endless"),
            scheduler=SimpleNamespace(num_running=0, num_waiting=0), block_manager=SimpleNamespace(usage=0.0))
        self.token = tokenizer.encode("fox", add_special_tokens=False)[0]
        self.text = tokenizer.decode([self.token])
        self.closed = threading.Event()

    async def call(self, fn):
        return fn(self.engine)

    async def generate(self, prompt, params, request_id, *, priority=0):
        try:
            for _ in range(500):
                await asyncio.sleep(0.02)
                yield RequestOutput(request_id, prompt.get("prompt"), prompt["prompt_token_ids"],
                                    [CompletionOutput(index=0, text=self.text, token_ids=[self.token])],
                                    finished=False)
        finally:
            self.closed.set()


def test_stop_button_aborts_the_stream(page, tmp_path):
    train_tokenizer(tmp_path)
    front = EndlessFront(Tokenizer.from_directory(tmp_path))
    with live_server(create_app(front, ServerSettings(served_model_names=("endless",)))) as server:
        open_chat(page, server.base_url, max_tokens="")
        say(page, "Go on forever")
        reply = page.locator(".msg.assistant")
        page.wait_for_function("Number(document.querySelector('.msg.assistant').dataset.chunks) >= 3")
        page.click("#stop")
        expect(reply).to_have_attribute("data-state", "stopped")
        # Aborting the fetch closes the connection, and the server closes the engine's stream.
        assert front.closed.wait(10)
        expect(page.locator("#stop")).to_be_hidden()
        expect(page.locator("#send")).to_be_enabled()
        # The partial reply stays in the conversation.
        kept = reply.locator(".text").inner_text()
        assert len(kept) >= 3 * len(front.text) and kept == front.text * (len(kept) // len(front.text))
        assert not page.locator("#error").is_visible()


def test_api_key_entered_on_the_page(page, tmp_path):
    train_tokenizer(tmp_path)
    front = EndlessFront(Tokenizer.from_directory(tmp_path))
    app = create_app(front, ServerSettings(served_model_names=("endless",), api_key="sk-page"))
    with live_server(app) as server:
        page.goto(server.base_url + "/")
        # Without the key the model list is refused, and the page says why in the server's words.
        expect(page.locator("#error")).to_contain_text("Incorrect or missing API key")
        page.fill("#api_key", "sk-page")
        page.dispatch_event("#api_key", "change")
        expect(page.locator("body")).to_have_attribute("data-ready", "true")
        assert page.locator("#model option").all_inner_texts() == ["endless"]
        expect(page.locator("#error")).to_be_hidden()
