"""GGUF loading: block decoding, configs and tensors against HF transformers' GGUF loader, errors.

Tiny random models of each architecture are written to GGUF here (with llama.cpp's q/k row
permutation for llama), so every tensor type and architecture is checked on fresh weights; the
demo SmolLM2 file is checked against HF loading the same file, down to greedy tokens.
"""

import struct

import gguf
import jax
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q

from jaxinfer.config import ModelConfig, RopeScaling, UnsupportedModelError, rope_inv_freq
from jaxinfer.errors import CheckpointError
from jaxinfer.loading.gguf import GGUFCheckpoint, GGUFTensor, config_from_gguf, load_gguf, open_gguf
from jaxinfer.loading.hf_weights import params_from_hf

# ----- block decoding against a hand-written reference -----


def _reference_block(qtype: Q, block: bytes) -> list[float]:
    """One block decoded straight from ggml's layout. Q8_0/Q4_0/Q4_1: f16 scale (and min), then 32
    quants; 4-bit quants pack element i in the low nibble of byte i and element i + 16 in its high one."""
    if qtype == Q.Q8_0:
        (d,) = struct.unpack("<e", block[:2])
        return [d * q for q in struct.unpack("<32b", block[2:34])]
    if qtype == Q.Q4_0:
        (d,) = struct.unpack("<e", block[:2])
        qs = block[2:18]
        return [d * ((b & 0xF) - 8) for b in qs] + [d * ((b >> 4) - 8) for b in qs]
    if qtype == Q.Q4_1:
        d, m = struct.unpack("<ee", block[:4])
        qs = block[4:20]
        return [d * (b & 0xF) + m for b in qs] + [d * (b >> 4) + m for b in qs]
    if qtype == Q.Q4_K:
        return _reference_q4_k(block)
    if qtype == Q.Q6_K:
        return _reference_q6_k(block)
    raise AssertionError(qtype)


def _reference_q4_k(block: bytes) -> list[float]:
    # ggml-quants.c dequantize_row_q4_K: 8 sub-blocks of 32, each with a 6-bit scale and min
    # packed into 12 bytes; each 32-byte run of quants feeds two sub-blocks (low, then high nibbles).
    d, dmin = struct.unpack("<ee", block[:4])
    scales, qs = block[4:16], block[16:144]

    def scale_min(j):
        if j < 4:
            return scales[j] & 63, scales[j + 4] & 63
        return ((scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4),
                (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4))

    out = []
    for chunk in range(4):
        q = qs[32 * chunk: 32 * chunk + 32]
        (sc1, m1), (sc2, m2) = scale_min(2 * chunk), scale_min(2 * chunk + 1)
        out += [d * sc1 * (b & 0xF) - dmin * m1 for b in q]
        out += [d * sc2 * (b >> 4) - dmin * m2 for b in q]
    return out


def _reference_q6_k(block: bytes) -> list[float]:
    # ggml-quants.c dequantize_row_q6_K: 6-bit quants split into low 4 bits (ql) and high 2 bits
    # (qh), 16 int8 scales of 16 elements each, one f16 super-scale at the end.
    ql, qh = block[:128], block[128:192]
    sc = struct.unpack("<16b", block[192:208])
    (d,) = struct.unpack("<e", block[208:210])
    out = [0.0] * 256
    for half in range(2):
        l_, h_, s_, y = ql[64 * half:], qh[32 * half:], sc[8 * half:], 128 * half
        for i in range(32):
            k = i // 16
            out[y + i] = d * s_[k] * (((l_[i] & 0xF) | (((h_[i] >> 0) & 3) << 4)) - 32)
            out[y + i + 32] = d * s_[k + 2] * (((l_[i + 32] & 0xF) | (((h_[i] >> 2) & 3) << 4)) - 32)
            out[y + i + 64] = d * s_[k + 4] * (((l_[i] >> 4) | (((h_[i] >> 4) & 3) << 4)) - 32)
            out[y + i + 96] = d * s_[k + 6] * (((l_[i + 32] >> 4) | (((h_[i] >> 6) & 3) << 4)) - 32)
    return out


# Byte offsets of the f16 scales in each block type (the rest of a random block is left random).
_F16_OFFSETS = {Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q4_K: (0, 2), Q.Q6_K: (208,)}


