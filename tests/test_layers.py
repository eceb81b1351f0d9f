"""The package's layer contract, checked over its import graph (imports inside functions included, since
those are how the heavy extras come in): no import cycles, no module importing a layer above its own, and an
inference path that never needs torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = ROOT / "babyllama"

# Bottom to top: a module may import its own layer and those below. A new module must be placed here.
LAYERS = [
    ["version", "errors", "config", "threads", "progress", "safeio", "fields", "memory"],
    ["quant", "formats", "tokenizer", "sampler", "documents"],
    ["kernels_base", "kernels", "kernels_native", "kernels_numba", "engine"],
    ["generate", "speculative", "chat_template", "printer", "evaluate", "instruct"],
    ["interop.*", "adapter", "model", "train.config", "train.checkpoint", "train.data", "train.vocab", "train.metrics"],
    ["loading"],
    ["api", "export", "catalog", "download", "bench", "chat", "train.*"],
    ["serve.*"],
    ["cli.*", "__main__", "__init__"],
]
# What `babyllama run`/`chat`/`eval` load: none of it may import torch at module level, however indirectly.
INFERENCE = ["config", "errors", "threads", "progress", "safeio", "fields", "memory", "quant", "formats", "tokenizer",
             "sampler", "documents", "kernels_base", "kernels", "kernels_native", "engine", "generate", "speculative",
             "chat_template", "printer", "evaluate", "instruct", "adapter", "loading", "api", "chat", "catalog",
             "cli.__init__", "cli.run", "cli.evaluate", "cli.common"]
HEAVY = ("torch", "transformers", "fastapi", "uvicorn", "numba", "peft", "safetensors", "sentencepiece", "gguf")


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return ".".join(rel.parts)


def _module_file(name: str) -> str | None:
    """Our module called `name` ("" is the package itself): "x.y" for x/y.py, "x.__init__" for a package x."""
    parts = name.split(".") if name else []
    path = PACKAGE.joinpath(*parts)
    if parts and path.with_suffix(".py").is_file():
        return name
    if (path / "__init__.py").is_file():
        return ".".join([*parts, "__init__"])
    return None


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[tuple[bool, str]]:
    """(ours?, name) for everything an import statement imports: our module names, or third-party
    top-level package names."""
    if isinstance(node, ast.Import):
        bases = [(a.name, []) for a in node.names]
    elif node.level:  # relative: from the package that holds `module`
        package = module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        bases = [(".".join(["babyllama", *package, *([node.module] if node.module else [])]),
                  [a.name for a in node.names])]
    else:
        bases = [(node.module or "", [a.name for a in node.names])]
    out = []
    for base, names in bases:
        if base != "babyllama" and not base.startswith("babyllama."):
            out.append((False, base.split(".")[0]))
            continue
        base = base.removeprefix("babyllama").removeprefix(".")
        for name in names or [""]:  # `from .pkg import mod` imports a module; `from .mod import obj` its module
            sub = f"{base}.{name}" if base and name else name or base
            out.append((True, _module_file(sub) if name and _module_file(sub) else _module_file(base)))
    return out


def import_graph(module_level_only: bool = False) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(our module -> our modules it imports, our module -> third-party top-level packages it imports)."""
    ours: dict[str, set[str]] = {}
    third: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if module_level_only:  # the statements that run on import, `if`/`try` blocks included
            nodes = [n for top in tree.body if not isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                     ast.ClassDef)) for n in ast.walk(top)]
        else:
            nodes = list(ast.walk(tree))
        ours[name], third[name] = set(), set()
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for is_ours, target in _targets(name, node):
                    if is_ours and target and target != name:
                        ours[name].add(target)
                    elif not is_ours:
                        third[name].add(target)
    return ours, third


def layer_of(module: str) -> int:
    for i, layer in enumerate(LAYERS):
        for pattern in layer:
            if module == pattern or (pattern.endswith(".*") and module.startswith(pattern[:-1])):
                return i
            if pattern.endswith(".*") and module == f"{pattern[:-2]}.__init__":
                return i
    raise AssertionError(f"module babyllama.{module} has no layer: place it in LAYERS (tests/test_layers.py)")


def test_every_module_has_a_layer_and_imports_only_downward():
    ours, _ = import_graph()
    upward = [f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
              for m, targets in ours.items() for t in targets if layer_of(t) > layer_of(m)]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycles():
    ours, _ = import_graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in ours.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in list(ours):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_graph_sees_imports_inside_functions():
    """The checks above would be empty promises if function-level imports were missed."""
    ours, third = import_graph()
    assert "train.checkpoint" in ours["loading"]  # imported inside weights_from_checkpoint
    assert "torch" in third["model"] and "torch" not in import_graph(module_level_only=True)[1]["loading"]


def test_inference_modules_do_not_import_heavy_packages_at_module_level():
    ours, third = import_graph(module_level_only=True)
    reached, todo = set(), list(INFERENCE)
    while todo:
        m = todo.pop()
        if m not in reached:
            reached.add(m)
            todo.extend(ours.get(m, ()))
    heavy = sorted(f"{m}: {p}" for m in reached for p in third.get(m, ()) if p in HEAVY)
    assert not heavy, f"module-level imports of heavy packages on the inference path: {heavy}"


BLOCK_TORCH = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {heavy}:
            raise ImportError(f"{{name}} is blocked in this test")
sys.meta_path.insert(0, Block())
from babyllama.cli import main
code = main(["run", "-t", "0", "-n", "24", "-i", "Once upon a time"])
code |= main(["chat", "-t", "0", "-n", "8", "-y", "Be brief."])
print("heavy modules loaded:", sorted(m for m in sys.modules if m.split(".")[0] in {heavy}))
sys.exit(code)
"""


def test_run_and_chat_work_with_torch_blocked():
    """A fresh interpreter in which importing torch (or any heavy extra) fails still runs and chats."""
    heavy = repr(set(HEAVY))
    proc = subprocess.run([sys.executable, "-c", BLOCK_TORCH.format(heavy=heavy)], input=b"Hello\n",
                          capture_output=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode()
    assert out.startswith("Once upon a time") and "Assistant: " in out
    assert "heavy modules loaded: []" in out


def test_import_from_the_checkouts_parent_folder_finds_the_package(tmp_path):
    """A folder named babyllama (the checkout, seen from its parent) must not shadow the installed package as
    a namespace package: the editable install puts the checkout on sys.path (pyproject's package-dir)."""
    import babyllama

    if Path(babyllama.__file__).resolve().parent != PACKAGE.resolve():
        pytest.skip("babyllama is not installed in editable mode from this checkout (pip install -e .)")
    (tmp_path / "babyllama").symlink_to(ROOT, target_is_directory=True)
    proc = subprocess.run([sys.executable, "-c", "import babyllama; print(babyllama.load.__name__)"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "load", proc.stderr
