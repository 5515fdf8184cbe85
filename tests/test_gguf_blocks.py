"""Native GGUF execution (loading/gguf_blocks.py): block codes moved into the quantized matmul's
layout, checked against gguf-py's own dequantization (an independent decoder); whole files
loaded with their blocks kept against the same files dequantized; and the demo model's greedy
tokens with its Q4_1 blocks kept against the dequantized model's."""

from __future__ import annotations

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from jaxinfer.loading.gguf import load_gguf
from jaxinfer.loading.gguf_blocks import NATIVE_TYPES, block_layout, codes_from_blocks
from jaxinfer.quantization import QuantizedWeight, dequantize_weight
from pallas_kernels.quantized_matmul import dequantize
from tests.test_gguf import _tiny_hf_model, _write_model_gguf

_F16_FIELDS = {Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q4_K: (0, 2), Q.Q6_K: (208,)}


def random_blocks(rng, qtype, rows: int, cols: int) -> np.ndarray:
    """Random bytes as blocks of `qtype`, their float16 fields set to finite values."""
    elems, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // elems, nbytes), dtype=np.uint8)
    for offset in _F16_FIELDS[qtype]:
        halves = rng.uniform(-0.1, 0.1, raw.shape[:2]).astype(np.float16)
        raw[..., offset:offset + 2] = halves.view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", NATIVE_TYPES, ids=lambda t: t.name)
def test_codes_reproduce_gguf_dequantization_exactly(qtype):
    rng = np.random.default_rng(int(qtype))
    data = random_blocks(rng, qtype, 6, 512)
    values, scales, offsets = codes_from_blocks(data, qtype, (6, 512))
    w = dequantize(jnp.asarray(values), jnp.asarray(scales), None if offsets is None else jnp.asarray(offsets),
                   block_layout(qtype))
    expected = gguf.quants.dequantize(data, qtype).reshape(6, 512).T
    np.testing.assert_array_equal(np.asarray(w), expected)


def test_other_types_are_refused():
    with pytest.raises(ValueError, match="no native layout"):
        codes_from_blocks(np.zeros((2, 22), np.uint8), Q.Q5_0, (2, 32))


@pytest.mark.parametrize("types", [(Q.Q8_0,), (Q.Q4_0,), (Q.Q4_1,)], ids=lambda t: t[0].name)
def test_kept_blocks_equal_the_dequantized_file(tmp_path, types):
    """Every projection of a file in one block type stays quantized, and stands for exactly the
    weights the float path loads (fused q|k|v and gate|up columns in the model's order)."""
    model = _tiny_hf_model("llama", seed=5)
    path = _write_model_gguf(tmp_path / "m.gguf", "llama", model, types=types)
    _, floats = load_gguf(path)
    _, kept = load_gguf(path, keep_blocks=True)
    for name in ("w_qkv", "w_o", "w_gate_up", "w_down"):
        w = kept["layers"][name]
        assert isinstance(w, QuantizedWeight) and w.layout == block_layout(types[0])
        ref = floats["layers"][name]
        rows = ref.shape[1] * ref.shape[2] if name == "w_o" else ref.shape[1]
        np.testing.assert_array_equal(np.asarray(dequantize_weight(w)), ref.reshape(ref.shape[0], rows, -1))
    np.testing.assert_array_equal(kept["embed"], floats["embed"])


def test_mixed_types_fall_back_to_floats(tmp_path):
    """q, k and v in different block types cannot share one fused weight: that projection is
    dequantized, the others keep their blocks where every layer agrees."""
    model = _tiny_hf_model("llama", seed=6)
    path = _write_model_gguf(tmp_path / "mixed.gguf", "llama", model, types=(Q.Q8_0, Q.Q4_0))
    _, floats = load_gguf(path)
    _, kept = load_gguf(path, keep_blocks=True)
    assert isinstance(kept["layers"]["w_qkv"], np.ndarray)
    np.testing.assert_array_equal(kept["layers"]["w_qkv"], floats["layers"]["w_qkv"])


@pytest.mark.slow
def test_demo_greedy_tokens_with_blocks_kept(demo_gguf_path):
    from jaxinfer.llm import LLM
    from jaxinfer.sampling_params import SamplingParams

    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
    params = SamplingParams(temperature=0.0, max_tokens=16)
    tokens = {}
    for quantization in (None, "gguf"):
        llm = LLM(str(demo_gguf_path), quantization=quantization, max_model_len=128, warmup=False)
        if quantization == "gguf":
            assert isinstance(llm.model.params["layers"]["w_down"].get_value(), QuantizedWeight)
        tokens[quantization] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert tokens["gguf"] == tokens[None]
