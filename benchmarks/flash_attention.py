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

import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.record import kernel_bench_parser, report_saver, run_header
from benchmarks.kernels import rel_err, timings
from pallas_kernels.flash_attention import flash_attention_dense, gpu, mosaic_gpu
from pallas_kernels.flash_attention.reference import flash_attention_reference
from pallas_kernels.flash_attention.tuned_block_sizes import GpuFlashBlockSizes, MosaicFlashBlockSizes

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
    if not interpret:
        rows += check_mosaic(rng)
    return rows


def check_mosaic(rng):
    """The Mosaic GPU kernel (dense layout) against the reference, in float32 on upcast inputs."""
    rows = []
    cases = [((2, 512, 8, 2, 128), dict(causal=True)), ((1, 384, 4, 4, 64), dict(causal=False)),
             ((2, 512, 8, 2, 128), dict(causal=True, sliding_window=200, logit_softcap=30.0)),
             ((1, 256, 4, 1, 128), dict(causal=False, sliding_window=65))]
    for (b, s, n, kh, h), opts in cases:
        for dtype in (jnp.bfloat16, jnp.float16):
            q, k, v = (jnp.asarray(rng.standard_normal(sh, dtype=np.float32), dtype)
                       for sh in [(b, s, n, h), (b, s, kh, h), (b, s, kh, h)])
            name = f"{jnp.dtype(dtype).name} B,S,N,K,H={(b, s, n, kh, h)} {opts}"
            for bs in (MosaicFlashBlockSizes(64, 64, 2), MosaicFlashBlockSizes(64, 128, 3)):
                try:
                    out = mosaic_gpu.flash_attention_dense(q, k, v, scale=h ** -0.5, block_sizes=bs, **opts)
                    ref = flash_attention_dense(*(x.astype(jnp.float32) for x in (q, k, v)),
                                                kernel=flash_attention_reference, scale=h ** -0.5, **opts)
                    err = rel_err(out, ref)
                    rows.append(dict(kernel=f"ours mosaic {bs} vs reference", case=name, rel_err=err,
                                     ok=err <= REL_ERR_OK["bfloat16"]))
                except Exception:  # noqa: BLE001
                    rows.append(dict(kernel=f"ours mosaic {bs} vs reference", case=name, rel_err=float("inf"),
                                     ok=False, error=traceback.format_exc()[-3000:]))
    return rows


def dense_inputs(rng, b, s, n, h, sets):
    shape = (b, s, n, h)
    return [tuple(jnp.asarray(rng.standard_normal(shape, dtype=np.float32), jnp.bfloat16) for _ in range(3))
            for _ in range(sets)]


def fp16(q, k, v):
    return tuple(x.astype(jnp.float16) for x in (q, k, v))


def prescaled_fp16(q, k, v):
    return fp16(q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype), k, v)


def implementations(sweep, interpret):
    """name -> jitted fn(q, k, v), or (fn, prepare) where prepare maps a bf16 input set to the
    fn's inputs outside the timing."""
    impls = {}

    def ours(bs):
        return jax.jit(lambda q, k, v: flash_attention_dense(
            q, k, v, kernel=gpu.flash_attention, scale=q.shape[-1] ** -0.5, causal=True, block_sizes=bs,
            interpret=interpret))

    impls["ours (default tiling)"] = ours(GpuFlashBlockSizes(16, 16) if interpret else None)
    if not interpret:
        def mosaic(bs):
            return jax.jit(lambda q, k, v: mosaic_gpu.flash_attention_dense(
                q, k, v, scale=q.shape[-1] ** -0.5, causal=True, block_sizes=bs))

        impls["ours mosaic (default tiling)"] = mosaic(None)
        if sweep:
            for t in [(64, 64, 2), (64, 64, 3), (64, 128, 3)]:
                impls[f"ours mosaic {MosaicFlashBlockSizes(*t)}"] = mosaic(MosaicFlashBlockSizes(*t))
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
        try:
            from jax.experimental.pallas.ops.gpu import attention_mgpu as stock_mgpu
            config = stock_mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=True)
            # It has no scale argument: it gets q already scaled (outside the timing).
            # It is float16 only: inputs are cast (outside the timing), and ours is timed on the
            # same float16 inputs beside it.
            impls["stock mosaic gpu attention (fp16)"] = (
                jax.jit(lambda q, k, v: stock_mgpu.attention(q, k, v, config)), prescaled_fp16)
            impls["ours mosaic (default tiling, fp16)"] = (mosaic(None), fp16)
        except Exception as e:  # noqa: BLE001
            print("stock mosaic gpu attention unavailable:", e, flush=True)
        try:  # where it installs (carried as wheels to the GPU machine)
            import tokamax
            from absl import flags

            flags.FLAGS(sys.argv[:1])  # tokamax reads absl flags; this script's own are argparse's
            for impl in ("mosaic", "triton"):
                impls[f"tokamax {impl}"] = jax.jit(lambda q, k, v, impl=impl: tokamax.dot_product_attention(
                    q, k, v, scale=q.shape[-1] ** -0.5, is_causal=True, implementation=impl))
        except Exception as e:  # noqa: BLE001
            print("tokamax unavailable:", e, flush=True)
    return impls


