"""Skinny (decode) matmul: weight-read bandwidth of XLA, the Pallas kernel and cuBLAS.

  PYTHONPATH=. python benchmarks/matmul.py --out DIR [--sweep]   # on a GPU (~4 min, ~8 with --sweep)
  PYTHONPATH=. python benchmarks/matmul.py --quick --out DIR     # CPU smoke run, interpret mode

At decode every projection is y[T, N] = x[T, K] @ W[K, N] with few tokens, so its cost is
reading W once. For the Llama-3-8B projections (qkv, o, gate|up, down) and T in 1..64, bf16:
  1. ceilings in the same run: a device copy (bytes read + written per second, from
     benchmarks/kernels.py) and an 8192^3 bf16 jnp.dot (TFLOP/s);
  2. cuBLAS through torch (F.linear on w [N, K], and x @ w[K, N]), CUDA-graph replays timed
     with CUDA events, in a subprocess run before JAX touches the GPU (skipped without torch);
  3. XLA jnp.dot(x, w) with w [K, N]; XLA x @ w.T with w stored [N, K] (torch's layout); the
     Pallas kernel with the table's (or the heuristic's) tiling, with its max relative error
     against the float32 reference;
  4. with --sweep, a sweep of tilings at T in {1, 16, 64}, compiled concurrently;
  5. the scan form: weights stacked [32, K, N] (qkv and down), a fori_loop over the layers doing
     dot(x, w[i]) (XLA) or skinny_matmul(x, w, i): does XLA copy w[i] inside the loop?

Timing as in benchmarks/kernels.py: warm-up, repeats of back-to-back calls over rotated input
sets (--sets, at least 3, so weights up to 235 MB come from HBM and not the 50 MB L2), median
over repeats; kernel time from a profiler trace. TB/s = K * N * 2 bytes of weight per call
over the kernel time (the wall time where no trace is available).
Writes matmul.json and matmul.md under --out.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks.kernels import copy_bandwidth, time_call, timings
from benchmarks.record import kernel_bench_parser, report_saver, run_header
from pallas_kernels.matmul import GpuMatmulBlockSizes, gpu_matmul_block_sizes, skinny_matmul
from pallas_kernels.matmul.reference import skinny_matmul_reference
from jaxinfer.devices import datasheet
from pallas_kernels.paged_attention.tuned_block_sizes import device_family

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
TOKENS = (1, 2, 4, 8, 16, 32, 64)
SWEEP_TOKENS = (1, 16, 64)
SCAN_SHAPES, SCAN_LAYERS, SCAN_TOKENS = ("qkv", "down"), 32, (1, 16, 64)
QUICK_SHAPES = {"qkv": (128, 192), "down": (256, 128)}
QUICK_TOKENS, QUICK_SCAN_LAYERS = (1, 3), 4
REL_ERR_OK = 1e-2  # bf16 outputs: max |out - ref| / max |ref|
DTYPE = jnp.bfloat16


# --- the cuBLAS peer (its own process, before JAX takes the GPU) -------------------------------

def cublas_peer(shapes, tokens, sets, iters, repeats):
    """F.linear(x, w[N, K]) and x @ w[K, N] through torch: median device µs per call of CUDA-graph
    replays of `iters` calls over rotated weight sets, timed with CUDA events."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return {"skipped": "torch is not installed"}
    if not torch.cuda.is_available():
        return {"skipped": f"torch {torch.__version__} sees no CUDA device"}
    torch.manual_seed(0)
    rows = []
    for name, (k, n) in shapes.items():
        w_nk = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(sets)]
        w_kn = [w.t().contiguous() for w in w_nk]
        for t in tokens:
            xs = [torch.randn(t, k, device="cuda", dtype=torch.bfloat16) for _ in range(sets)]
            for layout, fn, ws in (("nk", F.linear, w_nk), ("kn", torch.matmul, w_kn)):
                us, graphed = _torch_us_per_call(lambda i: fn(xs[i % sets], ws[i % sets]), iters, repeats)
                rows.append(dict(shape=name, k=k, n=n, tokens=t, layout=layout, us=us, cuda_graph=graphed))
        del w_nk, w_kn
        torch.cuda.empty_cache()
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(),
            "rows": rows}


