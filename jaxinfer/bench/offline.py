"""`jaxinfer bench latency | throughput | startup`: the offline engine timed against its floor.

latency     batches of --batch-size prompts (a comma list sweeps it) of --input-len random
            tokens, each generating --output-len tokens; time to first token (the prefill),
            decode tokens/s, end-to-end latency.
throughput  --num-prompts such requests at once through continuous batching.
startup     the latency command in fresh processes: cold (empty compilation caches) and warm
            (caches filled by the cold run), each timed from process start to its first token.

The model is a checkpoint (--model) or a preset with random weights made on the device
(--preset). Floors come from the device's datasheet and from a copy and a matrix product
timed in the same run (jaxinfer/devices.py); with --hf-peer, HF transformers runs the same
prompts in its own process first. Each run writes JSON and a markdown table (and a PNG plot
for sweeps) to --output-dir.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time

import numpy as np

STARTUP_MARK = "JAXINFER_FIRST_TOKEN"


def add_args(sub) -> None:
    """Registers latency, throughput and startup under `jaxinfer bench`."""
    from jaxinfer.cli import _add_engine_args

    for name, help_text in (("latency", "batch latency: prefill, decode tokens/s, end-to-end"),
                            ("throughput", "offline throughput of many requests at once"),
                            ("startup", "cold and warm start to first token, each in a fresh process")):
        p = sub.add_parser(name, help=help_text)
        _add_engine_args(p)
        p.add_argument("--preset", default=None, help="random weights of a named shape (e.g. llama3-8b)")
        p.add_argument("--input-len", type=int, default=128)
        p.add_argument("--output-len", type=int, default=256 if name != "throughput" else 128)
        p.add_argument("--num-iters", type=int, default=3, help="timed repetitions (the median is reported)")
        p.add_argument("--hf-peer", action="store_true", help="HF transformers on the same prompts, same run")
        p.add_argument("--output-dir", default="benchmarks/results")
        p.add_argument("--tag", default="", help="appended to the result files' names")
        p.add_argument("--profile", action="store_true",
                       help="trace decode steps (throughput: one whole extra run): device busy/idle share "
                            "and the top kernels")
        if name == "throughput":
            p.add_argument("--num-prompts", type=int, default=256)
        else:
            p.add_argument("--batch-size", default="1", help="sequences per batch; a comma list sweeps")
        p.set_defaults(func=globals()[f"cmd_{name}"], max_num_seqs=None, max_num_batched_tokens=None)


# -- the model and the engine ---------------------------------------------------------------
def _load(args):
    """A LoadedModel from --preset (random weights on the device) or --model."""
    import jax
    import jax.numpy as jnp

    from jaxinfer.loading.loader import LoadedModel, load_model

    dtype = None if args.dtype == "auto" else getattr(jnp, args.dtype)
    if args.preset:
        from jaxinfer.config import preset
        from jaxinfer.models import random_model

        config = preset(args.preset)
        dtype = dtype or (jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
        graphdef, state = random_model(config, dtype=dtype)
        jax.block_until_ready(state)
        return LoadedModel(config, state, None, ".", graphdef=graphdef)
    return load_model(args.model, dtype=dtype, load_tokenizer=False, gguf_blocks=args.quantization == "gguf")


def _engine(model, args, *, max_num_seqs: int, max_len: int, batched_tokens: int):
    """The engine for the benchmark's shape; engine flags given on the command line win."""
    from jaxinfer.cli import engine_config_kwargs
    from jaxinfer.engine.config import EngineConfig
    from jaxinfer.engine.engine import LLMEngine

    kwargs = engine_config_kwargs(args)
    kwargs["max_model_len"] = args.max_model_len or -(-max_len // args.page_size) * args.page_size
    kwargs["max_num_seqs"] = args.max_num_seqs or max_num_seqs
    kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens or batched_tokens
    return LLMEngine(model, EngineConfig(**kwargs))


def _prompts(vocab: int, count: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, length).tolist() for _ in range(count)]


