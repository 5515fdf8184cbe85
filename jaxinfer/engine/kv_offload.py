"""The host-memory KV tier's memory and copies: the runner's side of host_tier.py.

The device pools are [K, L, P, page_size, H]: a page is K * 2 strided pieces there. A step's
offloaded pages are gathered over every layer by one jitted program per transfer size
(TRANSFER_BATCHES) into device arrays of at most HOST_BATCH pages [b, 2, K, L, page_size, H],
each then copied into the host's pinned memory by one DMA (36-42 GB/s on the H200, where reading
a device array into pageable numpy memory ran at 1 GB/s, `benchmarks/results/host_copy_*`).
These host arrays ("batches") are never written again: a host slot names a row of one batch,
and a slot offloaded anew moves to a row of a newer batch. A reload copies back by DMA only the
batches holding the rows asked for (a batch's other rows, at most HOST_BATCH - 1 of them, land
in the scratch page 0) and scatters the rows into their pages before the step that reads them.

A step's copies are queued in this order, so that a reload waits for nothing of its own step
(on the GPU runtime a copy into a new buffer first waits for the programs queued before it):
  1. the reloads' copies to the device (they read only batches of earlier steps);
  2. the offloads' gathers, on the device, which read their pages before
  3. the reloads' scatters overwrite them;
  4. the offloads' copies to the host, which then run beside the step's forward pass. (A
     gather whose output lived in host memory held the device's queue for its whole DMA, and
     the reload and the step waited behind it.)
Nothing waits on the engine's thread: the copies are dispatched, and a batch's reload waits on
the device for its copy to the host to have landed.

A batch's memory is freed when none of its rows is the current copy of a slot. Rows left behind
by slots offloaded again can pile up (a slot kept in the tier by hits sits in an old batch); when
the batches hold more rows than the pool's slots, the batch with the smallest share of live rows
is let go, and its slots are reported (`take_dropped`) so the tier forgets them before the next step
is planned: memory never exceeds the configured size, and a dropped page is a cache miss,
never a stale read.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from jaxinfer.engine.kv_cache import KVCacheSpec

# Pages per gather (and per scatter), so that each size compiles once (at warm-up). Offloads use
# an exact decomposition into these sizes (a batch holds no padding rows, which would waste host
# memory).
TRANSFER_BATCHES = (1, 8, 64)
# Pages per host array. A reload moves whole arrays, so this bounds the rows it moves that were
# not asked for, while an array stays a large DMA (16 MiB of Llama-3-8B). Timed one at a time, a
# 16 MiB copy took 0.84 ms and a 128 MiB one 3.3 ms: ~0.45 ms a copy plus 45 GB/s, where the fixed
# part is mostly the timed wait itself, which copies queued back to back should not pay one by
# one (not measured). Each transfer size is a multiple of it or smaller.
HOST_BATCH = 8


def gather_pages(kv_cache, pages_b):
    """[B, 2, K, L, page_size, H]: pages pages_b of the k and v pools [K, L, P, page_size, H]."""
    k, v = kv_cache
    return jnp.stack([k[:, :, pages_b], v[:, :, pages_b]]).transpose(3, 0, 1, 2, 4, 5)


def _gather_batches(kv_cache, pages_b):
    """gather_pages, as host batches [<= HOST_BATCH, 2, K, L, page_size, H] in page order."""
    rows = gather_pages(kv_cache, pages_b)
    return tuple(rows[i:i + HOST_BATCH] for i in range(0, rows.shape[0], HOST_BATCH))


def _scatter_pages(kv_cache, pages_b, rows_b):
    """Writes rows_b [B, 2, K, L, page_size, H] into pages pages_b of both pools."""
    rows = rows_b.transpose(1, 2, 3, 0, 4, 5)  # [2, K, L, B, page_size, H]
    return tuple(pool.at[:, :, pages_b].set(rows[i].astype(pool.dtype)) for i, pool in enumerate(kv_cache))


def _scatter_batches(kv_cache, pages_b, batches):
    """Writes host batches (a tuple, as a gather of len(pages_b) pages makes them) into pages_b."""
    return _scatter_pages(kv_cache, pages_b, batches[0] if len(batches) == 1 else jnp.concatenate(batches))


def batch_sizes(num: int) -> list[int]:
    """Rows of each host batch a transfer of `num` pages makes (one of TRANSFER_BATCHES)."""
    return [min(num, HOST_BATCH)] * -(-num // HOST_BATCH)


def exact_spans(num: int) -> list[tuple[int, int]]:
    """(start, batch size) of transfers covering exactly `num` pages, largest sizes first."""
    out, start = [], 0
    for b in sorted(TRANSFER_BATCHES, reverse=True):
        while num - start >= b:
            out.append((start, b))
            start += b
    return out


def host_memory_kind(device) -> str:
    """The memory space host copies live in: pinned (DMA-able) where the backend has it."""
    kinds = {m.kind for m in device.addressable_memories()}
    for kind in ("pinned_host", "unpinned_host"):
        if kind in kinds:
            return kind
    raise ValueError(f"the host KV tier needs a host memory space; {device.platform} offers {sorted(kinds)}")


def rows_shardings(pools_placement) -> tuple[jax.sharding.Sharding, jax.sharding.Sharding]:
    """Where a batch of gathered pages [B, 2, K, L, page_size, H] lives on the device and in host
    memory, for pools placed on `pools_placement` (a device, or the pools' NamedSharding on a
    mesh, whose kv heads the rows keep split)."""
    if isinstance(pools_placement, NamedSharding):
        mesh, spec = pools_placement.mesh, PartitionSpec(None, None, pools_placement.spec[0])
        host = host_memory_kind(mesh.devices.flat[0])
        return NamedSharding(mesh, spec, memory_kind="device"), NamedSharding(mesh, spec, memory_kind=host)
    device = pools_placement if isinstance(pools_placement, jax.Device) else next(iter(pools_placement.device_set))
    return (SingleDeviceSharding(device, memory_kind="device"),
            SingleDeviceSharding(device, memory_kind=host_memory_kind(device)))


@dataclasses.dataclass
class _Batch:
    rows: jax.Array  # [b, 2, K, L, page_size, H] in host memory, b <= HOST_BATCH
    slots: np.ndarray  # the slot each row was written for
    live: int = 0  # rows that are still their slot's current copy


def _scatter_runs(reads: list) -> list[list]:
    """Splits reads of host batches into runs a scatter compiled at warm-up takes: the batches of
    one transfer size's gather (e.g. 8 batches of 8 rows), largest runs first."""
    by_rows: dict[int, list] = {}
    for read in reads:
        by_rows.setdefault(len(read[0].slots), []).append(read)
    runs = []
    for rows, same in by_rows.items():
        counts = sorted({len(batch_sizes(b)) for b in TRANSFER_BATCHES if batch_sizes(b)[0] == rows}, reverse=True)
        start = 0
        for count in counts:
            while len(same) - start >= count:
                runs.append(same[start:start + count])
                start += count
        if start != len(same):
            raise ValueError(f"no scatter takes host batches of {rows} rows")
    return runs


