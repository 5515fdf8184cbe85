"""`jaxinfer bench structured`: the cost of grammar-constrained decoding (structured outputs).

One batch of --batch-size requests, each under its own JSON schema (distinct property names,
so every request compiles a grammar), generates greedily until its grammar completes; then the
same prompts run unconstrained, each for exactly as many tokens as its structured run made
(eos ignored), so both runs produce the same number of tokens. Reported: output tokens/s of
both, the host's mean mask time per structured step, grammar compile time per request, and
the grammar tokenizer's one-time build.

The schemas are bounded (enums, bounded integers, strings of at most --max-string-len
characters, arrays of at most 3 items, no additional properties, no free whitespace), so even
a random-weight model (--preset) writes valid JSON of bounded length: the mask forces it.
Outputs cut by --max-tokens are counted as truncated (raise --max-tokens if any are); the
others are decoded and parsed after the run.

A random-weight preset has no tokenizer: --tokenizer gives one (a tokenizer.json, an HF
directory, a .gguf, or a demo alias; default the demo model's). Its ids must fit the model's
vocabulary; ids past the tokenizer's are never allowed.
"""

from __future__ import annotations

import concurrent.futures
import json
import sys
import time

import numpy as np

from jaxinfer.bench.offline import _load, _plain, _prompts, _save, run_header


def add_args(sub) -> None:
    """Registers `structured` under `jaxinfer bench`."""
    from jaxinfer.cli import _add_engine_args

    p = sub.add_parser("structured", help="output tok/s under JSON-schema constraints vs unconstrained")
    _add_engine_args(p)
    p.add_argument("--preset", default=None, help="random weights of a named shape (e.g. llama3-8b)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json, HF directory, .gguf or demo alias (default: the model's own, else the demo's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=256, help="cap per request; outputs cut by it are reported")
    p.add_argument("--max-string-len", type=int, default=12, help="maxLength of the schema's strings")
    p.add_argument("--output-dir", default="benchmarks/results")
    p.add_argument("--tag", default="", help="appended to the result files' names")
    p.add_argument("--profile", action="store_true",
                   help="also run the structured batch (fresh schemas) under cProfile, a device trace and a host "
                        "timeline (the unconstrained one too)")
    p.set_defaults(func=cmd_structured, max_num_seqs=None, max_num_batched_tokens=None)


def schema_for(i: int, max_string_len: int) -> dict:
    """Request i's schema: a bounded record whose property names are unique to the request."""
    return {
        "type": "object", "additionalProperties": False,
        "required": [f"id_{i}", f"status_{i}", f"label_{i}", f"scores_{i}", f"flag_{i}"],
        "properties": {
            f"id_{i}": {"type": "integer", "minimum": 0, "maximum": 100000},
            f"status_{i}": {"enum": ["queued", "running", "done", "failed"]},
            f"label_{i}": {"type": "string", "maxLength": max_string_len},
            f"scores_{i}": {"type": "array", "maxItems": 3, "items": {"type": "integer", "minimum": 0, "maximum": 99}},
            f"flag_{i}": {"type": "boolean"},
        },
    }


def _tokenizer(args, model):
    from jaxinfer.loading.resolve import resolve_model
    from jaxinfer.tokenizer import Tokenizer

    ref = args.tokenizer
    if ref is None and model.tokenizer is not None:
        return model.tokenizer
    if ref is not None and ref.endswith(".json"):
        import tokenizers

        backend = tokenizers.Tokenizer.from_file(ref)
        # A bare tokenizer.json names no eos: the model's, where the tokenizer has those ids.
        eos = [i for i in model.config.eos_token_ids if i < backend.get_vocab_size(with_added_tokens=True)]
        return Tokenizer(backend, extra_eos_token_ids=eos)
    resolved = resolve_model(ref)
    return Tokenizer.from_gguf(resolved.path) if resolved.kind == "gguf" else Tokenizer.from_directory(resolved.path)


def _run(engine, prompts, params_list, tag: str) -> dict:
    """Runs one batch to the end: seconds, steps, each request's output, and the host's own
    time (the run's time less its waits for the device) per step."""
    from jaxinfer.bench.profile import device_waits

    with device_waits() as waits:
        t0 = time.perf_counter()
        engine.prepare_structured_outputs(params_list)  # as `LLM.generate` admits a batch
        for i, (p, params) in enumerate(zip(prompts, params_list)):
            engine.add_request(f"{tag}-{i}", {"prompt_token_ids": p}, params)
        added = time.perf_counter() - t0
        done, step_ms = {}, []
        while engine.has_unfinished_requests():
            t = time.perf_counter()
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0]
            step_ms.append(1e3 * (time.perf_counter() - t))
        seconds = time.perf_counter() - t0
        steps = len(step_ms)
    outs = [done[f"{tag}-{i}"] for i in range(len(prompts))]
    waited = waits.seconds()
    return {"seconds": seconds, "steps": steps, "outputs": outs, "add_requests_ms": 1e3 * added,
            "host_ms_per_step": 1e3 * (seconds - added - waited) / max(steps, 1),
            "wait_ms_per_step": 1e3 * waited / max(steps, 1),
            # Where a slower run loses its time: the first steps (prefill, the first masks) or
            # every step.
            "first_steps_ms": [round(t, 2) for t in step_ms[:6]],
            "median_step_ms": float(np.median(step_ms)) if step_ms else 0.0,
            "generated_tokens": sum(len(o.token_ids) for o in outs)}


