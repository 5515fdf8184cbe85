"""HF transformers as the peer of the offline benchmarks, run in its own process.

The parent writes a spec (the model, the prompts, what to time) to a JSON file and runs
`python -m jaxinfer.bench.hf_peer SPEC`, before JAX touches an accelerator (two allocators
cannot share one), and reads one JSON line back. Latency: `generate` with a static cache on
GPUs and eager on the CPU (HF's defaults there), time to first token from a one-token
`generate`. Throughput: `generate_batch` (continuous batching) where this transformers has it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time


def run_peer(spec: dict, timeout_s: float = 1800) -> dict:
    """Runs the peer in a subprocess; returns its result, or {"error": ...} if it failed."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        proc = subprocess.run([sys.executable, "-m", "jaxinfer.bench.hf_peer", f.name], capture_output=True,
                              text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s} s"}
    finally:
        os.unlink(f.name)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout)[-2000:]}
    return json.loads(lines[-1])


def _preset_hf_config(c: dict, transformers):
    """The HF config of a random-weight preset (jaxinfer.config.PRESETS): Llama, Mixtral or
    Qwen3-MoE shapes."""
    common = dict(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_hidden_layers=c["num_layers"],
                  num_attention_heads=c["num_heads"], num_key_value_heads=c["num_kv_heads"], head_dim=c["head_dim"],
                  rope_theta=c["rope_theta"], rms_norm_eps=c["rms_norm_eps"],
                  max_position_embeddings=c["max_position_embeddings"], tie_word_embeddings=c["tie_word_embeddings"])
    if c["model_type"] == "llama":
        return transformers.LlamaConfig(intermediate_size=c["intermediate_size"], **common)
    if c["model_type"] == "mixtral":
        return transformers.MixtralConfig(intermediate_size=c["moe_intermediate_size"],
                                          num_local_experts=c["num_experts"],
                                          num_experts_per_tok=c["num_experts_per_tok"], **common)
    if c["model_type"] == "qwen3_moe":
        return transformers.Qwen3MoeConfig(intermediate_size=c["intermediate_size"],
                                           moe_intermediate_size=c["moe_intermediate_size"],
                                           num_experts=c["num_experts"], num_experts_per_tok=c["num_experts_per_tok"],
                                           norm_topk_prob=c["norm_topk_prob"], **common)
    raise ValueError(f"the HF peer builds random llama, mixtral and qwen3_moe models, not {c['model_type']!r}")


def _load_model(spec: dict, torch, transformers):
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[spec["dtype"]]
    device = spec["device"]
    if spec.get("preset_config"):
        config = _preset_hf_config(spec["preset_config"], transformers)
        with torch.device(device):
            return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    path = spec["path"]
    if path.endswith(".gguf"):
        directory, name = os.path.split(path)
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=dtype)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device).eval()


def _latency(spec: dict, model, torch) -> dict:
    device = spec["device"]
    ids = torch.tensor(spec["prompts"], device=device)
    mask = torch.ones_like(ids)
    out_len = spec["output_len"]
    extra = {"cache_implementation": "static"} if device == "cuda" else {}

    def timed(n: int) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=0, **extra)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    with torch.no_grad():
        timed(min(4, out_len))  # warm-up: kernels, caches, the static cache's allocation
        ttft = sorted(timed(1) for _ in range(spec["num_iters"]))[spec["num_iters"] // 2]
        e2e = sorted(timed(out_len) for _ in range(spec["num_iters"]))[spec["num_iters"] // 2]
    batch = ids.shape[0]
    return {"ttft_s": ttft, "latency_s": e2e,
            "decode_tokens_per_s": batch * (out_len - 1) / max(e2e - ttft, 1e-9),
            "prefill_tokens_per_s": batch * ids.shape[1] / ttft,
            "cache": extra.get("cache_implementation", "dynamic")}


def _throughput(spec: dict, model, torch, transformers) -> dict:
    if not hasattr(model, "generate_batch"):
        return {"error": f"transformers {transformers.__version__} has no generate_batch"}
    config = transformers.GenerationConfig(max_new_tokens=spec["output_len"], min_new_tokens=spec["output_len"],
                                           do_sample=False, eos_token_id=-1, pad_token_id=0)
    with torch.no_grad():
        model.generate_batch(inputs=spec["prompts"][:8], generation_config=config)  # warm-up
        if spec["device"] == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs = model.generate_batch(inputs=spec["prompts"], generation_config=config)
        if spec["device"] == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
    generated = sum(len(o.generated_tokens) for o in outs.values())
    return {"seconds": elapsed, "generated_tokens": generated, "output_tokens_per_s": generated / elapsed,
            "api": "generate_batch"}


def main(argv=None) -> int:
    import torch
    import transformers

    (path,) = argv if argv is not None else sys.argv[1:]
    with open(path) as f:
        spec = json.load(f)
    if spec["device"] == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"error": "torch sees no CUDA device"}))
        return 0
    model = _load_model(spec, torch, transformers)
    result = _latency(spec, model, torch) if spec["mode"] == "latency" else \
        _throughput(spec, model, torch, transformers)
    result.update(name="hf_transformers", torch=torch.__version__, transformers=transformers.__version__,
                  threads=torch.get_num_threads(), device=spec["device"], dtype=spec["dtype"])
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
