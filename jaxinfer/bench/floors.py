"""Bytes and FLOPs a model must move and compute: the floors the benchmarks report against.

A decode step reads every weight once (the embedding table only for the rows it looks up,
unless it doubles as the LM head) plus each sequence's cached keys and values; a prefill
computes 2 FLOPs per weight per token plus attention. Times are these over the device's
bandwidth and matrix peak.

A mixture-of-experts step reads only the routed experts' weights. Batch 1 reads exactly k of
the X experts a layer: that floor is exact. For B tokens the floor counts each expert with
probability 1 - (1 - k/X)^B, the expectation when tokens pick their k experts uniformly and
independently (what a trained router's balancing aims at). It is not a bound: a router that
concentrates tokens reads fewer experts, and random-weight presets do (a 128-token prefill of
the Qwen3-30B-A3B shape ran under this floor on the H200, benchmarks/NOTES.md). Each token
computes through k experts, not X.
"""

from __future__ import annotations

import dataclasses

from jaxinfer.config import ModelConfig


def stored_expert_bytes(config: ModelConfig, state) -> int:
    """Bytes of the routed experts' weights as stored (0 for a dense model)."""
    import jax

    if not config.is_moe:
        return 0
    layers = state["layers"]
    return sum(int(a.nbytes) for name in ("w_expert_gate_up", "w_expert_down")
               for a in jax.tree.leaves(layers[name]))


def stored_decode_weight_bytes(config: ModelConfig, state) -> int:
    """Bytes a decode step reads of a model state as stored (quantized projections count their
    codes, scales and offsets): every array but an untied embedding table."""
    import jax

    from jaxinfer.models import param_value

    total = sum(int(a.nbytes) for a in jax.tree.leaves(state))
    if not config.tie_word_embeddings:
        total -= int(param_value(state["embed"]).nbytes)
    return total


@dataclasses.dataclass(frozen=True)
class ModelCost:
    """Per-model constants for the floors (weights in `weight_bytes_per_param` bytes each, or
    `stored_decode_weight_bytes` counted off the actual arrays, e.g. quantized ones)."""

    config: ModelConfig
    weight_bytes_per_param: float
    kv_bytes_per_element: float
    stored_decode_weight_bytes: float | None = None
    stored_expert_bytes: float | None = None

    @property
    def decode_weight_bytes(self) -> float:
        """Every weight a decode step could read (every projection, all experts, the LM head;
        no embedding rows); `decode_weight_bytes_at` counts only the routed experts."""
        if self.stored_decode_weight_bytes is not None:
            return self.stored_decode_weight_bytes
        c = self.config
        params = c.num_params() - (0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size)
        return params * self.weight_bytes_per_param

    @property
    def expert_weight_bytes(self) -> float:
        """Bytes of every routed expert's weights (0 for a dense model)."""
        c = self.config
        if not c.is_moe:
            return 0.0
        if self.stored_expert_bytes is not None:
            return self.stored_expert_bytes
        return c.num_layers * c.num_experts * 3 * c.hidden_size * c.moe_intermediate_size * self.weight_bytes_per_param

    def routed_expert_fraction(self, tokens: int) -> float:
        """Expected fraction of a layer's experts that `tokens` tokens route to (1 when dense)."""
        c = self.config
        if not c.is_moe:
            return 1.0
        return 1.0 - (1.0 - c.num_experts_per_tok / c.num_experts) ** max(0, tokens)

    def decode_weight_bytes_at(self, batch: int) -> float:
        """Weights a decode step of `batch` tokens reads: all but the experts no token routes to."""
        return self.decode_weight_bytes - self.expert_weight_bytes * (1.0 - self.routed_expert_fraction(batch))

    def kv_bytes(self, tokens: int) -> float:
        """Bytes of cached keys and values of `tokens` positions (all layers)."""
        c = self.config
        return 2 * c.num_layers * c.num_kv_heads * c.head_dim * tokens * self.kv_bytes_per_element

    @property
    def matmul_flops_per_token(self) -> float:
        """2 FLOPs per weight a token passes through (no embedding lookup, no LM head; of the
        experts only its k)."""
        c = self.config
        embed = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
        unrouted = c.num_layers * (c.num_experts - c.num_experts_per_tok) * 3 * c.hidden_size * c.moe_intermediate_size
        return 2.0 * (c.num_params() - embed - unrouted)

    def prefill_flops(self, prompt_len: int) -> float:
        """One prompt's prefill: its projections, causal attention (q.k and p.v over half the
        square) and the LM head for its last token."""
        c = self.config
        attention = 2 * 2 * c.num_layers * c.num_heads * c.head_dim * prompt_len * (prompt_len + 1) / 2
        return self.matmul_flops_per_token * prompt_len + attention + 2 * c.vocab_size * c.hidden_size

    def decode_step_bytes(self, batch: int, context: int) -> float:
        return self.decode_weight_bytes_at(batch) + batch * self.kv_bytes(context)

    def generation_floor_s(self, *, batch: int, input_len: int, output_len: int, bytes_per_s: float,
                           flops_per_s: float) -> dict:
        """Floor of `batch` prompts of input_len tokens each generating output_len tokens: the
        prefill as compute (or bytes, whichever is larger) and each decode step as bytes (or
        compute at large batches)."""
        return self.ragged_generation_floor_s(input_len=input_len, output_lens=[output_len] * batch,
                                              bytes_per_s=bytes_per_s, flops_per_s=flops_per_s)

    def ragged_generation_floor_s(self, *, input_len: int, output_lens, bytes_per_s: float,
                                  flops_per_s: float) -> dict:
        """`generation_floor_s` for prompts that stop at their own output lengths: a decode
        step reads the weights and the KV of the requests still generating."""
        batch, output_len = len(output_lens), max(output_lens, default=0)
        prefill = max(batch * self.prefill_flops(input_len) / flops_per_s,
                      (self.decode_weight_bytes_at(batch * input_len) + batch * self.kv_bytes(input_len))
                      / bytes_per_s)
        decode = 0.0
        for step in range(1, output_len):
            live, context = sum(n > step for n in output_lens), input_len + step
            decode += max(self.decode_step_bytes(live, context) / bytes_per_s,
                          live * (self.matmul_flops_per_token + 2 * self.config.vocab_size *
                                  self.config.hidden_size) / flops_per_s)
        return {"prefill_s": prefill, "decode_s": decode, "total_s": prefill + decode,
                "decode_step_s": decode / max(1, output_len - 1)}
