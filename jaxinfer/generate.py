"""Reference generation loop over a contiguous KV cache.

Deliberately simple: one prefill over the padded batch, then one jitted decode step per token,
the cache donated to each step. The paged engine is tested against this loop.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flax import nnx

from jaxinfer.config import ModelConfig
from jaxinfer.models import param_dtype
from jaxinfer.models.attention import ContiguousAttention, ContiguousMetadata

_BACKEND = ContiguousAttention()


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("kv_cache",))
def _step(graphdef, params, token_ids_bs, positions_bs, last_index_b, kv_cache):
    """One forward over B x S tokens; returns float32 logits at each row's `last_index_b` token."""
    model = nnx.merge(graphdef, params)
    b, s = token_ids_bs.shape
    hidden, kv_cache = model(token_ids_bs.reshape(-1), jnp.maximum(positions_bs, 0).reshape(-1), kv_cache,
                             ContiguousMetadata(positions_bs), _BACKEND)
    last = hidden.reshape(b, s, -1)[jnp.arange(b), last_index_b]
    return model.compute_logits(last), kv_cache


def _split(model) -> tuple[nnx.GraphDef, nnx.State]:
    """(graph definition, state) of a model given as an NNX module or a LoadedModel."""
    if isinstance(model, nnx.Module):
        return nnx.split(model)
    return model.graphdef, model.params


def _new_cache(config: ModelConfig, params, batch: int, max_len: int):
    return _BACKEND.init_cache(config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim,
                               param_dtype(params))


def _next_pow2(n: int, smallest: int = 16) -> int:
    return max(smallest, 1 << (n - 1).bit_length())


def _pick(logits_bv, temperature: float, key):
    if temperature <= 0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits_bv / temperature, axis=-1).astype(jnp.int32)


def prefill_logits(model, prompt: Sequence[int]) -> np.ndarray:
    """Float32 logits [len(prompt), V] for every prompt position (parity tests use this).

    model: an NNX model or a LoadedModel."""
    graphdef, params = _split(model)
    n = len(prompt)

    @jax.jit
    def run(params, tokens, cache):
        positions = jnp.arange(n, dtype=jnp.int32)
        module = nnx.merge(graphdef, params)
        hidden, _ = module(tokens, positions, cache, ContiguousMetadata(positions[None]), _BACKEND)
        return module.compute_logits(hidden)

    return np.asarray(run(params, jnp.asarray(prompt, jnp.int32), _new_cache(model.config, params, 1, n)))


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             temperature: float = 0.0, eos_token_ids: Sequence[int] = (), seed: int = 0) -> list[list[int]]:
    """Generates up to `max_new_tokens` tokens for each prompt.

    Args:
      model: an NNX model or a LoadedModel (parameters on the device).
      prompts: token ids per prompt (non-empty).
      max_new_tokens: tokens to generate per prompt.
      temperature: 0 for greedy decoding, else softmax sampling at this temperature.
      eos_token_ids: generation of a prompt stops after it emits one of these (kept in the output).
      seed: PRNG seed when sampling.
    Returns:
      The generated token ids per prompt.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    b = len(prompts)
    lengths = np.array([len(p) for p in prompts], np.int32)
    # Pad the prompt axis and the cache to powers of two: a few shapes serve every length.
    s = _next_pow2(int(lengths.max()))
    max_len = _next_pow2(s + max_new_tokens)
    tokens = np.zeros((b, s), np.int32)
    positions = np.full((b, s), -1, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
        positions[i, :len(p)] = np.arange(len(p))
    graphdef, params = _split(model)
    cache = _new_cache(model.config, params, b, max_len)
    key = jax.random.PRNGKey(seed)
    logits, cache = _step(graphdef, params, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(lengths - 1),
                          cache)
    eos = set(int(t) for t in eos_token_ids)
    outputs: list[list[int]] = [[] for _ in range(b)]
    done = np.zeros(b, bool)
    pos = lengths.copy()
    for step in range(max_new_tokens):
        key, sub = jax.random.split(key)
        next_ids = np.asarray(_pick(logits, temperature, sub))
        for i in range(b):
            if not done[i]:
                outputs[i].append(int(next_ids[i]))
                done[i] = int(next_ids[i]) in eos
        if done.all() or step == max_new_tokens - 1:
            break
        logits, cache = _step(graphdef, params, jnp.asarray(next_ids[:, None]), jnp.asarray(pos[:, None]),
                              jnp.zeros(b, jnp.int32), cache)
        pos += 1
    return outputs
