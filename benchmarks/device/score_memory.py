"""Temp memory XLA gives each prompt scorer (and model step) of an 8B engine, by weight format:
prints memory_analysis() of the engine's ahead-of-time executables (no warm-up run)."""
import sys

import jax.numpy as jnp
from flax import nnx

from jaxinfer.config import preset
from jaxinfer.engine.config import EngineConfig
from jaxinfer.engine.engine import LLMEngine
from jaxinfer.loading.loader import LoadedModel
from jaxinfer.models import create_model

for q in sys.argv[1:]:
    config = preset("llama3-8b")
    graphdef, state = nnx.split(create_model(config, dtype=jnp.bfloat16))
    engine = LLMEngine(LoadedModel(config, state, None, ".", graphdef=graphdef),
                       EngineConfig(max_model_len=1024, max_num_batched_tokens=8192, warmup=False,
                                    kv_cache_memory_fraction=0.3, quantization=None if q == "none" else q))
    engine.runner.precompile()
    for key, exe in sorted(engine.runner._executables.items(), key=str):
        if key[0] in ("score", "step"):
            m = exe.memory_analysis()
            print(q, key, "temp GB %.2f" % (m.temp_size_in_bytes / 1e9), "args GB %.2f" % (m.argument_size_in_bytes / 1e9),
                  "out GB %.2f" % (m.output_size_in_bytes / 1e9), flush=True)
    del engine, state
