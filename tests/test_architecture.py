"""The package's shape: imports point one way, no cycles, no borrowed private names, a cheap `import lm`."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lm"

# Layers from the bottom; a module may import from its own unit or from a lower layer only.
LAYERS = (
    ("lm.errors", "lm.jsonsafe"),
    ("lm.storage",),
    ("lm.config",),
    ("lm.rundir",),
    ("lm.model", "lm.data", "lm.parallel"),
    ("lm.observe",),
    ("lm.training",),
    ("lm.tools",),
    ("lm.hf",),
    ("lm.cli",),
)
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}
ENTRY = len(LAYERS)  # lm/__init__.py, every __main__.py and the `python -m lm.X` entry modules


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_and_rank(module: str, path: pathlib.Path | None = None) -> tuple[str, int]:
    for length in (2, 1):
        unit = ".".join(module.split(".")[:length])
        if unit in RANK and (path is None or path.name != "__main__.py"):
            return unit, RANK[unit]
    return module, ENTRY


def lm_imports(path: pathlib.Path) -> list[tuple[str, list[str]]]:
    """(imported lm module, names taken from it) for every import statement, also inside functions."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.split(".")[0] == "lm"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "lm":
                continue
            for alias in node.names:  # `from lm.data import packaged` imports the submodule lm.data.packaged
                sub = f"{base}.{alias.name}"
                is_module = (ROOT / pathlib.Path(*sub.split("."))).with_suffix(".py").is_file() or \
                    (ROOT / pathlib.Path(*sub.split(".")) / "__init__.py").is_file()
                found.append((sub, []) if is_module else (base, [alias.name]))
    return found


def graph() -> dict[str, tuple[pathlib.Path, list[tuple[str, list[str]]]]]:
    return {module_name(p): (p, lm_imports(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def package_metadata(target: str, names: list[str]) -> bool:
    """`from lm import __version__`: the package's own metadata, loaded with any lm module, not its API."""
    return target == "lm" and bool(names) and all(n.startswith("__") and n.endswith("__") for n in names)


def test_imports_point_down_the_layers():
    wrong = []
    for module, (path, imports) in graph().items():
        unit, rank = unit_and_rank(module, path)
        for target, names in imports:
            if package_metadata(target, names):
                continue
            target_unit, target_rank = unit_and_rank(target)
            if target_unit != unit and target_rank >= rank:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "imports that run up (or across) the layers: " + "; ".join(wrong)


def test_no_import_cycles():
    edges = {m: {t for t, _ in imports if t != m} for m, (_, imports) in graph().items()}
    state, cycles = {}, []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(cycles)


def test_no_module_takes_another_modules_private_names():
    borrowed = [f"{module} takes {name} from {target}" for module, (_, imports) in graph().items()
                for target, names in imports for name in names
                if name.startswith("_") and not name.startswith("__") and target != module]
    assert not borrowed, "; ".join(borrowed)


def test_the_checks_see_a_violation(tmp_path, monkeypatch):
    """The walker finds an upward import, a private name and a function-level import."""
    bad = tmp_path / "lm" / "model" / "bad.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("def f():\n    from lm.training.loop import _private\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert lm_imports(bad) == [("lm.training.loop", ["_private"])]
    assert unit_and_rank("lm.model.bad") == ("lm.model", 4) and unit_and_rank("lm.training.loop")[1] == 6
    assert package_metadata("lm", ["__version__"]) and not package_metadata("lm", ["train", "__version__"])


@pytest.mark.parametrize("code", [
    "import lm, sys; assert 'jax' not in sys.modules and 'lm.config' not in sys.modules",
    "import lm.hf, sys; assert 'lm.training.loop' not in sys.modules",
    "import lm.tools.evaluate, sys; assert 'lm.training.loop' not in sys.modules",
    "import lm.rundir, lm.storage, sys; lm.storage.path('runs/x'); "
    "assert not {'etils', 'fsspec', 'gcsfs', 'jax'} & set(sys.modules)",  # a local run_dir: no remote I/O imports
    "import lm, sys; assert callable(lm.train) and callable(lm.generate) and callable(lm.restore_run); "
    "import lm.training.runtime; assert callable(lm.train) and lm.build is lm.training.runtime.build",
])
def test_import_costs_and_the_public_api(code):
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("argv", [["-m", "lm", "--help"], ["-m", "lm.generate", "--help"], ["-m", "lm.aot", "--help"],
                                  ["-m", "lm.hf", "import", "--help"], ["-m", "lm.data", "list"],
                                  ["train.py", "--help"], ["eval.py", "--help"], ["-m", "lm.train", "--help"],
                                  ["-m", "lm.eval", "--help"]])
def test_every_entry_point_reaches_the_one_command_line(argv):
    result = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