def _run_batch(engine, prompts, output_len: int, tag: str) -> dict:
    """Generates output_len tokens for every prompt at once; times the first token and the end."""
    from jaxinfer.sampling_params import RequestOutputKind, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", {"prompt_token_ids": p}, params)
    first, steps, tokens = None, 0, 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        steps += 1
        new = sum(len(o.outputs[0].token_ids) for o in outs)
        tokens += new
        if first is None and new:
            first = time.perf_counter() - t0
    return {"seconds": time.perf_counter() - t0, "ttft_s": first, "steps": steps, "generated_tokens": tokens}


# -- floors and reports ---------------------------------------------------------------------
def _cost(model):
    """The model's floors, its decode bytes counted off its arrays as the engine holds them
    (so after the engine quantized them)."""
    from jaxinfer.bench.floors import ModelCost, stored_decode_weight_bytes, stored_expert_bytes
    from jaxinfer.models import param_dtype

    itemsize = param_dtype(model.params).itemsize
    return ModelCost(model.config, itemsize, itemsize, stored_decode_weight_bytes(model.config, model.params),
                     stored_expert_bytes(model.config, model.params))


def weight_bytes_fields(cost, batch_sizes) -> dict:
    """The record's weight bytes a decode step reads: all of them, and for a mixture of experts
    also by batch size (only routed experts are read)."""
    fields = {"weight_bytes_per_decode_step": cost.decode_weight_bytes}
    if cost.config.is_moe:
        fields["weight_bytes_per_decode_step_by_batch"] = {b: cost.decode_weight_bytes_at(b) for b in batch_sizes}
    return fields


def _floors(cost, ceilings, spec, **shape) -> dict:
    """The run's floor by datasheet and by the ceilings measured in this run."""
    out = {"measured": cost.generation_floor_s(bytes_per_s=ceilings["bytes_per_s"],
                                               flops_per_s=ceilings["matmul_flops_per_s"], **shape)}
    if spec is not None:
        out["datasheet"] = cost.generation_floor_s(bytes_per_s=spec.memory_bytes_per_s,
                                                   flops_per_s=spec.bf16_flops_per_s, **shape)
    return out


def run_header(argv=None) -> dict:
    """Device, versions, UTC date and the command line of this run."""
    import jax

    d = jax.devices()[0]
    versions = {"jax": jax.__version__, "python": platform.python_version()}
    for name in ("flax", "jaxlib"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    command = " ".join(["jaxinfer"] + list(argv if argv is not None else sys.argv[1:]))
    # XLA's flags and its memory pool's size change what is measured (autotuning, command
    # buffers, the room left beside the KV pool): part of the command.
    for name in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION"):
        value = os.environ.get(name, "").strip()
        if value:
            command = f"{name}={shlex.quote(value)} {command}"
    return dict(device=d.device_kind, platform=d.platform, device_count=jax.device_count(), **versions,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), command=command)


