"""The `jaxinfer` command line: generate, chat, batch, convert, serve, bench (serve, latency, throughput,
startup, quality, structured)."""

from __future__ import annotations

import argparse
import json
import sys


def _parse_token_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-token-ids takes comma-separated integers, got {text!r}")
    if not ids or any(i < 0 for i in ids):
        raise argparse.ArgumentTypeError("--prompt-token-ids needs at least one non-negative id")
    return ids


def _add_engine_args(p: argparse.ArgumentParser):
    p.add_argument("--config", default=None,
                   help="YAML file of engine settings (flag names with _ for -); flags given here win")
    p.add_argument("--model", default=None,
                   help="HF directory, .gguf file, hub id, or alias (default: smollm2-135m-instruct)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="parameter dtype (auto: float32 on CPU, bfloat16 on accelerators)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--num-pages", type=int, default=None, help="KV pages (default: sized from memory)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                   help="reuse the KV pages of shared prompt prefixes (default: on)")
    p.add_argument("--kv-offloading-size", type=float, default=None,
                   help="GiB of host memory for KV pages evicted from the device's prefix cache (default: none)")
    p.add_argument("--attention-backend", choices=("auto", "xla", "pallas"), default="auto")
    p.add_argument("--linear-kernel", choices=("auto", "xla", "pallas"), default="auto",
                   help="projections: the Pallas skinny matmul for decode-sized steps (auto: on one GPU) or XLA")
    p.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=None,
                   help="layers in lax.scan over stacked weights (default: on accelerators) or unrolled")
    p.add_argument("--scan-unroll", type=int, default=1,
                   help="layers per iteration of the scanned layer loop (default 1)")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="plan step N+1 while step N runs (default: on accelerators)")
    p.add_argument("--compilation-cache-dir", default=None,
                   help="JAX's persistent compilation cache (default: under $JAXINFER_CACHE_DIR; '' disables)")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="devices to split the model over (heads, mlp width, vocabulary)")
    p.add_argument("--enable-expert-parallel", action="store_true", default=False,
                   help="mixture-of-experts models: split whole experts over the tensor-parallel devices")
    p.add_argument("--kv-cache-dtype", choices=("auto", "float32", "bfloat16", "fp8", "fp8_e4m3"), default="auto",
                   help="KV cache storage (fp8: e4m3, on the XLA attention path)")
    p.add_argument("--quantization", "-q", choices=("int8", "int4", "fp8", "w8a8_int8", "w8a8_fp8", "gguf", "awq", "gptq"), default=None,
                   help="quantization of the decoder projections at start: int8/int4/fp8 weight-only; "
                        "w8a8_int8/w8a8_fp8 8-bit weights and per-token 8-bit activations; gguf: run a GGUF "
                        "file's own quantized blocks")
    p.add_argument("--quantization-group-size", type=int, default=128, help="rows per int4 scale group")
    p.add_argument("--response-cache-size", type=int, default=0,
                   help="finished responses of deterministic requests (greedy, or seeded) kept to answer "
                        "exact repeats without running the model (0: off)")
    p.add_argument("--speculative-config", type=_json_object, default=None,
                   help='speculative decoding as JSON, e.g. \'{"method": "ngram", "num_speculative_tokens": 4, '
                        '"prompt_lookup_max": 4}\'')
    p.add_argument("--seed", type=int, default=0)


def _add_data_parallel_arg(p: argparse.ArgumentParser):
    """vLLM's --data-parallel-size, for the commands that drive many requests (generate, batch, serve)."""
    p.add_argument("--data-parallel-size", type=int, default=1,
                   help="engine replicas, each over its own --tensor-parallel-size devices; requests go to "
                        "the least busy one (docs/sharding.md)")
    p.add_argument("--disaggregate-prefill", action="store_true",
                   help="prefill-decode disaggregation: prompts computed on the first --tensor-parallel-size "
                        "devices, their KV pages moved to a decode engine on the next ones (docs/sharding.md)")


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e})")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int):
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--n", type=int, default=1)


