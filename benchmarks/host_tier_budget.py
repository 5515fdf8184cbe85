"""Host time of the host tier's budget keeper (`HostKVPool._keep_within_budget`) when one
64-page offload pushes the pool over its size, among ~850 host arrays of 8 pages (the
Llama-3-8B shape's 5,431 host pages, some offloaded twice), against a scan of every array per array let go (the
keeper before it ordered the arrays once per call; kept here as the reference).

    python benchmarks/host_tier_budget.py --out benchmarks/results/host_tier_budget_cpu_DATE.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import jax
import numpy as np

from jaxinfer.engine.kv_cache import KVCacheSpec
from jaxinfer.engine.kv_offload import HOST_BATCH, HostKVPool


def scan_per_drop(pool: HostKVPool, keep: set[int]) -> None:
    """The earlier keeper: the smallest live share found by a scan for every array let go."""
    while pool.num_rows_held > pool.num_slots:
        candidates = [(b.live / len(b.slots), bid) for bid, b in pool._batches.items() if bid not in keep]
        if not candidates:
            return
        _, batch_id = min(candidates)
        batch = pool._batches[batch_id]
        for row, slot in enumerate(batch.slots):
            if pool._slot_batch[slot] == batch_id and pool._slot_row[slot] == row:
                pool._slot_batch[slot] = -1
                pool._dropped.append(int(slot))
        pool._free(batch_id)


def filled_pool(num_slots: int, seed: int) -> tuple[HostKVPool, set[int]]:
    """A pool holding num_slots / 8 full arrays and num_slots / 32 arrays of 8 pages offloaded
    again (their older rows go dead), at its size, then one 64-page offload's 8 new arrays."""
    spec = KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=2, page_size=2, num_pages=4, dtype="float32")
    pool = HostKVPool(spec, num_slots, jax.devices()[0])
    rng = np.random.default_rng(seed)
    for start in range(0, num_slots, HOST_BATCH):
        pool._add_batch(None, list(range(start, start + HOST_BATCH)))
    for _ in range(num_slots // 32):  # 8-page offloads of pages already there: older rows go dead
        pool._add_batch(None, [int(s) for s in rng.choice(num_slots, HOST_BATCH, replace=False)])
    # Steady state: the pool is at its size (dead rows count until their array goes) when the
    # offload arrives, so the keeper lets go of about the offload's 64 rows.
    pool.num_slots = pool.num_rows_held
    new = {pool._add_batch(None, [int(s) for s in rng.choice(num_slots, HOST_BATCH, replace=False)])
           for _ in range(8)}
    return pool, new


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--slots", type=int, default=5431 // HOST_BATCH * HOST_BATCH)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    times = {"scan_per_drop": [], "one_ordering": []}
    for i in range(args.repeats):
        for name in times:
            pool, new = filled_pool(args.slots, i)
            t0 = time.perf_counter()
            if name == "one_ordering":
                pool._keep_within_budget(keep=new)
            else:
                scan_per_drop(pool, new)
            times[name].append(time.perf_counter() - t0)
            assert pool.num_rows_held <= pool.num_slots
    result = {name: {"median_ms": 1e3 * float(np.median(t)), "min_ms": 1e3 * float(np.min(t))}
              for name, t in times.items()}
    pool, _ = filled_pool(args.slots, 0)
    record = {"benchmark": "host_tier_budget", "command": " ".join(sys.argv), "device": platform.processor() or
              platform.machine(), "python": platform.python_version(), "jax": jax.__version__,
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host_slots": args.slots,
              "host_arrays": len(pool._batches), "results": result}
    print(json.dumps(result))
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
