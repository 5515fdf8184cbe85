"""The server's own cost per streamed token: the real app and engine front (`create_app`,
`AsyncLLMEngine`) over a stand-in engine whose step only sleeps and emits one token for every
running request, so the engine costs (almost) nothing and what the server process spends is
the front end's: HTTP, output routing, chunk building, SSE.

  PYTHONPATH=. python benchmarks/serve_overhead.py --tokenizer DIR --port 8040 --step-ms 15

serves until interrupted (SIGINT), then prints one JSON line: the server process's CPU seconds,
the streamed tokens, and CPU microseconds per token. Drive it with `jaxinfer bench serve`
(`--client-processes` so the client is not the bound).
"""

from __future__ import annotations

import argparse
import json
import signal
import time
from types import SimpleNamespace

from jaxinfer.engine.metrics import EngineMetrics
from jaxinfer.outputs import CompletionOutput, RequestOutput
from jaxinfer.sampling_params import RequestOutputKind


class StepEngine:
    """LLMEngine's request surface; each step sleeps `step_s` (the device's step) and gives every
    running request one more token, as a real engine's step does."""

    def __init__(self, tokenizer, step_s: float):
        self.tokenizer, self.step_s = tokenizer, step_s
        self.max_model_len = 4096
        self.model_config = SimpleNamespace(vocab_size=tokenizer.vocab_size)
        self.metrics, self.model = EngineMetrics(), SimpleNamespace(path="stand-in")
        self.scheduler = SimpleNamespace(num_running=0, num_waiting=0)
        self.block_manager = SimpleNamespace(usage=0.0)
        # Tokens that decode to printable text on their own, cycled through as the "output".
        self.pieces = [(i, tokenizer.decode([i])) for i in range(tokenizer.vocab_size)]
        self.pieces = [(i, t) for i, t in self.pieces if t.isascii() and t.isprintable() and t.strip()][:64]
        self.running: dict[str, list] = {}
        self.tokens = 0

    def add_request(self, request_id, prompt, params, priority: int = 0, **_):
        if params.output_kind != RequestOutputKind.DELTA:
            raise ValueError("the stand-in engine streams deltas only")
        ids = prompt.get("prompt_token_ids") or self.tokenizer.encode(prompt["prompt"])
        self.running[request_id] = [params, ids, 0]

    def abort_request(self, request_ids):
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            self.running.pop(rid, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.running)

    def step(self) -> list[RequestOutput]:
        time.sleep(self.step_s)
        outputs = []
        for rid, entry in list(self.running.items()):
            params, ids, done = entry
            token, text = self.pieces[done % len(self.pieces)]
            entry[2] = done = done + 1
            finished = done >= params.max_tokens
            outputs.append(RequestOutput(rid, None, ids, [CompletionOutput(
                index=0, text=text, token_ids=[token], finish_reason="length" if finished else None)],
                finished=finished))
            if finished:
                del self.running[rid]
        self.tokens += len(outputs)
        return outputs


def main() -> int:
    import uvicorn

    from jaxinfer.engine.async_engine import AsyncLLMEngine
    from jaxinfer.server import ServerSettings, create_app
    from jaxinfer.tokenizer import Tokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", required=True, help="a directory with tokenizer.json")
    parser.add_argument("--port", type=int, default=8040)
    parser.add_argument("--step-ms", type=float, default=15.0)
    args = parser.parse_args()
    engine = StepEngine(Tokenizer.from_directory(args.tokenizer), args.step_ms / 1e3)
    front = AsyncLLMEngine(engine)
    app = create_app(front, ServerSettings(served_model_names=("stand-in",)))
    server = uvicorn.Server(uvicorn.Config(app, port=args.port, log_level="warning"))
    start = time.process_time()
    signal.signal(signal.SIGINT, lambda *_: setattr(server, "should_exit", True))
    server.run()
    front.shutdown()
    cpu = time.process_time() - start
    print(json.dumps({"server_cpu_s": cpu, "tokens": engine.tokens,
                      "cpu_us_per_token": 1e6 * cpu / max(1, engine.tokens)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