def _sampling_params(args, seed=None):
    from jaxinfer.sampling_params import SamplingParams

    return SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          min_p=args.min_p, repetition_penalty=args.repetition_penalty, stop=args.stop,
                          max_tokens=args.max_tokens, seed=seed)


def engine_config_kwargs(args) -> dict:
    """EngineConfig fields from the engine flags (`_add_engine_args`); unset ones are left out."""
    kwargs = dict(max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=args.max_num_batched_tokens, page_size=args.page_size,
                  num_pages=args.num_pages, kv_cache_memory_fraction=args.gpu_memory_utilization,
                  enable_prefix_caching=args.enable_prefix_caching, kv_offloading_size=args.kv_offloading_size,
                  attention_backend=args.attention_backend,
                  linear_kernel=args.linear_kernel, scan_layers=args.scan_layers, scan_unroll=args.scan_unroll,
                  async_scheduling=args.async_scheduling, seed=args.seed,
                  tensor_parallel_size=args.tensor_parallel_size, enable_expert_parallel=args.enable_expert_parallel,
                  quantization=args.quantization, quantization_group_size=args.quantization_group_size,
                  kv_cache_dtype=args.kv_cache_dtype, speculative_config=args.speculative_config,
                  response_cache_size=args.response_cache_size,
                  compilation_cache_dir=args.compilation_cache_dir)
    # None means "the EngineConfig default" for the flags whose default is not None there.
    for name in ("max_num_seqs", "max_num_batched_tokens", "compilation_cache_dir", "enable_prefix_caching"):
        if kwargs[name] is None:
            del kwargs[name]
    if getattr(args, "data_parallel_size", None) is not None:  # `_add_data_parallel_arg`'s flags
        kwargs["data_parallel_size"] = args.data_parallel_size
        kwargs["disaggregate_prefill"] = args.disaggregate_prefill
    return kwargs


def _make_llm(args, warmup: bool):
    """The LLM the engine flags describe; settings the devices cannot serve (too few for dp x tp,
    ...) exit with their message, while a missing or unsupported model propagates for `main`
    to report with its own exit status."""
    from jaxinfer.llm import LLM

    try:
        return LLM(args.model, dtype=args.dtype, warmup=warmup, **engine_config_kwargs(args))
    except ValueError as e:
        from jaxinfer.config import UnsupportedModelError
        from jaxinfer.errors import CheckpointError

        if isinstance(e, (CheckpointError, UnsupportedModelError)):
            raise
        raise SystemExit(f"error: {e}")


def _read_prompts(path: str) -> list:
    """One prompt per line; a line that is a JSON object is taken as {"prompt": ...} or
    {"prompt_token_ids": [...]}."""
    prompts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                try:
                    prompts.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SystemExit(f"error: {path}:{n}: invalid JSON ({e})")
            else:
                prompts.append(line)
    if not prompts:
        raise SystemExit(f"error: {path} holds no prompts")
    return prompts


