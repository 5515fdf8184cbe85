"""Batch inference over a Ray cluster: one jaxinfer engine replica per Ray actor.

    pip install -e ".[ray]"
    python examples/ray_batch.py --model /models/llama-3-8b --input prompts.jsonl --output results/ \
        --replicas 4 --gpus-per-replica 1 --max-tokens 128

`prompts.jsonl` holds one {"prompt": "..."} object per line (extra fields are carried through);
`results/` receives JSON-lines files whose rows add generated_text, generated_tokens,
num_input_tokens, num_generated_tokens and finish_reason. With RAY_ADDRESS set (or run on a
cluster's head node) the replicas spread over the cluster's hosts; otherwise Ray starts on this
machine. Every host needs jaxinfer installed and the model at the same path. docs/batch.md
explains the choices below.
"""

from __future__ import annotations

import argparse


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF directory, .gguf file or alias, loadable on every host")
    p.add_argument("--input", required=True, help="JSONL with a 'prompt' field per line (file or folder)")
    p.add_argument("--output", required=True, help="folder for the JSONL results")
    p.add_argument("--replicas", type=int, default=1, help="engine replicas (Ray actors)")
    p.add_argument("--gpus-per-replica", type=float, default=0,
                   help="GPUs each replica holds (its tensor-parallel devices); 0 on CPUs")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=256,
                   help="rows per call; several times --max-num-seqs keeps the engine's batch full")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    args = p.parse_args(argv)

    import ray

    from jaxinfer import SamplingParams
    from jaxinfer.ray import LLMPredictor

    ray.init()  # joins the cluster at RAY_ADDRESS when set, else starts a local instance
    ds = ray.data.read_json(args.input)
    ds = ds.map_batches(
        LLMPredictor,
        compute=ray.data.ActorPoolStrategy(size=args.replicas),
        num_gpus=args.gpus_per_replica,
        batch_size=args.batch_size,
        fn_constructor_kwargs={
            "model": args.model,
            "sampling_params": SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens),
            "max_num_seqs": args.max_num_seqs,
            "tensor_parallel_size": args.tensor_parallel_size,
        })
    ds.write_json(args.output)


if __name__ == "__main__":
    main()
