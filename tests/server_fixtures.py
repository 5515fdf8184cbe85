"""A tiny checkpoint with a real tokenizer, an engine over it, and a live server on loopback.

The checkpoint is what `jaxinfer serve --model DIR` would load: a random Llama saved as an HF
directory (config.json + safetensors) with a byte-level BPE tokenizer trained here on a few
sentences, special tokens, and a ChatML chat template in tokenizer_config.json.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import json
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "Once upon a time there was a small model that served requests over HTTP.",
    "Streaming responses arrive as server-sent events, one chunk at a time.",
    "Numbers like 1234567890 and symbols like ?!,.;:-_ appear in text too.",
    "Unicode text: café, naïve, 東京, Привет, emoji 🙂.",
]
# Byte-level BPE needs its 256 base symbols; the merges on top bring the vocabulary to this size.
VOCAB_SIZE = 320
# Larger weights make next-token distributions peaked, so greedy outputs are decided by clear
# margins and a request gives the same tokens alone or batched with others.
WEIGHT_SCALE = 0.08


def train_tokenizer(directory: Path) -> int:
    """Writes tokenizer.json and tokenizer_config.json into `directory`; returns the vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
              "add_bos_token": False, "add_eos_token": False, "chat_template": CHATML_TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return tok.get_vocab_size()


def write_checkpoint(directory: str | Path, seed: int = 0) -> Path:
    """A random tiny Llama with a trained tokenizer, saved as an HF directory."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = train_tokenizer(directory)
    d, n, k, h, f, layers = 64, 4, 2, 16, 128, 2
    trained = Tokenizer.from_file(str(directory / "tokenizer.json"))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
              "hidden_size": d, "intermediate_size": f, "num_hidden_layers": layers,
              "num_attention_heads": n, "num_key_value_heads": k, "head_dim": h, "rms_norm_eps": 1e-5,
              "max_position_embeddings": 512, "rope_theta": 10000.0, "tie_word_embeddings": False,
              "bos_token_id": trained.token_to_id("<s>"),
              "eos_token_id": trained.token_to_id("<|endoftext|>")}
    (directory / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(seed)

    def weight(*shape):
        return (WEIGHT_SCALE * rng.standard_normal(shape)).astype(np.float32)

    # Tokens that decode to no printable text alone (stray UTF-8 bytes) get zero logits, so the
    # model writes readable text that streams token by token instead of bytes held back as
    # incomplete characters until the end.
    readable = [trained.decode([i], skip_special_tokens=False) for i in range(vocab)]
    lm_head = weight(vocab, d)
    for i, text in enumerate(readable):
        if not (text.isascii() and text.isprintable()) and trained.id_to_token(i) not in SPECIAL_TOKENS:
            lm_head[i] = 0.0
    tensors = {"model.embed_tokens.weight": weight(vocab, d), "model.norm.weight": np.ones(d, np.float32),
               "lm_head.weight": lm_head}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": np.ones(d, np.float32),
            p + "post_attention_layernorm.weight": np.ones(d, np.float32),
            p + "self_attn.q_proj.weight": weight(n * h, d),
            p + "self_attn.k_proj.weight": weight(k * h, d),
            p + "self_attn.v_proj.weight": weight(k * h, d),
            p + "self_attn.o_proj.weight": weight(d, n * h),
            p + "mlp.gate_proj.weight": weight(f, d),
            p + "mlp.up_proj.weight": weight(f, d),
            p + "mlp.down_proj.weight": weight(d, f),
        })
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


# Small buckets keep compilation short on the CPU.
TEST_ENGINE_CONFIG = dict(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64, page_size=8,
                          num_pages=160, enable_prefix_caching=True, compilation_cache_dir="")


def make_engine(checkpoint: Path, **overrides):
    """A warmed-up LLMEngine over the checkpoint."""
    from jaxinfer.engine.config import EngineConfig
    from jaxinfer.engine.engine import LLMEngine
    from jaxinfer.loading.loader import load_model

    model = load_model(str(checkpoint))
    return LLMEngine(model, EngineConfig(**{**TEST_ENGINE_CONFIG, **overrides}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """Runs an ASGI app under uvicorn on a free loopback port in a background thread."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        # uvicorn installs signal handlers only in the main thread; in a worker thread it skips them.
        self.thread = threading.Thread(target=self._run, name="uvicorn-test", daemon=True)

    def _run(self):
        asyncio.run(self.server.serve())

    def start(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self):
        self.server.should_exit = True
        self.thread.join(15)


@contextlib.contextmanager
def live_server(app):
    server = LiveServer(app).start()
    try:
        yield server
    finally:
        server.stop()


MODEL_NAME = "tiny-llama"


@dataclasses.dataclass
class ServerStack:
    """Everything a server test touches; `url` is the live server's base URL."""

    checkpoint: Path
    engine: object
    front: object
    app: object
    server: LiveServer

    @property
    def url(self) -> str:
        return self.server.base_url

    def on_engine(self, fn):
        """Runs `fn(engine)` on the engine thread (safe against a concurrent step) and returns its result."""
        return asyncio.run(self.front.call(fn))

    def wait_idle(self, timeout: float = 10.0) -> float:
        """Waits until the engine holds no request; returns its KV usage then."""
        deadline = time.monotonic() + timeout
        while True:
            busy, usage = self.on_engine(lambda e: (e.has_unfinished_requests(), e.block_manager.usage))
            if not busy or time.monotonic() > deadline:
                return usage if not busy else float("nan")
            time.sleep(0.02)


_shared: dict[str, ServerStack] = {}


def shared_stack() -> ServerStack:
    """A checkpoint, warmed-up engine, app and live server, built once per test process and shared
    by every server test module (compiling the engine's buckets is the slow part)."""
    if "stack" not in _shared:
        from jaxinfer.engine.async_engine import AsyncLLMEngine
        from jaxinfer.server import ServerSettings, create_app

        checkpoint = write_checkpoint(Path(tempfile.mkdtemp(prefix="jaxinfer-server-test-")) / MODEL_NAME)
        engine = make_engine(checkpoint)
        front = AsyncLLMEngine(engine)
        app = create_app(front, ServerSettings(served_model_names=(MODEL_NAME, "alias")))
        server = LiveServer(app).start()
        _shared["stack"] = ServerStack(checkpoint, engine, front, app, server)

        def close():
            server.stop()
            front.shutdown()
            shutil.rmtree(checkpoint.parent, ignore_errors=True)

        atexit.register(close)
    return _shared["stack"]


# Fixtures of the modules that test the shared live server through the openai client; a module
# takes them with `from tests.server_fixtures import stack, client, engine_left_idle`.
import pytest  # noqa: E402  (test-only module: pytest is there whenever these are used)


@pytest.fixture(scope="module")
def stack():
    return shared_stack()


@pytest.fixture(scope="module")
def client(stack):
    import openai

    with openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture
def engine_left_idle(stack):
    """Use with autouse in a module (see test_server_openai.py): no request may be left holding
    KV pages after a test."""
    yield
    assert stack.wait_idle() == 0.0, "a request was left holding KV pages"
