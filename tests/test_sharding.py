"""sharding/: the rules table in-process, and tensor-parallel engine runs on a simulated
8-device CPU mesh in a subprocess (this process already started JAX with one device)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from jaxinfer.config import preset
from jaxinfer.engine.config import EngineConfig
from jaxinfer.engine.engine import LLMEngine, resolve_attention_backend
from flax import nnx

from jaxinfer.models import abstract_model, create_model
from jaxinfer.models.llama import param_value
from jaxinfer.models.paged_attention_pallas import PagedAttentionPallas
from jaxinfer.models.paged_attention_xla import PagedAttentionXLA
from jaxinfer.sharding import DEFAULT_RULES, kv_cache_sharding, logical_to_spec, make_mesh, param_shardings
from jaxinfer.sharding.rules import logical_axes

ROOT = Path(__file__).resolve().parents[1]

# Eight query heads and four kv heads: tp 2 and 4 split both, tp 8 splits the query heads and
# replicates the kv heads (GQA with tp > kv heads).
TP_OVERRIDES = dict(num_heads=8, num_kv_heads=4)


def _mesh_shape(tp: int, dp: int = 1):
    """Stands in for a Mesh where only axis sizes matter (this process has one device)."""
    return SimpleNamespace(shape={"dp": dp, "tp": tp}, axis_names=("dp", "tp"))


# -- the rules, in-process --------------------------------------------------------------------
def test_logical_to_spec_splits_divisible_dims_only():
    mesh = _mesh_shape(8)
    assert logical_to_spec(("embed", "heads", "head_dim"), DEFAULT_RULES, mesh, (64, 8, 16)) == \
        PartitionSpec(None, "tp", None)
    # 4 kv heads do not split 8 ways: replicated.
    assert tuple(logical_to_spec(("embed", "kv_heads", "head_dim"), DEFAULT_RULES, mesh, (64, 4, 16))) == \
        (None, None, None)
    assert tuple(logical_to_spec(("embed", "kv_heads", "head_dim"), DEFAULT_RULES, _mesh_shape(4),
                                 (64, 4, 16))) == (None, "tp", None)
    # A vocabulary of 250 does not split 8 ways either.
    assert tuple(logical_to_spec(("vocab", "embed"), DEFAULT_RULES, mesh, (250, 64))) == (None, None)
    assert tuple(logical_to_spec(("vocab", "embed"), DEFAULT_RULES, mesh, (256, 64))) == ("tp", None)


def test_logical_to_spec_uses_a_mesh_axis_once_and_rejects_bad_input():
    mesh = _mesh_shape(2)
    assert tuple(logical_to_spec(("heads", "mlp"), DEFAULT_RULES, mesh, (8, 8))) == ("tp", None)
    with pytest.raises(ValueError, match="logical axes"):
        logical_to_spec(("embed",), DEFAULT_RULES, mesh, (4, 4))
    with pytest.raises(KeyError, match="no rule"):
        logical_to_spec(("experts",), DEFAULT_RULES, mesh, (4,))
    with pytest.raises(ValueError, match="mesh has axes"):
        logical_to_spec(("heads",), {"heads": "ep"}, mesh, (4,))


@pytest.mark.parametrize("overrides", [dict(), dict(qkv_bias=True, o_bias=True, qk_norm=True),
                                       dict(tie_word_embeddings=True)])
def test_every_parameter_gets_a_spec_of_its_rank(overrides):
    config = preset("tiny", **TP_OVERRIDES, **overrides)
    _, state = abstract_model(config)
    names = jax.tree.leaves(logical_axes(state), is_leaf=lambda x: isinstance(x, PartitionSpec))
    shapes = [x.shape for x in jax.tree.leaves(state)]
    assert len(names) == len(shapes)
    for tp in (1, 2, 4, 8):
        for axes, shape in zip(names, shapes):
            spec = logical_to_spec(tuple(axes), DEFAULT_RULES, _mesh_shape(tp), shape)
            assert len(spec) == len(shape)
            for entry, dim in zip(spec, shape):
                assert entry in (None, "tp") and (entry is None or dim % tp == 0)
    # With a real (one-device) mesh: NamedShardings in the model state's structure.
    shardings = param_shardings(config, make_mesh(tp=1))
    _, real = nnx.split(create_model(config))
    assert jax.tree.structure(shardings) == jax.tree.structure(real)
    for s, p in zip(jax.tree.leaves(shardings), jax.tree.leaves(real)):
        assert len(s.spec) == p.ndim
    assert tuple(kv_cache_sharding(config, make_mesh(tp=1)).spec) == ("tp", None, None, None, None)


def test_mesh_and_engine_errors():
    with pytest.raises(ValueError, match="needs 2 devices"):
        make_mesh(tp=2)
    with pytest.raises(ValueError, match="exactly 1"):
        make_mesh(tp=1, devices=jax.devices() * 2)
    with pytest.raises(ValueError, match="positive integer"):
        make_mesh(tp=0)
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="tensor_parallel_size"):
            EngineConfig(tensor_parallel_size=bad)
    from tests.engine_fixtures import tiny_model

    with pytest.raises(ValueError, match="needs 2 devices"):
        LLMEngine(tiny_model(**TP_OVERRIDES), EngineConfig(tensor_parallel_size=2, num_pages=8, warmup=False,
                                                           compilation_cache_dir=""))


def test_pallas_backend_needs_kv_heads_split_by_tp():
    # 4 kv heads: tp = 8 replicates the KV pools, which the per-device kernel cannot use.
    mesh = _mesh_shape(8)
    assert isinstance(resolve_attention_backend("auto", platform="gpu", mesh=mesh, num_kv_heads=4),
                      PagedAttentionXLA)
    with pytest.raises(ValueError, match="does not divide the model's 4 kv heads"):
        resolve_attention_backend("pallas", platform="gpu", mesh=mesh, num_kv_heads=4)
    for tp in (2, 4):
        mesh = _mesh_shape(tp)
        backend = resolve_attention_backend("auto", platform="gpu", mesh=mesh, num_kv_heads=4)
        assert isinstance(backend, PagedAttentionPallas) and backend.mesh is mesh and not backend.interpret
        assert resolve_attention_backend("auto", platform="tpu", mesh=mesh, num_kv_heads=4).platform == "tpu"
        assert isinstance(resolve_attention_backend("auto", platform="cpu", mesh=mesh, num_kv_heads=4),
                          PagedAttentionXLA)
        backend = resolve_attention_backend("pallas", platform="cpu", mesh=mesh, num_kv_heads=4)
        assert backend.interpret and backend.platform == "gpu" and backend.mesh is mesh
    # tp = 1 needs no mesh inside the backend.
    assert resolve_attention_backend("pallas", platform="gpu", mesh=_mesh_shape(1), num_kv_heads=4).mesh is None


# -- tensor-parallel engine runs on 8 simulated devices ---------------------------------------
def _shard_shapes(a) -> set[tuple[int, ...]]:
    return {tuple(s.data.shape) for s in a.addressable_shards}


def _check_placement(engine, tp: int):
    """Parameters and KV pools are split as the rules say, on tp distinct devices."""
    params = engine.runner.params
    layers = params["layers"]
    split = "tp" if tp > 1 else None
    # 4 kv heads: split for tp <= 4, replicated on tp = 8. Two layers, 8 q heads (E = 2 + 2).
    kv_split, kv_heads = (split, 4 // tp) if tp <= 4 else (None, 4)
    expected = {  # array -> (spec, shape of one shard)
        "w_qkv": (param_value(layers["w_qkv"]), (None, None, kv_split, None, None), (2, 64, kv_heads, 4, 16)),
        "w_o": (param_value(layers["w_o"]), (None, split, None, None), (2, 8 // tp, 16, 64)),
        "w_gate_up": (param_value(layers["w_gate_up"]), (None, None, None, split), (2, 64, 2, 128 // tp)),
        "w_down": (param_value(layers["w_down"]), (None, split, None), (2, 128 // tp, 64)),
        "embed": (param_value(params["embed"]), (split, None), (256 // tp, 64)),
        "final_norm": (param_value(params["final_norm"]), (None,), (64,)),
    }
    k_pages = engine.runner.kv_cache[0]
    expected["k_pages"] = (k_pages, (kv_split, None, None, None, None), (kv_heads,) + tuple(k_pages.shape[1:]))
    for name, (a, spec, shard) in expected.items():
        if tp > 1:
            assert tuple(a.sharding.spec) == spec, (name, a.sharding.spec)
        assert _shard_shapes(a) == {shard}, (name, _shard_shapes(a))
        assert len({s.device for s in a.addressable_shards}) == tp, name


# (attention backend, tp) engine runs of the subprocess, checked against the first run and the
# reference loop. Pallas runs in interpret mode here (slow), so only where it splits 4 kv heads.
TP_RUNS = (("xla", 1), ("xla", 2), ("xla", 4), ("xla", 8), ("pallas", 2), ("pallas", 4))


def _tp_engine_main():
    """Runs in the subprocess: every run of TP_RUNS against the first and the reference loop."""
    import warnings

    from jaxinfer.generate import generate, prefill_logits
    from jaxinfer.sampling_params import SamplingParams
    from tests.engine_fixtures import tiny_model

    # A donated KV pool that XLA cannot alias would be copied every step: fail instead.
    warnings.filterwarnings("error", message=".*donated buffers were not usable.*")
    assert jax.device_count() == 8, jax.devices()
    model = tiny_model(**TP_OVERRIDES)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 256, n).tolist() for n in (5, 13, 20)]
    max_tokens = 8
    reference = generate(model, prompts, max_tokens)
    ref_logprobs = jax.nn.log_softmax(prefill_logits(model, prompts[2]), axis=-1)
    first = None
    for attention_backend, tp in TP_RUNS:
        engine = LLMEngine(tiny_model(**TP_OVERRIDES), EngineConfig(
            tensor_parallel_size=tp, max_num_seqs=4, max_num_batched_tokens=32, page_size=8, num_pages=24,
            max_model_len=64, compilation_cache_dir="", attention_backend=attention_backend,
            # One run compiles ahead of time (the warm-up's executables must accept the mesh's
            # shardings); the others compile on first use, which is faster for a short run.
            warmup=(attention_backend, tp) == ("xla", 2)))
        assert engine.runner.attention.name == attention_backend
        if attention_backend == "pallas":  # per device, over the engine's mesh
            assert engine.runner.attention.mesh is engine.mesh
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                                                         logprobs=1, prompt_logprobs=1 if i == 2 else None))
        done = {}
        while len(done) < len(prompts):
            done.update((o.request_id, o) for o in engine.step() if o.finished)
        outs = [done[str(i)] for i in range(len(prompts))]
        tokens = [o.outputs[0].token_ids for o in outs]
        assert tokens == reference, (tp, tokens, reference)
        sampled_lp = np.array([[d[t].logprob for d, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
                               for o in outs])
        prompt_lp = np.array([d[t].logprob for d, t in zip(outs[2].prompt_logprobs[1:], prompts[2][1:])])
        want = np.array([ref_logprobs[j, t] for j, t in enumerate(prompts[2][1:])])
        np.testing.assert_allclose(prompt_lp, want, rtol=1e-5, atol=1e-5)
        if first is None:
            first = (sampled_lp, prompt_lp)
        else:
            np.testing.assert_allclose(sampled_lp, first[0], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(prompt_lp, first[1], rtol=1e-5, atol=1e-6)
        _check_placement(engine, tp)  # after the steps: donation kept the pools' sharding
        print(f"{attention_backend} tp={tp} ok", flush=True)


def test_tensor_parallel_engine_matches_one_device():
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()}
    proc = subprocess.run([sys.executable, "-c", "from tests.test_sharding import _tp_engine_main; _tp_engine_main()"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    want = [f"{backend} tp={tp} ok" for backend, tp in TP_RUNS]
    assert want == proc.stdout.split("\n")[-len(TP_RUNS) - 1:-1], proc.stdout
