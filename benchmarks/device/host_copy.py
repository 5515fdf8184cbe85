"""Device <-> host copy paths for the host KV tier, timed on one batch of gathered pages.

Which way of moving a [B, 2, K, L, page_size, H] batch between the GPU and host memory is fast:
numpy from a device array (pageable memory), a device_put into JAX's pinned host memory, a
jitted gather whose output lives in pinned host memory, and the copies back. Prints one JSON
line per path (GB/s over the batch's bytes, median of --repeats).

  python benchmarks/device/host_copy.py --pages 64 --out $OUT/host_copy.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from jaxinfer.engine.kv_offload import gather_pages


def timed(fn, repeats):
    fn()  # warm (compile, first-touch)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", type=int, default=64)
    ap.add_argument("--pool-pages", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--alloc-batches", type=int, default=0, help="batches held at once to time allocation")
    ap.add_argument("--out")
    args = ap.parse_args()
    dev = jax.devices()[0]
    shape = (args.kv_heads, args.layers, args.pool_pages, args.page_size, args.head_dim)
    kv = (jnp.ones(shape, jnp.bfloat16), jnp.ones(shape, jnp.bfloat16))
    pages = np.arange(1, args.pages + 1, dtype=np.int32) * 7 % args.pool_pages
    gather = jax.jit(gather_pages)
    rows = gather(kv, pages)
    nbytes = rows.nbytes
    results = []

    def report(name, seconds, **extra):
        line = dict(path=name, seconds=seconds, gb_per_s=nbytes / seconds / 1e9, bytes=nbytes, **extra)
        results.append(line)
        print(json.dumps(line), flush=True)

    report("gather on device", timed(lambda: jax.block_until_ready(gather(kv, pages)), args.repeats))

    def to_numpy():
        g = gather(kv, pages)
        g.copy_to_host_async()
        return np.asarray(g)
    t_gather = results[0]["seconds"]
    report("gather + numpy (pageable)", timed(to_numpy, args.repeats), minus_gather=t_gather)

    pinned = None
    try:
        pinned = SingleDeviceSharding(dev, memory_kind="pinned_host")
        report("gather + device_put pinned_host",
               timed(lambda: jax.block_until_ready(jax.device_put(gather(kv, pages), pinned)), args.repeats))
        on_host = jax.device_put(rows, pinned)
        report("numpy of a pinned_host array", timed(lambda: np.asarray(on_host), args.repeats))
        view = np.asarray(on_host)
        report("numpy of pinned_host shares memory", 1.0, shares=bool(np.shares_memory(view, np.asarray(on_host))))
        gather_pinned = jax.jit(gather_pages, out_shardings=pinned)
        report("jit gather out pinned_host", timed(lambda: jax.block_until_ready(gather_pinned(kv, pages)),
                                                   args.repeats))
        on_device = SingleDeviceSharding(dev, memory_kind="device")
        report("pinned_host -> device", timed(lambda: jax.block_until_ready(jax.device_put(on_host, on_device)),
                                              args.repeats))
        host_np = np.asarray(on_host)
        report("numpy -> pinned_host", timed(lambda: jax.block_until_ready(jax.device_put(host_np, pinned)),
                                             args.repeats))
    except Exception as e:  # noqa: BLE001 - report what this JAX cannot do
        print(json.dumps(dict(path="pinned_host", error=repr(e)[:400])), flush=True)

    if pinned is not None and args.alloc_batches:
        # Does host memory come from a cache once freed? Two rounds of holding many batches.
        for rnd in (1, 2):
            t0 = time.perf_counter()
            held = [jax.device_put(gather(kv, pages), pinned) for _ in range(args.alloc_batches)]
            jax.block_until_ready(held)
            report(f"{args.alloc_batches} batches held in pinned_host, round {rnd}",
                   (time.perf_counter() - t0) / args.alloc_batches)
            del held
    host_rows = np.asarray(rows)
    report("numpy -> device", timed(lambda: jax.block_until_ready(jax.device_put(host_rows, dev)), args.repeats))
    pool = np.empty((args.pages * 4, *host_rows.shape[1:]), host_rows.dtype)
    pool[:] = 0
    slots = np.arange(args.pages) * 3 % (args.pages * 4)

    def land():
        pool[slots] = host_rows
    report("host pool fancy-index write (faulted in)", timed(land, args.repeats))

    def land_loop():
        for i, s in enumerate(slots):
            pool[s] = host_rows[i]
    report("host pool per-slot write loop", timed(land_loop, args.repeats))
    report("host pool fancy-index read", timed(lambda: pool[slots], args.repeats))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=str(dev.device_kind), jax=jax.__version__, pages=args.pages, results=results), f,
                      indent=1)


if __name__ == "__main__":
    main()
