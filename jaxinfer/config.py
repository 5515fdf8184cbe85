"""Model configuration: one frozen dataclass for the Llama family, built from an HF `config.json`.

The Llama family here covers the architectures that share one block shape (RMSNorm, RoPE,
GQA attention, SwiGLU MLP): Llama 2/3/3.1/3.2, SmolLM2, Mistral, Qwen2/2.5 (qkv bias),
Qwen3 (qk-norm) and Phi-3/Phi-4 (fused projections in the checkpoint only). Gemma 2 and
Gemma 3 (text) add norms after each block, soft-capping and a local rope base (models/gemma.py).
Mixtral, Qwen2-MoE and Qwen3-MoE replace the MLP by routed experts (the MoE fields; models/moe.py).
Differences are fields, not subclasses.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe",
                         "phi3", "gemma2", "gemma3")
# Families whose layers also normalize the attention and MLP outputs (models/gemma.py).
GEMMA_TYPES = ("gemma2", "gemma3")

# Mixture-of-experts families (models/moe.py): every layer's MLP is routed over experts.
MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")

# HF model_type spellings of a supported type (Gemma3ForCausalLM's config says "gemma3_text").
_MODEL_TYPE_ALIASES = {"gemma3_text": "gemma3"}

# HF `architectures` entries that map onto a supported model_type.
_ARCHITECTURE_TO_TYPE = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture is not one jaxinfer implements."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `kind` is "default", "linear" or "llama3"."""

    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.kind not in ("default", "linear", "llama3"):
            raise UnsupportedModelError(
                f"rope scaling type {self.kind!r} is not supported (supported: default, linear, llama3)"
            )
        if self.factor <= 0:
            raise ValueError(f"rope scaling factor must be positive, got {self.factor}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder.

    Attributes:
      model_type: one of SUPPORTED_MODEL_TYPES.
      vocab_size, hidden_size, intermediate_size, num_layers: the usual sizes.
      num_heads, num_kv_heads: query heads and key/value heads (GQA when fewer kv heads).
      head_dim: per-head width; independent of hidden_size / num_heads (Qwen3, Mistral-Nemo).
      rms_norm_eps: RMSNorm epsilon.
      rope_theta, rope_scaling: rotary embedding base and scaling.
      max_position_embeddings: longest context the checkpoint was trained for.
      tie_word_embeddings: the LM head reuses the token embedding.
      qkv_bias: q/k/v projections carry a bias (Qwen2, Llama with attention_bias).
      o_bias: the output projection carries a bias (Llama with attention_bias).
      qk_norm: RMSNorm over each head of q and k before RoPE (Qwen3).
      sliding_windows: per layer, the attention window in tokens, or None for full attention.
      query_pre_attn_scalar: attention logits are scaled by its -1/2 power (Gemma); None: head_dim's.
      attn_logit_softcap: attention logits become cap * tanh(logits / cap) (Gemma 2).
      final_logit_softcap: the same on the output logits (Gemma 2).
      local_rope_theta: rope base of the sliding-window layers, unscaled (Gemma 3); None: rope_theta.
      bos_token_id, eos_token_ids: special ids from the config (tokenizers may add more).
      num_experts, num_experts_per_tok: routed experts per layer and experts per token (MoE
        model types only; 0 otherwise).
      moe_intermediate_size: each routed expert's MLP width.
      shared_expert_intermediate_size: width of the always-on, sigmoid-gated shared expert
        (Qwen2-MoE; 0: none).
      norm_topk_prob: renormalize the top-k routing probabilities to sum to one.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    sliding_windows: tuple[int | None, ...] = ()
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    local_rope_theta: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model type {self.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.model_type in MOE_MODEL_TYPES:
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be in "
                                 f"1..num_experts ({self.num_experts})")
            if self.moe_intermediate_size <= 0:
                raise ValueError(f"moe_intermediate_size must be positive, got {self.moe_intermediate_size}")
        elif self.num_experts:
            raise ValueError(f"num_experts is set but model type {self.model_type!r} has no experts")
        if not self.sliding_windows:
            object.__setattr__(self, "sliding_windows", (None,) * self.num_layers)
        if len(self.sliding_windows) != self.num_layers:
            raise ValueError(
                f"sliding_windows has {len(self.sliding_windows)} entries for {self.num_layers} layers"
            )

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def post_norms(self) -> bool:
        """Layers also normalize their attention and MLP outputs (Gemma 2/3)."""
        return self.model_type in GEMMA_TYPES

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * h * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.qkv_bias:
            attn += h * (self.num_heads + 2 * self.num_kv_heads)
        if self.o_bias:
            attn += d
        mlp = 3 * d * f
        if self.is_moe:
            s = self.shared_expert_intermediate_size
            mlp = self.num_experts * (d + 3 * d * self.moe_intermediate_size) + (3 * d * s + d if s else 0)
        per_layer = attn + mlp + (4 if self.post_norms else 2) * d + (2 * h if self.qk_norm else 0)
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_layers * per_layer + d + head

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> "ModelConfig":
        """Builds the config from a parsed HF `config.json` dictionary."""
        model_type = _MODEL_TYPE_ALIASES.get(hf.get("model_type"), hf.get("model_type"))
        if model_type == "gemma3" and "text_config" in hf:
            raise UnsupportedModelError("Gemma 3 multimodal checkpoints (a config with text_config) are not "
                                        "supported; only the text model (model_type gemma3_text)")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = hf.get("architectures") or []
            mapped = [_ARCHITECTURE_TO_TYPE[a] for a in archs if a in _ARCHITECTURE_TO_TYPE]
            if not mapped:
                raise UnsupportedModelError(
                    f"unsupported architecture (model_type={model_type!r}, architectures={archs}); "
                    f"jaxinfer supports model types {', '.join(SUPPORTED_MODEL_TYPES)}"
                )
            model_type = mapped[0]
        try:
            hidden = int(hf["hidden_size"])
            num_heads = int(hf["num_attention_heads"])
            num_layers = int(hf["num_hidden_layers"])
            config = dict(
                vocab_size=int(hf["vocab_size"]),
                intermediate_size=int(hf["intermediate_size"]),
            )
        except KeyError as e:
            raise ValueError(f"config.json is missing required field {e.args[0]!r}") from None
        head_dim = hf.get("head_dim") or hidden // num_heads
        num_kv_heads = hf.get("num_key_value_heads") or num_heads

        theta, scaling = _rope_from_hf(hf)
        attention_bias = bool(hf.get("attention_bias", False))
        # (Qwen2-MoE: q/k/v biases unless `qkv_bias` says otherwise)
        qkv_bias = attention_bias or model_type == "qwen2" or (model_type == "qwen2_moe" and hf.get("qkv_bias", True))
        o_bias = attention_bias and model_type in ("llama", "mistral")
        if hf.get("mlp_bias"):
            raise UnsupportedModelError("mlp_bias=True is not supported")
        _check_activation(hf, model_type)
        if hf.get("use_bidirectional_attention"):  # Gemma 3 embedding models: not causal
            raise UnsupportedModelError("use_bidirectional_attention=True is not supported (causal models only)")
        gemma = model_type in GEMMA_TYPES
        gemma2_caps = (50.0, 30.0) if model_type == "gemma2" else (None, None)

        return cls(
            model_type=model_type,
            hidden_size=hidden,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(num_kv_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            # (Gemma ties its embeddings unless the config says otherwise)
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3"),
            sliding_windows=_sliding_windows_from_hf(hf, model_type, num_layers),
            # (HF's defaults where a Gemma config.json leaves these out: scalar 256, Gemma 2's caps 50 and 30)
            query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)) if gemma else None,
            attn_logit_softcap=_optional_float(hf.get("attn_logit_softcapping", gemma2_caps[0])) if gemma else None,
            final_logit_softcap=_optional_float(hf.get("final_logit_softcapping", gemma2_caps[1])) if gemma else None,
            local_rope_theta=_local_rope_theta_from_hf(hf) if model_type == "gemma3" else None,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=_as_id_tuple(hf.get("eos_token_id")),
            **_moe_from_hf(hf, model_type, num_layers),
            **config,
        )

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "ModelConfig":
        return cls.from_hf_config(read_hf_config(path))


