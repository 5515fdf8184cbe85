"""`jaxinfer serve` and `jaxinfer bench serve`: argument definitions and what they run.

jaxinfer/cli.py registers these subcommands and imports this module only when one of them runs,
so the engine's command line never pulls in FastAPI.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os

from jaxinfer.server.tool_parsers import PARSERS  # plain Python: defining the flags does not load FastAPI

API_KEY_ENV = "JAXINFER_API_KEY"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """The server's own flags (the engine's flags are added by jaxinfer/cli.py)."""
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV} if set)")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="names clients use for the model; the first is reported (default: --model)")
    p.add_argument("--max-waiting-requests", type=int, default=1024,
                   help="requests held at once; more get 503 with Retry-After")
    p.add_argument("--max-request-body-bytes", type=int, default=None,
                   help="larger request bodies get a 413 (default: 8 MiB)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds SIGTERM waits for in-flight requests before cancelling them")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="let requests with tool_choice 'auto' (the default with tools) get parsed tool calls; "
                        "needs --tool-call-parser")
    p.add_argument("--tool-call-parser", default=None, choices=sorted(PARSERS),
                   help="the format the model writes tool calls in: hermes (Qwen2.5/Qwen3, Hermes), "
                        "llama3_json (Llama 3.x), mistral")
    p.add_argument("--engine-process", action="store_true",
                   help="run the engine in its own process, off the HTTP server's interpreter")


def serve(args: argparse.Namespace, make_engine) -> int:
    """Runs the server until SIGINT/SIGTERM, then drains in-flight requests and stops the engine.

    Args:
      args: parsed `serve` arguments.
      make_engine: builds the LLMEngine from the same arguments (jaxinfer/cli.py owns the engine flags).
    """
    import uvicorn

    from jaxinfer.engine.async_engine import AsyncLLMEngine
    from jaxinfer.loading.resolve import DEFAULT_MODEL
    from jaxinfer.server.app import DEFAULT_MAX_BODY_BYTES, ServerSettings, create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("jaxinfer.serve")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    names = tuple(args.served_model_name or [args.model or DEFAULT_MODEL])
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise SystemExit("error: --enable-auto-tool-choice needs --tool-call-parser")
    settings = ServerSettings(served_model_names=names, api_key=api_key, max_body_bytes=args.max_request_body_bytes or DEFAULT_MAX_BODY_BYTES,
                              shutdown_engine=True, enable_auto_tool_choice=args.enable_auto_tool_choice,
                              tool_call_parser=args.tool_call_parser)
    if args.host not in LOOPBACK_HOSTS and api_key is None:
        log.warning("serving on %s without an API key: anyone who can reach this address can use the model",
                    args.host)
    if args.engine_process:
        from jaxinfer.engine.core_process import AsyncEngineCore
        from jaxinfer.loading.loader import load_tokenizer

        # The engine steps in its own process; this one keeps HTTP, templates and streaming.
        front = AsyncEngineCore(make_engine, tokenizer=load_tokenizer(args.model),
                                max_waiting_requests=args.max_waiting_requests)
    else:
        front = AsyncLLMEngine(make_engine(), max_waiting_requests=args.max_waiting_requests)
    app = create_app(front, settings)
    log.info("serving %s (max_model_len %d) on http://%s:%d", ", ".join(names), front.engine.max_model_len,
             args.host, args.port)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout)
    try:
        uvicorn.Server(config).run()
    finally:
        front.shutdown()  # a no-op when the app's shutdown already stopped it
    return 0


def add_bench_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (with or without /v1)")
    p.add_argument("--model", required=True, help="model name to send")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests per second ('inf' sends all at once)")
    p.add_argument("--arrivals", choices=("poisson", "fixed"), default="poisson",
                   help="Poisson arrivals (exponential gaps) or a fixed gap of 1/rate")
    p.add_argument("--input-len", type=int, default=128, help="prompt length in words (about one token each)")
    p.add_argument("--output-len", type=int, default=128, help="max_tokens per request")
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="draw lengths uniformly from [len*(1-r), len*(1+r)]")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--goodput", nargs="+", default=None, metavar="METRIC:MS",
                   help="latency targets, e.g. ttft:500 itl:100 (metrics: ttft, itl, tpot, e2el)")
    p.add_argument("--ignore-eos", action="store_true", help="ask the server to generate past EOS")
    p.add_argument("--api-key", default=None, help=f"bearer key (default: ${API_KEY_ENV} if set)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--result-file", default=None, help="write the results as JSON here")
    p.add_argument("--client-processes", type=int, default=1,
                   help="processes sending the requests, each with an equal share of them and of "
                        "--max-concurrency (one process reads 40k+ streamed chunks a second)")


def _client_header() -> dict:
    """Where and when the client ran, and its command line. The server's device is not known to
    the client (and JAX is not imported here: on a GPU host it would take the device)."""
    import datetime
    import platform
    import sys

    from jaxinfer import __version__

    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["jaxinfer"] + sys.argv[1:]), "client_host": platform.node(),
            "python": platform.python_version(), "jaxinfer": __version__}


def bench_serve(args: argparse.Namespace) -> int:
    from jaxinfer.server.bench import BenchConfig, format_summary, parse_goodput, run_benchmark, run_event_loop

    try:
        cfg = BenchConfig(base_url=args.base_url, model=args.model, endpoint=args.endpoint,
                          num_prompts=args.num_prompts, request_rate=args.request_rate, arrivals=args.arrivals,
                          input_len=args.input_len, output_len=args.output_len,
                          random_range_ratio=args.random_range_ratio, max_concurrency=args.max_concurrency,
                          goodput=parse_goodput(args.goodput), ignore_eos=args.ignore_eos,
                          api_key=args.api_key or os.environ.get(API_KEY_ENV), seed=args.seed, timeout=args.timeout,
                          client_processes=args.client_processes)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    summary = run_event_loop(run_benchmark(cfg))
    print(format_summary(summary))
    if args.result_file:
        with open(args.result_file, "w", encoding="utf-8") as f:
            json.dump({**_client_header(), **summary}, f, indent=2)
    return 0 if summary["completed"] else 1
