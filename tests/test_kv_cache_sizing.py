"""KV cache sizing from a device's memory statistics."""
from jaxinfer.config import preset
from jaxinfer.engine.kv_cache import KVCacheSpec, pages_for_memory_fraction

GB = 10**9


class _Device:
    def __init__(self, **stats):
        self.stats = stats

    def memory_stats(self):
        return self.stats


def _page_bytes(config):
    return KVCacheSpec.bytes_per_page(config, 16, "bfloat16")


def test_fraction_of_free_memory():
    config = preset("llama3-8b")
    device = _Device(bytes_limit=112 * GB, bytes_in_use=12 * GB)
    pages = pages_for_memory_fraction(config, 16, "bfloat16", 0.5, device=device)
    assert pages == (50 * GB) // _page_bytes(config)


def test_pools_fit_the_largest_free_block():
    # 100 GB free, but only 60 GB of it in one block (a hole left by weights quantized on the
    # device): the pools are bounded by the block, less the allocator's slack.
    config = preset("llama3-8b")
    device = _Device(bytes_limit=112 * GB, bytes_in_use=12 * GB, largest_free_block_bytes=60 * GB)
    pages = pages_for_memory_fraction(config, 16, "bfloat16", 0.85, device=device)
    assert pages * _page_bytes(config) <= 60 * GB - (32 << 20)
    assert pages * _page_bytes(config) > 59 * GB
    # A block larger than the fraction does not raise it.
    device.stats["largest_free_block_bytes"] = 99 * GB
    assert pages_for_memory_fraction(config, 16, "bfloat16", 0.5, device=device) == (50 * GB) // _page_bytes(config)


def test_no_statistics_means_no_answer():
    config = preset("llama3-8b")
    assert pages_for_memory_fraction(config, 16, "bfloat16", 0.5, device=_Device()) is None
