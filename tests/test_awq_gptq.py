"""AWQ, GPTQ and compressed-tensors fp8 checkpoints: tiny ones written here in the published safetensors layouts
(packers written from the formats' definitions, independent of the loader) load 4-bit and
give the logits of HF transformers running the same model with the dequantized weights."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from jaxinfer.errors import CheckpointError
from jaxinfer.generate import prefill_logits
from jaxinfer.loading.loader import load_model
from jaxinfer.models import param_value
from jaxinfer.quantization import QuantizedWeight
from tests.hf_models import build_hf_model, hf_greedy, hf_logits

GROUP = 32
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's packing order of 8 columns in a word
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize(w_nk: np.ndarray, min_zero: int):
    """Asymmetric 4-bit groups of GROUP inputs: codes u [K, N], zeros z and float16 scales
    [K / GROUP, N], and the dequantized float32 weight [N, K] they stand for."""
    w = w_nk.T.astype(np.float64)  # [K, N]
    k, n = w.shape
    g = w.reshape(k // GROUP, GROUP, n)
    lo, hi = np.minimum(g.min(1), 0), np.maximum(g.max(1), 0)
    scales = ((hi - lo) / 15).astype(np.float16)
    s = scales.astype(np.float64)
    zeros = np.clip(np.round(-lo / s), min_zero, 15)
    u = np.clip(np.round(g / s[:, None]) + zeros[:, None], 0, 15)
    deq = ((u - zeros[:, None]) * s[:, None]).reshape(k, n)
    return u.reshape(k, n).astype(np.uint32), zeros.astype(np.uint32), scales, deq.T.astype(np.float32)


def pack_awq(codes_rn):
    r, n = codes_rn.shape
    words = np.zeros((r, n // 8), np.uint32)
    for c in range(n // 8):
        for j in range(8):
            words[:, c] |= codes_rn[:, 8 * c + ORDER[j]] << (4 * j)
    return words.view(np.int32)


def pack_gptq_rows(codes_kn):
    k, n = codes_kn.shape
    words = np.zeros((k // 8, n), np.uint32)
    for i in range(k // 8):
        for j in range(8):
            words[i] |= codes_kn[8 * i + j] << (4 * j)
    return words.view(np.int32)


def pack_gptq_columns(codes_rn):
    r, n = codes_rn.shape
    words = np.zeros((r, n // 8), np.uint32)
    for c in range(n // 8):
        for j in range(8):
            words[:, c] |= (codes_rn[:, 8 * c + j] & 0xF) << (4 * j)
    return words.view(np.int32)


def write_checkpoint(tmp_path, method: str):
    """(directory, HF model carrying the dequantized weights) of a tiny quantized llama."""
    model = build_hf_model("llama", seed=11)
    tensors = {}
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    for name, w in state.items():
        module = name.rsplit(".", 1)[0]
        if not name.endswith(".weight") or module.rsplit(".", 1)[-1] not in LINEARS:
            tensors[name] = w
            continue
        if method == "fp8":  # compressed-tensors: e4m3 values, one float32 scale per output channel
            scale = (np.max(np.abs(w), axis=1, keepdims=True) / 448.0).astype(np.float32)
            values = (w / scale).astype(ml_dtypes.float8_e4m3fn)
            tensors[name], tensors[module + ".weight_scale"] = values, scale
            with torch.no_grad():
                model.get_parameter(name).copy_(torch.from_numpy(values.astype(np.float32) * scale))
            continue
        # GPTQ's original format stores zero - 1 and cannot hold a zero point of 0.
        u, z, scales, deq = quantize(w, min_zero=1 if method == "gptq" else 0)
        tensors[module + ".scales"] = scales
        if method == "awq":
            tensors[module + ".qweight"] = pack_awq(u)
            tensors[module + ".qzeros"] = pack_awq(z)
        else:
            tensors[module + ".qweight"] = pack_gptq_rows(u)
            tensors[module + ".qzeros"] = pack_gptq_columns(z - 1)
            tensors[module + ".g_idx"] = (np.arange(u.shape[0]) // GROUP).astype(np.int32)
        with torch.no_grad():
            model.get_parameter(name).copy_(torch.from_numpy(deq))
    # safetensors writes an array's memory as it lies: every tensor C-ordered first.
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    config = model.config.to_dict()
    config["quantization_config"] = {
        "awq": dict(quant_method="awq", bits=4, group_size=GROUP, zero_point=True, version="gemm"),
        "gptq": dict(quant_method="gptq", bits=4, group_size=GROUP, desc_act=False, sym=False),
        "fp8": dict(quant_method="compressed-tensors", format="float-quantized", ignore=["lm_head"],
                    config_groups=dict(group_0=dict(targets=["Linear"], weights=dict(
                        num_bits=8, type="float", strategy="channel", symmetric=True, dynamic=False)))),
    }[method]
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path, model


@pytest.mark.parametrize("method", ["awq", "gptq", "fp8"])
def test_logits_match_hf_on_the_dequantized_weights(tmp_path, method):
    directory, hf_model = write_checkpoint(tmp_path, method)
    loaded = load_model(str(directory), load_tokenizer=False)
    for name in ("w_qkv", "w_o", "w_gate_up", "w_down"):
        w = param_value(loaded.params["layers"][name])
        assert isinstance(w, QuantizedWeight)
        assert (w.layout.kind, w.layout.group_size) == (("fp8", w.shape[1]) if method == "fp8" else ("int4", GROUP))
    prompt = [5, 17, 3, 99, 42, 7, 150, 8]
    ours = prefill_logits(loaded, prompt)
    ref = hf_logits(hf_model, prompt)
    assert np.max(np.abs(ours - ref)) / np.max(np.abs(ref)) < 1e-4


def test_engine_runs_a_gptq_checkpoint_as_hf_does(tmp_path):
    from jaxinfer.llm import LLM
    from jaxinfer.sampling_params import SamplingParams

    directory, hf_model = write_checkpoint(tmp_path, "gptq")
    llm = LLM(str(directory), quantization="gptq", max_model_len=64, num_pages=32, warmup=False)
    prompt = [5, 17, 3, 99]
    [out] = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                         use_tqdm=False)
    assert out.outputs[0].token_ids == hf_greedy(hf_model, prompt, 8)


@pytest.mark.parametrize("change, message", [
    (dict(quant_method="bitsandbytes"), "not supported"),
    (dict(bits=8), "8 bits"),
    (dict(desc_act=True), "act-order"),
    (dict(quant_method="compressed-tensors", format="pack-quantized"), "pack-quantized"),
])
def test_unsupported_quantization_configs_are_refused(tmp_path, change, message):
    directory, _ = write_checkpoint(tmp_path, "gptq")
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"].update(change)
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        load_model(str(directory), load_tokenizer=False)