def _read_config(path: str, parser: argparse.ArgumentParser) -> dict:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise SystemExit(f"error: cannot read config {path}: {e}")
    if not isinstance(values, dict):
        raise SystemExit(f"error: {path} must hold a mapping of setting: value")
    known = {a.dest for a in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SystemExit(f"error: {path}: unknown settings {unknown}")
    return values


def cmd_generate(args) -> int:
    if args.prompt_token_ids is not None:
        prompts = [{"prompt_token_ids": args.prompt_token_ids}]
    elif args.prompts_file is not None:
        prompts = _read_prompts(args.prompts_file)
    else:
        prompts = [args.prompt]
    try:
        params = _sampling_params(args, seed=args.seed if args.temperature > 0 else None)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    llm = _make_llm(args, warmup=args.warmup)
    tok = llm.get_tokenizer()
    if args.chat:
        if tok is None or not tok.chat_template:
            raise SystemExit("error: --chat needs a model with a chat template")
        wrapped = []
        for p in prompts:
            if not isinstance(p, str):
                raise SystemExit("error: --chat takes text prompts")
            text = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
            wrapped.append({"prompt": text, "prompt_token_ids": tok.encode(text, add_special_tokens=False)})
        prompts = wrapped
    try:
        outputs = llm.generate(prompts, params, use_tqdm=len(prompts) > 1 and not args.json)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    import jax

    if jax.process_index() != 0:
        return 0  # every process of a multi-process run computed the same outputs: one prints them
    for out in outputs:
        for c in out.outputs:
            if args.json:
                print(json.dumps({"prompt": out.prompt, "prompt_token_ids": out.prompt_token_ids, "index": c.index,
                                  "token_ids": c.token_ids, "text": c.text, "finish_reason": c.finish_reason}))
            else:
                print(c.text if tok is not None else " ".join(map(str, c.token_ids)))
    return 0


def cmd_convert(args) -> int:
    """Writes a model as an Orbax checkpoint that `--model DIR` restores straight into its shards."""
    import jax.numpy as jnp

    from jaxinfer.loading.loader import load_model
    from jaxinfer.loading.orbax_checkpoint import save_orbax

    model = load_model(args.model, dtype=None if args.dtype == "auto" else getattr(jnp, args.dtype))
    out = save_orbax(model, args.output)
    print(f"wrote {out}")
    return 0


def cmd_chat(args) -> int:
    """Interactive chat: reads user turns from stdin, streams the reply."""
    from jaxinfer.sampling_params import RequestOutputKind

    llm = _make_llm(args, warmup=False)
    tok = llm.get_tokenizer()
    if tok is None or not tok.chat_template:
        raise SystemExit("error: chat needs a model with a chat template")
    messages = [{"role": "system", "content": args.system}] if args.system else []
    engine = llm.engine
    turn = 0
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        text = tok.apply_chat_template(messages, add_generation_prompt=True)
        params = _sampling_params(args, seed=args.seed + turn if args.temperature > 0 else None).clone(
            n=1, output_kind=RequestOutputKind.DELTA)
        rid = f"chat-{turn}"
        try:
            engine.add_request(rid, {"prompt": text, "prompt_token_ids": tok.encode(text, add_special_tokens=False)},
                               params)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            messages.pop()
            continue
        reply = []
        while engine.has_unfinished_requests():
            for out in engine.step():
                delta = out.outputs[0].text
                reply.append(delta)
                print(delta, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})
        turn += 1


def cmd_batch(args) -> int:
    """An OpenAI batch file through the engine (jaxinfer/batch_job.py)."""
    from jaxinfer.batch_job import run_batch_job

    return run_batch_job(args, lambda: _make_llm(args, warmup=args.warmup).engine)


def cmd_serve(args) -> int:
    """The OpenAI-compatible server (server/ is imported only here, so the engine never needs FastAPI)."""
    from jaxinfer.server.cli import serve

    import functools

    # The engine's arguments alone (no parser callables), so they pickle into an engine process.
    engine_args = argparse.Namespace(**{k: v for k, v in vars(args).items()
                                        if not callable(v) and not isinstance(v, argparse.ArgumentParser)})
    return serve(args, functools.partial(engine_for_serving, engine_args))


def engine_for_serving(args):
    """The warmed-up engine `serve` runs (module-level: with --engine-process it is built in
    the engine's own process from the pickled arguments)."""
    return _make_llm(args, warmup=True).engine


def cmd_bench_serve(args) -> int:
    from jaxinfer.server.cli import bench_serve

    return bench_serve(args)


def _add_server_commands(sub) -> None:
    from jaxinfer.server.cli import add_bench_serve_args, add_serve_args

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, ...)")
    _add_engine_args(s)
    _add_data_parallel_arg(s)
    add_serve_args(s)
    s.set_defaults(func=cmd_serve)

    b = sub.add_parser("bench", help="benchmarks")
    bench_sub = b.add_subparsers(dest="bench_command", required=True)
    bs = bench_sub.add_parser("serve", help="client-side benchmark of an OpenAI-compatible server")
    add_bench_serve_args(bs)
    bs.set_defaults(func=cmd_bench_serve)
    from jaxinfer.bench.offline import add_args as add_offline_bench_args

    add_offline_bench_args(bench_sub)
    from jaxinfer.bench.quality import add_args as add_quality_bench_args

    add_quality_bench_args(bench_sub)
    from jaxinfer.bench.prefix import add_args as add_prefix_bench_args

    add_prefix_bench_args(bench_sub)
    from jaxinfer.bench.structured import add_args as add_structured_bench_args

    add_structured_bench_args(bench_sub)
    from jaxinfer.bench.speculative import add_args as add_speculative_bench_args

    add_speculative_bench_args(bench_sub)