class HostKVPool:
    """The host pool of `num_slots` pages and its copies to and from the device pools.

    Args:
      spec: the device KV cache's spec (dtype, shape of a page).
      num_slots: pages the host pool holds.
      placement: where the device-side arrays live (a device, or a sharding on a mesh).
      kv_sharding: the pools' sharding on a mesh (kv heads split), else None.
    """

    TRANSFER_BATCHES = TRANSFER_BATCHES

    def __init__(self, spec: KVCacheSpec, num_slots: int, placement, kv_sharding=None):
        if num_slots < 1:
            raise ValueError(f"a host KV pool needs at least one slot, got {num_slots}")
        self.spec = spec
        self.num_slots = num_slots
        self.row_shape = (2, spec.num_kv_heads, spec.num_layers, spec.page_size, spec.head_dim)
        self.dtype = np.dtype(jnp.dtype(spec.dtype))
        scatter_out = dict(out_shardings=kv_sharding) if kv_sharding is not None else {}
        self._device_rows, self._host_rows = rows_shardings(kv_sharding or placement)
        # The gather's batches stay on the device: their copies to the host are queued apart,
        # after the step's scatters (see the module docstring).
        self._gather = jax.jit(_gather_batches, out_shardings=self._device_rows)
        self._scatter = jax.jit(_scatter_batches, donate_argnums=(0,), **scatter_out)
        # Where each slot's current copy is: batch id (-1: none) and row.
        self._slot_batch = np.full(num_slots, -1, np.int64)
        self._slot_row = np.zeros(num_slots, np.int64)
        self._batches: dict[int, _Batch] = {}
        self._next_batch = 0
        self.num_rows_held = 0  # rows of every batch in memory, live or not
        self._dropped: list[int] = []
        self.num_offloaded = self.num_reloaded = self.num_dropped = 0
        # Rows copied to the host and back by `apply` (a reload moves its batches' other rows too).
        self.num_rows_to_host = self.num_rows_to_device = 0

    @property
    def bytes_per_page(self) -> int:
        return int(np.prod(self.row_shape)) * self.dtype.itemsize

    def warmup(self, kv_cache):
        """Compiles every transfer size's gather and scatter (on page 0, the scratch page), runs
        their copies, and starts reserving the pool's host memory in the background."""
        for b in TRANSFER_BATCHES:
            pages = np.zeros(b, np.int32)
            host = jax.block_until_ready(self._to_host(self._gather(kv_cache, pages)))
            kv_cache = self._scatter(kv_cache, pages, self._to_device(host))
        threading.Thread(target=self._reserve, name="jaxinfer-kv-host-reserve", daemon=True).start()
        return kv_cache

    def _reserve(self) -> None:
        """Takes the pool's size of host memory once, in batches as offloads take it, and gives
        it back: the runtime keeps freed host memory for reuse, and pinning fresh memory is slow
        (1 GB/s on the H200's host, 30x slower than the copy into it), so the first offloads
        would otherwise pay for it."""
        b = min(HOST_BATCH, self.num_slots)
        # Put, not jnp.zeros: a transfer compiles nothing (this runs while the engine serves).
        zeros = jax.device_put(np.zeros((b, *self.row_shape), self.dtype), self._device_rows)
        jax.block_until_ready(self._to_host((zeros,) * -(-self.num_slots // b)))

    def _to_host(self, batches) -> tuple:
        """Copies of device batches in host memory: one DMA each, queued in one call."""
        return tuple(jax.device_put(tuple(batches), self._host_rows))

    def _to_device(self, batches) -> tuple:
        """Copies of host batches on the device: one DMA each, queued in one call."""
        return tuple(jax.device_put(tuple(batches), self._device_rows))

    def apply(self, kv_cache, offloads: Sequence[tuple[int, int]], reloads: Sequence[tuple[int, int]]):
        """Applies one step's copies and returns the new pools. Offloads (device page, slot) read
        the pools as they are before the step; reloads (slot, device page) read the slots as
        they were before the step (a slot the tier gave to another page in this same step still
        reloads its old page) and then write the pools."""
        sources: dict[int, tuple[_Batch, list[tuple[int, int]]]] = {}
        for slot, page in reloads:
            batch_id = int(self._slot_batch[slot])
            if batch_id < 0:
                raise ValueError(f"host slot {slot} holds no page")
            sources.setdefault(batch_id, (self._batches[batch_id], []))[1].append((int(self._slot_row[slot]), page))
        # 1. Only the batches holding rows asked for go back, first (module docstring).
        runs = _scatter_runs(list(sources.values()))
        reads = [read for run in runs for read in run]
        on_device = iter(self._to_device([batch.rows for batch, _ in reads]) if reads else ())
        self.num_rows_to_device += sum(len(batch.slots) for batch, _ in reads)
        # 2. The offloads' gathers read the pages before anything of this step writes them.
        gathered = []
        for start, b in exact_spans(len(offloads)):
            chunk = offloads[start:start + b]
            gathered += self._gather(kv_cache, np.array([page for page, _ in chunk], np.int32))
        # 3. The scatters; rows not asked for go to the scratch page.
        for run in runs:
            pages = []
            for batch, targets in run:
                run_pages = np.zeros(len(batch.slots), np.int32)
                for row, page in targets:
                    run_pages[row] = page
                pages.append(run_pages)
            kv_cache = self._scatter(kv_cache, np.concatenate(pages), tuple(next(on_device) for _ in run))
        self.num_reloaded += len(reloads)
        # 4. The copies to the host, behind the scatters; batches freed here by slots written
        # anew were already read above.
        new, start = [], 0
        for batch in self._to_host(gathered) if gathered else ():
            new.append(self._add_batch(batch, [slot for _, slot in offloads[start:start + batch.shape[0]]]))
            start += batch.shape[0]
        self.num_offloaded += len(offloads)
        self.num_rows_to_host += len(offloads)
        self._keep_within_budget(keep=set(new))
        return kv_cache

    def write_rows(self, slots: Sequence[int], rows: np.ndarray) -> None:
        """Writes pages' rows [N, 2, K, L, page_size, H] (moved in from elsewhere) into `slots`,
        readable by the next step."""
        sizes = [n for _, b in exact_spans(len(slots)) for n in batch_sizes(b)]
        starts = np.cumsum([0] + sizes)
        host = jax.device_put([np.ascontiguousarray(rows[s:s + n], self.dtype) for s, n in zip(starts, sizes)],
                              self._host_rows)
        new = [self._add_batch(batch, list(slots[s:s + n])) for batch, s, n in zip(host, starts, sizes)]
        self._keep_within_budget(keep=set(new))

    def read(self, slot: int) -> np.ndarray:
        """The slot's current copy [2, K, L, page_size, H] (waits for its transfer)."""
        batch_id = int(self._slot_batch[slot])
        if batch_id < 0:
            raise ValueError(f"host slot {slot} holds no page")
        return np.asarray(self._batches[batch_id].rows)[int(self._slot_row[slot])]

    def land(self) -> None:
        """Waits until every transfer to host memory has finished."""
        jax.block_until_ready([batch.rows for batch in self._batches.values()])

    def take_dropped(self) -> list[int]:
        """Slots whose memory was let go since the last call (the tier must forget them)."""
        out, self._dropped = self._dropped, []
        return out

    def _add_batch(self, rows: jax.Array, slots: list[int]) -> int:
        batch_id = self._next_batch
        self._next_batch += 1
        batch = self._batches[batch_id] = _Batch(rows, np.asarray(slots, np.int64))
        self.num_rows_held += len(slots)
        for row, slot in enumerate(slots):
            if self._slot_batch[slot] == batch_id:  # written twice in this batch: the later row counts
                batch.live -= 1
            else:
                self._release(slot)
            self._slot_batch[slot], self._slot_row[slot] = batch_id, row
            batch.live += 1
        return batch_id

    def _release(self, slot: int) -> None:
        """The slot's current copy is no longer needed: its batch loses a live row."""
        batch_id = int(self._slot_batch[slot])
        if batch_id < 0:
            return
        self._slot_batch[slot] = -1
        batch = self._batches[batch_id]
        batch.live -= 1
        if batch.live == 0:
            self._free(batch_id)

    def _free(self, batch_id: int) -> None:
        self.num_rows_held -= len(self._batches.pop(batch_id).slots)

    def _keep_within_budget(self, keep: set[int]) -> None:
        """Lets the batches with the smallest share of live rows (oldest first) go while more rows
        are held than the pool has slots; batches just written stay. (By share, not count: a
        one-page batch has one live row, and dropping it frees nothing that was dead.)"""
        if self.num_rows_held <= self.num_slots:
            return
        # Dropping a batch changes no other batch's share (its slots are forgotten, not moved),
        # so one ordering serves every drop of this call.
        order = sorted((b.live / len(b.slots), bid) for bid, b in self._batches.items() if bid not in keep)
        for _, batch_id in order:
            if self.num_rows_held <= self.num_slots:
                return
            batch = self._batches[batch_id]
            for row, slot in enumerate(batch.slots):
                if self._slot_batch[slot] == batch_id and self._slot_row[slot] == row:
                    self._slot_batch[slot] = -1
                    self._dropped.append(int(slot))
                    self.num_dropped += 1
            self._free(batch_id)
