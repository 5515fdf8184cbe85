"""Correctness on the device, then timings of the paged attention kernels.

  PYTHONPATH=. python benchmarks/kernels.py --out DIR [--sweep]   # on a GPU
  PYTHONPATH=. python benchmarks/kernels.py --quick --out DIR     # CPU smoke run, interpret mode

1. Correctness: each kernel against its reference on fresh random inputs (NaN in unused pages,
   permuted page ids), several dtypes and options.
2. The ceiling: a device-to-device copy (bytes read + written per second).
3. P4 decode (batch 64, context 2048, 32 q / 8 kv heads, head_dim 128, bf16): ours (a sweep of
   tilings with --sweep), the stock jax.experimental.pallas.ops.gpu.paged_attention and the
   pure-XLA reference, as TB/s of KV read and fraction of the datasheet floor; other page sizes.
4. The ragged kernel on decodes only (56 at context 2048; with --ragged-batches also the 8B
   engine's batch-64 decode at its mean context, 64 at 384), prefill chunks only, and a mixed
   batch (8 prefill chunks of 512 + 56 decodes at context 2048).

Timing: warm-up, then repeats of back-to-back calls over rotated input sets (the KV of one
set is larger than L2), median over repeats, block_until_ready at the end of each repeat.
Writes kernels.json and kernels.md under --out.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.record import kernel_bench_parser, report_saver, run_header
from jaxinfer.devices import datasheet
from pallas_kernels.common import next_power_of_2
from pallas_kernels.paged_attention import gpu as decode_gpu
from pallas_kernels.paged_attention.reference import paged_attention_reference
from pallas_kernels.paged_attention.tuned_block_sizes import GpuDecodeBlockSizes
from pallas_kernels.ragged_paged_attention import gpu as ragged_gpu
from pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention_reference
from pallas_kernels.ragged_paged_attention.tuned_block_sizes import GpuRaggedBlockSizes



def datasheet_tbs() -> float:
    """HBM bandwidth of this device from the datasheet table (jaxinfer.devices), TB/s; the H100's
    3.35 where the table has no row (the CPU of a --quick run, whose fractions mean nothing)."""
    spec = datasheet()
    return spec.memory_bytes_per_s / 1e12 if spec else 3.35


DATASHEET_TBS = datasheet_tbs()


def make_cache(rng, num_kv_heads, num_pages, page_size, head_dim, dtype, used_pages):
    """Random K, V pages; pages not in used_pages are NaN (page 0 included)."""
    shape = (num_kv_heads, num_pages, page_size, head_dim)
    k = rng.standard_normal(shape, dtype=np.float32)
    v = rng.standard_normal(shape, dtype=np.float32)
    unused = np.setdiff1d(np.arange(num_pages), used_pages)
    k[:, unused] = np.nan
    v[:, unused] = np.nan
    return jnp.asarray(k, dtype), jnp.asarray(v, dtype)


def make_tables(rng, lens, pages_per_seq, page_size, num_pages):
    """Block tables over a random permutation of pages 1..num_pages-1; slots past each
    sequence's last page hold out-of-range garbage."""
    perm = rng.permutation(np.arange(1, num_pages))
    tables = np.full((len(lens), pages_per_seq), 2**30, np.int32)
    used, cursor = [], 0
    for i, n in enumerate(lens):
        need = -(-int(n) // page_size)
        tables[i, :need] = perm[cursor:cursor + need]
        used.extend(perm[cursor:cursor + need])
        cursor += need
    return tables, np.array(used, np.int64)


def rel_err(out, ref):
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    if not np.all(np.isfinite(out)):
        return float("inf")
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def decode_case(rng, *, batch, num_heads, num_kv_heads, head_dim, page_size, lens, dtype):
    pages_per_seq = max(1, -(-max(lens) // page_size)) + 1
    num_pages = batch * pages_per_seq + 2
    tables, used = make_tables(rng, lens, pages_per_seq, page_size, num_pages)
    k, v = make_cache(rng, num_kv_heads, num_pages, page_size, head_dim, dtype, used)
    q = jnp.asarray(rng.standard_normal((batch, num_heads, head_dim), dtype=np.float32), dtype)
    return q, k, v, jnp.asarray(tables), jnp.asarray(np.array(lens, np.int32))


def ragged_case(rng, *, q_lens, kv_lens, num_heads, num_kv_heads, head_dim, page_size, dtype,
                pad_tokens=3, pad_seqs=2):
    s = len(q_lens) + pad_seqs
    kv_all = list(kv_lens) + [0] * pad_seqs
    pages_per_seq = max(1, -(-max(kv_lens) // page_size)) + 1
    num_pages = s * pages_per_seq + 2
    tables, used = make_tables(rng, kv_all, pages_per_seq, page_size, num_pages)
    k, v = make_cache(rng, num_kv_heads, num_pages, page_size, head_dim, dtype, used)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    cu = np.concatenate([cu, np.full(pad_seqs, cu[-1], np.int32)])
    t = int(cu[-1]) + pad_tokens
    q = jnp.asarray(rng.standard_normal((t, num_heads, head_dim), dtype=np.float32), dtype)
    return (q, k, v, jnp.asarray(np.array(kv_all, np.int32)), jnp.asarray(tables), jnp.asarray(cu),
            jnp.asarray(np.array([len(q_lens)], np.int32)))


def check_correctness(rng, interpret):
    """Returns rows {kernel, case, rel_err, ok}; the tolerance is keyed by dtype."""
    tol = {jnp.float32: 1e-4, jnp.bfloat16: 2e-2}
    rows = []
    decode_cases = [
        ("bf16 GQA G=4 ps16", dict(batch=6, num_heads=32, num_kv_heads=8, head_dim=128,
                                    page_size=16, lens=[0, 1, 15, 16, 17, 700], dtype=jnp.bfloat16), {}),
        ("bf16 G=4 window+softcap", dict(batch=4, num_heads=32, num_kv_heads=8, head_dim=128,
                                         page_size=16, lens=[5, 64, 300, 1000], dtype=jnp.bfloat16),
         dict(sliding_window=100, logit_softcap=30.0)),
        ("f32 MHA ps32", dict(batch=3, num_heads=4, num_kv_heads=4, head_dim=64, page_size=32,
                              lens=[1, 33, 200], dtype=jnp.float32), {}),
        ("bf16 G=6 ps64", dict(batch=3, num_heads=12, num_kv_heads=2, head_dim=128, page_size=64,
                               lens=[63, 64, 500], dtype=jnp.bfloat16), {}),
    ]
    for name, shape, opts in decode_cases:
        q, k, v, tables, lens = decode_case(rng, **shape)
        ref = paged_attention_reference(q, k, v, tables, lens, scale=0.088, **opts)
        for bs in (None, GpuDecodeBlockSizes(pages_per_block=2, num_splits=3)):
            out = decode_gpu.paged_attention(q, k, v, tables, lens, scale=0.088, block_sizes=bs,
                                             interpret=interpret, **opts)
            err = rel_err(out, ref)
            rows.append(dict(kernel="paged_attention", case=f"{name} bs={bs}", rel_err=err,
                             ok=err < tol[shape["dtype"]]))
    ragged_cases = [
        ("bf16 G=4 mixed", dict(q_lens=[37, 1, 1, 16, 1], kv_lens=[100, 1, 530, 16, 17],
                                num_heads=32, num_kv_heads=8, head_dim=128, page_size=16,
                                dtype=jnp.bfloat16), {}),
        ("bf16 G=4 window+softcap", dict(q_lens=[20, 1, 5], kv_lens=[300, 77, 5], num_heads=32,
                                         num_kv_heads=8, head_dim=128, page_size=16,
                                         dtype=jnp.bfloat16), dict(sliding_window=50, logit_softcap=30.0)),
        ("f32 MHA", dict(q_lens=[9, 1, 3], kv_lens=[9, 40, 70], num_heads=4, num_kv_heads=4,
                         head_dim=64, page_size=32, dtype=jnp.float32), {}),
    ]
    for name, shape, opts in ragged_cases:
        args = ragged_case(rng, **shape)
        ref = ragged_paged_attention_reference(*args, scale=0.088, **opts)
        n_real = int(args[5][len(shape["q_lens"])])
        for bs in (None, GpuRaggedBlockSizes(queries_per_block=16, pages_per_block=2, short_query_len=16,
                                                 short_pages_per_block=4)):
            out = ragged_gpu.ragged_paged_attention(*args, scale=0.088, block_sizes=bs,
                                                    interpret=interpret, **opts)
            err = rel_err(out[:n_real], ref[:n_real])
            pad_ok = bool(np.all(np.isfinite(np.asarray(out[n_real:], np.float32))))
            rows.append(dict(kernel="ragged_paged_attention", case=f"{name} bs={bs}", rel_err=err,
                             ok=err < tol[shape["dtype"]] and pad_ok))
    return rows


def time_call(fn, arg_sets, iters, repeats):
    """Median seconds per call of back-to-back calls over rotated argument sets."""
    for args in arg_sets:
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(iters):
            out = fn(*arg_sets[i % len(arg_sets)])
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / iters)
    return statistics.median(samples), samples


def device_us_per_call(fn, arg_sets, iters):
    """Kernel time per call on the device: the durations of all kernels the calls launched,
    summed from a JAX profiler trace (CUPTI activity records on the GPU's stream lines) and
    divided by the number of calls. Launch gaps and host time are not in it. None where the
    trace holds no kernel (e.g. on the CPU)."""
    import glob
    import tempfile

    for args in arg_sets:
        jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            for i in range(iters):
                out = fn(*arg_sets[i % len(arg_sets)])
            jax.block_until_ready(out)
        paths = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
        if not paths:
            return None
        data = jax.profiler.ProfileData.from_file(paths[0])
        kernels = [e.duration_ns for plane in data.planes if "GPU" in plane.name for line in plane.lines
                   if line.name.startswith("Stream") for e in line.events
                   if not e.name.lower().startswith(("memcpy", "memset"))]
    return sum(kernels) / iters / 1e3 if kernels else None


def timings(fn, arg_sets, iters, repeats, profile=True):
    """(seconds per call, record). us: median over repeats of back-to-back calls dispatched from
    Python (wall clock, so the first dispatch and the final sync are spread over `iters` calls);
    kernel_us: kernel time per call from a profiler trace (device_us_per_call)."""
    sec, samples = time_call(fn, arg_sets, iters, repeats)
    record = dict(us=sec * 1e6, samples_us=[x * 1e6 for x in samples])
    if profile:
        record["kernel_us"] = device_us_per_call(fn, arg_sets, iters)
    return sec, record


def copy_bandwidth(nbytes, iters, repeats):
    """A large elementwise pass: bytes read + written per second."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal(nbytes // 2, dtype=np.float32),
                    jnp.bfloat16)
    step = jax.jit(lambda a: a * jnp.bfloat16(-1))
    sec, _ = time_call(step, [(x,)], iters, repeats)
    return 2 * x.nbytes / sec / 1e12


def decode_inputs(rng, *, batch, context, num_heads, num_kv_heads, head_dim, page_size, dtype, sets):
    pages_per_seq = context // page_size
    num_pages = batch * pages_per_seq + 1
    out = []
    for _ in range(sets):
        perm = rng.permutation(np.arange(1, num_pages)).astype(np.int32)
        tables = jnp.asarray(perm.reshape(batch, pages_per_seq))
        shape = (num_kv_heads, num_pages, page_size, head_dim)
        k = jax.random.normal(jax.random.key(int(rng.integers(1 << 30))), shape, dtype)
        v = jax.random.normal(jax.random.key(int(rng.integers(1 << 30))), shape, dtype)
        q = jax.random.normal(jax.random.key(int(rng.integers(1 << 30))), (batch, num_heads, head_dim), dtype)
        lens = jnp.full((batch,), context, jnp.int32)
        out.append((q, k, v, tables, lens))
    return out


def bench_decode(rng, args, page_sizes, sweep):
    from jax.experimental.pallas.ops.gpu import paged_attention as stock
    shape = dict(batch=64, context=2048, num_heads=32, num_kv_heads=8, head_dim=128, dtype=jnp.bfloat16)
    if args.quick:
        shape = dict(batch=2, context=64, num_heads=8, num_kv_heads=2, head_dim=32, dtype=jnp.float32)
    kv_bytes = (shape["batch"] * shape["context"] * shape["num_kv_heads"] * shape["head_dim"] * 2
                * jnp.dtype(shape["dtype"]).itemsize)
    scale = shape["head_dim"] ** -0.5
    rows = []

    def record(name, page_size, fn, inputs, **extra):
        try:
            sec, times = timings(fn, inputs, args.iters, args.repeats, profile=not args.quick)
        except Exception as e:  # a tiling the compiler rejects is reported, not fatal
            rows.append(dict(name=name, page_size=page_size, error=f"{type(e).__name__}: {e}"[:300], **extra))
            print(f"  {name} ps={page_size}: FAILED {type(e).__name__}", flush=True)
            return
        tbs = kv_bytes / sec / 1e12
        rows.append(dict(name=name, page_size=page_size, kv_tbs=tbs, floor_frac=tbs / DATASHEET_TBS, **times,
                         **extra))
        if times.get("kernel_us"):
            rows[-1]["kv_tbs_kernel"] = kv_bytes / times["kernel_us"] / 1e6
        print(f"  {name:<44} ps={page_size:<3} {sec * 1e6:9.1f} us  {tbs:5.2f} TB/s; kernel time "
              f"{times.get('kernel_us')} us", flush=True)

    for page_size in page_sizes:
        inputs = decode_inputs(rng, page_size=page_size, sets=args.sets, **shape)
        ours = [None]
        if sweep and page_size == page_sizes[0]:
            # (tokens per inner step, splits, warps, stages): every tile size at each pipelining
            # depth, and split-K to more programs per SM.
            grid = [(tok, 1, w, st) for tok in (32, 64, 128, 256) for w in (4, 8) for st in (2, 3, 4)
                    if not (tok == 256 and st == 4)]
            grid += [(64, 2, 4, 3), (128, 2, 4, 3)]
            ours += [GpuDecodeBlockSizes(pages_per_block=max(1, tok // page_size), num_splits=sp,
                                         num_warps=w, num_stages=st) for tok, sp, w, st in grid]
        if page_size == page_sizes[0]:
            ours.append(None)  # the default again: the spread between the two is the noise
        for bs in ours:
            fn = jax.jit(lambda q, k, v, t, l, bs=bs: decode_gpu.paged_attention(
                q, k, v, t, l, scale=scale, block_sizes=bs, interpret=args.quick))
            label = "ours default" if bs is None else (
                f"ours tok={bs.pages_per_block * page_size} sp={bs.num_splits} w={bs.num_warps} "
                f"st={bs.num_stages}")
            record(label, page_size, fn, inputs,
                   block_sizes=None if bs is None else bs.__dict__)
        stock_configs = [dict()]
        if sweep and page_size == page_sizes[0]:
            stock_configs.append(dict(pages_per_compute_block=4, k_splits=4, num_warps=4))
        for cfg in stock_configs:
            if args.quick:
                cfg = dict(cfg, k_splits=1, interpret=True)
            fn = jax.jit(lambda q, k, v, t, l, cfg=cfg: stock.paged_attention(q * scale, k, v, t, l, **cfg))
            record("stock " + (",".join(f"{a}={b}" for a, b in cfg.items()) or "default"), page_size,
                   fn, inputs, config=cfg)
        if page_size == page_sizes[0]:
            fn = jax.jit(lambda q, k, v, t, l: paged_attention_reference(q, k, v, t, l, scale=scale))
            record("xla reference", page_size, fn, inputs[:1])
    return dict(shape={k: (jnp.dtype(v).name if k == "dtype" else v) for k, v in shape.items()},
                kv_bytes=kv_bytes, rows=rows)


def ragged_sweep_grids(page_size):
    """Tilings to sweep per batch. Decodes only use the short tile and prefill chunks only the
    long one, so each is swept alone (the other tile at the default); the mixed batch then takes
    the two winners together, under either winner's warps and stages (one launch has one of each).
    Returns (short grid, long grid), each of (rows, tokens per step, warps, stages)."""
    short = [(rows, tok, w, st) for rows in (16, 32) for tok in (32, 64, 128, 256) for w in (4, 8)
             for st in (2, 3, 4) if not (tok == 256 and st == 4) and not (rows == 32 and w == 4)]
    long_ = [(rows, tok, w, st) for rows, tok in ((64, 32), (64, 64), (128, 32), (128, 64), (128, 128))
             for w, st in ((4, 2), (4, 3), (8, 2), (8, 3))]
    return short, long_


def bench_ragged(rng, args, sweep):
    heads = dict(num_heads=32, num_kv_heads=8, head_dim=128, page_size=16, dtype=jnp.bfloat16)
    # Decodes only and prefill chunks only come first: with --sweep their winners make the
    # mixed batch's candidates.
    batches = {"decodes only": ([1] * 56, [2048] * 56),
               "prefill chunks only": ([512] * 8, [1024] * 8),
               "mixed": ([512] * 8 + [1] * 56, [1024] * 8 + [2048] * 56)}
    # the engine's batch-64 decode (128 in / 512 out) at its mean context
    batches = {"decodes at context 384": ([1] * 64, [384] * 64), **batches}
    batches = {name: b for name, b in batches.items()
               if name.split(" ")[0] in args.ragged_batches.split(",") or name in args.ragged_batches.split(",")}
    if args.quick:
        heads = dict(num_heads=8, num_kv_heads=2, head_dim=32, page_size=8, dtype=jnp.float32)
        batches = {"mixed": ([16, 1, 1], [32, 64, 40])}
    scale = heads["head_dim"] ** -0.5
    page_size = heads["page_size"]
    group_pad = next_power_of_2(heads["num_heads"] // heads["num_kv_heads"])
    default = ragged_gpu.gpu_ragged_block_sizes(
        group=heads["num_heads"] // heads["num_kv_heads"], head_dim=heads["head_dim"],
        page_size=page_size, dtype=heads["dtype"], device_kind="interpret" if args.quick else None)
    short_grid, long_grid = ragged_sweep_grids(page_size)

    def sizes(long_rows, long_tok, short_rows, short_tok, w, st):
        return GpuRaggedBlockSizes(
            queries_per_block=max(1, long_rows // group_pad), pages_per_block=max(1, long_tok // page_size),
            short_query_len=max(1, short_rows // group_pad),
            short_pages_per_block=max(1, short_tok // page_size), num_warps=w, num_stages=st)

    d_long = (default.queries_per_block * group_pad, default.pages_per_block * page_size)
    d_short = (default.short_query_len * group_pad, default.short_pages_per_block * page_size)
    rows_out = []
    best = {}  # batch name -> (seconds, block sizes)
    for batch_name, (q_lens, kv_lens) in batches.items():
        inputs = [ragged_case(rng, q_lens=q_lens, kv_lens=kv_lens, pad_tokens=0, pad_seqs=0, **heads)
                  for _ in range(args.sets)]
        kv_bytes = (sum(kv_lens) * heads["num_kv_heads"] * heads["head_dim"] * 2
                    * jnp.dtype(heads["dtype"]).itemsize)
        configs = [None]
        if sweep and batch_name.startswith("decodes"):
            configs += [sizes(*d_long, *tile) for tile in short_grid]
        elif sweep and batch_name == "prefill chunks only":
            configs += [sizes(rows, tok, *d_short, w, st) for rows, tok, w, st in long_grid]
        elif sweep and batch_name == "mixed" and {"decodes only", "prefill chunks only"} <= best.keys():
            s, l = best["decodes only"][1], best["prefill chunks only"][1]
            for launch in (s, l):
                configs.append(dataclasses.replace(
                    l, short_query_len=s.short_query_len, short_pages_per_block=s.short_pages_per_block,
                    num_warps=launch.num_warps, num_stages=launch.num_stages))
        for bs in configs:
            fn = jax.jit(lambda *a, bs=bs: ragged_gpu.ragged_paged_attention(
                *a, scale=scale, block_sizes=bs, interpret=args.quick))
            label = f"{batch_name}: ours " + ("default" if bs is None else (
                f"q={bs.queries_per_block} tok={bs.pages_per_block * page_size} "
                f"short_q={bs.short_query_len} short_tok={bs.short_pages_per_block * page_size} "
                f"w={bs.num_warps} st={bs.num_stages}"))
            try:
                sec, times = timings(fn, inputs, args.iters, args.repeats, profile=not args.quick)
            except Exception as e:
                rows_out.append(dict(name=label, error=f"{type(e).__name__}: {e}"[:300]))
                print(f"  {label}: FAILED {type(e).__name__}", flush=True)
                continue
            tbs = kv_bytes / sec / 1e12
            rows_out.append(dict(name=label, batch=batch_name, kv_bytes=kv_bytes, kv_tbs=tbs,
                                 floor_frac=tbs / DATASHEET_TBS, **times,
                                 block_sizes=(bs or default).__dict__))
            ranked = times.get("kernel_us") or sec * 1e6
            if batch_name not in best or ranked < best[batch_name][0]:
                best[batch_name] = (ranked, bs or default)
            print(f"  {label:<72} {sec * 1e6:9.1f} us  {tbs:5.2f} TB/s (KV read once); kernel time "
                  f"{times.get('kernel_us')} us", flush=True)
    return dict(batches={k: dict(q_lens=f"{len(v[0])} seqs, {sum(v[0])} query tokens",
                                 kv_lens=f"{sum(v[1])} cached tokens") for k, v in batches.items()},
                heads={k: (jnp.dtype(v).name if k == "dtype" else v) for k, v in heads.items()},
                best={k: dict(us=v[0], block_sizes=v[1].__dict__) for k, v in best.items()},
                rows=rows_out)


def markdown(report):
    lines = [f"# Kernel benchmarks: {report['device']} ({report['date']})", "",
             f"jax {report['jax']}; `{report['command']}`", "",
             f"Copy ceiling (bytes read + written): {report['copy_tbs']:.2f} TB/s; datasheet {DATASHEET_TBS} TB/s.", "",
             "## Correctness on the device (relative L2 error vs the float32 reference)", "",
             "| kernel | case | rel err | ok |", "|---|---|---|---|"]
    lines += [f"| {r['kernel']} | {r['case']} | {r['rel_err']:.2e} | {r['ok']} |" for r in report["correctness"]]
    d = report.get("decode", dict(rows=[]))
    if "shape" in d:
        lines += ["", f"## Paged decode, {d['shape']}", "",
                  f"KV bytes per call: {d['kv_bytes'] / 1e6:.1f} MB; floor at {DATASHEET_TBS} TB/s: "
                  f"{d['kv_bytes'] / DATASHEET_TBS / 1e6:.1f} us", "",
                  "Kernel µs: kernel time per call from a profiler trace (CUPTI) of back-to-back calls; "
                  "wall µs: the calls dispatched back to back from Python, timed by the host clock.", "",
                  "| kernel | page size | kernel µs | kernel TB/s | of floor | wall µs | wall TB/s |",
                  "|---|---|---|---|---|---|---|"]
        ok_rows = sorted((r for r in d["rows"] if "us" in r),
                         key=lambda r: (r["page_size"], r.get("kernel_us") or r["us"]))

        def kernel_cols(r):
            if not r.get("kernel_us"):
                return " | | "
            return f"{r['kernel_us']:.1f} | {r['kv_tbs_kernel']:.2f} | {r['kv_tbs_kernel'] / DATASHEET_TBS:.0%}"

        lines += [f"| {r['name']} | {r['page_size']} | {kernel_cols(r)} | {r['us']:.1f} | {r['kv_tbs']:.2f} |"
                  for r in ok_rows]
    g = report["ragged"]
    lines += ["", "## Ragged batches (32 q / 8 kv heads, head_dim 128, bf16, page 16; prefill chunks "
              "of 512 at context 1024, decodes at context 2048 unless the batch says otherwise)", "",
              "| batch | kernel | kernel µs | wall µs | KV MB (once) | TB/s KV (wall) | of floor |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['name'].split(': ', 1)[1]} | {r.get('kernel_us') or 0:.1f} | {r['us']:.1f} | "
              f"{r['kv_bytes'] / 1e6:.1f} | {r['kv_tbs']:.2f} | {r['floor_frac']:.0%} |"
              for r in sorted((r for r in g["rows"] if "us" in r), key=lambda r: (r["batch"], r["us"]))]
    failed = [r for r in d["rows"] + g["rows"] if "error" in r]
    if failed:
        lines += ["", "Failed to compile or run: " + "; ".join(f"{r['name']}: {r['error'][:80]}" for r in failed)]
    return "\n".join(lines) + "\n"


def main():
    parser = kernel_bench_parser(__doc__.split("\n")[0], iters=100)
    parser.add_argument("--page-sizes", default="16,32,64")
    parser.add_argument("--ragged-batches", default="decodes only,prefill,mixed",
                        help="ragged batches to time, by name or first word: 'decodes only' (56 at "
                             "context 2048), 'decodes at context 384' (64), prefill, mixed")
    parser.add_argument("--ragged-only", action="store_true", help="skip the paged decode kernel (P4)")
    args = parser.parse_args()
    if args.quick:
        args.iters, args.repeats, args.sets = 2, 2, 1
    rng = np.random.default_rng(int(time.time()))
    report = run_header()
    print(report, flush=True)
    save = report_saver(report, args.out, "kernels.json")

    print("correctness", flush=True)
    report["correctness"] = check_correctness(rng, interpret=args.quick)
    for r in report["correctness"]:
        print(f"  {r['kernel']:<24} {r['case']:<90} {r['rel_err']:.2e} {'ok' if r['ok'] else 'FAIL'}", flush=True)
    report["copy_tbs"] = copy_bandwidth(1 << 20 if args.quick else 1 << 31, args.iters, args.repeats)
    print(f"copy ceiling {report['copy_tbs']:.2f} TB/s", flush=True)
    save()
    print("decode", flush=True)
    page_sizes = [int(p) for p in args.page_sizes.split(",")]
    if not args.ragged_only:
        report["decode"] = bench_decode(rng, args, page_sizes if not args.quick else [8], args.sweep)
        save()
    print("ragged", flush=True)
    report["ragged"] = bench_ragged(rng, args, args.sweep)
    save()
    with open(os.path.join(args.out, "kernels.md"), "w") as f:
        f.write(markdown(report))
    print(markdown(report))
    return 0 if all(r["ok"] for r in report["correctness"]) else 1


if __name__ == "__main__":
    sys.exit(main())
