"""GGUF checkpoints (llama.cpp's format): metadata to `ModelConfig`, tensors to HF names and layout.

A GGUF holds the model config as `{arch}.*` metadata keys, the tokenizer as `tokenizer.ggml.*`
keys, and each tensor either as floats or as quantized blocks along its rows. `GGUFCheckpoint`
maps the tensors to HF names and undoes llama.cpp's q/k row permutation, keeping the raw blocks
reachable (`tensor(name)`) for quantized execution; `get(name)` dequantizes to float32, which is
what `params_from_hf` consumes.

Supported architectures: llama (also SmolLM2 and Mistral, which llama.cpp writes as llama),
qwen2 (qkv bias), qwen3 (qk-norm) and gemma3 (text; its norms are stored as 1 + weight, see
`_NORM_SHIFTED_ARCHITECTURES`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import gguf
import jax.numpy as jnp
import numpy as np
from gguf import GGMLQuantizationType

from jaxinfer.config import ModelConfig, RopeScaling, UnsupportedModelError, rope_inv_freq
from jaxinfer.errors import CheckpointError
from jaxinfer.loading.gguf_file import GGUFFile
from jaxinfer.loading.hf_weights import params_from_hf

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")

# llama.cpp's converter permutes the rows of q and k (weights and biases) of llama-arch models so
# that its RoPE can rotate adjacent pairs; HF rotates the two halves of each head instead.
_PERMUTED_ARCHITECTURES = ("llama",)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma's four norms per layer: llama.cpp's ffn_norm is the norm before the MLP, which HF calls
# pre_feedforward_layernorm (HF's post_attention_layernorm normalizes the attention output).
_GEMMA_LAYER_NAMES = {
    **_LAYER_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# llama.cpp's converter stores Gemma's norm weights with 1 added (its RMSNorm multiplies by the
# stored weight); HF's weights, and models/gemma.py's (1 + weight), are the unshifted values.
_NORM_SHIFTED_ARCHITECTURES = ("gemma3",)
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Tensors that carry no parameter of their own: llama.cpp's precomputed llama3 RoPE factors,
# read into the config instead.
_CONFIG_ONLY_TENSORS = ("rope_freqs.weight",)

_FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.F64)
_INT_TYPES = (GGMLQuantizationType.I8, GGMLQuantizationType.I16, GGMLQuantizationType.I32,
              GGMLQuantizationType.I64)
# Types the reader returns as typed arrays of the logical shape rather than as raw bytes.
_ARRAY_TYPES = _FLOAT_TYPES + _INT_TYPES
_MISSING = object()


def gguf_to_hf_name(name: str, architecture: str = "llama") -> str | None:
    """The HF name of a GGUF tensor name, or None when the name is not one of a block of
    `architecture`."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    layer_names = _GEMMA_LAYER_NAMES if architecture == "gemma3" else _LAYER_NAMES
    match = _LAYER_TENSOR.fullmatch(name)
    if match and match.group(2) in layer_names:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{layer_names[part]}.{kind}"
    return None


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """One tensor as the file stores it, with rows already in HF order.

    Attributes:
      name: the GGUF tensor name.
      hf_name: the HF transformers name.
      ggml_type: the storage type (F32, F16, Q8_0, Q4_K, ...).
      shape: the logical shape in numpy/HF order ([out, in] for linear weights).
      data: the stored values: for block-quantized types the raw bytes, [rows, bytes per row]
        uint8 (blocks run along the last axis, so a row's blocks never mix with another's);
        for F32/F16/F64 (and integer types) the typed array of `shape`.
    """

    name: str
    hf_name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray

    def __post_init__(self):
        expected = tuple(self.shape)
        if self.ggml_type not in _ARRAY_TYPES:
            expected = gguf.quant_shape_to_byte_shape(self.shape, self.ggml_type)
        if tuple(self.data.shape) != expected:
            raise CheckpointError(
                f"tensor {self.name!r} ({self.ggml_type.name}) holds data of shape {tuple(self.data.shape)}, "
                f"expected {expected} for logical shape {self.shape}"
            )

    def dequantize(self) -> np.ndarray:
        """The values as float32, of `shape`."""
        if self.ggml_type in _FLOAT_TYPES:
            return np.asarray(self.data, dtype=np.float32)
        if self.ggml_type in _INT_TYPES:
            raise CheckpointError(f"tensor {self.name!r} holds integers ({self.ggml_type.name}), not weights")
        try:
            values = gguf.quants.dequantize(np.asarray(self.data), self.ggml_type)
        except NotImplementedError:
            raise CheckpointError(
                f"tensor {self.name!r} is stored as {self.ggml_type.name}, which cannot be dequantized"
            ) from None
        return np.asarray(values, dtype=np.float32).reshape(self.shape)


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Opens a GGUF file, turning every way it can be unreadable into a `CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist")
    try:
        return GGUFFile(path)
    # A file cut short or corrupted fails as one of these while its header is parsed.
    except (ValueError, IndexError, KeyError, OverflowError, TypeError) as e:
        size = path.stat().st_size
        raise CheckpointError(
            f"{path} is not a valid GGUF file ({size} bytes; it may be truncated or corrupted): {e}"
        ) from None


def _as_reader(reader_or_path) -> GGUFFile:
    return reader_or_path if isinstance(reader_or_path, GGUFFile) else open_gguf(reader_or_path)


def read_field(reader: GGUFFile, key: str, default: Any = _MISSING) -> Any:
    """A metadata value as a Python scalar, string or list; `default` (or a CheckpointError) when absent."""
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise CheckpointError(f"GGUF metadata has no {key!r}")
        return default
    try:
        return field.contents()
    except (ValueError, IndexError, UnicodeDecodeError) as e:
        raise CheckpointError(f"GGUF metadata {key!r} is unreadable: {e}") from None


def _architecture(reader: GGUFFile) -> str:
    arch = read_field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def _single_value(key: str, value) -> int:
    # Some files give per-layer lists; the Llama family here has one value for all layers.
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise UnsupportedModelError(f"{key} varies across layers ({value}), which is not supported")
        value = value[0]
    return int(value)


def _rope_scaling(reader: GGUFFile, arch: str, theta: float, head_dim: int) -> RopeScaling:
    kind = read_field(reader, f"{arch}.rope.scaling.type", "none")
    if kind == "linear":
        return RopeScaling(kind="linear", factor=float(read_field(reader, f"{arch}.rope.scaling.factor")))
    if kind != "none":
        raise UnsupportedModelError(f"GGUF rope scaling type {kind!r} is not supported (supported: none, linear)")
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is None:
        return RopeScaling()
    return _llama3_scaling_from_factors(np.asarray(freqs.data, np.float32).reshape(-1), theta, head_dim,
                                        reader, arch)


def _llama3_scaling_from_factors(factors: np.ndarray, theta: float, head_dim: int, reader: GGUFFile,
                                 arch: str) -> RopeScaling:
    # Llama 3.1+ files store the per-frequency divisors llama3 scaling produces, not its parameters.
    # Recover them: the largest divisor is `factor`, and the rest are Meta's published defaults,
    # accepted only if they reproduce every stored divisor.
    original = int(read_field(reader, f"{arch}.rope.scaling.original_context_length", 8192))
    candidate = RopeScaling(kind="llama3", factor=float(factors.max()), low_freq_factor=1.0,
                            high_freq_factor=4.0, original_max_position_embeddings=original)
    probe = dict(model_type="llama", vocab_size=1, hidden_size=head_dim, intermediate_size=1, num_layers=1,
                 num_heads=1, num_kv_heads=1, head_dim=head_dim, rope_theta=theta)
    base = np.asarray(rope_inv_freq(ModelConfig(**probe)))
    scaled = np.asarray(rope_inv_freq(ModelConfig(**probe, rope_scaling=candidate)))
    if factors.shape != base.shape or not np.allclose(base / scaled, factors, rtol=1e-4):
        raise UnsupportedModelError(
            "rope_freqs.weight holds RoPE factors that do not match llama3 scaling with "
            f"factor={candidate.factor}, low/high freq factors 1/4 and original context {original}"
        )
    return candidate


def config_from_gguf(reader_or_path) -> ModelConfig:
    """Builds the `ModelConfig` from a GGUF's metadata and tensor list.

    Args:
      reader_or_path: an open `GGUFFile`, or the path of a .gguf file.
    """
    reader = _as_reader(reader_or_path)
    arch = _architecture(reader)

    def key(name: str, default: Any = _MISSING) -> Any:
        return read_field(reader, f"{arch}.{name}", default)

    tensors = {t.name: t for t in reader.tensors}
    hidden = int(key("embedding_length"))
    num_heads = _single_value("head_count", key("attention.head_count"))
    num_kv_heads = _single_value("head_count_kv", key("attention.head_count_kv", num_heads))
    head_dim = int(key("attention.key_length", 0)) or hidden // num_heads
    rotary_dims = key("rope.dimension_count", head_dim)
    if int(rotary_dims) != head_dim:
        raise UnsupportedModelError(f"partial rotary embeddings ({rotary_dims} of {head_dim} dims) are not supported")
    theta = float(key("rope.freq_base", 10000.0))
    if "token_embd.weight" not in tensors:
        raise CheckpointError("GGUF has no 'token_embd.weight' tensor")
    # The embedding's row count is the model's vocabulary; it equals the token list's length in
    # files written by llama.cpp's converter.
    vocab = int(tensors["token_embd.weight"].shape[-1])
    eos = read_field(reader, "tokenizer.ggml.eos_token_id", None)
    num_layers = int(key("block_count"))
    return ModelConfig(
        **(_gemma3_fields(reader, num_layers) if arch == "gemma3" else {}),
        model_type=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=_single_value("feed_forward_length", key("feed_forward_length")),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=theta,
        rope_scaling=_rope_scaling(reader, arch, theta, head_dim),
        max_position_embeddings=int(key("context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensors,
        qkv_bias="blk.0.attn_q.bias" in tensors,
        o_bias="blk.0.attn_output.bias" in tensors,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
        bos_token_id=read_field(reader, "tokenizer.ggml.bos_token_id", None),
        eos_token_ids=() if eos is None else (int(eos),),
    )


def _gemma3_fields(reader: GGUFFile, num_layers: int) -> dict[str, Any]:
    """Gemma 3's config fields beyond the Llama family's, as HF's Gemma3TextConfig sets them
    where the GGUF metadata has no key for them."""
    def key(name: str, default: Any = None) -> Any:
        return read_field(reader, f"gemma3.{name}", default)

    window = key("attention.sliding_window")
    pattern = key("attention.sliding_window_pattern")
    if window is None:
        sliding = (None,) * num_layers
    elif isinstance(pattern, list):
        # Per-layer flags (true: sliding window), where the metadata gives them.
        if len(pattern) != num_layers:
            raise CheckpointError(f"gemma3.attention.sliding_window_pattern has {len(pattern)} entries "
                                  f"for {num_layers} layers")
        sliding = tuple(int(window) if flag else None for flag in pattern)
    else:
        # HF's default: every `pattern`-th layer (6th) attends globally, the rest within the window.
        period = int(pattern or 6)
        sliding = tuple(None if (i + 1) % period == 0 else int(window) for i in range(num_layers))
    attn_cap, final_cap = key("attn_logit_softcapping"), key("final_logit_softcapping")
    return dict(
        sliding_windows=sliding,
        # HF's Gemma3TextConfig default: the metadata has no key for it, and HF's GGUF loading
        # (the reference these files are checked against) uses the default too.
        query_pre_attn_scalar=256.0,
        attn_logit_softcap=None if attn_cap is None else float(attn_cap),
        final_logit_softcap=None if final_cap is None else float(final_cap),
        local_rope_theta=10000.0,  # HF's rope_local_base_freq default; not in the metadata either
    )


def _unpermute_rows(num_rows: int, num_heads: int) -> np.ndarray:
    """Row order that undoes llama.cpp's q/k permutation: hf[i] = gguf[order[i]].

    llama.cpp reshapes each head's rows as (2, head_dim / 2) and swaps the axes, interleaving the
    two halves; reading them back as (head_dim / 2, 2) and swapping restores HF's order.
    """
    half = num_rows // num_heads // 2
    return np.arange(num_rows).reshape(num_heads, half, 2).swapaxes(1, 2).reshape(-1)


class GGUFCheckpoint:
    """An open GGUF file: its config, and its tensors under HF names in HF layout.

    Attributes:
      path: the file.
      reader: the underlying `GGUFFile` (metadata, including the tokenizer's).
      architecture: the GGUF architecture name.
      config: the model configuration.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.reader = open_gguf(self.path)
        self.architecture = _architecture(self.reader)
        self.config = config_from_gguf(self.reader)
        self._by_hf_name = {}
        for t in self.reader.tensors:
            if t.name in _CONFIG_ONLY_TENSORS:
                continue
            hf_name = gguf_to_hf_name(t.name, self.architecture)
            if hf_name is None:
                raise UnsupportedModelError(
                    f"GGUF tensor {t.name!r} is not part of a {self.architecture} model jaxinfer can run"
                )
            self._by_hf_name[hf_name] = t

    def names(self) -> set[str]:
        """Every HF tensor name in the file."""
        return set(self._by_hf_name)

    def tensor(self, hf_name: str) -> GGUFTensor:
        """The stored tensor (raw blocks for quantized types) with rows in HF order."""
        t = self._by_hf_name.get(hf_name)
        if t is None:
            raise CheckpointError(f"GGUF has no tensor for {hf_name!r}")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        data = t.data
        if self.architecture in _PERMUTED_ARCHITECTURES and re.search(r"\.attn_[qk]\.", t.name):
            heads = self.config.num_heads if ".attn_q." in t.name else self.config.num_kv_heads
            if len(shape) == 1 and t.tensor_type not in _ARRAY_TYPES:
                # The blocks of a quantized vector span the permuted axis; llama.cpp never writes one.
                raise CheckpointError(f"tensor {t.name!r} is a quantized vector ({t.tensor_type.name})")
            data = data[_unpermute_rows(shape[0], heads)]
        if self.architecture in _NORM_SHIFTED_ARCHITECTURES and t.name.endswith("norm.weight"):
            if t.tensor_type not in _FLOAT_TYPES:
                raise CheckpointError(f"norm tensor {t.name!r} is stored as {t.tensor_type.name}, expected floats")
            data = np.asarray(data, np.float32) - 1.0
            return GGUFTensor(t.name, hf_name, GGMLQuantizationType.F32, shape, data)
        return GGUFTensor(t.name, hf_name, t.tensor_type, shape, data)

    def get(self, hf_name: str) -> np.ndarray:
        """The tensor dequantized to float32, in HF layout."""
        return self.tensor(hf_name).dequantize()


def load_gguf(path_or_checkpoint: str | os.PathLike | GGUFCheckpoint, dtype=jnp.float32, keep_blocks: bool = False):
    """Loads a GGUF file into the parameter tree of `models/llama.py`.

    Args:
      path_or_checkpoint: the .gguf file, or a `GGUFCheckpoint` already open (parsing the metadata
        takes seconds, so a caller that also builds the tokenizer can open the file once).
      dtype: parameter dtype (quantized tensors are dequantized, then cast).
      keep_blocks: keep the decoder projections' quantized blocks as `QuantizedWeight`s (on
        the device; see gguf_blocks.py) where the file's types allow; the rest dequantized.
    Returns:
      (ModelConfig, params) with params as host numpy arrays (and quantized device arrays).
    """
    checkpoint = (path_or_checkpoint if isinstance(path_or_checkpoint, GGUFCheckpoint)
                  else GGUFCheckpoint(path_or_checkpoint))
    native = {}
    if keep_blocks:
        from jaxinfer.loading.gguf_blocks import native_layer_weights

        native = native_layer_weights(checkpoint)
    params = params_from_hf(checkpoint.config, checkpoint.get, checkpoint.names(), dtype, skip=set(native))
    params["layers"].update(native)
    return checkpoint.config, params
