"""Every Python block of docs/guide.md runs as is."""

import pathlib
import re

import pytest

GUIDE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "guide.md"
BLOCKS = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)


def test_guide_has_examples():
    assert len(BLOCKS) >= 9


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_example_runs(index):
    code = BLOCKS[index]
    if "import torch" in code:
        pytest.importorskip("torch")
    if "import equinox" in code:
        pytest.importorskip("equinox")
    exec(compile(code, f"{GUIDE}:block{index}", "exec"), {"__name__": f"guide_{index}"})