def _save(record: dict, args, kind: str, table: list[str], plot=None) -> str:
    os.makedirs(args.output_dir, exist_ok=True)
    model = args.preset or os.path.basename(str(args.model or "smollm2-135m-instruct"))
    device = record["device"].replace(" ", "_")
    stem = f"bench_{kind}_{model}_{device}_{record['date'][:10]}" + (f"_{args.tag}" if args.tag else "")
    base = os.path.join(args.output_dir, stem)
    with open(base + ".json", "w") as f:
        json.dump(record, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(f"# jaxinfer bench {kind}\n\n`{record['command']}`\n\n{record['device']}, JAX {record['jax']}, "
                f"{record['date']}\n\n" + "\n".join(table) + "\n")
    if plot is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig = plot(plt)
            fig.savefig(base + ".png", dpi=120, bbox_inches="tight")
            plt.close(fig)
        except ImportError:
            print("matplotlib is not installed: no plot", file=sys.stderr)
    print(f"wrote {base}.json and .md", file=sys.stderr)
    return base


def _run_peer(spec):
    from jaxinfer.bench.hf_peer import run_peer

    result = run_peer(spec)
    print("peer:", result, file=sys.stderr, flush=True)
    return result


# -- latency --------------------------------------------------------------------------------
def cmd_latency(args) -> int:
    batch_sizes = [int(b) for b in str(args.batch_size).split(",")]
    peers = {}
    if args.hf_peer:  # before JAX allocates the accelerator
        for b in batch_sizes:
            peers[b] = _peer_for_shape(args, "latency", b)
    from jaxinfer.devices import datasheet, measure_ceilings

    child = bool(os.environ.get(STARTUP_MARK))  # `bench startup`'s child: it times the phases to the first token
    if child:
        print(STARTUP_MARK, "imports", flush=True)
    model = _load(args)
    if child:
        print(STARTUP_MARK, "weights", flush=True)
    else:  # before the engine takes its KV pool: the ceilings' buffers must fit beside big weights
        ceilings, spec = measure_ceilings(), datasheet()
    max_len = args.input_len + args.output_len
    engine = _engine(model, args, max_num_seqs=max(batch_sizes), max_len=max_len,
                     batched_tokens=min(8192, max(512, max(batch_sizes) * args.input_len)))
    if child:
        print(STARTUP_MARK, "engine", json.dumps(engine.startup_seconds), flush=True)
        _run_batch(engine, _prompts(model.config.vocab_size, 1, args.input_len, args.seed), 1, "startup")
        print(STARTUP_MARK, flush=True)
        return 0
    cost = _cost(model)
    rows = []
    for b in batch_sizes:
        prompts = _prompts(model.config.vocab_size, b, args.input_len, args.seed)
        _run_batch(engine, prompts, min(args.output_len, 8), f"warm{b}")  # first-use costs off the clock
        # Fresh prompts each run: repeating one would find its pages in the prefix cache.
        runs = [_run_batch(engine, _prompts(model.config.vocab_size, b, args.input_len, args.seed + 1 + i),
                           args.output_len, f"b{b}-{i}") for i in range(args.num_iters)]
        median = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
        decode_s = median["seconds"] - median["ttft_s"]
        row = {"batch_size": b, "runs": runs, "latency_s": median["seconds"], "ttft_s": median["ttft_s"],
               "decode_tokens_per_s": b * (args.output_len - 1) / decode_s,
               "prefill_tokens_per_s": b * args.input_len / median["ttft_s"],
               "floor": _floors(cost, ceilings, spec, batch=b, input_len=args.input_len,
                                output_len=args.output_len)}
        for basis, floor in row["floor"].items():
            row[f"decode_fraction_of_{basis}_floor"] = floor["decode_s"] / decode_s
            row[f"prefill_fraction_of_{basis}_floor"] = floor["prefill_s"] / median["ttft_s"]
        peer = peers.get(b)
        if peer is not None and "error" not in peer:
            row["peer"] = peer
            row["decode_ratio_vs_peer"] = row["decode_tokens_per_s"] / peer["decode_tokens_per_s"]
            row["prefill_ratio_vs_peer"] = peer["ttft_s"] / row["ttft_s"]
        elif peer is not None:
            row["peer"] = peer
        rows.append(row)
        if args.profile:
            row["profile"] = _profile_decode(engine, prompts, args.output_len)
        print(json.dumps({k: v for k, v in row.items() if k not in ("runs", "floor")}), flush=True)
    record = {"benchmark": "latency", **run_header(args.argv), "args": _plain(vars(args)), "ceilings": ceilings,
              "datasheet": dataclasses.asdict(spec) if spec else None,
              **weight_bytes_fields(cost, batch_sizes), "results": rows}
    basis = "datasheet" if spec else "measured"
    sheet = (f"the datasheet's {spec.memory_bytes_per_s / 1e12:.2f} TB/s and {spec.bf16_flops_per_s / 1e12:.0f} "
             "TFLOP/s, and " if spec else "")
    table = [f"input {args.input_len} / output {args.output_len} tokens; floors from {sheet}this run's measured "
             f"ceilings ({ceilings['bytes_per_s'] / 1e12:.2f} TB/s, {ceilings['matmul']} "
             f"{ceilings['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s)", "",
             f"| batch | TTFT (ms) | prefill tok/s | of {basis} floor | decode tok/s | of {basis} floor | "
             "of measured floor | latency (s) | HF TTFT (ms) | HF decode tok/s | vs HF prefill | vs HF decode |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r.get("peer") or {}
        table.append(
            f"| {r['batch_size']} | {1e3 * r['ttft_s']:.1f} | {r['prefill_tokens_per_s']:.0f} | "
            f"{r[f'prefill_fraction_of_{basis}_floor']:.2f} | {r['decode_tokens_per_s']:.1f} | "
            f"{r[f'decode_fraction_of_{basis}_floor']:.2f} | {r['decode_fraction_of_measured_floor']:.2f} | "
            f"{r['latency_s']:.3f} | "
            + (f"{1e3 * p['ttft_s']:.1f} | {p['decode_tokens_per_s']:.1f} | {r['prefill_ratio_vs_peer']:.2f}x | "
               f"{r['decode_ratio_vs_peer']:.2f}x |" if "ttft_s" in p else "- | - | - | - |"))

    def plot(plt):
        fig, ax = plt.subplots(figsize=(6, 4))
        bs = [r["batch_size"] for r in rows]
        ax.plot(bs, [r["decode_tokens_per_s"] for r in rows], "o-", label="jaxinfer")
        ax.plot(bs, [r["batch_size"] * (args.output_len - 1) / r["floor"][basis]["decode_s"] for r in rows], "k--",
                label=f"floor ({basis})")
        if all("ttft_s" in (r.get("peer") or {}) for r in rows):
            ax.plot(bs, [r["peer"]["decode_tokens_per_s"] for r in rows], "s-", label="HF transformers")
        ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="decode tokens/s",
               title=f"{args.preset or args.model}, {record['device']}")
        ax.legend()
        return fig

    _save(record, args, "latency", table, plot if len(rows) > 1 else None)
    return 0


def _profile_decode(engine, prompts, output_len: int, num_steps: int = 16) -> dict:
    """Profiles num_steps decode steps of one batch (after its prefill), then finishes it."""
    from jaxinfer.bench.profile import host_profile, profile_steps
    from jaxinfer.sampling_params import RequestOutputKind, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max(output_len, 2 * num_steps + 8), ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)
    for i, p in enumerate(prompts):
        engine.add_request(f"profile-{i}", {"prompt_token_ids": p}, params)
    started: set[str] = set()
    while len(started) < len(prompts):  # until every prompt has its first token: prefills done
        started.update(o.request_id for o in engine.step() if o.outputs[0].token_ids)
    for _ in range(4):  # a few plain decode steps first
        engine.step()
    result = profile_steps(engine.step, num_steps)
    result["host"] = host_profile(engine.step, num_steps)
    if result.get("device_busy_s"):
        # Tracing slows the host (hundreds of kernels a step are recorded), which inflates the
        # traced idle share once the host's work approaches the device's; the kernels' busy time
        # per step against the untraced step time estimates the idle share without that cost.
        busy_ms = result["device_busy_s"] / num_steps * 1e3
        result["device_idle_fraction_untraced_estimate"] = max(0.0, 1 - busy_ms / result["host"]["wall_ms_per_step"])
    while engine.has_unfinished_requests():
        engine.step()
    return result


