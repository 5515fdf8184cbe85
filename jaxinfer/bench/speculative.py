"""`jaxinfer bench speculative` and `jaxinfer bench verify-cost`: what speculation buys.

speculative   a real chat model (with its template) on two workloads, greedy, at each batch
              size: "rewrite" asks it to summarise, rewrite or repeat passages of
              bench/data/quality.txt (output that copies its input: where n-gram lookup
              pays), "chat" asks short open questions. Each batch runs on an engine without
              speculation and on one with --speculative-config; reported: output tok/s of
              both, the speedup, acceptance rate, mean accepted length, and how many outputs
              are identical (greedy: all should be, up to numerics).
verify-cost   the cost of a step that verifies k proposed tokens per request against a
              one-token step, at each batch size, on any shape (random weights with
              --preset): proposals are forced to k tokens that are never accepted, so every
              step costs what a k-token verification does. With --accepted K:L (the mean accepted length
              `speculative` measured with K proposals), the expected speedup over the
              engine without speculation (asynchronous scheduling) follows.
Both write JSON and a markdown table to --output-dir.
"""

from __future__ import annotations

import json
import time

from jaxinfer.bench.offline import _load, _plain, _save, run_header

CHAT_QUESTIONS = (
    "Why do leaves change colour in autumn?", "How does a bicycle stay upright when it moves?",
    "What is the difference between weather and climate?", "Explain how a refrigerator keeps food cold.",
    "Why is the sea salty?", "How do bees make honey?", "What makes a good night's sleep?",
    "Why do we have seasons?", "How does a compass work?", "What is a prime number? Give examples.",
    "How do plants drink water?", "Why does bread rise?", "What causes thunder?",
    "How do birds know where to migrate?", "Why is exercise good for the heart?", "How is glass made?",
)
REWRITE_TASKS = ("Summarize the following text in a few sentences.",
                 "Rewrite the following text in simpler words, keeping every fact.",
                 "Repeat the following text exactly, then give it a short title.")


def add_args(sub) -> None:
    from jaxinfer.cli import _add_engine_args

    s = sub.add_parser("speculative", help="speculative decoding on a real model: speed and acceptance")
    _add_engine_args(s)
    s.add_argument("--workload", default="rewrite,chat", help="comma list of rewrite, chat")
    s.add_argument("--batch-size", default="1,16", help="comma list")
    s.add_argument("--output-len", type=int, default=128)
    s.add_argument("--num-rounds", type=int, default=4,
                   help="batches run one after another per point, each of different prompts")
    s.add_argument("--num-iters", type=int, default=3,
                   help="timed repetitions per point, the engines alternating (medians are reported)")
    s.add_argument("--output-dir", default="benchmarks/results")
    s.add_argument("--tag", default="")
    s.set_defaults(func=cmd_speculative, max_num_seqs=None)

    v = sub.add_parser("verify-cost", help="cost of verifying k proposed tokens per request in a step")
    _add_engine_args(v)
    v.add_argument("--preset", default=None, help="random weights of a named shape (e.g. llama3-8b)")
    v.add_argument("--batch-size", default="1,16,64", help="comma list")
    v.add_argument("--num-tokens", default="0,1,2,4", help="proposals per request per step (comma list)")
    v.add_argument("--input-len", type=int, default=128)
    v.add_argument("--num-steps", type=int, default=64, help="timed steps per point")
    v.add_argument("--output-dir", default="benchmarks/results")
    v.add_argument("--tag", default="")
    v.set_defaults(func=cmd_verify_cost, max_num_seqs=None)
    v.add_argument("--accepted", action="append", default=[], dest="accepted",
                   help="K:L, mean accepted length L (tokens per step) measured with K proposals; repeatable")


# -- speculative ----------------------------------------------------------------------------------
def _workload_prompts(name: str, tokenizer, count: int) -> list[list[int]]:
    from importlib import resources

    if name == "rewrite":
        text = resources.files("jaxinfer.bench").joinpath("data/quality.txt").read_text()
        passages = [p.strip() for p in text.split("\n\n") if p.strip()]
        messages = [f"{task}\n\n{passage}" for passage in passages for task in REWRITE_TASKS]
    elif name == "chat":
        messages = list(CHAT_QUESTIONS)
    else:
        raise SystemExit(f"error: unknown workload {name!r} (rewrite, chat)")
    prompts = []
    for i in range(count):
        chat = [{"role": "user", "content": messages[i % len(messages)]}]
        text = tokenizer.apply_chat_template(chat, add_generation_prompt=True)
        prompts.append(tokenizer.encode(text, add_special_tokens=False))
    return prompts


