"""The host-memory KV tier's memory and copies: the runner's side of host_tier.py.

The host pool is one numpy array [S, 2, K, L, page_size, H] (slot, k/v, kv head, layer, ...):
a slot is contiguous, so landing or reading a batch of slots is one fancy-indexed copy. The
device pools stay [K, L, P, page_size, H] (the kernels read that layout), so a page is K * 2
strided pieces there: a batch of pages is gathered into one [B, 2, K, L, page_size, H] array by
one jitted program over every layer (one device-to-host transfer per batch), and a reload
scatters one such array back (one host-to-device transfer).

Order within a step (see block_manager.py): this step's offloads are gathered from the pools
as they are before the step touches them, and reloads read the host pool. Offloads are
asynchronous and off the engine's thread: the gathered batch is copied to the host in the
background, and one landing thread writes the batches into the host pool in order, so the
engine thread neither waits for the device-to-host copy nor pays for the host copy (on the
H200 these two made the tier 3x slower at 0% hits when they ran on the engine thread). Reloads
are asynchronous too: the host rows are copied out of the pool (so a later landing cannot change
them) and put on the device without waiting; the scatter is queued before the step that reads
the pages. The engine waits only where it must: a reload of a slot still landing, or more
gathered bytes held on the device than MAX_PENDING_BYTES (those sit outside the KV budget).

The host pool is anonymous memory advised to use huge pages, faulted in by a background thread
at start (slots not yet landed into only): a first write into fresh memory costs more than the
copy itself (measured on the 2-core CPU: 1.45 s/GB into a fresh numpy array, 0.35 with huge
pages, 0.12 into memory already faulted in).
"""

from __future__ import annotations

import concurrent.futures
import mmap
import threading
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxinfer.engine.kv_cache import KVCacheSpec

# Pages per transfer, so that each size compiles once (at warm-up); a step's pages go in as few
# batches of these sizes as cover them.
TRANSFER_BATCHES = (1, 8, 64)
# Gathered pages waiting on the device to land: bounded, since they are outside the KV budget.
MAX_PENDING_BYTES = 1 << 30


def gather_pages(kv_cache, pages_b):
    """[B, 2, K, L, page_size, H]: pages pages_b of the k and v pools [K, L, P, page_size, H]."""
    k, v = kv_cache
    return jnp.stack([k[:, :, pages_b], v[:, :, pages_b]]).transpose(3, 0, 1, 2, 4, 5)


def _scatter_pages(kv_cache, pages_b, rows_b):
    """Writes rows_b [B, 2, K, L, page_size, H] into pages pages_b of both pools."""
    rows = rows_b.transpose(1, 2, 3, 0, 4, 5)  # [2, K, L, B, page_size, H]
    return tuple(pool.at[:, :, pages_b].set(rows[i].astype(pool.dtype)) for i, pool in enumerate(kv_cache))