def _peer_for_shape(args, mode: str, batch: int, count: int | None = None) -> dict:
    """The HF peer for one shape, from the config alone (no JAX device touched)."""
    from jaxinfer.config import preset

    if args.preset:
        config = preset(args.preset)
        spec = {"preset_config": dataclasses.asdict(config)}
    else:
        from jaxinfer.loading.resolve import resolve_model

        resolved = resolve_model(args.model)
        config = _config_of(resolved)
        spec = {"path": str(resolved.path)}
    on_cpu = _backend_is_cpu()
    dtype = args.dtype if args.dtype != "auto" else ("float32" if on_cpu else "bfloat16")
    prompts = _prompts(config.vocab_size, count or batch, args.input_len, args.seed)
    spec.update(mode=mode, prompts=prompts, output_len=args.output_len, num_iters=args.num_iters,
                device="cpu" if on_cpu else "cuda", dtype=dtype)
    return _run_peer(spec)


def _config_of(resolved):
    from jaxinfer.config import ModelConfig

    if resolved.kind == "gguf":
        from jaxinfer.loading.gguf import config_from_gguf, open_gguf

        return config_from_gguf(open_gguf(resolved.path))
    return ModelConfig.from_json_file(os.path.join(resolved.path, "config.json"))


def _backend_is_cpu() -> bool:
    """Whether JAX will run on the CPU, decided without initialising an accelerator."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0] == "cpu"
    import importlib.util

    return importlib.util.find_spec("jax_cuda13_plugin") is None and \
        importlib.util.find_spec("jax_cuda12_plugin") is None and importlib.util.find_spec("libtpu") is None


def _plain(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (str, int, float, bool, type(None), list))}


# -- throughput -----------------------------------------------------------------------------
def cmd_throughput(args) -> int:
    peer = _peer_for_shape(args, "throughput", 1, count=args.num_prompts) if args.hf_peer else None
    from jaxinfer.devices import datasheet, measure_ceilings

    model = _load(args)
    ceilings, spec = measure_ceilings(), datasheet()
    prompts = _prompts(model.config.vocab_size, args.num_prompts, args.input_len, args.seed)
    engine = _engine(model, args, max_num_seqs=min(256, args.num_prompts),
                     max_len=args.input_len + args.output_len, batched_tokens=8192)
    cost = _cost(model)
    # Warm-up and every run draw their own prompts: a repeated prompt would hit the prefix cache.
    _run_batch(engine, _prompts(model.config.vocab_size, 8, args.input_len, args.seed + 1_000_003), 4, "warm")
    runs = [_run_batch(engine, prompts if i == 0 else _prompts(model.config.vocab_size, args.num_prompts,
                                                                args.input_len, args.seed + i),
                       args.output_len, f"t{i}") for i in range(args.num_iters)]
    median = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
    profile = None
    if args.profile:  # one more whole run in a trace: where its kernel time goes, and its idle share
        from jaxinfer.bench.profile import profile_steps

        fresh = _prompts(model.config.vocab_size, args.num_prompts, args.input_len, args.seed + 7_777)
        profile = profile_steps(lambda: _run_batch(engine, fresh, args.output_len, "profile"), 1)
    seqs = engine.config.max_num_seqs
    waves = -(-args.num_prompts // seqs)
    floors = {basis: {"total_s": waves * f["total_s"]} for basis, f in
              _floors(cost, ceilings, spec, batch=min(seqs, args.num_prompts), input_len=args.input_len,
                      output_len=args.output_len).items()}
    result = {"seconds": median["seconds"], "runs": runs,
              "output_tokens_per_s": median["generated_tokens"] / median["seconds"],
              "total_tokens_per_s": args.num_prompts * (args.input_len + args.output_len) / median["seconds"],
              "floor": floors, **{f"fraction_of_{b}_floor": f["total_s"] / median["seconds"] for b, f in floors.items()}}
    if profile is not None:
        result["profile_of_one_run"] = profile
    if peer is not None:
        result["peer"] = peer
        if "seconds" in peer:
            result["speedup_vs_peer"] = peer["seconds"] / median["seconds"]
    record = {"benchmark": "throughput", **run_header(args.argv), "args": _plain(vars(args)), "ceilings": ceilings,
              "datasheet": dataclasses.asdict(spec) if spec else None, "result": result}
    basis = "datasheet" if spec else "measured"
    table = [f"{args.num_prompts} prompts x {args.input_len} in / {args.output_len} out, max_num_seqs {seqs}", "",
             "| seconds | output tok/s | total tok/s | floor (s) | of floor | HF (s) | speedup vs HF |",
             "|---|---|---|---|---|---|---|",
             f"| {median['seconds']:.2f} | {result['output_tokens_per_s']:.0f} | {result['total_tokens_per_s']:.0f} | "
             f"{floors[basis]['total_s']:.2f} | {result[f'fraction_of_{basis}_floor']:.2f} | "
             + (f"{peer['seconds']:.1f} | {result['speedup_vs_peer']:.1f}x |" if peer and "seconds" in peer
                else "- | - |")]
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}), flush=True)
    _save(record, args, "throughput", table)
    return 0


# -- startup --------------------------------------------------------------------------------
def _startup_phases(marks: dict[str, float], first: float) -> dict[str, float]:
    """Seconds of each phase from the child's marks (times since its start): interpreter and
    imports, weights, the engine's compilation and its first runs of every program (as the
    engine timed them), the rest of the engine's construction, the first request."""
    out = {"imports": marks.get("imports", float("nan"))}
    out["weights"] = marks.get("weights", float("nan")) - out["imports"]
    engine = marks.get("engine", float("nan")) - marks.get("weights", float("nan"))
    out["compile"] = marks.get("engine_compile", 0.0)
    out["first_runs"] = marks.get("engine_first_runs", 0.0)
    out["engine_other"] = engine - out["compile"] - out["first_runs"]
    out["first_request"] = first - marks.get("engine", float("nan"))
    return {k: round(v, 3) for k, v in out.items()}


