"""End-to-end engine benchmarks on random weights: decode at batch 1 (P1) and offline throughput (P2).

Each run reports its floor and, with --hf-peer, HF transformers on the same device in the same
process, and writes a JSON record to benchmarks/results/.

  PYTHONPATH=. python benchmarks/engine_bench.py --preset llama3-8b --mode decode --hf-peer
  PYTHONPATH=. python benchmarks/engine_bench.py --preset llama3-8b --mode offline
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.record import run_header
from jaxinfer.config import preset
from jaxinfer.engine.config import EngineConfig
from jaxinfer.engine.engine import LLMEngine
from jaxinfer.loading.loader import LoadedModel
from jaxinfer.models import llama
from jaxinfer.sampling_params import SamplingParams

HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}


def hbm_bandwidth() -> float | None:
    kind = jax.devices()[0].device_kind
    for name, bw in HBM_BYTES_PER_S.items():
        if name in kind:
            return bw
    return None


def build_engine(config, params, args) -> LLMEngine:
    model = LoadedModel(config=config, params=params, tokenizer=None, path=".")
    t0 = time.perf_counter()
    engine = LLMEngine(model, EngineConfig(
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, page_size=args.page_size,
        attention_backend=args.attention_backend, compilation_cache_dir=args.compilation_cache_dir))
    return engine, time.perf_counter() - t0


def run_requests(engine, prompts, max_tokens):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": p}, params)
    first_token, done = None, 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        if first_token is None and any(o.outputs[0].token_ids for o in outs):
            first_token = time.perf_counter() - t0
        done += sum(o.finished for o in outs)
    return time.perf_counter() - t0, first_token


def hf_peer(config, args, prompts, max_tokens):
    """HF transformers with a static cache on the same GPU, random weights of the same shape."""
    import torch
    import transformers

    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim, rope_theta=config.rope_theta,
        max_position_embeddings=config.max_position_embeddings)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(hf_config).to(torch.bfloat16).eval()
    ids = torch.tensor([prompts[0]], device="cuda")
    kw = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, cache_implementation="static",
              pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, **kw)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, **kw)
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    del model
    torch.cuda.empty_cache()
    return {"name": "hf_transformers_static_cache", "torch": torch.__version__,
            "transformers": transformers.__version__, "seconds": elapsed, "tokens_per_s": max_tokens / elapsed}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="llama3-8b")
    p.add_argument("--mode", choices=("decode", "offline"), default="decode")
    p.add_argument("--input-len", type=int, default=None)
    p.add_argument("--output-len", type=int, default=None)
    p.add_argument("--num-prompts", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--attention-backend", default="xla")
    p.add_argument("--compilation-cache-dir", default="")
    p.add_argument("--hf-peer", action="store_true")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--peer-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    decode = args.mode == "decode"
    args.input_len = args.input_len or (128 if decode else 512)
    args.output_len = args.output_len or (256 if decode else 128)
    args.num_prompts = args.num_prompts or (1 if decode else 256)
    args.max_num_seqs = args.max_num_seqs or (1 if decode else 256)

    config = preset(args.preset)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, config.vocab_size, args.input_len).tolist() for _ in range(args.num_prompts)]
    if args.peer_only:
        print(json.dumps(hf_peer(config, args, prompts, args.output_len)))
        return
    peer = None
    if args.hf_peer:
        # In its own process and before JAX touches the GPU: the two allocators cannot share it.
        import subprocess

        cmd = [sys.executable, __file__, "--peer-only"] + [a for a in (argv or sys.argv[1:]) if a != "--hf-peer"]
        peer = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        print("peer:", peer, flush=True)
    t0 = time.perf_counter()
    params = llama.init_params(config, jax.random.PRNGKey(0), jnp.bfloat16)
    jax.block_until_ready(params)
    init_s = time.perf_counter() - t0
    engine, startup_s = build_engine(config, params, args)
    # One untimed pass over the same shapes so first-use costs stay out of the numbers.
    run_requests(engine, prompts[:1], 4)
    elapsed, ttft = run_requests(engine, prompts, args.output_len)
    gen_tokens = args.num_prompts * args.output_len
    # Decode reads every weight once per step, except the embedding table: one row per token
    # (unless it doubles as the LM head).
    read = {k: v for k, v in params.items() if k != "embed_vd" or config.tie_word_embeddings}
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(read))
    record = {
        "benchmark": f"engine_{args.mode}", **run_header(),
        "preset": args.preset, "args": vars(args), "weights": "random bf16",
        "init_params_s": init_s, "engine_startup_s": startup_s, "seconds": elapsed, "ttft_s": ttft,
        "generated_tokens": gen_tokens, "output_tokens_per_s": gen_tokens / elapsed,
        "total_tokens_per_s": args.num_prompts * (args.input_len + args.output_len) / elapsed,
    }
    bw = hbm_bandwidth()
    if decode and bw:
        floor_s = param_bytes / bw  # every weight read once per token at batch 1
        record["floor_tokens_per_s"] = 1 / floor_s
        record["fraction_of_floor"] = record["output_tokens_per_s"] * floor_s
    if peer is not None:
        record["peer"] = peer
        record["ratio_vs_peer"] = record["output_tokens_per_s"] / record["peer"]["tokens_per_s"]
    os.makedirs(args.out, exist_ok=True)
    name = f"engine_{args.mode}_{args.attention_backend}_{args.preset}_{record['device'].replace(' ', '_')}.json"
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(record, f, indent=2)
    print(json.dumps({k: v for k, v in record.items() if k != "args"}, indent=2))


if __name__ == "__main__":
    main()
