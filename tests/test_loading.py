"""Loading HF safetensors directories: sharded indexes and clear errors for bad checkpoints."""

import json

import jax
import numpy as np
import pytest

from jaxinfer.config import ModelConfig, UnsupportedModelError
from jaxinfer.errors import CheckpointError
from jaxinfer.loading.loader import load_hf_directory
from jaxinfer.loading.safetensors import SafetensorsCheckpoint
from tests.hf_models import build_hf_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    model = build_hf_model("llama", seed=7)
    directory = tmp_path_factory.mktemp("llama")
    model.save_pretrained(directory, safe_serialization=True)
    return model, directory


def test_sharded_index_equals_single_file(saved_llama, tmp_path):
    model, single = saved_llama
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    _, a = load_hf_directory(single)
    _, b = load_hf_directory(tmp_path)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_bfloat16_checkpoint_loads(saved_llama, tmp_path):
    import torch

    model, _ = saved_llama
    model.to(torch.bfloat16).save_pretrained(tmp_path, safe_serialization=True)
    model.to(torch.float32)
    config, params = load_hf_directory(tmp_path)
    ref = model.model.embed_tokens.weight.detach().to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(params["embed"], ref)


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf_directory(tmp_path)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedModelError, match="supports model types llama, mistral, qwen2, qwen3"):
        load_hf_directory(tmp_path)


def test_missing_config_field():
    with pytest.raises(ValueError, match="missing required field 'hidden_size'"):
        ModelConfig.from_hf_config({"model_type": "llama", "vocab_size": 10})


def test_pickle_only_checkpoint_is_refused(saved_llama, tmp_path):
    _, directory = saved_llama
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match="only pickle checkpoints.*safetensors and GGUF only"):
        load_hf_directory(tmp_path)


def test_truncated_safetensors(saved_llama, tmp_path):
    _, directory = saved_llama
    data = (directory / "model.safetensors").read_bytes()
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_hf_directory(tmp_path)


@pytest.mark.parametrize("payload", [b"", b"\x01\x02", b"\xff" * 64, (8).to_bytes(8, "little") + b"not json"])
def test_corrupted_safetensors(tmp_path, payload):
    (tmp_path / "model.safetensors").write_bytes(payload)
    with pytest.raises(CheckpointError):
        SafetensorsCheckpoint(tmp_path)


def test_missing_tensor(saved_llama, tmp_path):
    from jaxinfer.loading.safetensors import SafetensorsFile

    _, directory = saved_llama
    f = SafetensorsFile(directory / "model.safetensors")
    names = set(f.keys()) - {"model.layers.1.mlp.up_proj.weight"}
    from jaxinfer.loading.hf_weights import params_from_hf

    config = ModelConfig.from_json_file(directory / "config.json")
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        params_from_hf(config, f.get, names)
