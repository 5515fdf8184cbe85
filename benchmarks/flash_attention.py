"""Correctness on the device, then timings of the flash-attention prefill kernel.

  PYTHONPATH=. python benchmarks/flash_attention.py --out DIR [--sweep]   # on a GPU
  PYTHONPATH=. python benchmarks/flash_attention.py --quick --out DIR     # CPU smoke run, interpret

1. Correctness: the GPU kernel against the pure-jnp reference on fresh random packed batches
   (GQA, lengths at block edges, NaN padding rows, window, softcap, bf16 and float32), and
   against cuDNN (jax.nn.dot_product_attention) at the P3 shape.
2. P3 (causal, B=4, S=4096, 32 heads, D=128, bf16) and shorter lengths: ours (a sweep of
   tilings with --sweep), cuDNN, and the stock jax.experimental.pallas.ops.gpu.attention.mha,
   as TFLOP/s (causal FLOPs = 2 * 2 * B * N * S^2 * D / 2), fraction of the 989 TFLOP/s floor
   and ratio to cuDNN in the same run.

Timing as in benchmarks/kernels.py: warm-up, repeats of back-to-back calls over rotated input
sets, median over repeats, block_until_ready at the end of each repeat.
Writes flash_attention.json and flash_attention.md under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.record import run_header
from benchmarks.kernels import rel_err, time_call
from pallas_kernels.flash_attention import flash_attention_dense, gpu
from pallas_kernels.flash_attention.reference import flash_attention_reference
from pallas_kernels.flash_attention.tuned_block_sizes import GpuFlashBlockSizes

PEAK_TFLOPS = 989.0  # H100 SXM dense bf16 datasheet
# Relative L2 error bounds: bf16 rounds p before p @ v.
REL_ERR_OK = {"bfloat16": 1e-2, "float32": 1e-4}


def packed_case(rng, lens, num_tokens, num_heads, num_kv_heads, head_dim, dtype):
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    q = rng.standard_normal((num_tokens, num_heads, head_dim)).astype(np.float32)
    k = rng.standard_normal((num_tokens, num_kv_heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((num_tokens, num_kv_heads, head_dim)).astype(np.float32)
    for x in (q, k, v):
        x[cu[-1]:] = np.nan  # padding rows must not leak
    return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(cu))


def check_correctness(rng, interpret):
    bs = GpuFlashBlockSizes(16, 16) if interpret else None
    h = 16 if interpret else 128
    lens = [1, 15, 16, 17, 40] if interpret else [1, 63, 64, 65, 127, 128, 129, 700, 1500]
    cases = [
        dict(dtype=jnp.bfloat16, heads=(8, 2), opts=dict(causal=True)),
        dict(dtype=jnp.bfloat16, heads=(8, 8), opts=dict(causal=False)),
        dict(dtype=jnp.bfloat16, heads=(8, 2), opts=dict(causal=True, sliding_window=100, logit_softcap=30.0)),
        dict(dtype=jnp.float32, heads=(4, 1), opts=dict(causal=True, sliding_window=37)),
    ]
    rows = []
    for c in cases:
        args = packed_case(rng, lens, sum(lens) + 11, *c["heads"], h, c["dtype"])
        opts = dict(scale=h ** -0.5, **c["opts"])
        real = int(args[3][-1])
        name = f"{jnp.dtype(c['dtype']).name} N,K={c['heads']} lens={lens} {c['opts']}"
        try:
            out = gpu.flash_attention(*args, block_sizes=bs, interpret=interpret, **opts)
            ref = flash_attention_reference(*args, **opts)
            err = rel_err(out[:real], ref[:real])
            pad_zero = bool(np.all(np.asarray(out[real:], np.float32) == 0))
            ok = err <= REL_ERR_OK[jnp.dtype(c["dtype"]).name] and pad_zero
            rows.append(dict(kernel="ours vs reference", case=name, rel_err=err, padding_zero=pad_zero, ok=ok))
        except Exception:  # noqa: BLE001 - record and go on, so one failure still leaves timings
            rows.append(dict(kernel="ours vs reference", case=name, rel_err=float("inf"), ok=False,
                             error=traceback.format_exc()[-3000:]))
    return rows


def dense_inputs(rng, b, s, n, h, sets):
    shape = (b, s, n, h)
    return [tuple(jnp.asarray(rng.standard_normal(shape, dtype=np.float32), jnp.bfloat16) for _ in range(3))
            for _ in range(sets)]


def implementations(sweep, interpret):
    impls = {}

    def ours(bs):
        return jax.jit(lambda q, k, v: flash_attention_dense(
            q, k, v, kernel=gpu.flash_attention, scale=q.shape[-1] ** -0.5, causal=True, block_sizes=bs,
            interpret=interpret))

    impls["ours (default tiling)"] = ours(GpuFlashBlockSizes(16, 16) if interpret else None)
    if sweep and not interpret:
        for t in [(128, 64, 4, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3)]:
            impls[f"ours {GpuFlashBlockSizes(*t)}"] = ours(GpuFlashBlockSizes(*t))
    if not interpret:
        impls["cuDNN"] = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn"))
        try:
            from jax.experimental.pallas.ops.gpu import attention as stock
            impls["stock pallas mha"] = jax.jit(lambda q, k, v: stock.mha(
                q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=True))
        except Exception as e:  # noqa: BLE001
            print("stock mha unavailable:", e, flush=True)
    return impls


def bench(rng, args, impls, shapes):
    rows = []
    for b, s, n, h in shapes:
        flops = 4 * b * n * s * s * h / 2
        arg_sets = dense_inputs(rng, b, s, n, h, args.sets)
        ref = None
        for name, fn in impls.items():
            if name.startswith("ours ") and "default" not in name and s != shapes[0][1]:
                continue  # the tiling sweep runs at the first (P3) shape only
            row = dict(impl=name, B=b, S=s, N=n, H=h, gflop=flops / 1e9)
            try:
                out = fn(*arg_sets[0])
                if name == "cuDNN":
                    ref = out
                sec, samples = time_call(fn, arg_sets, args.iters, args.repeats)
                row.update(us=sec * 1e6, samples_us=[x * 1e6 for x in samples], tflops=flops / sec / 1e12,
                           floor_us=flops / (PEAK_TFLOPS * 1e12) * 1e6)
                row["fraction_of_peak"] = row["tflops"] / PEAK_TFLOPS
                row["out"] = out
            except Exception:  # noqa: BLE001
                row["error"] = traceback.format_exc()[-3000:]
            rows.append(row)
            print(f"  {name:<70} S={s:<5} " + (f"{row['us']:9.1f} us {row['tflops']:6.1f} TFLOP/s"
                                               if "us" in row else "ERROR " + row["error"][-600:]), flush=True)
        cudnn_us = next((r["us"] for r in rows if r["impl"] == "cuDNN" and r["S"] == s and "us" in r), None)
        for r in rows:
            if r["S"] != s or "out" not in r:
                continue
            out = r.pop("out")
            if cudnn_us:
                r["speed_vs_cudnn"] = cudnn_us / r["us"]
            if ref is not None:
                r["rel_err_vs_cudnn"] = rel_err(np.asarray(out, np.float32), np.asarray(ref, np.float32))
    return rows


def markdown(report):
    lines = [f"# Flash attention prefill: {report['device']}, JAX {report['jax']}, {report['date']}", "",
             f"`{report['command']}`", "", "## Correctness", "", "| check | case | rel. L2 error | ok |",
             "|---|---|---|---|"]
    for r in report["correctness"]:
        lines.append(f"| {r['kernel']} | {r['case']} | {r['rel_err']:.2e} | {'ok' if r['ok'] else 'FAIL'} |")
    lines += ["", "## Timings (causal, bf16; median of repeats)", "",
              "| impl | B | S | N | H | µs | floor µs | TFLOP/s | of 989 | vs cuDNN | rel. err vs cuDNN |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["timings"]:
        if "us" not in r:
            lines.append(f"| {r['impl']} | {r['B']} | {r['S']} | {r['N']} | {r['H']} | error | | | | | |")
            continue
        vs = f"{r['speed_vs_cudnn']:.2f}x" if "speed_vs_cudnn" in r else ""
        err = f"{r['rel_err_vs_cudnn']:.1e}" if "rel_err_vs_cudnn" in r else ""
        lines.append(f"| {r['impl']} | {r['B']} | {r['S']} | {r['N']} | {r['H']} | {r['us']:.1f} | "
                     f"{r['floor_us']:.1f} | {r['tflops']:.1f} | {r['fraction_of_peak']:.1%} | {vs} | {err} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true", help="tiny shapes in interpret mode (CPU)")
    parser.add_argument("--sweep", action="store_true", help="also time a sweep of tilings at P3")
    parser.add_argument("--lengths", default="4096,2048,1024", help="sequence lengths; the first gets the sweep")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sets", type=int, default=2, help="input sets rotated between calls")
    args = parser.parse_args()
    if args.quick:
        args.iters, args.repeats, args.sets = 1, 2, 1
    rng = np.random.default_rng(int(time.time()))
    report = run_header()
    print(report, flush=True)
    os.makedirs(args.out, exist_ok=True)

    def save():  # after every stage, so a run cut short still leaves its numbers
        with open(os.path.join(args.out, "flash_attention.json"), "w") as f:
            json.dump(report, f, indent=1)

    report["correctness"] = check_correctness(rng, interpret=args.quick)
    for r in report["correctness"]:
        print(f"  {r['case']:<100} {r['rel_err']:.2e} {'ok' if r['ok'] else 'FAIL'}", flush=True)
        if "error" in r:
            print(r["error"], flush=True)
    save()
    shapes = [(1, 64, 2, 16)] if args.quick else [(4, int(s), 32, 128) for s in args.lengths.split(",")]
    report["timings"] = bench(rng, args, implementations(args.sweep, args.quick), shapes)
    save()
    with open(os.path.join(args.out, "flash_attention.md"), "w") as f:
        f.write(markdown(report))
    print(markdown(report))
    ok = all(r["ok"] for r in report["correctness"]) and all(
        r.get("rel_err_vs_cudnn", 0) < REL_ERR_OK["bfloat16"] for r in report["timings"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