def cmd_startup(args) -> int:
    """Runs `jaxinfer bench latency` twice in fresh processes sharing a new, empty cache
    directory: cold, then warm; each is timed from its start to its first token."""
    argv = [a for a in args.argv if a != "--hf-peer"]
    argv[argv.index("startup")] = "latency"
    times, phases = {}, {}
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, STARTUP_MARK: "1"}
        for kind in ("cold", "warm"):
            t0 = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-m", "jaxinfer.cli"] + argv + ["--compilation-cache-dir", cache],
                                    env=env, stdout=subprocess.PIPE, text=True)
            first, marks = None, {}
            for line in proc.stdout:
                words = line.strip().split(" ", 2)
                if words[0] != STARTUP_MARK:
                    continue
                now = time.perf_counter() - t0
                if len(words) == 1:
                    first = now
                else:
                    marks[words[1]] = now
                    if words[1] == "engine" and len(words) == 3:
                        marks.update({f"engine_{k}": v for k, v in json.loads(words[2]).items()})
            proc.wait()
            if proc.returncode != 0 or first is None:
                print(f"error: the {kind} start failed (exit {proc.returncode})", file=sys.stderr)
                return 1
            times[kind] = first
            phases[kind] = _startup_phases(marks, first)
            print(f"{kind} start to first token: {first:.1f} s ({phases[kind]})", flush=True)
    record = {"benchmark": "startup", **run_header(args.argv), "args": _plain(vars(args)),
              "cold_start_to_first_token_s": times["cold"], "warm_start_to_first_token_s": times["warm"],
              "phases_s": phases}
    names = list(phases["cold"])
    table = ["From process start (interpreter, imports, weights, compilation of every bucket) to the "
             "first generated token, and its phases (s).", "",
             "| start | total | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    table += [f"| {kind} | {times[kind]:.1f} | " + " | ".join(f"{phases[kind].get(n, float('nan')):.1f}" for n in names)
              + " |" for kind in ("cold", "warm")]
    _save(record, args, "startup", table)
    return 0