@pytest.mark.parametrize("qtype", list(_F16_OFFSETS))
def test_dequantize_matches_hand_decoding(qtype):
    rng = np.random.default_rng(int(qtype))
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rows, blocks_per_row = 5, 3
    raw = rng.integers(0, 256, size=(rows * blocks_per_row, block_bytes), dtype=np.uint8)
    # Random bytes would make some scales inf/NaN; write finite f16 scales (and mins) of both signs.
    for offset in _F16_OFFSETS[qtype]:
        scales = (rng.standard_normal((rows * blocks_per_row, 1)) * 0.05).astype(np.float16)
        raw[:, offset:offset + 2] = scales.view(np.uint8)
    tensor = GGUFTensor("blk.0.ffn_up.weight", "model.layers.0.mlp.up_proj.weight", qtype,
                        (rows, blocks_per_row * block_elems), raw.reshape(rows, -1))

    expected = np.array([_reference_block(qtype, bytes(b)) for b in raw]).reshape(rows, -1)
    got = tensor.dequantize()
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())


def test_gguf_tensor_rejects_data_of_wrong_size():
    with pytest.raises(CheckpointError, match="expected"):
        GGUFTensor("x", "y", Q.Q8_0, (2, 64), np.zeros((2, 34), np.uint8))


# ----- tiny random models written as GGUF -----

_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_GGUF_LAYER_PARTS = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=5000.0,
             bos_token_id=1, eos_token_id=2)
_ARCHS = {
    "llama": (transformers.LlamaConfig, dict(head_dim=8, tie_word_embeddings=False)),
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=True)),
    # HF's GGUF loader ignores qwen3's attention.key_length and keeps Qwen3Config's head_dim
    # default of 128, so the tiny model uses that width.
    "qwen3": (transformers.Qwen3Config, dict(head_dim=128, tie_word_embeddings=True)),
}
_ALL_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1)


def _tiny_hf_model(arch: str, seed: int = 0):
    config_cls, overrides = _ARCHS[arch]
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**_TINY, **overrides)).float()
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # norms and biases random too, so a swapped one shows
            p.normal_(0.0, 0.5)
    return model


