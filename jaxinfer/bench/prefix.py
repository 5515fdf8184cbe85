"""`jaxinfer bench prefix`: what prefix caching and the host KV tier buy.

ttft        time to first token of --prefix-len shared tokens + --new-len new ones: cold (the
            prefix never seen), device hit (its pages still in the device pool), and host hit
            (its pages evicted to the host tier by filler prompts that fill the device pool,
            then copied back). Each on a fresh random prefix, --num-iters times (median).
throughput  --num-prompts requests of --input-len tokens, the first hit-rate x input-len of which
            are one shared prefix (computed once before the clock starts, as a system prompt
            would be), each generating --output-len tokens; for each of --hit-rates with the
            host tier, with prefix caching on the device alone (the default), and with it off
            (three engines, one after another).

The engine's pool is sized for the throughput batch (--num-pages overrides it); the host tier
holds the whole device pool plus the prefix (--kv-offloading-size overrides it), so the filler
that evicts the prefix from the device cannot evict it from the host tier too. One JSON record
and a markdown table go to --output-dir.
"""

from __future__ import annotations

import gc
import json
import time

import numpy as np


def add_args(sub) -> None:
    """Registers `prefix` under `jaxinfer bench`."""
    from jaxinfer.cli import _add_engine_args

    p = sub.add_parser("prefix", help="prefix caching: TTFT cold / device hit / host hit; throughput by hit rate")
    _add_engine_args(p)
    p.add_argument("--preset", default=None, help="random weights of a named shape (e.g. llama3-8b)")
    p.add_argument("--prefix-len", type=int, default=2048, help="shared prefix of the TTFT prompts")
    p.add_argument("--new-len", type=int, default=128, help="new tokens after the prefix in the TTFT prompts")
    p.add_argument("--hit-rates", default="0,0.5,0.9", help="shared share of each throughput prompt (comma list)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-iters", type=int, default=3, help="timed repetitions (the median is reported)")
    p.add_argument("--output-dir", default="benchmarks/results")
    p.add_argument("--tag", default="", help="appended to the result files' names")
    p.set_defaults(func=cmd_prefix, max_num_seqs=None, max_num_batched_tokens=None)


def _hit_rates(text: str) -> list[float]:
    try:
        rates = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise SystemExit(f"error: --hit-rates takes comma-separated numbers in [0, 1), got {text!r}")
    if not rates or any(not 0 <= r < 1 for r in rates):
        raise SystemExit(f"error: --hit-rates takes comma-separated numbers in [0, 1), got {text!r}")
    return rates


