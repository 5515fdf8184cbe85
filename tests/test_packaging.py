"""What `pip install` puts on a user's path: the package list in pyproject.toml covers every
package of the tree, and a built wheel holds only the jaxinfer and pallas_kernels top-level
names (server/ and sharding/ install as jaxinfer.server and jaxinfer.sharding), with its data."""

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _config():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_package_list_covers_the_tree():
    config = _config()
    folders = {name: ROOT / name.replace(".", "/") for name in ("jaxinfer", "pallas_kernels")}
    folders.update({name: ROOT / path for name, path in config["package-dir"].items()})
    found = set()
    for name, folder in folders.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder)
            found.add(".".join([name, *rel.parts]))
    assert set(config["packages"]) == found


def test_wheel_installs_no_top_level_server_or_sharding(tmp_path):
    # Built from a copy: a build writes into its source folder (build/, egg-info), and a stale
    # build/ there could hide what the configuration does.
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("jaxinfer", "pallas_kernels", "server", "sharding"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(source)], check=True, cwd=tmp_path)
    [wheel] = tmp_path.glob("jaxinfer-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"jaxinfer", "pallas_kernels"}
    for path in ("jaxinfer/server/app.py", "jaxinfer/server/tool_parsers/hermes.py", "jaxinfer/sharding/rules.py",
                 "jaxinfer/server/static/chat.html", "jaxinfer/bench/data/quality.txt"):
        assert path in names