def _gguf_name(hf_name: str) -> str:
    if hf_name in _GGUF_NAMES:
        return _GGUF_NAMES[hf_name]
    _, _, layer, *part, kind = hf_name.split(".")
    return f"blk.{layer}.{_GGUF_LAYER_PARTS['.'.join(part)]}.{kind}"


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp convert_hf_to_gguf.py, LlamaModel.permute.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_model_gguf(path, arch: str, model, types=_ALL_TYPES, metadata=None, extra_tensors=None):
    """Writes `model` as llama.cpp would: its metadata keys, permuted llama q/k, 2-D tensors stored
    in `types` by turns (1-D ones in F32)."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    for key, value in (metadata or {}).items():
        (w.add_string if isinstance(value, str) else w.add_float32)(key, value)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    two_d = 0
    for hf_name, x in state.items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # state_dict lists the tied head; llama.cpp writes no output.weight then
        name = _gguf_name(hf_name)
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            x = _llama_cpp_permute(x, cfg.num_attention_heads if ".attn_q." in name else cfg.num_key_value_heads)
        qtype = types[two_d % len(types)] if x.ndim == 2 else Q.F32
        two_d += x.ndim == 2
        if qtype in (Q.F32, Q.F16):
            w.add_tensor(name, x.astype(np.float32 if qtype == Q.F32 else np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(x.astype(np.float32), qtype), raw_dtype=qtype)
    for name, x in (extra_tensors or {}).items():
        w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _hf_params(config: ModelConfig, state: dict):
    state = {k: v.detach().numpy() for k, v in state.items()}
    return params_from_hf(config, state.__getitem__, set(state))


def _assert_trees_equal(a, b, atol=0.0):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=0, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("arch", sorted(_ARCHS))
def test_tiny_gguf_matches_hf_gguf_loader(tmp_path, arch):
    model = _tiny_hf_model(arch, seed=len(arch))
    path = _write_model_gguf(tmp_path / f"{arch}.gguf", arch, model)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)

    config, params = load_gguf(path)
    assert config == ModelConfig.from_hf_config(hf.config.to_dict())
    assert (config.qkv_bias, config.qk_norm) == (arch == "qwen2", arch == "qwen3")
    _assert_trees_equal(params, _hf_params(config, hf.state_dict()))


def test_f32_gguf_gives_back_the_original_weights(tmp_path):
    # Independent of HF's loader: written unquantized, every tensor must come back exactly,
    # which holds only if the q/k unpermutation inverts llama.cpp's permutation.
    model = _tiny_hf_model("llama", seed=3)
    path = _write_model_gguf(tmp_path / "f32.gguf", "llama", model, types=(Q.F32,))
    config, params = load_gguf(path)
    _assert_trees_equal(params, _hf_params(config, model.state_dict()))


def test_quantized_blocks_are_kept_in_hf_row_order(tmp_path):
    model = _tiny_hf_model("llama", seed=4)
    path = _write_model_gguf(tmp_path / "q8.gguf", "llama", model, types=(Q.Q8_0,))
    checkpoint = GGUFCheckpoint(path)
    for hf_name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        stored = checkpoint.tensor(hf_name)
        original = model.state_dict()[hf_name].numpy()
        assert stored.ggml_type == Q.Q8_0 and stored.shape == original.shape
        # Q8_0 quantizes each row on its own, so quantizing the HF-order weight gives the same bytes.
        np.testing.assert_array_equal(stored.data, gguf.quants.quantize(original, Q.Q8_0))


def _llama3_factors(theta: float, head_dim: int, scaling: RopeScaling) -> np.ndarray:
    probe = dict(model_type="llama", vocab_size=1, hidden_size=head_dim, intermediate_size=1, num_layers=1,
                 num_heads=1, num_kv_heads=1, head_dim=head_dim, rope_theta=theta)
    base = np.array(rope_inv_freq(ModelConfig(**probe)))
    return (base / np.array(rope_inv_freq(ModelConfig(**probe, rope_scaling=scaling)))).astype(np.float32)


def test_rope_scaling_from_metadata_and_rope_freqs(tmp_path):
    model = _tiny_hf_model("llama")
    linear = _write_model_gguf(tmp_path / "linear.gguf", "llama", model,
                               metadata={"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.5})
    assert config_from_gguf(linear).rope_scaling == RopeScaling(kind="linear", factor=2.5)

    # Llama 3.1 files carry the llama3 divisors as a tensor; the parameters must be recovered.
    scaling = RopeScaling(kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64)
    factors = _llama3_factors(5000.0, 8, scaling)
    assert len(set(factors.tolist())) > 2  # the scaled, unscaled and smoothed bands all appear
    llama3 = _write_model_gguf(tmp_path / "llama3.gguf", "llama", model, extra_tensors={"rope_freqs.weight": factors},
                               metadata={"llama.rope.scaling.original_context_length": 64})
    assert config_from_gguf(llama3).rope_scaling == scaling
    assert GGUFCheckpoint(llama3).names() == GGUFCheckpoint(linear).names()  # rope_freqs is config only

    odd = _write_model_gguf(tmp_path / "odd.gguf", "llama", model,
                            extra_tensors={"rope_freqs.weight": factors[::-1].copy()})
    with pytest.raises(UnsupportedModelError, match="rope_freqs"):
        config_from_gguf(odd)
    yarn = _write_model_gguf(tmp_path / "yarn.gguf", "llama", model, metadata={"llama.rope.scaling.type": "yarn"})
    with pytest.raises(UnsupportedModelError, match="yarn"):
        config_from_gguf(yarn)


# ----- loading errors -----


@pytest.fixture(scope="module")
def tiny_gguf_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    return _write_model_gguf(path, "llama", _tiny_hf_model("llama")).read_bytes()


@pytest.mark.parametrize("cut", ["empty", "header", "metadata", "tensor_data"])
def test_truncated_gguf_is_a_checkpoint_error(tmp_path, tiny_gguf_bytes, cut):
    keep = {"empty": 0, "header": 10, "metadata": 200, "tensor_data": len(tiny_gguf_bytes) - 1000}[cut]
    path = tmp_path / "cut.gguf"
    path.write_bytes(tiny_gguf_bytes[:keep])
    with pytest.raises(CheckpointError, match="not a valid GGUF|truncated"):
        load_gguf(path)


def test_bad_magic_is_a_checkpoint_error(tmp_path, tiny_gguf_bytes):
    path = tmp_path / "magic.gguf"
    path.write_bytes(b"GGML" + tiny_gguf_bytes[4:])
    with pytest.raises(CheckpointError, match="magic"):
        open_gguf(path)


def test_missing_file_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_gguf(tmp_path / "nope.gguf")


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "phi.gguf"), "phi3")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match="'phi3'.*llama, qwen2, qwen3"):
        load_gguf(tmp_path / "phi.gguf")


def test_unknown_tensor_is_refused(tmp_path):
    path = _write_model_gguf(tmp_path / "extra.gguf", "llama", _tiny_hf_model("llama"),
                             extra_tensors={"blk.0.attn_qkv.weight": np.zeros((4, 64), np.float32)})
    with pytest.raises(UnsupportedModelError, match="attn_qkv"):
        load_gguf(path)


# ----- the demo model against HF transformers loading the same file -----


@pytest.fixture(scope="module")
def demo_hf_model(demo_gguf_path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        demo_gguf_path.parent, gguf_file=demo_gguf_path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def demo_checkpoint(demo_gguf_path):
    return GGUFCheckpoint(demo_gguf_path)


@pytest.fixture(scope="module")
def demo_loaded(demo_checkpoint):
    return load_gguf(demo_checkpoint)


def test_demo_config_matches_hf(demo_checkpoint, demo_hf_model):
    config = config_from_gguf(demo_checkpoint.reader)
    assert config == ModelConfig.from_hf_config(demo_hf_model.config.to_dict())
    assert (config.num_layers, config.hidden_size, config.tie_word_embeddings) == (30, 576, True)


def test_demo_params_match_hf_state_dict(demo_loaded, demo_hf_model):
    config, params = demo_loaded
    reference = _hf_params(config, demo_hf_model.state_dict())
    for key in ("embed", "final_norm"):
        np.testing.assert_array_equal(params[key], reference[key])
    for layer in (0, 13, config.num_layers - 1):
        _assert_trees_equal({k: v[layer] for k, v in params["layers"].items()},
                            {k: v[layer] for k, v in reference["layers"].items()})


_CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Write a Python function that reverses a string."}],
    [{"role": "user", "content": "Name three colours."}, {"role": "assistant", "content": "Red, green, blue."},
     {"role": "user", "content": "Now three animals, please."}],
]


@pytest.fixture
def one_torch_thread():
    # The CPU is shared; torch's default of one thread per core oversubscribes it several-fold.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_demo_greedy_tokens_match_hf_generate(demo_checkpoint, demo_loaded, demo_hf_model, monkeypatch,
                                              one_torch_thread):
    from jaxinfer.generate import generate
    from jaxinfer.loading.loader import LoadedModel
    from jaxinfer.tokenizer import Tokenizer

    config, params = demo_loaded
    tokenizer = Tokenizer.from_gguf(demo_checkpoint.reader)
    model = LoadedModel(config, jax.device_put(params), tokenizer, demo_checkpoint.path)
    # Without EOS, so that all 48 tokens are compared even after the answer ends (HF falls back to
    # the model's generation config for an eos_token_id of None, so it is cleared there too).
    monkeypatch.setattr(demo_hf_model.generation_config, "eos_token_id", None)
    hf_generation = transformers.GenerationConfig(max_new_tokens=48, do_sample=False, eos_token_id=None,
                                                  pad_token_id=tokenizer.pad_token_id)
    for chat in _CHATS:
        prompt = tokenizer.encode(tokenizer.apply_chat_template(chat), add_special_tokens=False)
        ours = generate(model, [prompt], max_new_tokens=48, temperature=0.0, eos_token_ids=())[0]
        with torch.no_grad():
            ids = torch.tensor([prompt])
            hf = demo_hf_model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=hf_generation)
        theirs = hf[0, len(prompt):].tolist()
        assert len(theirs) == 48
        assert ours == theirs, tokenizer.decode(ours) + "\n---\n" + tokenizer.decode(theirs)
