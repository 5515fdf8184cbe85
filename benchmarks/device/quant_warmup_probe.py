"""Why a quantized 8B engine's warm-up runs out of memory at --gpu-memory-utilization 0.85:
builds the engine without warm-up, then compiles its programs serially or in parallel threads
and reports device memory (in use, peak) around each phase, and the full error if one occurs."""
import sys
import time
import traceback

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinfer.config import preset
from jaxinfer.engine.config import EngineConfig
from jaxinfer.engine.engine import LLMEngine
from jaxinfer.loading.loader import LoadedModel
from jaxinfer.models import create_model

method, fraction, workers = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])


def mem(tag):
    s = jax.devices()[0].memory_stats()
    print(f"{tag}: in use {s['bytes_in_use'] / 1e9:.1f} GB, peak {s['peak_bytes_in_use'] / 1e9:.1f} GB, "
          f"limit {s['bytes_limit'] / 1e9:.1f} GB, largest free block "
          f"{s.get('largest_free_block_bytes', float('nan')) / 1e9:.1f} GB", flush=True)


config = preset("llama3-8b")
graphdef, state = nnx.split(create_model(config, dtype=jnp.bfloat16))
mem("weights made")
engine = LLMEngine(LoadedModel(config, state, None, ".", graphdef=graphdef),
                   EngineConfig(max_num_batched_tokens=8192, warmup=False, kv_cache_memory_fraction=fraction,
                                quantization=None if method == "none" else method))
del state
mem(f"engine built ({engine.kv_spec.num_pages} pages)")
try:
    t0 = time.perf_counter()
    n = engine.runner.precompile(max_workers=workers or None)
    mem(f"compiled {n} programs with {workers or 'default'} workers in {time.perf_counter() - t0:.1f} s")
    engine.runner.warmup(progress=False)
    mem("warm-up ran")
    print("OK", method, fraction, workers)
except Exception as e:  # the point is to see the allocation that fails
    mem("failed")
    print("FAILED", method, fraction, workers, type(e).__name__, str(e)[:3000])
    traceback.print_exc(limit=6)
