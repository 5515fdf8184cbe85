"""The host-memory KV tier's memory and copies: the runner's side of host_tier.py.

The device pools are [K, L, P, page_size, H]: a page is K * 2 strided pieces there. A step's
offloaded pages are gathered by one jitted program over every layer into a batch
[B, 2, K, L, page_size, H] whose output lives in the host's pinned memory (the program's
transfer is one DMA: 36-40 GB/s on the H200, where reading a device array into pageable numpy
memory ran at 1 GB/s, `benchmarks/results/host_copy_*`). Batches are never written again: a
host slot names a row of one batch, and a slot offloaded anew moves to a row of a newer batch.
So an offload costs the engine's thread only the dispatch, nothing waits for a transfer to
land, and a reload puts whole batches back on the device by DMA (a batch is kept whole, so a
reload moves its other rows too, which land in the scratch page 0) and scatters the named rows
into their pages before the step that reads them.

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

# Pages per transfer, so that each size compiles once (at warm-up). Offloads use an exact
# decomposition into these sizes (a batch holds no padding rows, which would waste host memory).
TRANSFER_BATCHES = (1, 8, 64)


def gather_pages(kv_cache, pages_b):
    """[B, 2, K, L, page_size, H]: pages pages_b of the k and v pools [K, L, P, page_size, H]."""
    k, v = kv_cache
    return jnp.stack([k[:, :, pages_b], v[:, :, pages_b]]).transpose(3, 0, 1, 2, 4, 5)


def _scatter_pages(kv_cache, pages_b, rows_b):
    """Writes rows_b [B, 2, K, L, page_size, H] into pages pages_b of both pools."""
    rows = rows_b.transpose(1, 2, 3, 0, 4, 5)  # [2, K, L, B, page_size, H]
    return tuple(pool.at[:, :, pages_b].set(rows[i].astype(pool.dtype)) for i, pool in enumerate(kv_cache))


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
    rows: jax.Array  # [B, 2, K, L, page_size, H] in host memory
    slots: np.ndarray  # the slot each row was written for
    live: int = 0  # rows that are still their slot's current copy


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
        self._gather = jax.jit(gather_pages, out_shardings=self._host_rows)
        self._scatter = jax.jit(_scatter_pages, donate_argnums=(0,), **scatter_out)
        # Where each slot's current copy is: batch id (-1: none) and row.
        self._slot_batch = np.full(num_slots, -1, np.int64)
        self._slot_row = np.zeros(num_slots, np.int64)
        self._batches: dict[int, _Batch] = {}
        self._next_batch = 0
        self.num_rows_held = 0  # rows of every batch in memory, live or not
        self._dropped: list[int] = []
        self.num_offloaded = self.num_reloaded = self.num_dropped = 0

    @property
    def bytes_per_page(self) -> int:
        return int(np.prod(self.row_shape)) * self.dtype.itemsize

    def warmup(self, kv_cache):
        """Compiles every batch size of both copies (on page 0, the scratch page), and starts
        reserving the pool's host memory in the background."""
        for b in TRANSFER_BATCHES:
            pages = np.zeros(b, np.int32)
            rows = jax.device_put(jax.block_until_ready(self._gather(kv_cache, pages)), self._device_rows)
            kv_cache = self._scatter(kv_cache, pages, rows)
        threading.Thread(target=self._reserve, name="jaxinfer-kv-host-reserve", daemon=True).start()
        return kv_cache

    def _reserve(self) -> None:
        """Takes the pool's size of host memory once and gives it back: the runtime keeps freed
        host memory for reuse, and pinning fresh memory is slow (1 GB/s on the H200's host, 30x
        slower than the copy into it), so the first offloads would otherwise pay for it."""
        b = TRANSFER_BATCHES[-1]
        # Put, not jnp.zeros: a transfer compiles nothing (this runs while the engine serves).
        zeros = jax.device_put(np.zeros((b, *self.row_shape), self.dtype), self._device_rows)
        held = [jax.device_put(zeros, self._host_rows) for _ in range(-(-self.num_slots // b))]
        jax.block_until_ready(held)

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
        new = []
        for start, b in exact_spans(len(offloads)):
            chunk = offloads[start:start + b]
            rows = self._gather(kv_cache, np.array([page for page, _ in chunk], np.int32))
            new.append(self._add_batch(rows, [slot for _, slot in chunk]))
        self.num_offloaded += len(offloads)
        for batch, targets in sources.values():  # batches freed by the offloads above are still held here
            pages = np.zeros(len(batch.slots), np.int32)  # rows not asked for go to the scratch page
            for row, page in targets:
                pages[row] = page
            kv_cache = self._scatter(kv_cache, pages, jax.device_put(batch.rows, self._device_rows))
        self.num_reloaded += len(reloads)
        self._keep_within_budget(keep=set(new))
        return kv_cache

    def write_rows(self, slots: Sequence[int], rows: np.ndarray) -> None:
        """Writes pages' rows [N, 2, K, L, page_size, H] (moved in from elsewhere) into `slots`,
        readable by the next step."""
        new = []
        for start, b in exact_spans(len(slots)):
            host = jax.device_put(np.ascontiguousarray(rows[start:start + b], self.dtype), self._host_rows)
            new.append(self._add_batch(host, list(slots[start:start + b])))
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
        while self.num_rows_held > self.num_slots:
            candidates = [(b.live / len(b.slots), bid) for bid, b in self._batches.items() if bid not in keep]
            if not candidates:
                return
            _, batch_id = min(candidates)
            batch = self._batches[batch_id]
            for row, slot in enumerate(batch.slots):
                if self._slot_batch[slot] == batch_id and self._slot_row[slot] == row:
                    self._slot_batch[slot] = -1
                    self._dropped.append(int(slot))
                    self.num_dropped += 1
            self._free(batch_id)

