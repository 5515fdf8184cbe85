"""Does the engine's EAGLE path accept what the head predicts? Two measures of one head:

1. teacher-forced: over greedy answers the model gave to held-out prompts, how often the
   head's first guess (from the model's true features) is the model's own next token, i.e. the
   rate at which a first proposal should be accepted;
2. the engine: the same prompts through the engine with the head (greedy), the acceptance rate
   of first proposals (vLLM's per-position counter, position 0).

A path that feeds the head what it was trained on gives (2) close to (1) (they differ only in
which positions propose). Trains a small head first unless --head is given.

    python benchmarks/eagle_acceptance.py --model M --out benchmarks/results/eagle_acceptance_X.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--head", default=None, help="a trained head's directory (default: train one here)")
    p.add_argument("--messages", type=int, default=40, help="training messages (stdlib docstrings, questions)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--cls-weight", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-prompts", type=int, default=6)
    p.add_argument("--eval-tokens", type=int, default=64)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    import jax
    from flax import nnx

    from jaxinfer.bench.speculative import _workload_prompts
    from jaxinfer.eagle_training import (QUESTIONS, eagle_loss, generate_data, pack_sequences, target_features,
                                         train_head, training_messages)
    from jaxinfer.engine.config import EngineConfig
    from jaxinfer.engine.engine import LLMEngine
    from jaxinfer.llm import LLM
    from jaxinfer.loading.eagle import load_eagle_head, save_eagle_head
    from jaxinfer.models import param_dtype
    from jaxinfer.models.eagle import head_config
    from jaxinfer.sampling_params import SamplingParams

    t0 = time.perf_counter()
    llm = LLM(args.model, max_num_seqs=32, max_model_len=1024)
    model = llm.model
    record = {"command": " ".join(sys.argv), "device": str(jax.devices()[0]), "jax": jax.__version__,
              "python": platform.python_version(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "args": vars(args)}
    head_dir = args.head
    if head_dir is None:
        messages = [m for m in training_messages(600) if m not in QUESTIONS][:args.messages]
        sequences = generate_data(llm, messages, max_tokens=args.max_tokens, temperature=0.7, repeats=args.repeats,
                                  seed=0)
        _, state, history = train_head(model, sequences, steps=args.steps, batch_size=args.batch_size,
                                       seq_len=args.seq_len, lr=args.lr, cls_weight=args.cls_weight,
                                       log=lambda s: print(s, file=sys.stderr, flush=True))
        head_dir = Path("/tmp/eagle_acceptance_head")
        save_eagle_head(head_dir, state, head_config(model.config))
        record["training"] = {"sequences": len(sequences), "tokens": sum(map(len, sequences)), "history": history}
    # Held-out prompts: the speculative benchmark's chat questions (never in the training data).
    prompts = _workload_prompts("chat", llm.get_tokenizer(), args.eval_prompts)
    spec = {"method": "eagle", "model": str(head_dir), "num_speculative_tokens": args.k, "adaptive": False}
    engine = LLMEngine(model, EngineConfig(max_num_seqs=8, max_model_len=1024, speculative_config=spec))
    params = SamplingParams(temperature=0.0, max_tokens=args.eval_tokens)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = list(out.outputs[0].token_ids)
    m = engine.metrics
    per_pos = m.spec_decode_num_accepted_tokens_per_pos_total
    engine_first = per_pos[0] / m.spec_decode_num_drafts_total if m.spec_decode_num_drafts_total else None
    # Teacher-forced over the same greedy answers.
    sequences = [prompts[i] + outputs[str(i)] for i in range(len(prompts))]
    tokens, mask = pack_sequences(sequences, 1024)
    for row, prompt in enumerate(prompts):  # score the answers' positions, where proposals are made
        mask[row, :] = 0
        mask[row, len(prompt):len(sequences[row])] = 1
    graphdef, head_state = load_eagle_head(head_dir, model.config, dtype=param_dtype(model.params))
    target = nnx.merge(model.graphdef, model.params)
    features = target_features(model.graphdef, model.params, tokens)
    _, aux = jax.jit(lambda s: eagle_loss(s, graphdef, target, tokens, features, mask, jax.random.key(0),
                                          noise=0.0))(head_state)
    record["results"] = {"teacher_forced_first_guess_top1": float(aux["top1"]),
                         "engine_first_proposal_acceptance": engine_first,
                         "engine_acceptance_rate": m.spec_decode_acceptance_rate,
                         "engine_mean_accepted_length": m.spec_decode_mean_accepted_length,
                         "drafts": m.spec_decode_num_drafts_total, "accepted_per_position": list(per_pos),
                         "seconds": time.perf_counter() - t0}
    print(json.dumps(record["results"]))
    Path(args.out).write_text(json.dumps(record, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
