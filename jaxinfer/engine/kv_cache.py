"""The device KV cache: one pair of page pools, every layer stacked.

Layout: `k_pages`, `v_pages`, each [K, L, P, page_size, H] (kv head, then layer major). A kv
head's page is one contiguous [page_size, H] tile, which is what a decode kernel program reads;
the layer axis lets the model's layer scan carry the whole cache and update a layer's slice in
place, and since a kv head's layers are contiguous, a kernel sees layer l's page p as page
l * P + p of a [K, L * P, page_size, H] view (a free reshape). Tensor parallelism shards axis 0.
Page 0 is scratch: padding tokens write there and unused block-table entries point there, so
no index is ever out of bounds.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxinfer.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    num_pages: int
    dtype: str = "bfloat16"

    def __post_init__(self):
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {self.page_size}")
        if self.num_pages < 2:
            raise ValueError(f"the KV cache needs at least 2 pages (page 0 is scratch), got {self.num_pages}")

    @property
    def pool_shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_kv_heads, self.num_layers, self.num_pages, self.page_size, self.head_dim)

    @staticmethod
    def bytes_per_page(config: ModelConfig, page_size: int, dtype, head_dim: int | None = None) -> int:
        """head_dim: the cache's head size (the attention backend's; default the model's)."""
        head_dim = head_dim or config.head_dim
        return 2 * config.num_layers * config.num_kv_heads * page_size * head_dim * jnp.dtype(dtype).itemsize

    @property
    def total_bytes(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.num_pages * self.page_size * self.head_dim * \
            jnp.dtype(self.dtype).itemsize


# Headroom below the largest free block for the allocator's rounding of the two pools.
_ALLOCATOR_SLACK = 64 << 20


def pages_for_memory_fraction(config: ModelConfig, page_size: int, dtype, fraction: float,
                              device=None, head_dim: int | None = None) -> int | None:
    """Pages that fit in `fraction` of the device's free memory, or None where the device
    reports no memory statistics (the CPU): callers then need an explicit page count.

    device: default the one `jax.default_device` names (a data-parallel front end builds each
    replica under its own), else this process's first device (in a multi-process run
    `jax.devices()[0]` may belong to another process)."""
    default = jax.config.jax_default_device
    device = device or (default if isinstance(default, jax.Device) else jax.local_devices()[0])
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:
        return None
    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    budget = int(free * fraction)
    # The pools are two large arrays, and free memory need not be one block: weights quantized
    # on the device leave their float originals' space as a hole below the quantized ones
    # (8B int8 on an H200: a 16 GB hole under 88 GB above, so 0.85 of all free memory could not
    # be placed). The pools take the largest block; holes serve the steps' temporaries.
    largest = stats.get("largest_free_block_bytes")
    if largest:
        budget = min(budget, largest - _ALLOCATOR_SLACK)
    pages = max(budget, 0) // KVCacheSpec.bytes_per_page(config, page_size, dtype, head_dim)
    if jax.process_count() > 1:
        # Every process must plan the same steps (docs/sharding.md, multi-host), so all take the
        # smallest count; the processes reach this point together, as they run the same engine.
        import numpy as np
        from jax.experimental import multihost_utils

        pages = int(np.min(multihost_utils.process_allgather(np.int64(pages))))
    return pages


def allocate_kv_cache(spec: KVCacheSpec, sharding=None, fill: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """Allocates the (k, v) page pools; `fill=nan` poisons them (tests: nothing unwritten may be read)."""
    def pool():
        return jnp.full(spec.pool_shape, fill, dtype=spec.dtype, device=sharding)

    return pool(), pool()
