"""Stable path of `jbn.train.cpu_tuning`: ``from jbn import cpu_tuning``."""

import sys

from jbn.train import cpu_tuning

sys.modules[__name__] = cpu_tuning
