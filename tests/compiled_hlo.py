"""What XLA compiled: the fusions of a jitted function (a helper of the tests)."""

from __future__ import annotations

import re

import jax
import numpy as np


def full_size_fusions(fn, *args, size: int) -> list[str]:
    """Names of the compiled loop fusions of ``fn`` that write arrays of ``size`` or more elements.

    YNNPACK fusions (XLA:CPU's reductions) write per-feature results only; they
    are left out.
    """
    text = jax.jit(fn).lower(*args).compile().as_text()
    found = []
    for line in text[text.index("\nENTRY") :].splitlines():
        match = re.match(r"\s*(?:ROOT )?%(\S+) = \w+\[([\d,]*)\]\S* fusion\(", line)
        if match and "__ynn_fusion" not in line:
            dims = [int(d) for d in match.group(2).split(",") if d]
            if np.prod(dims, dtype=int) >= size:
                found.append(match.group(1))
    return found
