"""What `pip` and `python -m build` make of the repository: the sdist holds every file git tracks (its tests can
run), the wheel the package with its data (the built-in models, the C source, the chat page)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def tracked_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the files git tracks are what the sdist is checked against")
    # and the files not yet added that git does not ignore: a change's new files count before its commit
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True).stdout
    return [name for name in out.decode().split("\0") if name and (ROOT / name).is_file()]


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory) -> Path:
    """The tracked files as they are in the working tree, copied out (a build writes its egg-info beside them)."""
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} cannot read pyproject.toml's license (77 or later: the "
                    "dev extra)")
    copy = tmp_path_factory.mktemp("src")
    for name in tracked_files():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, copy / name)
    return copy


def build(source: Path, kind: str, out: Path) -> Path:
    """The sdist or wheel built by the project's backend (setuptools.build_meta, as pip and build call it)."""
    code = f"from setuptools import build_meta; print(build_meta.build_{kind}({str(out)!r}))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=source, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out / proc.stdout.strip().splitlines()[-1]


def test_the_sdist_holds_every_tracked_file(source_copy, tmp_path):
    sdist = build(source_copy, "sdist", tmp_path)
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    missing = sorted(set(tracked_files()) - names)
    assert missing == [], f"left out of {sdist.name}: {missing[:20]}"
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_the_wheel_holds_the_package_and_its_data(source_copy, tmp_path):
    wheel = build(source_copy, "wheel", tmp_path)
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    package = {n for n in tracked_files() if n.startswith("babyllama/")}
    assert sorted(package - names) == []
    assert {"babyllama/csrc/kernels.c", "babyllama/serve/static/chat.js"} <= names
    assert not [n for n in names if n.startswith("tests/")]
