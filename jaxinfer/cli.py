"""The `jaxinfer` command line: generate (more subcommands join as they land)."""

from __future__ import annotations

import argparse
import json
import sys


def _parse_token_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-token-ids takes comma-separated integers, got {text!r}")
    if not ids or any(i < 0 for i in ids):
        raise argparse.ArgumentTypeError("--prompt-token-ids needs at least one non-negative id")
    return ids


def _add_model_args(p: argparse.ArgumentParser):
    p.add_argument("--model", default=None,
                   help="HF directory, .gguf file, hub id, or alias (default: smollm2-135m-instruct)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="parameter dtype (default: float32 on CPU, bfloat16 on accelerators)")


def _generate_parser(sub):
    p = sub.add_parser("generate", help="generate a completion for one prompt")
    _add_model_args(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="Write a haiku about the sea.")
    src.add_argument("--prompt-token-ids", type=_parse_token_ids, default=None,
                     help="comma-separated token ids fed to the model as they are")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def cmd_generate(args) -> int:
    import jax.numpy as jnp

    from jaxinfer.generate import generate
    from jaxinfer.loading.loader import load_model

    if args.max_tokens < 1:
        raise SystemExit("error: --max-tokens must be at least 1")
    if args.temperature < 0:
        raise SystemExit("error: --temperature must be >= 0")
    dtype = None if args.dtype is None else getattr(jnp, args.dtype)
    loaded = load_model(args.model, dtype=dtype)
    tok = loaded.tokenizer
    if args.prompt_token_ids is not None:
        prompt_ids = args.prompt_token_ids
        bad = [i for i in prompt_ids if i >= loaded.config.vocab_size]
        if bad:
            raise SystemExit(f"error: token ids {bad} are outside the vocabulary (size {loaded.config.vocab_size})")
        prompt_text = tok.decode(prompt_ids, skip_special_tokens=False) if tok else None
    else:
        if tok is None:
            raise SystemExit("error: this checkpoint has no tokenizer; pass --prompt-token-ids")
        prompt_text = args.prompt
        if args.chat:
            prompt_text = tok.apply_chat_template([{"role": "user", "content": args.prompt}],
                                                  add_generation_prompt=True)
            prompt_ids = tok.encode(prompt_text, add_special_tokens=False)
        else:
            prompt_ids = tok.encode(prompt_text)
    eos = tuple(tok.eos_token_ids) if tok else loaded.config.eos_token_ids
    [out] = generate(loaded.params, loaded.config, [prompt_ids], args.max_tokens,
                     temperature=args.temperature, eos_token_ids=eos, seed=args.seed)
    finish_reason = "stop" if out and out[-1] in eos else "length"
    text = tok.decode(out, skip_special_tokens=True) if tok else None
    if args.json:
        print(json.dumps({"prompt": prompt_text, "prompt_token_ids": prompt_ids, "token_ids": out,
                          "text": text, "finish_reason": finish_reason}))
    else:
        print(text if text is not None else " ".join(map(str, out)))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="jaxinfer", description="LLM inference on JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub).set_defaults(func=cmd_generate)
    args = parser.parse_args(argv)
    from jaxinfer.config import UnsupportedModelError
    from jaxinfer.errors import CheckpointError, ModelNotFoundError

    try:
        return args.func(args)
    except (CheckpointError, ModelNotFoundError, UnsupportedModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