def _shape(args):
    """(max_model_len, max_num_seqs, token budget, device pages) of the benchmark's engine."""
    ps = args.page_size
    round_up = lambda n: -(-n // ps) * ps  # noqa: E731
    max_len = round_up(max(args.prefix_len + args.new_len + 1, args.input_len + args.output_len))
    seqs = args.max_num_seqs or min(64, args.num_prompts)
    budget = args.max_num_batched_tokens or min(8192, max(2048, round_up(args.prefix_len + args.new_len)))
    # The throughput batch at full length, plus room for the TTFT prompts and their variants.
    pages = args.num_pages or seqs * round_up(args.input_len + args.output_len) // ps + 4 * max_len // ps + 1
    return max_len, seqs, budget, pages


def _engine(model, args, enable_prefix_caching: bool, host_tier: bool = True):
    from jaxinfer.cli import engine_config_kwargs
    from jaxinfer.engine.config import EngineConfig
    from jaxinfer.engine.engine import LLMEngine
    from jaxinfer.engine.kv_cache import KVCacheSpec

    max_len, seqs, budget, pages = _shape(args)
    kwargs = engine_config_kwargs(args)
    kwargs.update(max_model_len=args.max_model_len or max_len, max_num_seqs=seqs, max_num_batched_tokens=budget,
                  num_pages=pages, enable_prefix_caching=enable_prefix_caching)
    if not (enable_prefix_caching and host_tier):
        kwargs["kv_offloading_size"] = None
    elif kwargs.get("kv_offloading_size") is None:
        import jax.numpy as jnp

        from jaxinfer.models import param_dtype

        page_bytes = KVCacheSpec.bytes_per_page(model.config, args.page_size, param_dtype(model.params)
                                                if args.kv_cache_dtype == "auto" else jnp.dtype(args.kv_cache_dtype))
        kwargs["kv_offloading_size"] = (pages + 2 * max_len // args.page_size) * page_bytes / 2**30
    return LLMEngine(model, EngineConfig(**kwargs))


def _counters(engine) -> dict:
    bm, host = engine.block_manager, engine.runner.host_kv
    return {"device_hit_tokens": bm.num_prefix_hit_tokens, "host_hit_tokens": bm.num_external_hit_tokens,
            "query_tokens": bm.num_prefix_query_tokens,
            # Pages copied to and from the host tier: its cost inside a run's time.
            "pages_offloaded": host.num_offloaded if host is not None else 0,
            "pages_reloaded": host.num_reloaded if host is not None else 0}


def _delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in after}


def _first_token(engine, prompt: list[int], tag: str) -> dict:
    """Time from adding one request to its first (and only) token; the cache hits it took."""
    from jaxinfer.sampling_params import SamplingParams

    before = _counters(engine)
    t0 = time.perf_counter()
    engine.add_request(tag, {"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=1,
                                                                          ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    return {"ttft_s": time.perf_counter() - t0, **_delta(_counters(engine), before)}


def _fill_device_pool(engine, rng, vocab: int, tag: str) -> None:
    """Computes fresh prompts worth the whole device pool, so every cached page is evicted."""
    from jaxinfer.sampling_params import SamplingParams

    bm = engine.block_manager
    length = engine.max_model_len - 1
    count = -(-bm.num_allocatable_pages * bm.page_size // length) + 1
    for i in range(count):
        engine.add_request(f"{tag}-{i}", {"prompt_token_ids": rng.integers(0, vocab, length).tolist()},
                           SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()


def _ttft(engine, args, vocab: int, rng, host_hit: bool = True) -> dict:
    warm = rng.integers(0, vocab, args.prefix_len + args.new_len).tolist()
    _first_token(engine, warm, "warm")  # first-use costs off the clock
    runs = []
    for i in range(args.num_iters):
        prefix = rng.integers(0, vocab, args.prefix_len).tolist()
        new = lambda: rng.integers(0, vocab, args.new_len).tolist()  # noqa: E731
        run = {"cold": _first_token(engine, prefix + new(), f"cold{i}"),
               "device_hit": _first_token(engine, prefix + new(), f"dev{i}")}
        if host_hit:
            _fill_device_pool(engine, rng, vocab, f"fill{i}")
            run["host_hit"] = _first_token(engine, prefix + new(), f"host{i}")
        runs.append(run)
        print(json.dumps({"iteration": i, **{k: round(v["ttft_s"], 4) for k, v in run.items()}}), flush=True)
    out = {"runs": runs}
    for kind in ("cold", "device_hit", "host_hit")[:3 if host_hit else 2]:
        out[f"{kind}_ttft_s"] = float(np.median([r[kind]["ttft_s"] for r in runs]))
    return out


def _throughput(engine, args, vocab: int, rate: float, seed: int) -> dict:
    """Seconds for the batch whose prompts share their first rate x input-len tokens."""
    from jaxinfer.bench.offline import _run_batch

    rng = np.random.default_rng(seed)
    shared = rng.integers(0, vocab, int(rate * args.input_len)).tolist()
    prompts = [shared + rng.integers(0, vocab, args.input_len - len(shared)).tolist()
               for _ in range(args.num_prompts)]
    if shared:  # the shared prefix is computed once before the clock, as a system prompt would be
        _first_token(engine, shared + [0], f"prime{seed}")
    before = _counters(engine)
    result = _run_batch(engine, prompts, args.output_len, f"tp{seed}")
    counts = _delta(_counters(engine), before)
    tokens = args.num_prompts * (args.input_len + args.output_len)
    return {"seconds": result["seconds"], "output_tokens_per_s": result["generated_tokens"] / result["seconds"],
            "total_tokens_per_s": tokens / result["seconds"], "ttft_s": result["ttft_s"],
            "measured_hit_rate": ((counts["device_hit_tokens"] + counts["host_hit_tokens"])
                                  / max(1, counts["query_tokens"])),
            **counts}


def cmd_prefix(args) -> int:
    from jaxinfer.bench.offline import _load, _plain, _save, run_header

    rates = _hit_rates(args.hit_rates)
    for name in ("prefix_len", "new_len", "num_prompts", "input_len", "output_len", "num_iters"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1")
    model = _load(args)
    vocab = model.config.vocab_size
    rng = np.random.default_rng(args.seed)
    engine = _engine(model, args, enable_prefix_caching=True)
    ttft = _ttft(engine, args, vocab, rng)
    # Three engines over the same workloads: with the host tier (the TTFT engine), prefix
    # caching on the device alone (the default configuration), and prefix caching off.
    rows = {rate: {"host_tier": _throughput(engine, args, vocab, rate, seed=1000 + i)}
            for i, rate in enumerate(rates)}
    shape = dict(num_pages=engine.kv_spec.num_pages, num_host_pages=engine.num_host_pages,
                 max_num_seqs=engine.config.max_num_seqs, max_num_batched_tokens=engine.config.max_num_batched_tokens)
    for mode, caching in (("on", True), ("off", False)):
        del engine
        gc.collect()  # the previous engine's KV pools go before the next allocates its own
        engine = _engine(model, args, enable_prefix_caching=caching, host_tier=False)
        if caching:  # cold and device hit without the tier's copies in the way
            ttft_device_only = _ttft(engine, args, vocab, rng, host_hit=False)
        for i, rate in enumerate(rates):
            rows[rate][mode] = _throughput(engine, args, vocab, rate, seed=1000 + i)
    for rate, row in rows.items():
        row["speedup"] = row["off"]["seconds"] / row["on"]["seconds"]
        row["speedup_host_tier"] = row["off"]["seconds"] / row["host_tier"]["seconds"]
        print(json.dumps({"hit_rate": rate, **{f"{m}_s": round(row[m]["seconds"], 3)
                                               for m in ("off", "on", "host_tier")}}), flush=True)
    record = {"benchmark": "prefix", **run_header(args.argv), "args": _plain(vars(args)), "engine": shape,
              "ttft": ttft, "ttft_device_only": ttft_device_only,
              "throughput": [{"hit_rate": rate, **row} for rate, row in rows.items()]}
    table = [f"TTFT of {args.prefix_len} shared + {args.new_len} new tokens (median of {args.num_iters}); "
             f"device pool {shape['num_pages']} pages, host tier {shape['num_host_pages']} pages", "",
             "| cold (ms) | device hit (ms) | host hit (ms) |", "|---|---|---|",
             f"| {1e3 * ttft['cold_ttft_s']:.1f} | {1e3 * ttft['device_hit_ttft_s']:.1f} | "
             f"{1e3 * ttft['host_hit_ttft_s']:.1f} |",
             f"| {1e3 * ttft_device_only['cold_ttft_s']:.1f} | {1e3 * ttft_device_only['device_hit_ttft_s']:.1f} "
             "| (engine without the host tier) |", "",
             f"{args.num_prompts} prompts x {args.input_len} in / {args.output_len} out", "",
             "| hit rate | measured | off (s) | on (s) | on + host tier (s) | off tok/s | on tok/s | "
             "on / off | on + host tier / off |", "|---|---|---|---|---|---|---|---|---|"]
    for rate, row in rows.items():
        table.append(f"| {rate:.2f} | {row['on']['measured_hit_rate']:.2f} | {row['off']['seconds']:.2f} | "
                     f"{row['on']['seconds']:.2f} | {row['host_tier']['seconds']:.2f} | "
                     f"{row['off']['total_tokens_per_s']:.0f} | {row['on']['total_tokens_per_s']:.0f} | "
                     f"{row['speedup']:.3f}x | {row['speedup_host_tier']:.3f}x |")
    print("\n".join(table), flush=True)
    _save(record, args, "prefix", table)
    return 0
