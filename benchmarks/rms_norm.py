"""Fused residual add + RMSNorm: kernel time of the Pallas kernel (over a sweep of warps and
chunks) against what XLA runs for the same work (the sum of a projection's split-K partials
fused with the residual add, the slice of the stacked norm weight, the norm).

  PYTHONPATH=. python benchmarks/rms_norm.py --out DIR        # on a GPU (~1 min)
  PYTHONPATH=. python benchmarks/rms_norm.py --quick --out DIR # CPU smoke run, interpret mode

At decode sizes these are a few kilobytes each, so what is measured is mostly each kernel's
launch-to-finish latency: kernel time per call from a profiler trace (benchmarks/kernels.py),
for T tokens x D = 4096 (Llama-3-8B), bf16, with S float32 partials (S = 1: a finished bf16
product). Writes rms_norm.json and rms_norm.md under --out.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks.kernels import timings
from benchmarks.record import kernel_bench_parser, report_saver, run_header
from pallas_kernels.rms_norm import RmsNormBlockSizes, add_rms_norm, add_rms_norm_reference, rms_norm_block_sizes

EPS = 1e-5
LAYERS = 32


def xla_unfused(y, residual, weight, layer):
    """The model's path without the kernel: XLA fuses what it can of the same computation."""
    return add_rms_norm_reference(y, residual, weight, layer, eps=EPS)


def inputs(rng, t, d, splits, sets):
    out = []
    for _ in range(sets):
        y = (jnp.asarray(rng.standard_normal((splits, t, d)), jnp.float32) if splits > 1
             else jnp.asarray(rng.standard_normal((t, d)), jnp.bfloat16))
        r = jnp.asarray(rng.standard_normal((t, d)), jnp.bfloat16)
        w = jnp.asarray(rng.standard_normal((LAYERS, d)), jnp.bfloat16)
        out.append((y, r, w, jnp.int32(5)))
    return out


def main():
    parser = kernel_bench_parser(__doc__.split("\n")[0], iters=200)
    args = parser.parse_args()
    interpret = args.quick
    d = 256 if args.quick else 4096
    tokens, splits_list = ((1, 3), (1, 4)) if args.quick else ((1, 16, 64), (1, 4, 7))
    variants = [rms_norm_block_sizes(d)] if args.quick else [
        RmsNormBlockSizes(chunk, warps) for chunk, warps in
        ((4096, 4), (4096, 8), (4096, 16), (4096, 32), (2048, 4), (2048, 8), (2048, 16), (1024, 4), (1024, 8))]
    iters = 3 if args.quick else args.iters
    report = {**run_header(), "width": d, "rows": []}
    save = report_saver(report, args.out, "rms_norm.json")
    rng = np.random.default_rng(0)
    for t in tokens:
        for splits in splits_list:
            arg_sets = inputs(rng, t, d, splits, args.sets)
            ref = jax.jit(xla_unfused)
            _, xla = timings(ref, arg_sets, iters, args.repeats)
            row = {"tokens": t, "splits": splits, "xla": xla, "kernel": []}
            want = ref(*arg_sets[0])
            for bs in variants:
                fn = jax.jit(lambda y, r, w, i, bs=bs: add_rms_norm(y, r, w, i, eps=EPS, block_sizes=bs,
                                                                      interpret=interpret))
                got = fn(*arg_sets[0])
                err = max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - e.astype(jnp.float32))))
                          for g, e in zip(got, want))
                _, rec = timings(fn, arg_sets, iters, args.repeats)
                row["kernel"].append({"chunk": bs.chunk, "num_warps": bs.num_warps, "max_abs_err": err, **rec})
            report["rows"].append(row)
            save()
            best = min(row["kernel"], key=lambda k: k["kernel_us"] or k["us"])
            print(f"T={t:3d} S={splits}: xla {xla['kernel_us'] or xla['us']:.2f} us; kernel best "
                  f"{best['kernel_us'] or best['us']:.2f} us (chunk {best['chunk']}, {best['num_warps']} warps); "
                  + " ".join(f"{k['chunk']}/{k['num_warps']}:{k['kernel_us'] or k['us']:.2f}" for k in row["kernel"]),
                  flush=True)
    lines = ["# Fused residual add + RMSNorm: kernel time per call (us)", "",
             f"{report['device']}, JAX {report['jax']}, {report['date']}; width {d}, bf16, stacked weights "
             f"[{LAYERS}, {d}]", "", "| tokens | partials | XLA (us) | kernel default (us) | best (us) | best tiling |",
             "|---|---|---|---|---|---|"]
    default = rms_norm_block_sizes(d)
    for row in report["rows"]:
        def us(rec):
            return rec["kernel_us"] or rec["us"]
        best = min(row["kernel"], key=us)
        dflt = next((k for k in row["kernel"] if (k["chunk"], k["num_warps"]) == (default.chunk, default.num_warps)),
                    None)
        lines.append(f"| {row['tokens']} | {row['splits']} | {us(row['xla']):.2f} | "
                     f"{us(dflt) if dflt else float('nan'):.2f} | {us(best):.2f} | chunk {best['chunk']}, "
                     f"{best['num_warps']} warps |")
    with open(f"{args.out}/rms_norm.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(json.dumps({"saved": f"{args.out}/rms_norm.json"}))


if __name__ == "__main__":
    main()