def host_buffer(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A zeroed numpy array in anonymous memory advised to use transparent huge pages (fewer,
    cheaper first-touch faults than np.empty's 4 KB pages)."""
    dtype = np.dtype(dtype)
    nbytes = max(1, int(np.prod(shape)) * dtype.itemsize)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # a kernel without transparent huge pages: 4 KB pages then
            pass
    return np.frombuffer(buf, dtype, count=int(np.prod(shape))).reshape(shape)


def batches(num: int) -> list[int]:
    """Batch sizes from TRANSFER_BATCHES covering `num` pages: the largest while it fills, then
    the smallest that holds the rest."""
    out = []
    largest = TRANSFER_BATCHES[-1]
    while num >= largest:
        out.append(largest)
        num -= largest
    if num:
        out.append(next(b for b in TRANSFER_BATCHES if b >= num))
    return out


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
        self.pool = host_buffer((num_slots, 2, spec.num_kv_heads, spec.num_layers, spec.page_size, spec.head_dim),
                                jnp.dtype(spec.dtype))
        # (slots, bytes held on the device, the landing's future), oldest first.
        self._landing: list[tuple[list[int], int, concurrent.futures.Future]] = []
        self._lander = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxinfer-kv-land")
        # Slots that hold data: the fault-in thread leaves them alone (it writes zeros).
        self._written = np.zeros(num_slots, bool)
        self._slot_lock = threading.Lock()
        self.faulting_in = threading.Thread(target=self._fault_in, name="jaxinfer-kv-fault-in", daemon=True)
        self.faulting_in.start()
        self._rows_placement = placement
        gather_out, scatter_out = {}, {}
        if kv_sharding is not None:
            self._rows_placement = NamedSharding(kv_sharding.mesh, PartitionSpec(None, None, kv_sharding.spec[0]))
            gather_out = dict(out_shardings=self._rows_placement)
            scatter_out = dict(out_shardings=kv_sharding)
        self._gather = jax.jit(gather_pages, **gather_out)
        self._scatter = jax.jit(_scatter_pages, donate_argnums=(0,), **scatter_out)
        self.num_offloaded = self.num_reloaded = 0

    @property
    def bytes_per_page(self) -> int:
        return self.pool[0].nbytes

    def warmup(self, kv_cache):
        """Compiles every batch size of both copies (on page 0, the scratch page)."""
        for b in TRANSFER_BATCHES:
            pages = np.zeros(b, np.int32)
            jax.block_until_ready(self._gather(kv_cache, pages))
            rows = jax.device_put(np.zeros((b, *self.pool.shape[1:]), self.pool.dtype), self._rows_placement)
            kv_cache = self._scatter(kv_cache, pages, rows)
        return kv_cache

    def apply(self, kv_cache, offloads: Sequence[tuple[int, int]], reloads: Sequence[tuple[int, int]]):
        """Applies one step's copies (see the module docstring); returns the new pools."""
        self._reap()
        landing = {slot for slots, _, _ in self._landing for slot in slots}
        if any(slot in landing for slot, _ in reloads):
            self.land()
        for start, b in transfer_spans(len(offloads)):
            chunk = offloads[start:start + b]
            # Padding reads the scratch page.
            gathered = self._gather(kv_cache, padded_pages([page for page, _ in chunk], 0, b))
            gathered.copy_to_host_async()
            slots = [slot for _, slot in chunk]
            self._landing.append((slots, gathered.nbytes, self._lander.submit(self._land, slots, gathered)))
            self.num_offloaded += len(chunk)
        while sum(nbytes for _, nbytes, _ in self._landing) > MAX_PENDING_BYTES:
            self._wait_first()
        for start, b in transfer_spans(len(reloads)):
            chunk = reloads[start:start + b]
            pages = padded_pages([page for _, page in chunk], 0, b)  # padding writes zeros into the scratch page
            rows = np.zeros((b, *self.pool.shape[1:]), self.pool.dtype)
            rows[:len(chunk)] = self.pool[[slot for slot, _ in chunk]]
            kv_cache = self._scatter(kv_cache, pages, jax.device_put(rows, self._rows_placement))
            self.num_reloaded += len(chunk)
        return kv_cache

    def land(self) -> None:
        """Waits until every offload in flight is in the host pool."""
        while self._landing:
            self._wait_first()

    def _wait_first(self) -> None:
        _, _, future = self._landing.pop(0)
        future.result()  # a failed landing raises here, on the engine's thread

    def _reap(self) -> None:
        """Forgets the landings that are done (raising a failure)."""
        while self._landing and self._landing[0][2].done():
            self._wait_first()

    def _land(self, slots: list[int], gathered) -> None:
        """On the landing thread: the gathered batch into its slots, in order of submission (a
        slot offloaded twice keeps the later page)."""
        rows = np.asarray(gathered)
        for i, slot in enumerate(slots):
            with self._slot_lock:
                self._written[slot] = True
                self.pool[slot] = rows[i]

    def write(self, slot: int, row) -> None:
        """Writes one page's row [2, K, L, page_size, H] into `slot` now (a page moved in from
        elsewhere; call `land` first if an offload may still be landing there)."""
        with self._slot_lock:
            self._written[slot] = True
            self.pool[slot] = row

    def _fault_in(self) -> None:
        """Writes zeros into every slot nothing has landed in yet, so that landings copy into
        memory the operating system has already backed."""
        for slot in range(self.num_slots):
            with self._slot_lock:
                if not self._written[slot]:
                    self.pool[slot] = 0


def padded_pages(pages: Sequence[int], start: int, b: int) -> np.ndarray:
    """Pages [start, start + b) of `pages` as one transfer batch of b, padded with the scratch page 0."""
    chunk = np.zeros(b, np.int32)
    part = pages[start:start + b]
    chunk[:len(part)] = part
    return chunk


def transfer_spans(num: int) -> list[tuple[int, int]]:
    """(start, batch size) of each transfer for `num` pages."""
    out, start = [], 0
    for b in batches(num):
        out.append((start, b))
        start += b
    return out