def cmd_structured(args) -> int:
    from jaxinfer.bench.offline import _cost, _engine
    from jaxinfer.devices import datasheet, measure_ceilings
    from jaxinfer.sampling_params import SamplingParams, StructuredOutputsParams

    model = _load(args)
    model.tokenizer = _tokenizer(args, model)
    if model.tokenizer.vocab_size > model.config.vocab_size:
        print(f"error: the tokenizer has {model.tokenizer.vocab_size} ids, more than the model's vocabulary "
              f"({model.config.vocab_size})", file=sys.stderr)
        return 1
    b = args.batch_size
    engine = _engine(model, args, max_num_seqs=b, max_len=args.input_len + args.max_tokens,
                     batched_tokens=min(8192, max(512, b * args.input_len)))
    so = engine.structured
    # Outputs are decoded after the runs, so neither pays the detokenizer, and unconstrained
    # ids past a smaller tokenizer's vocabulary (a preset's) are never decoded. The grammar
    # state keeps its own reference to the tokenizer.
    engine.tokenizer = None
    prompts = _prompts(min(model.config.vocab_size, model.tokenizer.vocab_size), b, args.input_len, args.seed)

    def structured_params(i: int):
        return SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True,
                              structured_outputs=StructuredOutputsParams(
                                  json=schema_for(i, args.max_string_len), disable_any_whitespace=True))

    # Off the clock: the grammar tokenizer's build, and one-time first-use costs of both paths
    # at the timed runs' batch. Warmed at 2 requests, the first structured batch of 64 on the
    # H200 spent 68 ms more in its second step than every later batch (not isolated further;
    # the unconstrained run, timed after it, never paid such a cost).
    t0 = time.perf_counter()
    _run(engine, prompts, [structured_params(-1 - i) for i in range(b)], "warm-structured")
    warm_s = time.perf_counter() - t0
    _run(engine, prompts, [SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)] * b, "warm-plain")

    compiles0, compile_s0, masks0, mask_s0 = so.num_compiles, so.compile_seconds, so.num_mask_steps, so.mask_seconds
    accept_s0 = so.accept_seconds
    constrained = _run(engine, prompts, [structured_params(i) for i in range(b)], "structured")
    num_compiles = so.num_compiles - compiles0
    mask_steps = so.num_mask_steps - masks0
    lengths = [len(o.token_ids) for o in constrained["outputs"]]
    valid = truncated = 0
    for o in constrained["outputs"]:
        truncated += o.finish_reason == "length"
        try:
            json.loads(model.tokenizer.decode(o.token_ids))
            valid += 1
        except ValueError:
            pass
    plain = _run(engine, prompts, [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths],
                 "plain")
    result = {
        "batch_size": b,
        "structured_output_tokens_per_s": constrained["generated_tokens"] / constrained["seconds"],
        "unconstrained_output_tokens_per_s": plain["generated_tokens"] / plain["seconds"],
        "structured_seconds": constrained["seconds"], "unconstrained_seconds": plain["seconds"],
        "structured_steps": constrained["steps"], "unconstrained_steps": plain["steps"],
        "generated_tokens": constrained["generated_tokens"],
        "mean_output_len": sum(lengths) / b, "max_output_len": max(lengths),
        "valid_json": valid, "truncated": truncated,
        "mask_ms_per_step": 1e3 * (so.mask_seconds - mask_s0) / max(mask_steps, 1),
        "mask_steps": mask_steps,
        "advance_ms_per_step": 1e3 * (so.accept_seconds - accept_s0) / max(mask_steps, 1),
        "compile_ms_per_request": 1e3 * (so.compile_seconds - compile_s0) / max(num_compiles, 1),
        "grammar_compiles": num_compiles,
        "first_structured_batch_s": warm_s,
        "tokenizer_vocab": model.tokenizer.vocab_size, "model_vocab": model.config.vocab_size,
        **{f"{name}_{key}": run[key] for name, run in (("structured", constrained), ("unconstrained", plain))
           for key in ("add_requests_ms", "host_ms_per_step", "wait_ms_per_step", "first_steps_ms",
                       "median_step_ms")},
    }
    result["slowdown"] = result["unconstrained_output_tokens_per_s"] / result["structured_output_tokens_per_s"]
    # Both runs make the same tokens (the unconstrained one stops each request at its structured
    # length): one floor, by this run's measured ceilings and by the datasheet.
    ceilings, spec = measure_ceilings(), datasheet()
    rates = {"measured": (ceilings["bytes_per_s"], ceilings["matmul_flops_per_s"])}
    if spec is not None:
        rates["datasheet"] = (spec.memory_bytes_per_s, spec.bf16_flops_per_s)
    cost = _cost(model)
    result["floor_s"] = {basis: cost.ragged_generation_floor_s(input_len=args.input_len, output_lens=lengths,
                                                               bytes_per_s=bw, flops_per_s=flops)["total_s"]
                         for basis, (bw, flops) in rates.items()}
    for name, run in (("structured", constrained), ("unconstrained", plain)):
        for basis, floor in result["floor_s"].items():
            result[f"{name}_fraction_of_{basis}_floor"] = floor / run["seconds"]
    if args.profile:
        from jaxinfer.bench.profile import HostTimeline, cprofile_top, profile_steps
        from jaxinfer.engine.engine import LLMEngine
        from jaxinfer.engine.runner import ModelRunner, PendingStep
        from jaxinfer.engine.scheduler import Scheduler
        from jaxinfer.engine.structured import StructuredOutputs

        # Each run takes fresh schemas, so that it compiles its grammars as the timed one did.
        def fresh_run(tag: str, first: int) -> None:
            _run(engine, prompts, [structured_params(first + i) for i in range(b)], tag)

        # The engine thread's serial path piece by piece (Future.result: its wait for the mask).
        targets = [(LLMEngine, "step"), (Scheduler, "schedule"), (ModelRunner, "dispatch"),
                   (ModelRunner, "_pack_step"), (ModelRunner, "_prepare_sampler"), (ModelRunner, "sample_deferred"),
                   (concurrent.futures.Future, "result"), (ModelRunner, "_grammar_mask"),
                   (PendingStep, "result"), (Scheduler, "update_from_output"), (StructuredOutputs, "accept_tokens"),
                   (StructuredOutputs, "fill_bitmask"), (LLMEngine, "_process_outputs")]
        timelines = {}
        for name, params_of in (("structured", lambda i: structured_params(30 * b + i)),
                                ("unconstrained", lambda i: SamplingParams(temperature=0.0, max_tokens=lengths[i],
                                                                           ignore_eos=True))):
            with HostTimeline(targets) as timeline:
                _run(engine, prompts, [params_of(i) for i in range(b)], f"timeline-{name}")
            timelines[name] = timeline.summary()
        result["profile"] = {"host_top_functions": cprofile_top(lambda: fresh_run("cprofile", 10 * b),
                                                                constrained["steps"]),
                             "device": profile_steps(lambda: fresh_run("trace", 20 * b), 1),
                             "host_timeline": timelines}
    print(json.dumps(result), flush=True)
    record = {"benchmark": "structured", **run_header(args.argv), "args": _plain(vars(args)), "result": result}
    table = [f"batch {b}, {args.input_len}-token prompts, one JSON schema per request (greedy, bounded); "
             f"tokenizer of {result['tokenizer_vocab']} ids, model vocabulary {result['model_vocab']}", "",
             "| structured tok/s | unconstrained tok/s | slowdown | of measured floor (structured / "
             "unconstrained) | mask ms/step | compile ms/request | mean / max output | valid JSON | truncated |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| {result['structured_output_tokens_per_s']:.1f} | {result['unconstrained_output_tokens_per_s']:.1f} | "
             f"{result['slowdown']:.2f}x | {result['structured_fraction_of_measured_floor']:.2f} / "
             f"{result['unconstrained_fraction_of_measured_floor']:.2f} | {result['mask_ms_per_step']:.2f} "
             f"(+{result['advance_ms_per_step']:.2f} advancing) | "
             f"{result['compile_ms_per_request']:.2f} | "
             f"{result['mean_output_len']:.1f} / {result['max_output_len']} | {valid}/{b} | {truncated} |"]
    _save(record, args, "structured", table)
    return 0
