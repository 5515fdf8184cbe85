"""Quantized skinny (decode) matmul: time and stored-weight bandwidth per format, against bf16.

  PYTHONPATH=. python benchmarks/quantized_matmul.py --out DIR [--sweep]   # on a GPU
  PYTHONPATH=. python benchmarks/quantized_matmul.py --quick --out DIR     # CPU smoke run

For the Llama-3-8B projections (qkv, o, gate|up, down) and T in {1, 16, 64}, each weight in
bf16 and as int8 (per channel), int4 (groups of 128, with offsets) and fp8 (e4m3, per
channel), the layouts jaxinfer/quantization.py makes: the Pallas kernel (the quantized one, or
the dense skinny kernel for bf16) and the XLA path the engine takes above 64 tokens (the
weight dequantized inside the jitted call, then jnp.dot). Rows give the kernel time, TB/s of
*stored* bytes (codes + scales + offsets), the speedup over the bf16 Pallas kernel at the same
shape and T, and the error against the float32 reference of the same quantized weight.
With --sweep, a few tilings around the heuristic's at T = 1 and 16.
Timing as benchmarks/matmul.py (rotated input sets, kernel time from a profiler trace).
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp

from benchmarks.kernels import timings
from benchmarks.matmul import SHAPES, compile_all, max_rel_err, random_sets
from benchmarks.record import close_report, kernel_bench_parser, report_saver, run_header
from jaxinfer.devices import datasheet
from jaxinfer.quantization import QuantizedWeight, dequantize_weight, quantize_weight
from pallas_kernels.matmul import GpuMatmulBlockSizes, skinny_matmul
from pallas_kernels.quantized_matmul import quantized_block_sizes, quantized_matmul, quantized_matmul_reference
from pallas_kernels.quantized_matmul.gpu import REDUCE_MAX_TOKENS
from pallas_kernels.quantized_matmul.tuned_block_sizes import programs_to_fill, split_to_fill
from pallas_kernels.quantized_matmul.w8a8 import quantize_activations, w8a8_matmul, w8a8_reference
from pallas_kernels.quantized_matmul.w8a8 import default_block_sizes as w8a8_default_block_sizes

TOKENS = (1, 4, 16, 64)
KINDS = ("bf16", "int8", "int4", "fp8")
# 8-bit weights and activations (pallas_kernels/quantized_matmul/w8a8.py), codes stored [N, K].
W8A8_KINDS = ("w8a8_int8", "w8a8_fp8")
W8A8_SWEEP = ((64, 128, 4), (128, 128, 6), (128, 256, 3), (128, 256, 4), (256, 128, 3), (64, 256, 4), (256, 256, 3),
              (128, 512, 3))
QUICK_SHAPES = {"qkv": (256, 128), "down": (512, 128)}
REL_ERR_OK = 2e-2


def stored_bytes(w) -> int:
    if isinstance(w, tuple):  # W8A8: (codes [N, K], scales)
        return sum(a.size * a.dtype.itemsize for a in w)
    return w.nbytes if isinstance(w, QuantizedWeight) else w.size * w.dtype.itemsize


def w8a8_jobs(t, kind, w0, x0, k, n, sweep, interpret):
    """{(t, kind, impl, tiling): (fn, args)} for one W8A8 weight (codes [N, K], scales)."""
    act = kind.split("_")[1]
    jobs = {}
    device = "interpret" if interpret else None
    default = w8a8_default_block_sizes(t, k, n, device)
    configs = [(default, "pallas")]
    if sweep and t in (1, 16, 64):
        for bn, bk, stages in W8A8_SWEEP:
            if n % bn or k % bk:
                continue
            bs = GpuMatmulBlockSizes(bn, bk, split_to_fill(k // bk, n // bn, programs_to_fill(device)), 4, stages)
            configs.append((bs, "pallas_sweep"))
    for bs, impl in configs:
        jobs[(t, kind, impl, bs)] = (
            lambda x, w, bs=bs: w8a8_matmul(x, w[0], w[1], kind=act, block_sizes=bs, interpret=interpret), (x0, w0))

    def xla_native(x, w):  # XLA's own 8-bit dot on the same per-token codes
        q, s = quantize_activations(x, act)
        acc = jax.lax.dot_general(q, w[0], (((1,), (1,)), ((), ())),
                                  preferred_element_type=jnp.int32 if act == "int8" else jnp.float32)
        return (acc.astype(jnp.float32) * s[:, None] * w[1].astype(jnp.float32)).astype(x.dtype)
    jobs[(t, kind, "xla", None)] = (xla_native, (x0, w0))
    return jobs


def sweep_tilings(default: GpuMatmulBlockSizes, k: int, n: int, unit: int):
    """A few tile shapes around the heuristic's, each split over K to fill ~264 programs."""
    out = [default]
    for bn, bk, stages in ((64, 64, 4), (128, 64, 4), (64, 256, 3), (256, 128, 3)):
        bk = max(bk, unit) // unit * unit
        if n % bn or k % bk:
            continue
        out.append(GpuMatmulBlockSizes(bn, bk, split_to_fill(k // bk, n // bn, 264), 4, stages))
    return list(dict.fromkeys(out))


def main():
    parser = kernel_bench_parser(__doc__.split("\n")[0], iters=20)
    parser.set_defaults(repeats=5, sets=3)
    parser.add_argument("--kinds", default=",".join(KINDS + W8A8_KINDS),
                        help="comma list of the weight kinds to time (bf16 is always timed: the baseline)")
    parser.add_argument("--sweep-kinds", default=None,
                        help="comma list of the kinds --sweep applies to (default: every kind timed)")
    args = parser.parse_args()
    kinds = tuple(dict.fromkeys(["bf16"] + args.kinds.split(",")))
    sweep_kinds = set(args.sweep_kinds.split(",")) if args.sweep_kinds else set(kinds)
    unknown = set(kinds) - set(KINDS + W8A8_KINDS)
    if unknown:
        parser.error(f"unknown kinds {sorted(unknown)}; choose from {KINDS + W8A8_KINDS}")
    shapes, tokens = SHAPES, TOKENS
    if args.quick:
        args.iters, args.repeats, args.sets = 2, 2, 3
        shapes, tokens = QUICK_SHAPES, (1, 3)
    interpret = args.quick
    report = run_header()
    spec = datasheet()
    report.update(datasheet_bps=spec.memory_bytes_per_s if spec else None, rows=[])
    save = report_saver(report, args.out, "quantized_matmul.json")
    rng = jax.random.key(0)
    t_start = time.perf_counter()
    for name, (k, n) in shapes.items():
        rng, kw, kx = jax.random.split(rng, 3)
        dense = random_sets(kw, (k, n), args.sets, k ** -0.5)
        weights = {"bf16": dense}
        for kind in KINDS[1:]:
            if kind in kinds or f"w8a8_{kind}" in kinds:
                weights[kind] = [quantize_weight(w, kind, 128) for w in dense]
        for kind in set(W8A8_KINDS) & set(kinds):
            weights[kind] = [(jnp.asarray(qw.values.T), qw.scales) for qw in weights[kind.split("_")[1]]]
        xs = {t: random_sets(jax.random.fold_in(kx, t), (t, k), args.sets) for t in tokens}
        jobs = {}
        for t in tokens:
            for kind in kinds:
                w0 = weights[kind][0]
                if kind in W8A8_KINDS:
                    jobs.update(w8a8_jobs(t, kind, w0, xs[t][0], k, n, args.sweep and kind in sweep_kinds, interpret))
                    continue
                if kind == "bf16":
                    jobs[(t, kind, "pallas", None)] = (
                        lambda x, w: skinny_matmul(x, w, interpret=interpret), (xs[t][0], w0))
                    jobs[(t, kind, "xla", None)] = (lambda x, w: jnp.dot(x, w), (xs[t][0], w0))
                    continue
                default = quantized_block_sizes(num_tokens=t, k=k, n=n, layout=w0.layout,
                                                device_kind="interpret" if interpret else None)
                configs = [(default, None)]
                if args.sweep and kind in sweep_kinds and t in (1, 16):
                    unit = w0.layout.pack_size or 16
                    modes = ("reduce", "dot_swap", "dot") if t <= REDUCE_MAX_TOKENS else ("dot_swap", "dot")
                    configs += [(bs, m) for bs in sweep_tilings(default, k, n, unit)[: 2 if interpret else None]
                                for m in modes]
                for i, (bs, mode) in enumerate(configs):
                    jobs[(t, kind, "pallas" if i == 0 else f"pallas_sweep_{mode}", bs)] = (
                        lambda x, w, bs=bs, mode=mode: quantized_matmul(
                            x, w.values, w.scales, w.offsets, layout=w.layout, block_sizes=bs, mode=mode,
                            interpret=interpret), (xs[t][0], w0))
                jobs[(t, kind, "xla", None)] = (
                    lambda x, w: jnp.dot(x, dequantize_weight(w, x.dtype)), (xs[t][0], w0))
        compiled = compile_all(jobs, min(16, os.cpu_count() or 1))
        print(f"{name} [{k} x {n}]: compiled {len(jobs)}", flush=True)
        base_us = {}
        for (t, kind, impl, bs), fn in compiled.items():
            w_sets = weights[kind]
            row = dict(shape=name, k=k, n=n, tokens=t, kind=kind, impl=impl, stored_bytes=stored_bytes(w_sets[0]))
            if bs is not None:
                row["tiling"] = dict(block_n=bs.block_n, block_k=bs.block_k, split_k=bs.split_k,
                                     num_stages=bs.num_stages)
            arg_sets = list(zip(xs[t], w_sets))
            if isinstance(fn, Exception):
                row["error"] = f"{type(fn).__name__}: {fn}"[:800]
            else:
                try:
                    if kind == "bf16":
                        ref = jnp.dot(xs[t][0].astype(jnp.float32), w_sets[0].astype(jnp.float32))
                    elif kind in W8A8_KINDS:
                        ref = w8a8_reference(xs[t][0], *w_sets[0], kind=kind.split("_")[1])
                    else:
                        w0 = w_sets[0]
                        ref = quantized_matmul_reference(xs[t][0], w0.values, w0.scales, w0.offsets, layout=w0.layout)
                    row["rel_err"] = max_rel_err(fn(*arg_sets[0]), ref)
                    row["ok"] = row["rel_err"] <= REL_ERR_OK
                    _, rec = timings(fn, arg_sets, args.iters, args.repeats, profile=not interpret)
                    rec.pop("samples_us", None)
                    row.update(rec)
                    us = rec.get("kernel_us") or rec["us"]
                    row["tbs"] = row["stored_bytes"] / us / 1e6
                    if kind == "bf16" and impl == "pallas":
                        base_us[t] = us
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {e}"[:800]
            report["rows"].append(row)
        for row in report["rows"]:
            us = row.get("kernel_us") or row.get("us")
            if row["shape"] == name and us and row["tokens"] in base_us:
                row["speedup_vs_bf16_pallas"] = base_us[row["tokens"]] / us
        for row in [r for r in report["rows"] if r["shape"] == name]:
            print("  ", json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                                    if k not in ("k", "n")}), flush=True)
        save()
    return close_report(report, save, args.out, "quantized_matmul", markdown(report), time.perf_counter() - t_start)


def markdown(report) -> str:
    lines = [f"# Quantized skinny matmul ({report.get('device')}, JAX {report.get('jax')}, {report.get('date')})", "",
             "TB/s of stored bytes (codes, scales, offsets) by kernel time; speedup over the bf16 Pallas "
             "kernel at the same shape and T. Best tiling where swept.", "",
             "| shape | T | kind | pallas us | pallas TB/s | vs bf16 | xla us | tiling |", "|---|---|---|---|---|---|---|---|"]
    best = {}
    for r in report["rows"]:
        key = (r["shape"], r["tokens"], r["kind"])
        us = r.get("kernel_us") or r.get("us")
        if not us:
            continue
        slot = best.setdefault(key, {})
        if r["impl"].startswith("pallas") and ("pallas" not in slot or us < slot["pallas"][0]):
            slot["pallas"] = (us, r)
        if r["impl"] == "xla":
            slot["xla"] = (us, r)
    for (shape, t, kind), slot in best.items():
        p = slot.get("pallas")
        x = slot.get("xla")
        tiling = p[1].get("tiling", "") if p else ""
        lines.append(f"| {shape} | {t} | {kind} | {p[0]:.1f} | {p[1]['tbs']:.2f} | "
                     f"{p[1].get('speedup_vs_bf16_pallas', 0):.2f}x | {x[0] if x else float('nan'):.1f} | {tiling} |"
                     if p else f"| {shape} | {t} | {kind} | - | - | - | {x[0] if x else float('nan'):.1f} | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
