"""The package's layers import one way (docs/architecture.md).

Each layer may import only the layers the document allows it (`ALLOWED`): the
native kernels (jbn.native) nothing else of jbn; the core only those; each
framework module (linen, nnx, equinox) and the ops (kernels) only the core
(and the native layer); the models the core, the framework modules and
the ops; the tools those and the models; the workbench (train) those and the
tools; the experiments everything below them. Never the public facade (the
re-exports in ``jbn/__init__.py`` and the stable paths kept at the top). Read
from the source with ``ast``, so imports inside functions count too, and
relative imports (``from ..train import loop``) are resolved.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "jbn"

_FRAMEWORK_MODULES = {"jbn.linen", "jbn.nnx", "jbn.equinox"}
_CORE = {"jbn.native", "jbn.core"}
_MODELS = {*_CORE, *_FRAMEWORK_MODULES, "jbn.ops", "jbn.models"}
# Layer -> the layers it may import (itself included).
ALLOWED = {
    "jbn.native": {"jbn.native"},
    "jbn.core": _CORE,
    **{name: {*_CORE, name} for name in _FRAMEWORK_MODULES},
    "jbn.ops": {*_CORE, "jbn.ops"},
    "jbn.models": _MODELS,
    "jbn.tools": {*_MODELS, "jbn.tools"},
    "jbn.train": {*_MODELS, "jbn.tools", "jbn.train"},
    "jbn.experiments": {*_MODELS, "jbn.tools", "jbn.train", "jbn.experiments"},
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
    for layer in sorted(ALLOWED, key=len, reverse=True):
        if name == layer or name.startswith(layer + "."):
            return layer
    return None


def _absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """The module a ``from`` import names, relative ones resolved against ``importer``."""
    if node.level == 0:
        return node.module or ""
    parts = importer.split(".") if is_package else importer.split(".")[:-1]
    base = parts[: len(parts) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _imports(path: pathlib.Path, package: pathlib.Path) -> list[str]:
    """Every module ``path`` imports (``from a import b``: ``a.b`` where that is a module)."""
    importer, is_package = _module_name(path, package), path.name == "__init__.py"
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(node, importer, is_package)
            for alias in node.names:
                child = f"{module}.{alias.name}"
                names.append(child if _is_module(child, package) else module)
    return names


def layering_violations(path: pathlib.Path, package: pathlib.Path = PACKAGE) -> list[str]:
    """What ``path`` imports against the layering, one message each."""
    name = _module_name(path, package)
    importer = _layer(name)
    if importer is None:
        return [f"{name} is in no layer (add it to ALLOWED)"]
    problems = []
    for imported in _imports(path, package):
        if imported.split(".")[0] in FRAMEWORKS and importer in _CORE:
            problems.append(f"{name} ({importer}) imports the framework {imported}")
        if not (imported == "jbn" or imported.startswith("jbn.")):
            continue
        if imported in FACADE:
            problems.append(f"{name} imports the facade {imported}; import where it lives")
        elif _layer(imported) not in ALLOWED[importer]:
            problems.append(
                f"{name} ({importer}) imports {imported} ({_layer(imported)}): "
                f"{importer} may import only {sorted(ALLOWED[importer])}"
            )
    return problems


def _layered_modules() -> list[pathlib.Path]:
    paths = sorted(PACKAGE.rglob("*.py"))
    return [p for p in paths if _module_name(p, PACKAGE) not in FACADE]


@pytest.mark.parametrize("path", _layered_modules(), ids=lambda p: _module_name(p, PACKAGE))
def test_imports_flow_one_way(path):
    assert layering_violations(path) == []


def _fake_package(root: pathlib.Path, bad_module: str, source: str) -> pathlib.Path:
    package = root / "jbn"
    for sub in ("native", "core", "ops", "train", "experiments"):
        (package / sub).mkdir(parents=True)
        (package / sub / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "train" / "loop.py").write_text("")
    (package / "linen.py").write_text("")
    (package / "experiments" / "sweep.py").write_text("")
    path = package.joinpath(*bad_module.split(".")).with_suffix(".py")
    path.write_text(source)
    return path


@pytest.mark.parametrize(
    ("module", "source", "message"),
    [
        ("core.bad", "def f():\n    from jbn.train import loop\n", "imports jbn.train.loop"),
        ("core.bad", "from ..train import loop\n", "imports jbn.train.loop (jbn.train)"),
        ("core.bad", "from .. import train\n", "imports jbn.train (jbn.train)"),
        ("core.bad", "import flax.linen\n", "imports the framework flax.linen"),
        ("train.bad", "from jbn.experiments.sweep import main\n", "imports jbn.experiments"),
        ("train.bad", "import jbn\n", "imports the facade jbn"),
        ("train.bad", "from .. import sweep\n", "imports the facade jbn"),
        (
            "ops.bad",
            "from jbn.linen import BatchNorm\n",
            "may import only ['jbn.core', 'jbn.native', 'jbn.ops']",
        ),
        ("native.bad", "from jbn.core import statistics\n", "may import only ['jbn.native']"),
        ("native.bad", "import flax\n", "imports the framework flax"),
        ("ops.bad", "from ..linen import BatchNorm\n", "imports jbn.linen (jbn.linen)"),
    ],
)
def test_the_check_catches_violations(tmp_path, module, source, message):
    path = _fake_package(tmp_path, module, source)
    problems = layering_violations(path, tmp_path / "jbn")
    assert len(problems) == 1 and message in problems[0], problems