def bench(rng, args, impls, shapes):
    rows = []
    for b, s, n, h in shapes:
        flops = 4 * b * n * s * s * h / 2
        arg_sets = dense_inputs(rng, b, s, n, h, args.sets)
        ref = None
        for name, impl in impls.items():
            fn, prepare = impl if isinstance(impl, tuple) else (impl, None)
            if name.startswith("ours ") and "default" not in name and s != shapes[0][1]:
                continue  # the tiling sweep runs at the first (P3) shape only
            row = dict(impl=name, B=b, S=s, N=n, H=h, gflop=flops / 1e9)
            sets = arg_sets if prepare is None else [prepare(*a) for a in arg_sets]
            try:
                out = fn(*sets[0])
                if name == "cuDNN":
                    ref = out
                sec, times = timings(fn, sets, args.iters, args.repeats, profile=not args.quick)
                row.update(wall_tflops=flops / sec / 1e12, floor_us=flops / (PEAK_TFLOPS * 1e12) * 1e6, **times)
                # The headline is kernel time where a trace gave it (the wall clock adds the
                # first dispatch and the last sync).
                row["tflops"] = flops / ((times.get("kernel_us") or row["us"]) * 1e-6) / 1e12
                row["fraction_of_peak"] = row["tflops"] / PEAK_TFLOPS
                row["out"] = out
            except Exception:  # noqa: BLE001
                row["error"] = traceback.format_exc()[-3000:]
            rows.append(row)
            print(f"  {name:<70} S={s:<5} " + (f"{row['us']:9.1f} us wall, kernel {row.get('kernel_us')} us, "
                                               f"{row['tflops']:6.1f} TFLOP/s"
                                               if "us" in row else "ERROR " + row["error"][-600:]), flush=True)
        cudnn_tflops = next((r["tflops"] for r in rows if r["impl"] == "cuDNN" and r["S"] == s and "us" in r), None)
        for r in rows:
            if r["S"] != s or "out" not in r:
                continue
            out = r.pop("out")
            if cudnn_tflops:
                r["speed_vs_cudnn"] = r["tflops"] / cudnn_tflops
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
              "Kernel µs: kernel time per call from a profiler trace (CUPTI) of back-to-back calls; TFLOP/s "
              "and the ratio to cuDNN are taken from it. Wall µs: the same calls timed by the host clock.", "",
              "| impl | B | S | N | H | kernel µs | floor µs | TFLOP/s | of 989 | vs cuDNN | rel. err vs cuDNN | wall µs |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["timings"]:
        if "us" not in r:
            lines.append(f"| {r['impl']} | {r['B']} | {r['S']} | {r['N']} | {r['H']} | error | | | | | | |")
            continue
        vs = f"{r['speed_vs_cudnn']:.2f}x" if "speed_vs_cudnn" in r else ""
        err = f"{r['rel_err_vs_cudnn']:.1e}" if "rel_err_vs_cudnn" in r else ""
        lines.append(f"| {r['impl']} | {r['B']} | {r['S']} | {r['N']} | {r['H']} | {r.get('kernel_us') or 0:.1f} | "
                     f"{r['floor_us']:.1f} | {r['tflops']:.1f} | {r['fraction_of_peak']:.1%} | {vs} | {err} | "
                     f"{r['us']:.1f} |")
    return "\n".join(lines) + "\n"


def main():
    parser = kernel_bench_parser(__doc__.split("\n")[0], iters=30)
    parser.add_argument("--lengths", default="4096,2048,1024", help="sequence lengths; the first gets the sweep")
    parser.add_argument("--timing-only", action="store_true", help="skip the correctness checks")
    args = parser.parse_args()
    if args.quick:
        args.iters, args.repeats, args.sets = 1, 2, 1
    rng = np.random.default_rng(int(time.time()))
    report = run_header()
    print(report, flush=True)
    save = report_saver(report, args.out, "flash_attention.json")

    report["correctness"] = [] if args.timing_only else check_correctness(rng, interpret=args.quick)
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