def read_hf_config(path: str | os.PathLike) -> dict:
    """An HF `config.json` as a dictionary (ValueError naming the file if it is not JSON)."""
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None


def _as_id_tuple(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def _moe_from_hf(hf: Mapping[str, Any], model_type: str, num_layers: int) -> dict[str, Any]:
    """The MoE fields of ModelConfig from an HF config (router_aux_loss_coef and
    output_router_logits only matter in training and are ignored)."""
    if model_type not in MOE_MODEL_TYPES:
        return {}
    # Every layer is one stacked, scanned block, so dense layers among the sparse ones are refused.
    step = int(hf.get("decoder_sparse_step") or 1)
    if step != 1:
        raise UnsupportedModelError(f"decoder_sparse_step={step} is not supported (only 1: every layer sparse)")
    if hf.get("mlp_only_layers"):
        raise UnsupportedModelError(f"mlp_only_layers={hf['mlp_only_layers']} is not supported (only [])")
    try:
        experts = int(hf.get("num_local_experts") or hf["num_experts"])
        top_k = int(hf["num_experts_per_tok"])
    except KeyError as e:
        raise ValueError(f"config.json is missing required field {e.args[0]!r}") from None
    if model_type == "mixtral":
        # Mixtral's router is a softmax over the chosen experts' logits: renormalized top-k.
        return dict(num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=True,
                    moe_intermediate_size=int(hf["intermediate_size"]))
    if "moe_intermediate_size" not in hf:
        raise ValueError("config.json is missing required field 'moe_intermediate_size'")
    shared = int(hf.get("shared_expert_intermediate_size") or 0) if model_type == "qwen2_moe" else 0
    return dict(num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=int(hf["moe_intermediate_size"]),
                shared_expert_intermediate_size=shared, norm_topk_prob=bool(hf.get("norm_topk_prob", False)))


def _optional_float(value) -> float | None:
    return None if value is None else float(value)


def _check_activation(hf: Mapping[str, Any], model_type: str) -> None:
    """Gemma's MLP is GeGLU with tanh-approximated gelu, Phi-3's SwiGLU: others are refused."""
    if model_type in GEMMA_TYPES:
        name, expected = "hidden_activation", ("gelu_pytorch_tanh", "gelu_tanh")
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    elif model_type == "phi3":
        name, expected = "hidden_act", ("silu",)
        act = hf.get("hidden_act", "silu")
    else:
        return
    if act not in expected:
        raise UnsupportedModelError(f"{name}={act!r} is not supported for {model_type} "
                                    f"(supported: {', '.join(expected)})")


def _global_rope_params(hf: Mapping[str, Any]) -> dict:
    """Rope settings of the full-attention layers (Gemma 3 nests them per layer type)."""
    params = dict(hf.get("rope_parameters") or {})
    if "full_attention" in params:
        params = dict(params["full_attention"] or {})
    return params


def _local_rope_theta_from_hf(hf: Mapping[str, Any]) -> float:
    """Gemma 3's rope base of the sliding-window layers (unscaled there)."""
    params = dict((hf.get("rope_parameters") or {}).get("sliding_attention") or {})
    kind = params.get("rope_type", "default")
    if kind != "default":
        raise UnsupportedModelError(f"rope_parameters.sliding_attention.rope_type={kind!r} is not supported "
                                    "(supported: default)")
    return float(params.get("rope_theta", hf.get("rope_local_base_freq", 10000.0)))


def _rope_from_hf(hf: Mapping[str, Any]) -> tuple[float, RopeScaling]:
    # transformers >= 5 nests RoPE settings in `rope_parameters`; older configs use
    # `rope_theta` plus an optional `rope_scaling` dictionary.
    params = _global_rope_params(hf)
    legacy = hf.get("rope_scaling") or {}
    merged = {**legacy, **params}
    # Phi-4-mini rotates only part of each head: not implemented.
    partial = float(merged.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
    if partial != 1.0:
        raise UnsupportedModelError(f"partial_rotary_factor={partial} is not supported (only 1.0)")
    theta = float(merged.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = merged.get("rope_type", merged.get("type", "default")) or "default"
    if kind == "default":
        return theta, RopeScaling()
    if kind == "linear":
        return theta, RopeScaling(kind="linear", factor=float(merged["factor"]))
    if kind == "llama3":
        return theta, RopeScaling(
            kind="llama3",
            factor=float(merged["factor"]),
            low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
            high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(merged.get("original_max_position_embeddings", 8192)),
        )
    raise UnsupportedModelError(
        f"rope scaling type {kind!r} is not supported (supported: default, linear, llama3)"
    )


def _sliding_windows_from_hf(hf, model_type: str, num_layers: int) -> tuple[int | None, ...]:
    window = hf.get("sliding_window")
    layer_types = hf.get("layer_types")
    if model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe") and not hf.get("use_sliding_window", False):
        window = None
    if not window:
        return (None,) * num_layers
    if not layer_types and model_type in GEMMA_TYPES:
        # Configs without layer_types: Gemma 2 alternates sliding and global layers, Gemma 3
        # has a global layer every `sliding_window_pattern` (default 6).
        period = 2 if model_type == "gemma2" else int(hf.get("sliding_window_pattern", 6))
        layer_types = ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(num_layers)]
    if layer_types:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        # Older Qwen configs: layers from max_window_layers on use the window.
        first = int(hf.get("max_window_layers", num_layers))
        return tuple(window if i >= first else None for i in range(num_layers))
    return (int(window),) * num_layers


def rope_inv_freq(config: ModelConfig, local: bool = False) -> "list[float]":
    """Inverse RoPE frequencies (head_dim / 2 of them) after scaling, as Python floats; with
    `local`, of a sliding-window layer, which has its own unscaled base where the config gives
    one (Gemma 3)."""
    dim = config.head_dim
    if local and config.local_rope_theta is not None:
        return [1.0 / (config.local_rope_theta ** (2 * i / dim)) for i in range(dim // 2)]
    inv = [1.0 / (config.rope_theta ** (2 * i / dim)) for i in range(dim // 2)]
    s = config.rope_scaling
    if s.kind == "linear":
        return [f / s.factor for f in inv]
    if s.kind == "llama3":
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        out = []
        for f in inv:
            wavelen = 2 * math.pi / f
            if wavelen < high_wavelen:
                out.append(f)
            elif wavelen > low_wavelen:
                out.append(f / s.factor)
            else:
                smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
                    s.high_freq_factor - s.low_freq_factor
                )
                out.append((1 - smooth) * f / s.factor + smooth * f)
        return out
    return inv


# Named presets for benchmarks and tests with random weights.
PRESETS: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
                      rope_theta=500000.0, max_position_embeddings=8192, eos_token_ids=(128001, 128009)),
    # Mixture-of-experts shapes (issue: MoE decode against its active-expert floor).
    "mixtral-8x7b": dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                         num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
                         rope_theta=1e6, max_position_embeddings=32768, eos_token_ids=(2,), num_experts=8,
                         num_experts_per_tok=2, moe_intermediate_size=14336, norm_topk_prob=True),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                          num_layers=48, num_heads=32, num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6,
                          rope_theta=1e6, max_position_embeddings=40960, eos_token_ids=(151645,), qk_norm=True,
                          num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True),
    "tiny-moe": dict(model_type="qwen3_moe", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, max_position_embeddings=512,
                     qk_norm=True, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                     norm_topk_prob=True),
    "tiny": dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                 num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
                 max_position_embeddings=512),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