def _torch_us_per_call(call, iters, repeats):
    import torch

    for i in range(3):
        call(i)
    torch.cuda.synchronize()
    try:  # a graph of `iters` calls: no launch gaps, like the profiler's kernel time
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for i in range(3):
                call(i)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(iters):
                call(i)
        run, graphed = graph.replay, True
    except Exception:  # noqa: BLE001 - plain launches then
        def run():
            for i in range(iters):
                call(i)
        graphed = False
    run()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / iters)
    return statistics.median(samples), graphed


def run_peer(args):
    cmd = [sys.executable, os.path.abspath(__file__), "--peer-only"] + [
        a for a in sys.argv[1:] if a != "--sweep"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode:
            return {"error": done.stderr[-2000:]}
        return json.loads(done.stdout.strip().splitlines()[-1])
    except Exception as e:  # noqa: BLE001 - the peer is optional
        return {"error": f"{type(e).__name__}: {e}"[:2000]}


# --- JAX side -------------------------------------------------------------------------------

def compile_all(jobs, workers):
    """{key: (fn, args)} -> {key: compiled function or the exception}, compiled concurrently
    (XLA and Triton release the GIL while compiling)."""
    def one(item):
        key, (fn, args) = item
        try:
            return key, jax.jit(fn).lower(*args).compile()
        except Exception as e:  # noqa: BLE001 - a tiling the compiler rejects is reported, not fatal
            return key, e

    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(pool.map(one, jobs.items()))


def max_rel_err(out, ref):
    out = np.asarray(out, np.float32)
    ref = np.asarray(ref, np.float32)
    if not np.all(np.isfinite(out)):
        return float("inf")
    return float(np.max(np.abs(out - ref))) / max(float(np.max(np.abs(ref))), 1e-30)


def random_sets(key, shape, sets, scale=1.0):
    keys = jax.random.split(key, sets)
    return [jax.random.normal(k, shape, DTYPE) * jnp.asarray(scale, DTYPE) for k in keys]


class Bench:
    """Timing settings and this run's ceilings."""

    def __init__(self, args, copy_tbs, datasheet_bps):
        self.args, self.copy_tbs, self.datasheet = args, copy_tbs, datasheet_bps

    def time(self, row, fn, arg_sets, weight_bytes):
        """Times fn over arg_sets into row (us, kernel_us, TB/s and fractions)."""
        try:
            sec, rec = timings(fn, arg_sets, self.args.iters, self.args.repeats, profile=not self.args.quick)
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {e}"[:1000]
            return row
        rec.pop("samples_us", None)
        row.update(rec)
        us = rec.get("kernel_us") or rec["us"]
        row["tbs"] = weight_bytes / us / 1e6
        row["tbs_wall"] = weight_bytes / rec["us"] / 1e6
        row["of_copy"] = row["tbs"] / self.copy_tbs
        if self.datasheet:
            row["of_datasheet"] = row["tbs"] * 1e12 / self.datasheet
        return row


def tiling(bs):
    return dict(block_n=bs.block_n, block_k=bs.block_k, split_k=bs.split_k, num_warps=bs.num_warps,
                num_stages=bs.num_stages, swap_ab=bs.swap_ab)


def sweep_tilings(k, n, default, tokens: int = 1):
    """~10 tilings around the default: tile shapes, warps, stages, operand order, split-K; at
    32 tokens and more also deeper pipelines and smaller splits (the dot's work per weight byte
    grows with T, so fewer, longer programs may keep more loads in flight)."""
    def split_for(block_n, block_k, programs=264):
        blocks = k // block_k
        divisors = [s for s in range(1, min(blocks, 32) + 1) if blocks % s == 0]
        return next((s for s in divisors if n // block_n * s >= programs), divisors[-1])

    out = [default]
    for bn, bk, warps, stages, swap in [(128, 64, 4, 4, True), (128, 128, 4, 3, True), (64, 128, 4, 4, True),
                                        (256, 64, 8, 3, True), (128, 64, 8, 4, True), (128, 64, 4, 4, False),
                                        (64, 256, 4, 3, True), (128, 32, 4, 6, True)]:
        if n % bn or k % bk:
            continue
        out.append(GpuMatmulBlockSizes(bn, bk, split_for(bn, bk), warps, stages, swap))
    if tokens >= 32:
        for bn, bk, warps, stages in [(64, 64, 4, 5), (64, 128, 4, 4), (64, 128, 8, 4), (128, 64, 8, 5),
                                      (128, 128, 8, 3), (64, 64, 4, 8)]:
            for split in (1, 2, 4):
                if n % bn == 0 and (k // bk) % split == 0:
                    out.append(GpuMatmulBlockSizes(bn, bk, split, warps, stages, True))
    else:  # deeper pipelines at the splits that fill the chip once or twice
        for bn, bk, warps, stages in [(64, 64, 4, 8), (128, 64, 4, 6), (128, 64, 4, 8), (64, 128, 4, 6),
                                      (128, 32, 4, 8)]:
            if n % bn or k % bk:
                continue
            for split in dict.fromkeys((split_for(bn, bk, 132), split_for(bn, bk))):
                out.append(GpuMatmulBlockSizes(bn, bk, split, warps, stages, True))
    blocks = k // default.block_k
    for split in (default.split_k * 2, default.split_k // 2):
        if split >= 1 and blocks % split == 0:
            out.append(GpuMatmulBlockSizes(default.block_n, default.block_k, split, default.num_warps,
                                           default.num_stages, default.swap_ab))
    return list(dict.fromkeys(out))  # unique, in order


def bench_shapes(args, bench, shapes, tokens, sweep, peer_us, interpret):
    rows = []
    rng = jax.random.key(int(time.time()))
    workers = min(16, os.cpu_count() or 1)
    for name, (k, n) in shapes.items():
        t_shape = time.perf_counter()
        rng, kw, kx = jax.random.split(rng, 3)
        w_kn = random_sets(kw, (k, n), args.sets, k ** -0.5)
        w_nk = [jnp.asarray(w.T) for w in w_kn]  # a transposed copy: stored [N, K]
        jax.block_until_ready(w_nk)
        weight_bytes = k * n * 2
        xs = {t: random_sets(jax.random.fold_in(kx, t), (t, k), args.sets) for t in tokens}
        jobs = {}
        for t in tokens:
            sets_kn = list(zip(xs[t], w_kn))
            jobs[(t, "xla", None)] = (lambda x, w: jnp.dot(x, w), sets_kn[0])
            jobs[(t, "xla_nk", None)] = (lambda x, w: x @ w.T, (xs[t][0], w_nk[0]))
            default = gpu_matmul_block_sizes(num_tokens=t, k=k, n=n, dtype=DTYPE,
                                             device_kind="interpret" if interpret else None)
            configs = [default]
            if sweep and t in (args.sweep_tokens if not interpret else tokens[:1]):
                configs = sweep_tilings(k, n, default, t)[: 3 if interpret else None]
            for i, bs in enumerate(configs):
                key = (t, "pallas" if i == 0 else "pallas_sweep", bs)
                jobs[key] = (lambda x, w, bs=bs: skinny_matmul(x, w, block_sizes=bs, interpret=interpret),
                             sets_kn[0])
        compiled = compile_all(jobs, workers)
        print(f"{name} [{k} x {n}]: compiled {len(jobs)} functions in {time.perf_counter() - t_shape:.1f} s",
              flush=True)
        for t in tokens:
            sets_kn = list(zip(xs[t], w_kn))
            ref = skinny_matmul_reference(*sets_kn[0])
            for (tt, impl, bs), fn in compiled.items():
                if tt != t:
                    continue
                row = dict(shape=name, k=k, n=n, tokens=t, impl=impl, weight_bytes=weight_bytes)
                if bs is not None:
                    row["tiling"] = tiling(bs)
                if isinstance(fn, Exception):
                    row["error"] = f"{type(fn).__name__}: {fn}"[:1000]
                else:
                    arg_sets = [(x, w) for x, w in zip(xs[t], w_nk)] if impl == "xla_nk" else sets_kn
                    try:
                        row["rel_err"] = max_rel_err(fn(*arg_sets[0]), ref)
                        row["ok"] = row["rel_err"] <= REL_ERR_OK
                    except Exception as e:  # noqa: BLE001
                        row["error"] = f"{type(e).__name__}: {e}"[:1000]
                    if "error" not in row:
                        bench.time(row, fn, arg_sets, weight_bytes)
                peer = peer_us.get((name, t, "nk"))
                if peer and "tbs" in row:
                    row["cublas_us"] = peer
                    row["vs_cublas"] = peer / (weight_bytes / row["tbs"] / 1e6)  # > 1: faster than cuBLAS
                rows.append(row)
                print("  " + row_line(row), flush=True)
        del w_kn, w_nk, xs, compiled
        print(f"{name}: {time.perf_counter() - t_shape:.1f} s", flush=True)
    return rows


def bench_scan(args, bench, shapes, tokens, layers, interpret):
    """fori_loop over stacked layers: XLA dot(x, w[i]) against skinny_matmul(x, w, i). One
    weight stack (it is far larger than L2 by itself), x rotated over the sets."""
    rows = []
    rng = jax.random.key(7)
    for name in SCAN_SHAPES:
        k, n = shapes[name]
        t0 = time.perf_counter()
        rng, kw, kx = jax.random.split(rng, 3)
        w = jax.random.normal(kw, (layers, k, n), DTYPE) * jnp.asarray(k ** -0.5, DTYPE)
        weight_bytes = layers * k * n * 2

        def xla(x, w):
            body = lambda i, acc: acc + jnp.dot(x, w[i]).astype(jnp.float32)
            return lax.fori_loop(0, w.shape[0], body, jnp.zeros((x.shape[0], w.shape[-1]), jnp.float32))

        def pallas(x, w):
            body = lambda i, acc: acc + skinny_matmul(x, w, i, interpret=interpret).astype(jnp.float32)
            return lax.fori_loop(0, w.shape[0], body, jnp.zeros((x.shape[0], w.shape[-1]), jnp.float32))

        for t in tokens:
            xs = random_sets(jax.random.fold_in(kx, t), (t, k), args.sets)
            compiled = compile_all({"xla_scan": (xla, (xs[0], w)), "pallas_scan": (pallas, (xs[0], w))}, 2)
            outs = {}
            for impl, fn in compiled.items():
                row = dict(shape=name, k=k, n=n, tokens=t, impl=impl, layers=layers, weight_bytes=weight_bytes)
                if isinstance(fn, Exception):
                    row["error"] = f"{type(fn).__name__}: {fn}"[:1000]
                    rows.append(row)
                    continue
                hlo = fn.as_text() or ""
                # A dynamic-slice left in the optimised HLO outside the Pallas call means XLA
                # slices (and may copy) w[i] each iteration.
                row["hlo_dynamic_slices"] = hlo.count("dynamic-slice(")
                outs[impl] = fn(xs[0], w)
                bench.time(row, fn, [(x, w) for x in xs], weight_bytes)
                if "kernel_us" in row and row.get("kernel_us"):
                    row["us_per_layer"] = row["kernel_us"] / layers
                rows.append(row)
            if len(outs) == 2:
                rows[-1]["rel_err_vs_xla_scan"] = max_rel_err(outs["pallas_scan"], outs["xla_scan"])
                rows[-1]["ok"] = rows[-1]["rel_err_vs_xla_scan"] <= REL_ERR_OK
            for row in rows[-len(compiled):]:
                print("  " + row_line(row), flush=True)
        del w
        print(f"scan {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    return rows


def row_line(r):
    head = f"{r['shape']:<8} T={r['tokens']:<3} {r['impl']:<13}"
    if "error" in r:
        return head + " ERROR " + r["error"][:300]
    t = r.get("tiling")
    tiling_s = "" if not t else (f" n{t['block_n']} k{t['block_k']} s{t['split_k']} w{t['num_warps']} "
                                 f"st{t['num_stages']}{'' if t['swap_ab'] else ' noswap'}")
    kernel = f"{r['kernel_us']:8.1f}" if r.get("kernel_us") else "       -"
    extra = f" vs cuBLAS {r['vs_cublas']:.2f}x" if "vs_cublas" in r else ""
    err = f" err {r['rel_err']:.1e}" if "rel_err" in r else ""
    return (f"{head} kernel {kernel} us  wall {r['us']:8.1f} us  {r['tbs']:5.2f} TB/s "
            f"({r['of_copy']:.0%} of copy){extra}{err}{tiling_s}")


def table_suggestions(rows, family):
    """`_GPU_TABLE` lines from the sweep: per (shape, token bucket), the tiling with the least
    total kernel time over the swept token counts of that bucket (T = 1 and 16 share bucket 16)."""
    from pallas_kernels.matmul.tuned_block_sizes import token_bucket

    swept_tokens = {(r["shape"], r["tokens"]) for r in rows if r["impl"] == "pallas_sweep"}
    totals = {}
    for r in rows:
        if (r["impl"] not in ("pallas", "pallas_sweep") or "tbs" not in r or not r.get("ok")
                or (r["shape"], r["tokens"]) not in swept_tokens):
            continue
        key = (r["shape"], r["k"], r["n"], token_bucket(r["tokens"]))
        cfg = tuple(sorted(r["tiling"].items()))
        totals.setdefault(key, {}).setdefault(cfg, {})[r["tokens"]] = r["weight_bytes"] / r["tbs"] / 1e6
    lines = []
    for (shape, k, n, bucket), by_cfg in totals.items():
        swept = max(len(t) for t in by_cfg.values())
        complete = {cfg: sum(t.values()) for cfg, t in by_cfg.items() if len(t) == swept}
        cfg = dict(min(complete, key=complete.get))
        lines.append(f'    ("{family}", {bucket}, {k}, {n}, "bfloat16"): GpuMatmulBlockSizes('
                     f'{cfg["block_n"]}, {cfg["block_k"]}, {cfg["split_k"]}, {cfg["num_warps"]}, '
                     f'{cfg["num_stages"]}, {cfg["swap_ab"]}),  # {shape}, {complete[min(complete, key=complete.get)]:.1f} us')
    return lines


def ceilings(args):
    nbytes = 1 << 20 if args.quick else 1 << 31
    copy_tbs = copy_bandwidth(nbytes, args.iters, args.repeats)
    m = 256 if args.quick else 8192
    a, b = (jax.random.normal(jax.random.key(i), (m, m), DTYPE) for i in (1, 2))
    sec, _ = time_call(jax.jit(jnp.dot), [(a, b)], max(2, args.iters // 4), args.repeats)
    return copy_tbs, 2 * m ** 3 / sec / 1e12


def markdown(report):
    ds = report.get("datasheet_bps")
    lines = [f"# Skinny matmul (decode projections): {report['device']}, JAX {report['jax']}, {report['date']}",
             "", f"`{report['command']}`", "",
             f"Ceilings in this run: copy {report['copy_tbs']:.2f} TB/s (read + written), datasheet "
             f"{ds / 1e12 if ds else float('nan'):.2f} TB/s, {report['matmul_tflops']:.0f} TFLOP/s "
             f"(8192^3 bf16 jnp.dot). cuBLAS peer: {report['peer'].get('torch', report['peer'])}.", "",
             "TB/s: weight bytes (K * N * 2) per kernel time (profiler; split-K rows include the "
             "partial-sum pass); vs cuBLAS: cuBLAS time (F.linear on w [N, K], CUDA graph) over ours, "
             "> 1 is faster than cuBLAS.", "",
             "| shape | T | impl | tiling | kernel µs | wall µs | TB/s | of copy | of datasheet | vs cuBLAS | "
             "max rel err |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"] + report.get("scan", []):
        t = r.get("tiling")
        tl = "" if not t else (f"n{t['block_n']} k{t['block_k']} s{t['split_k']} w{t['num_warps']} "
                               f"st{t['num_stages']}{'' if t['swap_ab'] else ' noswap'}")
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['tokens']} | {r['impl']} | {tl} | error: {r['error'][:80]} "
                         "| | | | | | |")
            continue
        err = r.get("rel_err", r.get("rel_err_vs_xla_scan"))
        lines.append(
            f"| {r['shape']} | {r['tokens']} | {r['impl']} | {tl} | {r.get('kernel_us') or 0:.1f} | {r['us']:.1f} | "
            f"{r['tbs']:.2f} | {r['of_copy']:.0%} | {r.get('of_datasheet', 0):.0%} | "
            f"{r.get('vs_cublas', float('nan')):.2f} | {'' if err is None else f'{err:.1e}'} |")
    if report.get("peer_rows"):
        lines += ["", "## cuBLAS (torch)", "", "| shape | T | layout | µs | TB/s |", "|---|---|---|---|---|"]
        lines += [f"| {r['shape']} | {r['tokens']} | {r['layout']} | {r['us']:.1f} | "
                  f"{r['k'] * r['n'] * 2 / r['us'] / 1e6:.2f} |" for r in report["peer_rows"]]
    return "\n".join(lines) + "\n"


def compact_table(report):
    """One line per (shape, T): TB/s of each implementation, best sweep tiling."""
    by = {}
    for r in report["rows"]:
        if "tbs" in r:
            cell = by.setdefault((r["shape"], r["tokens"]), {})
            if r["impl"] == "pallas_sweep":
                best = cell.get("sweep")
                cell["sweep"] = max(best or r, r, key=lambda x: x["tbs"])
            else:
                cell[r["impl"]] = r
    peer = {(r["shape"], r["tokens"], r["layout"]): r for r in report.get("peer_rows", [])}
    out = [f"{'shape':<8} {'T':>3} {'xla kn':>7} {'xla nk':>7} {'pallas':>7} {'cublas':>7} {'p/cub':>6} "
           f"{'sweep':>7}  (TB/s of weight reads, kernel time; copy ceiling {report['copy_tbs']:.2f})"]
    for (shape, t), cell in by.items():
        def f(impl):
            return f"{cell[impl]['tbs']:7.2f}" if impl in cell else "      -"
        p = peer.get((shape, t, "nk"))
        cub = f"{p['k'] * p['n'] * 2 / p['us'] / 1e6:7.2f}" if p else "      -"
        ratio = f"{cell['pallas']['vs_cublas']:6.2f}" if "pallas" in cell and "vs_cublas" in cell["pallas"] else "     -"
        sweep = ""
        if "sweep" in cell:
            s = cell["sweep"]
            tl = s["tiling"]
            sweep = (f"{s['tbs']:7.2f}  n{tl['block_n']} k{tl['block_k']} s{tl['split_k']} w{tl['num_warps']} "
                     f"st{tl['num_stages']}{'' if tl['swap_ab'] else ' noswap'}")
        out.append(f"{shape:<8} {t:>3} {f('xla')} {f('xla_nk')} {f('pallas')} {cub} {ratio} {sweep}")
    for r in report.get("scan", []):
        if "tbs" in r:
            out.append(f"scan {r['shape']:<8} T={r['tokens']:<3} {r['impl']:<12} {r['tbs']:6.2f} TB/s "
                       f"({r.get('us_per_layer') or r['us'] / r['layers']:.1f} us/layer, "
                       f"{r['hlo_dynamic_slices']} dynamic-slices in HLO)")
    return "\n".join(out)


def main():
    parser = kernel_bench_parser(__doc__.split("\n")[0], iters=20)
    parser.set_defaults(repeats=5, sets=3)
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="token counts to time")
    parser.add_argument("--sweep-tokens", default=",".join(map(str, SWEEP_TOKENS)),
                        help="token counts at which --sweep tries tilings")
    parser.add_argument("--no-peer", action="store_true", help="skip the cuBLAS (torch) peer")
    parser.add_argument("--no-scan", action="store_true", help="skip the stacked-weight loop")
    parser.add_argument("--peer-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    tokens = tuple(int(t) for t in args.tokens.split(","))
    args.sweep_tokens = tuple(int(t) for t in args.sweep_tokens.split(","))
    shapes = SHAPES
    args.sets = max(3, args.sets)  # weights rotated so that none is served from L2
    if args.quick:
        args.iters, args.repeats, args.sets = 2, 2, 3
        shapes, tokens = QUICK_SHAPES, QUICK_TOKENS
    if args.peer_only:
        print(json.dumps(cublas_peer(shapes, tokens, args.sets, args.iters, args.repeats)))
        return 0

    t_start = time.perf_counter()
    # In its own process and before JAX touches the GPU: the two allocators cannot share it.
    peer = {"skipped": "--no-peer"} if args.no_peer else run_peer(args)
    print("peer:", {k: v for k, v in peer.items() if k != "rows"}, f"({time.perf_counter() - t_start:.0f} s)",
          flush=True)
    report = run_header()
    print(report, flush=True)
    save = report_saver(report, args.out, "matmul.json")
    family = device_family()
    spec = datasheet()
    report.update(family=family, datasheet_bps=spec.memory_bytes_per_s if spec else None, peer={
        k: v for k, v in peer.items() if k != "rows"}, peer_rows=peer.get("rows", []))
    report["copy_tbs"], report["matmul_tflops"] = ceilings(args)
    print(f"copy {report['copy_tbs']:.2f} TB/s, matmul {report['matmul_tflops']:.0f} TFLOP/s "
          f"({time.perf_counter() - t_start:.0f} s)", flush=True)
    save()
    peer_us = {(r["shape"], r["tokens"], r["layout"]): r["us"] for r in report["peer_rows"]}
    bench = Bench(args, report["copy_tbs"], report["datasheet_bps"])
    report["rows"] = bench_shapes(args, bench, shapes, tokens, args.sweep, peer_us, interpret=args.quick)
    save()
    print(f"shapes done ({time.perf_counter() - t_start:.0f} s)", flush=True)
    report["scan"] = [] if args.no_scan else bench_scan(
        args, bench, shapes, QUICK_TOKENS[:1] if args.quick else SCAN_TOKENS,
        QUICK_SCAN_LAYERS if args.quick else SCAN_LAYERS, interpret=args.quick)
    report["seconds"] = time.perf_counter() - t_start
    save()
    with open(os.path.join(args.out, "matmul.md"), "w") as f:
        f.write(markdown(report))
    if args.sweep:
        report["table_suggestions"] = table_suggestions(report["rows"], report["family"])
        save()
        print("\nSuggested _GPU_TABLE entries (pallas_kernels/matmul/tuned_block_sizes.py):")
        print("\n".join(report["table_suggestions"]))
    print(compact_table(report))
    print(f"total {report['seconds']:.0f} s")
    bad = [r for r in report["rows"] + report["scan"] if r.get("ok") is False]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
