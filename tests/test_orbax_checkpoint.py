"""`jaxinfer convert` and Orbax checkpoints (loading/orbax_checkpoint.py), and loading straight
into shards (loading/placement.py): a round trip restores every parameter, the tokenizer and the
config exactly; restored and freshly loaded models on a tp=4 mesh are split as the rules table
says and generate the source model's greedy tokens (8 simulated devices, in a subprocess)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from jaxinfer.cli import main
from jaxinfer.errors import CheckpointError
from jaxinfer.loading.loader import load_model
from jaxinfer.loading.orbax_checkpoint import MARKER, config_from_json, config_to_json
from jaxinfer.loading.resolve import resolve_model
from tests.test_data_parallel import PROMPTS, SMALL, run_in_subprocess


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from tests.server_fixtures import write_checkpoint

    root = tmp_path_factory.mktemp("orbax")
    source = write_checkpoint(root / "hf", seed=3)
    assert main(["convert", "--model", str(source), "--output", str(root / "orbax")]) == 0
    return source, root / "orbax"


def _assert_same_params(a, b):
    left, right = jax.tree_util.tree_flatten_with_path(a), jax.tree_util.tree_flatten_with_path(b)
    assert left[1] == right[1]
    for (path, x), (_, y) in zip(left[0], right[0]):
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def test_round_trip_restores_every_parameter_the_config_and_tokenizer(converted):
    source, directory = converted
    assert resolve_model(str(directory)).kind == "orbax" and (directory / MARKER).is_file()
    a, b = load_model(str(source)), load_model(str(directory))
    assert a.config == b.config
    _assert_same_params(a.params, b.params)
    text = "Paris is the capital <|im_start|> café 🙂"
    assert b.tokenizer.encode(text) == a.tokenizer.encode(text)
    assert b.tokenizer.eos_token_ids == a.tokenizer.eos_token_ids
    messages = [{"role": "user", "content": "hi"}]
    assert b.tokenizer.apply_chat_template(messages) == a.tokenizer.apply_chat_template(messages)
    # A dtype other than the stored one is cast while reading.
    half = load_model(str(directory), dtype=jax.numpy.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(half.params)} == {jax.numpy.dtype("bfloat16")}


def test_config_json_round_trip_and_bad_checkpoints(converted, tmp_path, capsys):
    from jaxinfer.config import RopeScaling, preset

    config = preset("tiny", rope_scaling=RopeScaling("llama3", 8.0), eos_token_ids=(2, 3))
    assert config_from_json(json.loads(json.dumps(config_to_json(config)))) == config
    source, directory = converted
    assert main(["convert", "--model", str(source), "--output", str(directory)]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / MARKER).write_text(json.dumps({"format": "jaxinfer-orbax", "version": 99, "model_config": {}}))
    with pytest.raises(CheckpointError, match="version 99"):
        load_model(str(bad))


def test_gguf_tokenizer_saves_to_files_that_load_back(demo_gguf_path, tmp_path):
    """A GGUF source has no tokenizer files to copy: its tokenizer is written out."""
    from jaxinfer.tokenizer import Tokenizer

    a = Tokenizer.from_gguf(demo_gguf_path)
    a.save(tmp_path)
    b = Tokenizer.from_directory(tmp_path)
    text = "Hello <|im_start|>user\nwhat's up? 你好"
    assert b.encode(text) == a.encode(text) and b.eos_token_ids == a.eos_token_ids
    assert b.chat_template == a.chat_template and b.special_tokens == a.special_tokens


def _tp_main(source: str, directory: str):
    """Runs in the subprocess: the source and the restored checkpoint on a tp=4 mesh."""
    from jax.sharding import PartitionSpec

    from jaxinfer import LLM, SamplingParams
    from jaxinfer.models.llama import param_value
    from jaxinfer.sharding import make_mesh, param_shardings

    assert jax.device_count() == 8
    mesh = make_mesh(tp=4)
    for ref in (source, directory):
        model = load_model(ref, sharding=mesh)
        want = jax.tree.leaves(param_shardings(model.config, mesh))
        for leaf, target in zip(jax.tree.leaves(model.params), want, strict=True):
            assert leaf.sharding.is_equivalent_to(target, leaf.ndim), (leaf.sharding, target)
        # The table spelled out: 4 heads, the mlp width and the vocabulary split 4 ways; 2 kv
        # heads do not split over 4 devices and stay whole; norms replicated.
        layers = model.params["layers"]
        expected = {"w_o": (param_value(layers["w_o"]), PartitionSpec(None, "tp", None, None), (2, 1, 16, 64)),
                    "w_qkv": (param_value(layers["w_qkv"]), PartitionSpec(None, None, None, None, None),
                              (2, 64, 2, 4, 16)),
                    "w_down": (param_value(layers["w_down"]), PartitionSpec(None, "tp", None), (2, 32, 64)),
                    "embed": (param_value(model.params["embed"]), PartitionSpec("tp", None), (80, 64)),
                    "attn_norm": (param_value(layers["attn_norm"]), PartitionSpec(None, None), (2, 64))}
        for name, (array, spec, shard) in expected.items():
            assert array.sharding.spec == spec, (ref, name, array.sharding.spec)
            assert {s.data.shape for s in array.addressable_shards} == {shard}, (ref, name)
            assert len(array.devices()) == 4
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    want = [o.outputs[0].token_ids for o in LLM(source, **SMALL).generate(prompts, greedy, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in LLM(directory, tensor_parallel_size=4, **SMALL).generate(
        prompts, greedy, use_tqdm=False)]
    assert got == want, (got, want)
    print("tp=4 restore ok", flush=True)


def test_restore_with_tp4_is_sharded_by_the_rules_and_generates_the_same(converted):
    source, directory = converted
    out = run_in_subprocess(f"from tests.test_orbax_checkpoint import _tp_main; "
                            f"_tp_main({str(source)!r}, {str(directory)!r})")
    assert out.splitlines()[-1] == "tp=4 restore ok", out
