"""Steps of 65-128 tokens (verification at batch 16-64, small mixed steps) cost twice a 64-token
step on the 8B shape. Is it the projections leaving the Pallas skinny-matmul kernel for XLA's
dot above 64 tokens? Times decode steps of the 8B shape (random bf16 weights) for each of the
kernel's token limits given (argv[1], default 64,128) at each batch:k point (argv[2], default
64:0,16:4,64:1: one-token decode at batch 64; batch 16 with 4 forced proposals a request, 80
tokens; batch 64 with 1, 128 tokens). Prints one JSON line per point and writes the record
(device, versions, command, date, the weight floor by the datasheet) to argv[3] if given;
the limit-64 rows are the peer: XLA's dot above 64 tokens, timed in the same run."""
import json
import os

import jax
import jax.numpy as jnp
from flax import nnx

import jaxinfer.engine.engine as engine_module
from jaxinfer.bench.offline import _cost, run_header
from jaxinfer.bench.speculative import _forced_proposals, _step_time
from jaxinfer.devices import datasheet
from jaxinfer.config import preset
from jaxinfer.engine.config import EngineConfig
from jaxinfer.engine.engine import LLMEngine
from jaxinfer.loading.loader import LoadedModel
from jaxinfer.models import create_model
from jaxinfer.models.linear import Linear

config = preset("llama3-8b")
graphdef, state = nnx.split(create_model(config, dtype=jnp.bfloat16))
jax.block_until_ready(state)
model = LoadedModel(config, state, None, ".", graphdef=graphdef)
import sys

limits = [int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "64,128").split(",")]
points = [tuple(map(int, p.split(":"))) for p in (sys.argv[2] if len(sys.argv) > 2 else "64:0,16:4,64:1").split(",")]
rows = []
for limit in limits:
    engine_module.resolve_linear = lambda name, platform=None, mesh=None, limit=limit: Linear(
        kernel="pallas", max_kernel_tokens=limit)
    engine = LLMEngine(model, EngineConfig(max_num_seqs=64, max_num_batched_tokens=512, max_model_len=768,
                                           num_pages=8192, compilation_cache_dir="",
                                           speculative_config={"method": "ngram",
                                                               "num_speculative_tokens": max(k for _, k in points),
                                                               "disable_by_batch_size": 64}))
    for batch, k in points:
        _forced_proposals(engine, k)
        t = _step_time(engine, batch, 512, 32, config.vocab_size, f"l{limit}b{batch}k{k}")
        rows.append({"max_kernel_tokens": limit, "batch_size": batch, "num_speculative_tokens": k,
                     "step_tokens": batch * (1 + k), "step_ms": 1e3 * t})
        print(json.dumps(rows[-1]), flush=True)
    del engine
if len(sys.argv) > 3:
    sheet = datasheet()
    floor_ms = 1e3 * _cost(model).decode_weight_bytes / sheet.memory_bytes_per_s if sheet else None
    header = run_header(["python3", "benchmarks/device/linear_threshold_probe.py", *sys.argv[1:3]])
    os.makedirs(os.path.dirname(sys.argv[3]) or ".", exist_ok=True)
    with open(sys.argv[3], "w") as f:
        json.dump({"benchmark": "linear_threshold", **header, "weight_floor_ms": floor_ms, "results": rows}, f,
                  indent=1)
