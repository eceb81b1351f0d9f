"""The README's tour runs as written: every command of its bash blocks (and its Python example), from the
repository root, with the checkout's `babyllama` first on PATH. Commands that need the internet, a GPU or a
multi-GB model are named in SKIP; nothing else may be left out."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, SHARED

README = ROOT / "README.md"
SKIP = {
    "pip install . && babyllama run": "the set-up command itself (CI installs the package)",
    "pip install torch==2.13.0 && pip install -e '.[dev]' && ruff check . && mypy "
    "&& python -m pytest -q -n 2 --dist loadfile": "runs this suite",
    "bash .ci/run": "runs this suite",
    "BABYLLAMA_FUZZ_EXAMPLES=20000 python -m pytest -q tests/test_fuzz.py": "the long fuzz run (tens of minutes); "
                                                                             "the suite runs it with 40 inputs",
    "python scripts/fuzz_corpus.py --out out/fuzz-corpus": "1,102 CLI runs (6-14 min)",
}
NEEDS_INTERNET = ("babyllama download",)
NEEDS_GPU = ("--device cuda",)
# what the tour's commands past the inference path (training, export, fine-tuning, and the runs of their outputs in
# out/) import: the dev extra that its second command installs
DEV_EXTRA_MODULES = ("torch", "sentencepiece", "gguf", "safetensors")


def tour_blocks() -> list[tuple[str, str]]:
    """(language, code) of every fenced bash/python block in the README."""
    return re.findall(r"```(bash|python)\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def commands(code: str) -> list[str]:
    """Shell commands of a block: continuation lines joined, comments kept out."""
    out, pending = [], ""
    for line in code.splitlines():
        line = pending + line
        if line.endswith("\\"):
            pending = line[:-1]
            continue
        pending = ""
        command = re.sub(r"\s+#.*$", "", line).strip()
        if command and not command.startswith("#"):
            out.append(command)
    return out


def all_commands() -> list[str]:
    return [c for lang, code in tour_blocks() if lang == "bash" for c in commands(code)]


def needs_dev_extra(command: str) -> bool:
    """Whether `command` is past what a light install (`pip install .`, NumPy only) runs: run, chat, eval and bench
    of the built-in model or ../shared's fixtures."""
    light = re.search(r"(^|\| )babyllama (run|chat|eval|bench)\b", command)
    return not light or "out/" in command or "--lora" in command


def skipped(command: str) -> str | None:
    if command in SKIP:
        return SKIP[command]
    if any(k in command for k in NEEDS_INTERNET):
        return "needs the internet"
    if any(k in command for k in NEEDS_GPU):
        return "needs a GPU"
    return None


@pytest.fixture(scope="module")
def shell_env(tmp_path_factory):
    """PATH with a `babyllama` that runs this checkout (whatever is installed), from the repository root."""
    if not (SHARED / "fixtures").is_dir():
        pytest.skip(f"{SHARED} is absent (the tour uses ../shared's fixtures and TinyStories slice; CI has it)")
    bin_dir = tmp_path_factory.mktemp("bin")
    shim = bin_dir / "babyllama"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m babyllama "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    (ROOT / "out").mkdir(exist_ok=True)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}


def test_the_tour_has_the_commands_the_readme_promises():
    cmds = all_commands()
    assert cmds[:2] == list(SKIP)[:2]  # the README starts with exactly the two set-up commands
    for must in ("babyllama run", "babyllama chat", "babyllama eval", "babyllama train", "babyllama export",
                 "babyllama bench"):
        assert any(c.startswith(must) or f"| {must}" in c for c in cmds), must


@pytest.mark.parametrize("command", [c for c in all_commands() if not skipped(c)])
def test_tour_command_runs_as_written(command, shell_env):
    absent = [m for m in DEV_EXTRA_MODULES if importlib.util.find_spec(m) is None]
    if absent and needs_dev_extra(command):
        pytest.skip(f"needs the dev extra (the README's second command): {', '.join(absent)} not installed")
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=ROOT, env=shell_env, capture_output=True,
                          timeout=600)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, f"{command}\n{err[-2000:]}"
    assert "Traceback" not in err, err[-2000:]


def test_python_example_runs(shell_env):
    code = next(code for lang, code in tour_blocks() if lang == "python")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=shell_env, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().startswith("Once upon a time")


def test_the_readme_says_where_run_finds_a_tokenizer_as_the_help_does():
    text = " ".join(README.read_text(encoding="utf-8").replace("`", "").split())
    assert "for a .bin or a checkpoint, tokenizer.bin beside it, else for a .bin the built-in one" in text


def test_every_bin_the_tour_exports_has_a_folder_of_its_own():
    """A .bin export writes its tokenizer.bin beside it and keeps one already there, so two models of the tour
    in one folder would leave the second running with the first one's tokenizer."""
    targets = [Path(t) for c in all_commands() for t in re.findall(r"^babyllama export (\S+\.bin)\b", c)]
    assert len(targets) >= 2
    folders = [t.parent for t in targets]
    assert len(set(folders)) == len(folders), targets


def test_tour_outputs_stay_in_ignored_folders():
    """What the tour writes goes to out/, which git ignores (checked where the tree is a git checkout of its own,
    not an unpacked archive)."""
    written = [c for c in all_commands() if re.search(r"(--out_dir|--data-dir|export) ", c)]
    assert written
    for c in written:
        for target in re.findall(r"(?:--out_dir=|--data-dir |--data_dir=|export )(\S+)", c):
            assert target.startswith("out/"), c
    if shutil.which("git"):
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=ROOT, capture_output=True, text=True)
        if top.returncode == 0 and Path(top.stdout.strip()).resolve() == ROOT.resolve():
            ignored = subprocess.run(["git", "check-ignore", "-q", "out/anything"], cwd=ROOT)
            assert ignored.returncode == 0


def test_every_documented_install_of_a_torch_extra_installs_the_cpu_wheel_first():
    """The train, interop and dev extras hold torch: a bare `pip install` of them pulls a multi-GB CUDA build, so
    every such command in the README and docs/ installs PyTorch's CPU wheel first, the same one as the errors'
    hints and .ci/run."""
    from babyllama.errors import TORCH_PIN

    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(rf"pip install (-\w+ )*{re.escape(TORCH_PIN)}\b", ci)
    for page in (README, *sorted((ROOT / "docs").glob("*.md"))):
        text = " ".join(page.read_text(encoding="utf-8").split())
        for extra in re.finditer(r"pip install (?:(?!pip install)[^`|#])*?\[(?:train|interop|dev)\b", text):
            before = text[max(0, extra.start() - 40):extra.start()].rstrip()
            assert before.endswith(f"{TORCH_PIN} &&"), (page.name, extra.group(0))
