"""Host-side costs of a step that the engine pays on its own thread, each beside a peer timed in
the same run, on whatever machine runs it (the CPU numbers of benchmarks/NOTES.md):

  1. `SamplingMetadata.build` for 256 rows (greedy, and sampled with top_p and seeds); the peer
     is the per-row attribute reads the rows used to be packed with.
  2. One SSE chunk's JSON: `compact_json` (one shared encoder) against `json.dumps` with
     separators (a new encoder per call).
  3. `HostKVPool.apply` offloading 1 GB in batches of 64 pages with 20 ms "steps" between: the
     engine thread's seconds per GB, and the wait for the last transfers after the last step.

  PYTHONPATH=. python benchmarks/host_micro.py --out benchmarks/results [--tag TAG]

Timings are the minimum over repeats (this machine's spread is wide).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import timeit

import numpy as np

from benchmarks.record import run_header


def _min_us(fn, number: int, repeat: int) -> float:
    fn()
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def sampler_build() -> dict:
    from jaxinfer.engine.sampling import SamplingMetadata, SamplingRow
    from jaxinfer.sampling_params import SamplingParams

    outputs = [list(range(300)) for _ in range(256)]
    out = {}
    for name, make in (("greedy", lambda i: SamplingParams(temperature=0.0, max_tokens=500)),
                       ("top_p, seeded", lambda i: SamplingParams(temperature=0.7, top_p=0.9, seed=i, max_tokens=500))):
        rows = [SamplingRow(make(i), [1, 2, 3], o) for i, o in enumerate(outputs)]

        def per_row_reads():  # the peer: what packing the rows read per row before
            params = [r.params for r in rows]
            floats = [(0.0 if p.greedy else p.temperature, p.top_p, p.min_p, p.presence_penalty,
                       p.frequency_penalty, 0.0, p.repetition_penalty) for p in params]
            ints = [(p.top_k, r.num_outputs) for r in rows for p in (r.params,)]
            seeds = [(p.seed or 0) % 2**64 for p in params]
            return np.asarray(floats), np.asarray(ints), seeds

        out[name] = {"build_us": _min_us(lambda: SamplingMetadata.build(rows, batch_size=256, vocab_size=50000),
                                         100, 25),
                     "peer_per_row_reads_us": _min_us(per_row_reads, 100, 25)}
    return out


def chunk_json() -> dict:
    from jaxinfer.server.streaming import compact_json

    choice = {"index": 0, "text": " hello", "logprobs": None, "finish_reason": None, "stop_reason": None}
    return {"compact_json_us": _min_us(lambda: compact_json(choice), 20000, 15),
            "peer_json_dumps_us": _min_us(lambda: json.dumps(choice, separators=(",", ":")), 20000, 15)}


def offload() -> dict:
    import jax
    import jax.numpy as jnp

    from jaxinfer.engine.kv_cache import KVCacheSpec
    from jaxinfer.engine.kv_offload import HostKVPool

    k, layers, ps, h, pages = 8, 16, 16, 128, 520
    spec = KVCacheSpec(num_layers=layers, num_kv_heads=k, head_dim=h, page_size=ps, num_pages=pages)
    device = jax.devices()[0]
    kv = tuple(jax.device_put(jnp.full((k, layers, pages, ps, h), i, jnp.bfloat16), device) for i in (1, 2))
    pool = HostKVPool(spec, num_slots=1024, placement=device)
    kv = pool.warmup(kv)
    engine_s, t0 = 0.0, time.perf_counter()
    for rep in range(2):
        for step in range(8):
            offloads = [(1 + step * 64 + j, rep * 512 + step * 64 + j) for j in range(64)]
            t = time.perf_counter()
            kv = pool.apply(kv, offloads, [])
            engine_s += time.perf_counter() - t
            time.sleep(0.02)  # the step's device time
    t = time.perf_counter()
    pool.land()
    tail = time.perf_counter() - t
    gb = 1024 * pool.bytes_per_page / 1e9
    return {"gb": gb, "engine_thread_s_per_gb": engine_s / gb, "transfer_tail_s": tail,
            "wall_s": time.perf_counter() - t0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    report = {**run_header(), "sampler_build_256_rows": sampler_build(), "sse_chunk_json": chunk_json(),
              "host_tier_offload": offload()}
    print(json.dumps(report, indent=1))
    base = os.path.join(args.out, f"host_micro_{report['device'].replace(' ', '_')}_{report['date'][:10]}{args.tag}")
    with open(base + ".json", "w") as f:
        json.dump(report, f, indent=1)
    b, j, o = report["sampler_build_256_rows"], report["sse_chunk_json"], report["host_tier_offload"]
    lines = [f"# Host-side costs per step ({report['device']}, {report['date']})", "", f"`{report['command']}`", "",
             "| measurement | ours | peer in the same run |", "|---|---|---|"]
    lines += [f"| SamplingMetadata.build, 256 rows, {name} | {v['build_us']:.0f} us | per-row attribute reads "
              f"alone: {v['peer_per_row_reads_us']:.0f} us |" for name, v in b.items()]
    lines += [f"| one SSE chunk's JSON | compact_json {j['compact_json_us']:.2f} us | json.dumps with separators "
              f"{j['peer_json_dumps_us']:.2f} us |",
              f"| host tier: offloading {o['gb']:.2f} GB in 16 steps | engine thread {o['engine_thread_s_per_gb']:.3f} "
              f"s/GB; transfer tail {o['transfer_tail_s']:.2f} s; wall {o['wall_s']:.2f} s | - |"]
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("wrote", base + ".json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