def _add_train_eagle_command(sub) -> None:
    t = sub.add_parser("train-eagle", help="train an EAGLE draft head for a model on text it generates")
    t.add_argument("--model", required=True)
    t.add_argument("--output", required=True, help="directory for the head (config.json, model.safetensors)")
    t.add_argument("--repeats", type=int, default=8, help="answers per training message (sampled ones differ)")
    t.add_argument("--max-tokens", type=int, default=256, help="answer length")
    t.add_argument("--temperature", type=float, default=0.7)
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--seq-len", type=int, default=512)
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--noise", type=float, default=0.1)
    t.add_argument("--cls-weight", type=float, default=0.1,
                   help="weight of the LM-head cross-entropy (0: the feature regression alone)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--max-num-seqs", type=int, default=128, help="generation batch")
    t.add_argument("--max-messages", type=int, default=0, help="use only the first N training messages (0: all)")
    t.set_defaults(func=cmd_train_eagle)


def cmd_train_eagle(args) -> int:
    from jaxinfer.eagle_training import cmd_train_eagle as run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxinfer", description="LLM inference on JAX")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate completions for one prompt or a file of prompts")
    _add_engine_args(g)
    _add_sampling_args(g, max_tokens=64)
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="Write a haiku about the sea.")
    src.add_argument("--prompt-token-ids", type=_parse_token_ids, default=None,
                     help="comma-separated token ids fed to the model as they are")
    src.add_argument("--prompts-file", default=None, help="one prompt per line (text or a JSON object)")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object per completion")
    g.add_argument("--warmup", action="store_true", help="compile every shape bucket before generating")
    _add_data_parallel_arg(g)
    from jaxinfer.distributed import add_args as add_distributed_args

    add_distributed_args(g)
    g.set_defaults(func=cmd_generate)

    cv = sub.add_parser("convert", help="write a model as an Orbax checkpoint, restored into its shards at load")
    cv.add_argument("--model", default=None, help="HF directory, .gguf file, hub id, or alias (as generate's)")
    cv.add_argument("--output", required=True, help="a new directory for the checkpoint")
    cv.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                    help="dtype to store (auto: float32 on CPU, bfloat16 on accelerators)")
    cv.set_defaults(func=cmd_convert)

    c = sub.add_parser("chat", help="interactive chat with streaming replies")
    _add_engine_args(c)
    _add_sampling_args(c, max_tokens=256)
    c.add_argument("--system", default=None, help="system prompt")
    c.set_defaults(func=cmd_chat)

    from jaxinfer.batch_job import add_batch_args

    bj = sub.add_parser("batch", help="run an OpenAI batch file (JSONL of completions and chat requests), resumably")
    _add_engine_args(bj)
    _add_data_parallel_arg(bj)
    add_batch_args(bj)
    bj.set_defaults(func=cmd_batch)

    _add_train_eagle_command(sub)
    _add_server_commands(sub)
    for sub_parser in sub.choices.values():
        sub_parser.set_defaults(subparser=sub_parser)  # --config reads its settings against it
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        # Settings from the file become defaults, so flags on the command line still override them.
        args.subparser.set_defaults(**_read_config(args.config, args.subparser))
        args = parser.parse_args(argv)
    args.argv = argv  # what the benchmarks record as their command
    from jaxinfer.config import UnsupportedModelError
    from jaxinfer.errors import CheckpointError, ModelNotFoundError

    if hasattr(args, "coordinator_address"):
        from jaxinfer.distributed import initialize

        try:
            initialize(args.coordinator_address, args.num_processes, args.process_id)
        except ValueError as e:
            raise SystemExit(f"error: {e}")
    try:
        return args.func(args)
    except (CheckpointError, ModelNotFoundError, UnsupportedModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
