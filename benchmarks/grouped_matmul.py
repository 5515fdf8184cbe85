"""Grouped (mixture-of-experts) matmul at decode sizes: routed-expert weight-read bandwidth of
the Pallas kernel against XLA's ragged dot and a gather-then-batched-dot, at expert shapes.

  PYTHONPATH=. python benchmarks/grouped_matmul.py --out DIR [--sweep]   # on a GPU (~3 min)
  PYTHONPATH=. python benchmarks/grouped_matmul.py --quick --out DIR     # CPU smoke run, interpret

For Mixtral-8x7B (8 experts, top 2, D 4096, F 14336) and Qwen3-30B-A3B (128 experts, top 8, D
2048, F 768), each expert projection (gate|up with the SwiGLU epilogue; down) at T tokens: the
tokens route to k distinct uniformly random experts each, rows sorted by expert, weights a
stack [2, X, K, N] with layer 1 selected (the engine's layout), rotated over --sets stacks so
no weight comes from L2. Bytes = distinct routed experts x K x N x 2 (what a decode step must
read); TB/s over the kernel time from a profiler trace. Methods:
  pallas     pallas_kernels/grouped_matmul (the engine's path), its default tiling;
  xla_ragged lax.ragged_dot on w[layer] (XLA's lowering of this JAX version);
  gather     w[layer][expert of each row] gathered, then one batched dot (copies the routed weights);
  --sweep    a few tilings of the kernel at T = 1 and 64.
Writes grouped_matmul.json and grouped_matmul.md under --out.
"""

from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks.matmul import Bench, ceilings, compile_all, max_rel_err
from benchmarks.record import close_report, kernel_bench_parser, report_saver, run_header
from jaxinfer.devices import datasheet
from pallas_kernels.grouped_matmul import grouped_block_sizes, grouped_matmul, grouped_matmul_reference
from pallas_kernels.matmul import GpuMatmulBlockSizes

# model -> (experts, top k, D, F)
MODELS = {"mixtral-8x7b": (8, 2, 4096, 14336), "qwen3-30b-a3b": (128, 8, 2048, 768)}
QUICK_MODELS = {"tiny": (8, 2, 64, 32)}
TOKENS, QUICK_TOKENS = (1, 4, 16, 64), (1, 3)
DTYPE = jnp.bfloat16


def routed_rows(rng, tokens, experts, k):
    """group_sizes [X] and the number of distinct experts for T tokens choosing k of X each."""
    chosen = np.stack([rng.choice(experts, k, replace=False) for _ in range(tokens)])
    sizes = np.bincount(chosen.reshape(-1), minlength=experts).astype(np.int32)
    return jnp.asarray(sizes), int(np.count_nonzero(sizes))


def methods(w_shape, activation):
    out_n = w_shape[-1] // 2 if activation else w_shape[-1]

    def finish(y):
        if activation is None:
            return y.astype(DTYPE)
        return (jax.nn.silu(y[:, :out_n]) * y[:, out_n:]).astype(DTYPE)

    def xla_ragged(x, w, sizes):
        return finish(lax.ragged_dot(x, w[1], sizes, preferred_element_type=jnp.float32))

    def gather(x, w, sizes):
        row_expert = jnp.searchsorted(jnp.cumsum(sizes), jnp.arange(x.shape[0]), side="right")
        w_rows = w[1][jnp.minimum(row_expert, w.shape[1] - 1)]  # [P, K, N]: the copy
        return finish(jnp.einsum("pk,pkn->pn", x, w_rows, preferred_element_type=jnp.float32))

    return {"xla_ragged": xla_ragged, "gather": gather}


def sweep_tilings(k, n, gated):
    cands = [GpuMatmulBlockSizes(bn, bk, split_k=s, num_warps=4, num_stages=st)
             for bn, bk, s, st in ((64, 128, 1, 4), (128, 64, 1, 4), (128, 128, 1, 3), (64, 64, 1, 6),
                                   (32, 128, 1, 4), (64, 128, 2, 4), (128, 64, 4, 4), (64, 128, 4, 4))]
    return [c for c in cands if n % c.block_n == 0 and k % (c.block_k * c.split_k) == 0
            and not (gated and c.split_k > 1)]


