"""Stable path of `jbn.tools.interop_torch`: ``from jbn import interop_torch``."""

import sys

from jbn.tools import interop_torch

sys.modules[__name__] = interop_torch
