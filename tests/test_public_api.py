"""The top-level names: loaded lazily at run time, imported for type checkers.

``jbn/__init__.py`` exports through PEP 562 (``_EXPORTS``), which static tools
cannot follow; its ``if TYPE_CHECKING:`` imports show them the same names from
the same modules, and its literal ``__all__`` lists them.
"""

import ast
import importlib
import pathlib

import jbn

INIT = pathlib.Path(jbn.__file__)


def _type_checking_imports():
    tree = ast.parse(INIT.read_text())
    blocks = [
        node
        for node in tree.body
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
    ]
    assert len(blocks) == 1, "one `if TYPE_CHECKING:` block of imports"
    imports = {}
    for node in blocks[0].body:
        assert isinstance(node, ast.ImportFrom) and node.level == 0, ast.unparse(node)
        for alias in node.names:
            imports[alias.asname or alias.name] = node.module
    return imports


def test_type_checkers_see_every_export_from_where_it_lives():
    assert _type_checking_imports() == jbn._EXPORTS


def test_all_lists_the_exports():
    assert jbn.__all__ == sorted(jbn._EXPORTS)


def test_lazy_names_are_the_objects_of_their_modules():
    for name, module in jbn._EXPORTS.items():
        assert getattr(jbn, name) is getattr(importlib.import_module(module), name), name