def _timed(engine, prompts, output_len: int, tag: str) -> tuple[float, list[list[int]]]:
    from jaxinfer.sampling_params import RequestOutputKind, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, output_kind=RequestOutputKind.FINAL_ONLY)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", {"prompt_token_ids": p}, params)
    outs = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            outs[o.request_id] = o.outputs[0].token_ids
    return time.perf_counter() - t0, [outs[f"{tag}-{i}"] for i in range(len(prompts))]


def _spec_counters(engine) -> tuple[int, int, int]:
    m = engine.metrics
    return (m.spec_decode_num_drafts_total, m.spec_decode_num_draft_tokens_total,
            m.spec_decode_num_accepted_tokens_total)


def cmd_speculative(args) -> int:
    from jaxinfer.cli import engine_config_kwargs
    from jaxinfer.engine.config import EngineConfig
    from jaxinfer.engine.engine import LLMEngine
    from jaxinfer.loading.loader import load_model

    if args.speculative_config is None:
        raise SystemExit("error: give the speculation to measure with --speculative-config")
    batch_sizes = [int(b) for b in args.batch_size.split(",")]
    model = load_model(args.model, gguf_blocks=args.quantization == "gguf")
    kwargs = engine_config_kwargs(args)
    kwargs["max_num_seqs"] = args.max_num_seqs or max(batch_sizes)
    engines = {"off": LLMEngine(model, EngineConfig(**{**kwargs, "speculative_config": None})),
               "on": LLMEngine(model, EngineConfig(**kwargs))}
    rows = []
    for workload in args.workload.split(","):
        for b in batch_sizes:
            everything = _workload_prompts(workload, model.tokenizer, b * args.num_rounds)
            rounds = [everything[r * b:(r + 1) * b] for r in range(args.num_rounds)]
            row = {"workload": workload, "batch_size": b, "num_rounds": args.num_rounds,
                   "prompt_tokens_mean": sum(map(len, everything)) / len(everything)}
            outputs, seconds = {}, {name: [] for name in engines}
            for name, engine in engines.items():
                _timed(engine, rounds[0][:1], 8, f"warm-{name}")  # first-use costs off the clock
            before = _spec_counters(engines["on"])
            # The small model's host-bound runs vary by +-15% from one to the next: the engines
            # alternate (which goes first too), and each reports its median.
            for i in range(args.num_iters):
                for name in (("off", "on") if i % 2 == 0 else ("on", "off")):
                    total, outs = 0.0, []
                    for r, prompts in enumerate(rounds):
                        t, got = _timed(engines[name], prompts, args.output_len, f"{workload}-{b}-{r}-{name}-{i}")
                        total += t
                        outs += got
                    seconds[name].append(total)
                    outputs.setdefault(name, outs)
            for name in engines:
                tokens = sum(map(len, outputs[name]))
                median = sorted(seconds[name])[len(seconds[name]) // 2]
                row[name] = {"seconds": median, "runs_seconds": seconds[name], "output_tokens": tokens,
                             "output_tokens_per_s": tokens / median}
            drafts, drafted, accepted = (x - y for x, y in zip(_spec_counters(engines["on"]), before))
            row["on"].update(drafts=drafts, draft_tokens=drafted, accepted_tokens=accepted,
                             acceptance_rate=accepted / drafted if drafted else None,
                             mean_accepted_length=1 + accepted / drafts if drafts else None)
            row["speedup"] = row["on"]["output_tokens_per_s"] / row["off"]["output_tokens_per_s"]
            row["identical_outputs"] = sum(x == y for x, y in zip(outputs["on"], outputs["off"]))
            rows.append(row)
            print(json.dumps(row), flush=True)
    record = {"benchmark": "speculative", **run_header(args.argv), "args": _plain(vars(args)), "results": rows}
    table = [f"greedy, {args.output_len} output tokens at most, {args.num_rounds} batches of different prompts "
             f"per point, median of {args.num_iters} alternating runs per engine; speculation: `{json.dumps(args.speculative_config)}`",
             "", "| workload | batch | off tok/s | on tok/s | speedup | acceptance | mean accepted length | "
             "identical outputs |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        on = r["on"]
        rate = "-" if on["acceptance_rate"] is None else f"{on['acceptance_rate']:.2f}"
        length = "-" if on["mean_accepted_length"] is None else f"{on['mean_accepted_length']:.2f}"
        table.append(f"| {r['workload']} | {r['batch_size']} | {r['off']['output_tokens_per_s']:.1f} | "
                     f"{on['output_tokens_per_s']:.1f} | {r['speedup']:.2f}x | {rate} | {length} | "
                     f"{r['identical_outputs']}/{r['batch_size'] * r['num_rounds']} |")
    args.preset = None
    _save(record, args, "speculative", table)
    return 0


# -- verify-cost ------------------------------------------------------------------------------------
def _forced_proposals(engine, k: int):
    """Replaces the engine's proposer: k tokens for every decoding request, all of them wrong
    on purpose (token 0 repeated is never what the model picks here), so each step verifies k."""

    def propose():
        for req in engine.scheduler.running_requests:
            if not req.num_output_placeholders and req.num_computed_tokens == req.num_tokens - 1:
                req.spec_token_ids = [0] * k

    engine._propose = propose


def _step_time(engine, batch: int, input_len: int, num_steps: int, vocab: int, tag: str) -> float:
    """Seconds per decode step for `batch` requests (prefills done first, off the clock)."""
    import numpy as np

    from jaxinfer.sampling_params import SamplingParams

    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0.0, max_tokens=num_steps * 2 + 16, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"{tag}-{i}", {"prompt_token_ids": rng.integers(1, vocab, input_len).tolist()}, params)
    while engine.scheduler.num_waiting or any(r.num_output_tokens == 0 for r in engine.scheduler.running_requests):
        engine.step()
    for _ in range(4):
        engine.step()
    t0 = time.perf_counter()
    for _ in range(num_steps):
        engine.step()
    seconds = (time.perf_counter() - t0) / num_steps
    engine.abort_request([f"{tag}-{i}" for i in range(batch)])
    engine.step()
    return seconds


def cmd_verify_cost(args) -> int:
    import gc

    from jaxinfer.bench.offline import _cost
    from jaxinfer.cli import engine_config_kwargs
    from jaxinfer.devices import datasheet
    from jaxinfer.engine.config import EngineConfig
    from jaxinfer.engine.engine import LLMEngine

    batch_sizes = [int(b) for b in args.batch_size.split(",")]
    ks = [int(k) for k in args.num_tokens.split(",")]
    accepted = dict((int(k), float(v)) for k, v in (item.split(":") for item in args.accepted))
    model = _load(args)
    kwargs = engine_config_kwargs(args)
    kwargs.update(max_num_seqs=args.max_num_seqs or max(batch_sizes), speculative_config=None,
                  max_model_len=args.max_model_len or args.input_len + 2 * args.num_steps + 64)
    vocab = model.config.vocab_size
    baseline = {}
    engine = LLMEngine(model, EngineConfig(**kwargs))  # the engine users run without speculation
    for b in batch_sizes:
        baseline[b] = _step_time(engine, b, args.input_len, args.num_steps, vocab, f"base{b}")
    del engine
    gc.collect()
    # Proposals forced every step (the governor would stop them: they are never accepted).
    spec = {"method": "ngram", "num_speculative_tokens": max(max(ks), 1), "adaptive": False}
    engine = LLMEngine(model, EngineConfig(**{**kwargs, "speculative_config": spec}))
    cost = _cost(model)
    sheet = datasheet()
    floor_s = cost.decode_weight_bytes / sheet.memory_bytes_per_s if sheet else None
    rows = []
    for b in batch_sizes:
        for k in ks:
            _forced_proposals(engine, k)
            t = _step_time(engine, b, args.input_len, args.num_steps, vocab, f"b{b}k{k}")
            row = {"batch_size": b, "num_speculative_tokens": k, "step_ms": 1e3 * t,
                   "baseline_step_ms": 1e3 * baseline[b], "cost_vs_baseline": t / baseline[b],
                   "weight_floor_ms": 1e3 * floor_s if floor_s else None}
            if k in accepted:
                row["mean_accepted_length"] = accepted[k]
                row["expected_speedup"] = accepted[k] * baseline[b] / t
            rows.append(row)
            print(json.dumps(row), flush=True)
    record = {"benchmark": "verify_cost", **run_header(args.argv), "args": _plain(vars(args)), "results": rows,
              "weight_bytes_per_decode_step": cost.decode_weight_bytes}
    table = ["step time with k proposals per request verified (never accepted), against the engine without "
             "speculation (asynchronous scheduling) at the same batch; weight floor by the datasheet", "",
             "| batch | k | step (ms) | baseline step (ms) | cost vs baseline | weight floor (ms) | "
             "mean accepted length | expected speedup |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        floor = "-" if r["weight_floor_ms"] is None else f"{r['weight_floor_ms']:.2f}"
        table.append(f"| {r['batch_size']} | {r['num_speculative_tokens']} | {r['step_ms']:.2f} | "
                     f"{r['baseline_step_ms']:.2f} | {r['cost_vs_baseline']:.2f}x | {floor} | "
                     f"{r.get('mean_accepted_length', '-')} | "
                     + (f"{r['expected_speedup']:.2f}x |" if "expected_speedup" in r else "- |"))
    _save(record, args, "verify_cost", table)
    return 0
