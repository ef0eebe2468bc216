"""The package's layers import one way (docs/architecture.md).

core <- framework modules (linen, nnx, equinox) <- ops <- models <- tools
<- train (the workbench) <- experiments. A module may import its own layer and
the layers below it, never one above, and never the public facade (the
re-exports in ``jbn/__init__.py`` and the stable paths kept at the top). Read
from the source with ``ast``, so imports inside functions count too.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "jbn"

# Lower rank = lower layer. Framework adapters live at the top of the package.
LAYERS = {
    "jbn.core": 0,
    "jbn.linen": 1,
    "jbn.nnx": 1,
    "jbn.equinox": 1,
    "jbn.ops": 2,
    "jbn.models": 3,
    "jbn.tools": 4,
    "jbn.train": 5,
    "jbn.experiments": 6,
}
FACADE = {"jbn", "jbn.interop_torch", "jbn.cpu_tuning", "jbn.sweep", "jbn.report", "jbn.plot"}
FRAMEWORKS = ("flax", "equinox", "torch")


def _module_name(path: pathlib.Path, package: pathlib.Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str, package: pathlib.Path) -> bool:
    path = package.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _layer(name: str) -> str | None:
    for layer in sorted(LAYERS, key=len, reverse=True):
        if name == layer or name.startswith(layer + "."):
            return layer
    return None


def _imports(path: pathlib.Path, package: pathlib.Path) -> list[str]:
    """Every module ``path`` imports (``from a import b``: ``a.b`` where that is a module)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                names.append(child if _is_module(child, package) else node.module)
    return names


def layering_violations(path: pathlib.Path, package: pathlib.Path = PACKAGE) -> list[str]:
    """What ``path`` imports against the layering, one message each."""
    name = _module_name(path, package)
    importer = _layer(name)
    if importer is None:
        return [f"{name} is in no layer (add it to LAYERS)"]
    problems = []
    for imported in _imports(path, package):
        if imported.split(".")[0] in FRAMEWORKS and importer == "jbn.core":
            problems.append(f"{name} (the core) imports the framework {imported}")
        if not (imported == "jbn" or imported.startswith("jbn.")):
            continue
        if imported in FACADE:
            problems.append(f"{name} imports the facade {imported}; import where it lives")
        elif LAYERS[_layer(imported)] > LAYERS[importer]:
            problems.append(f"{name} ({importer}) imports {imported}, a layer above it")
    return problems


def _layered_modules() -> list[pathlib.Path]:
    paths = sorted(PACKAGE.rglob("*.py"))
    return [p for p in paths if _module_name(p, PACKAGE) not in FACADE]


@pytest.mark.parametrize("path", _layered_modules(), ids=lambda p: _module_name(p, PACKAGE))
def test_imports_flow_one_way(path):
    assert layering_violations(path) == []


def _fake_package(root: pathlib.Path, bad_module: str, source: str) -> pathlib.Path:
    package = root / "jbn"
    for sub in ("core", "train", "experiments"):
        (package / sub).mkdir(parents=True)
        (package / sub / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "train" / "loop.py").write_text("")
    (package / "experiments" / "sweep.py").write_text("")
    path = package.joinpath(*bad_module.split(".")).with_suffix(".py")
    path.write_text(source)
    return path


@pytest.mark.parametrize(
    ("module", "source", "message"),
    [
        ("core.bad", "def f():\n    from jbn.train import loop\n", "a layer above it"),
        ("core.bad", "import flax.linen\n", "imports the framework flax.linen"),
        ("train.bad", "from jbn.experiments.sweep import main\n", "a layer above it"),
        ("train.bad", "import jbn\n", "imports the facade jbn"),
    ],
)
def test_the_check_catches_violations(tmp_path, module, source, message):
    path = _fake_package(tmp_path, module, source)
    problems = layering_violations(path, tmp_path / "jbn")
    assert len(problems) == 1 and message in problems[0], problems