def bench_model(args, bench, name, shape, tokens, rng):
    experts, k, d, f = shape
    rows = []
    for proj, (kk, nn, act) in {"gate_up": (d, 2 * f, "silu"), "down": (f, d, None)}.items():
        w_shape = (2, experts, kk, nn)
        keys = jax.random.split(jax.random.key(len(rows) + experts), args.sets)
        w_sets = [jax.random.normal(key, w_shape, DTYPE) * jnp.asarray(kk ** -0.5, DTYPE) for key in keys]
        out_n = nn // 2 if act else nn
        for t in tokens:
            sizes, distinct = routed_rows(rng, t, experts, k)
            x = jax.random.normal(jax.random.key(t), (t * k, kk), DTYPE)
            arg_sets = [(x, w, sizes) for w in w_sets]
            nbytes = distinct * kk * nn * 2
            ref = grouped_matmul_reference(x, w_sets[0], sizes, 1, activation=act)
            jobs = {"pallas": (lambda x, w, s, act=act: grouped_matmul(x, w, s, 1, activation=act,
                                                                        interpret=args.quick), arg_sets[0])}
            jobs.update({m: (fn, arg_sets[0]) for m, fn in methods(w_shape, act).items()})
            if args.sweep and t in (1, 64) and not args.quick:
                for bs in sweep_tilings(kk, out_n, act is not None):
                    jobs[("sweep", bs)] = (lambda x, w, s, act=act, bs=bs: grouped_matmul(
                        x, w, s, 1, activation=act, block_sizes=bs), arg_sets[0])
            compiled = compile_all(jobs, workers=8)
            default = grouped_block_sizes(num_rows=t * k, num_groups=experts, k=kk, n=out_n, dtype=DTYPE,
                                          gated=act is not None, device_kind="interpret" if args.quick else None)
            for key, fn in compiled.items():
                method, tiling = (key, default) if isinstance(key, str) else ("pallas_sweep", key[1])
                row = {"model": name, "proj": proj, "tokens": t, "rows": t * k, "distinct_experts": distinct,
                       "k": kk, "n": nn, "method": method, "weight_bytes": nbytes}
                if method.startswith("pallas"):
                    row["tiling"] = {f: getattr(tiling, f) for f in ("block_n", "block_k", "split_k", "num_warps",
                                                                      "num_stages", "swap_ab")}
                if isinstance(fn, Exception):
                    row["error"] = f"{type(fn).__name__}: {fn}"[:500]
                    rows.append(row)
                    continue
                row["rel_err"] = max_rel_err(fn(*arg_sets[0]), ref)
                row["ok"] = row["rel_err"] <= 2e-2
                rows.append(bench.time(row, fn, arg_sets, nbytes))
                print(json.dumps({key: row.get(key) for key in ("model", "proj", "tokens", "method", "tiling", "tbs",
                                                                 "kernel_us", "rel_err", "error")}), flush=True)
        del w_sets
    return rows


def markdown(report):
    lines = [f"# Grouped (MoE) matmul, {report['device']}, {report['date']}", "",
             f"copy ceiling {report['copy_tbs']:.2f} TB/s; TB/s = routed experts' weight bytes / kernel time", "",
             "| model | proj | T | experts read | pallas TB/s | xla_ragged TB/s | gather TB/s | best sweep TB/s |",
             "|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["model"], r["proj"], r["tokens"]) for r in report["rows"]}, key=lambda x: (x[0], x[1], x[2]))
    for key in keys:
        rs = [r for r in report["rows"] if (r["model"], r["proj"], r["tokens"]) == key]

        def tbs(method):
            vals = [r["tbs"] for r in rs if r["method"] == method and "tbs" in r]
            return f"{max(vals):.2f}" if vals else "-"
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {rs[0]['distinct_experts']} | {tbs('pallas')} | "
                     f"{tbs('xla_ragged')} | {tbs('gather')} | {tbs('pallas_sweep')} |")
    return "\n".join(lines) + "\n"


def main():
    parser = kernel_bench_parser(__doc__.split("\n")[0], iters=20)
    parser.set_defaults(repeats=5, sets=3)
    args = parser.parse_args()
    models, tokens = (QUICK_MODELS, QUICK_TOKENS) if args.quick else (MODELS, TOKENS)
    if args.quick:
        args.iters, args.repeats = 2, 2
    t_start = time.perf_counter()
    report = run_header()
    save = report_saver(report, args.out, "grouped_matmul.json")
    spec = datasheet()
    report["datasheet_bps"] = spec.memory_bytes_per_s if spec else None
    report["copy_tbs"], report["matmul_tflops"] = ceilings(args)
    bench = Bench(args, report["copy_tbs"], report["datasheet_bps"])
    rng = np.random.default_rng(0)
    report["rows"] = []
    for name, shape in models.items():
        report["rows"] += bench_model(args, bench, name, shape, tokens, rng)
        save()
    return close_report(report, save, args.out, "grouped_matmul", markdown(report), time.perf_counter() - t_start)


if __name__ == "__main__":
    sys.exit(main())
