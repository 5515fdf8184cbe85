"""`jaxinfer bench quality`: perplexity of a fixed text through the engine, per quantization.

The text (jaxinfer/bench/data/quality.txt, or --text) is tokenized once and cut into
windows of --window tokens; each window is one prompt whose prompt logprobs the engine
returns (the same path a client's `prompt_logprobs` takes), and the perplexity is exp of the
mean negative log-likelihood over every scored token (each window's first token has no
context and is not scored). Each mode loads the checkpoint afresh and quantizes it as the
engine does for `--quantization`; the float model (the checkpoint in --dtype) is the
baseline every mode is compared with, in the same run.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

DEFAULT_TEXT = Path(__file__).parent / "data" / "quality.txt"


def add_args(sub) -> None:
    from jaxinfer.cli import _add_engine_args

    p = sub.add_parser("quality", help="perplexity of a fixed text for each quantization mode")
    _add_engine_args(p)
    p.add_argument("--modes", default="none,int8,int4,fp8,w8a8_int8,w8a8_fp8,kv-fp8",
                   help="comma list of modes to score: 'none' (the float model), a quantization "
                        "(int8, int4, fp8, w8a8_int8, w8a8_fp8), or kv-fp8 (float weights, fp8 KV cache)")
    p.add_argument("--text", default=str(DEFAULT_TEXT), help="UTF-8 text to score")
    p.add_argument("--window", type=int, default=512, help="tokens per scored prompt")
    p.add_argument("--output-dir", default="benchmarks/results")
    p.add_argument("--tag", default="", help="appended to the result files' names")
    p.set_defaults(func=cmd_quality, preset=None)  # result files are named by --model


def windows(token_ids: list[int], window: int) -> list[list[int]]:
    """Consecutive windows of `window` tokens (the last may be shorter; one of a single token,
    which has nothing to score, is dropped)."""
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    out = [token_ids[i:i + window] for i in range(0, len(token_ids), window)]
    return [w for w in out if len(w) > 1]


def perplexity(llm, prompts: list[list[int]]) -> dict:
    """exp(mean NLL) of every prompt token after the first, from the engine's prompt logprobs."""
    from jaxinfer.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    nll, count = 0.0, 0
    for prompt, out in zip(prompts, outs):
        for token, entry in zip(prompt[1:], out.prompt_logprobs[1:]):
            nll -= entry[token].logprob
            count += 1
    return {"perplexity": math.exp(nll / count), "mean_nll": nll / count, "scored_tokens": count}


def score_modes(model_ref, modes: list[str], prompts: list[list[int]], *, dtype: str = "auto",
                load=None, **engine_kwargs) -> dict[str, dict]:
    """{mode: perplexity record} for each mode ("none" or a quantization method); `load`
    (a callable returning a fresh LoadedModel) replaces loading `model_ref` for each mode."""
    from jaxinfer.llm import LLM

    results = {}
    for mode in modes:
        t0 = time.perf_counter()
        model = load() if load is not None else model_ref
        kwargs = dict(engine_kwargs)
        if mode == "kv-fp8":
            kwargs["kv_cache_dtype"] = "fp8"
        llm = LLM(model, dtype=dtype, quantization=None if mode in ("none", "kv-fp8") else mode, **kwargs)
        results[mode] = perplexity(llm, prompts)
        results[mode]["seconds"] = time.perf_counter() - t0
        del llm
    base = results.get("none")
    if base is not None:
        for r in results.values():
            r["vs_float"] = r["perplexity"] / base["perplexity"] - 1.0
    return results


def cmd_quality(args) -> int:
    from jaxinfer.bench.offline import _save, run_header
    from jaxinfer.cli import engine_config_kwargs
    from jaxinfer.loading.loader import load_tokenizer

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    from jaxinfer.quantization import METHODS

    known = ("none", *METHODS, "kv-fp8")
    for m in modes:
        if m not in known:
            raise SystemExit(f"error: unknown mode {m!r} ({', '.join(known)})")
    tokenizer = load_tokenizer(args.model)
    text = Path(args.text).read_text(encoding="utf-8")
    prompts = windows(tokenizer.encode(text), args.window)
    kwargs = engine_config_kwargs(args)
    kwargs.pop("quantization")
    kwargs.pop("kv_cache_dtype")
    kwargs["max_model_len"] = kwargs.get("max_model_len") or max(len(p) for p in prompts) + 16
    results = score_modes(args.model, modes, prompts, dtype=args.dtype, **kwargs)
    record = dict(run_header(), text=os.path.basename(args.text), window=args.window, results=results)
    table = ["| mode | perplexity | vs float | scored tokens |", "|---|---|---|---|"]
    for mode, r in results.items():
        vs = f"{100 * r['vs_float']:+.2f}%" if "vs_float" in r else "-"
        table.append(f"| {mode} | {r['perplexity']:.3f} | {vs} | {r['scored_tokens']} |")
    print("\n".join(table))
    _save(record, args, "quality", table)
    return 0
