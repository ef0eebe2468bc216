"""``python -m jbn.plot`` runs `jbn.train.plot`; ``import jbn.plot`` gives that module."""

import runpy
import sys

if __name__ == "__main__":
    runpy.run_module("jbn.train.plot", run_name="__main__", alter_sys=True)
else:
    from jbn.train import plot

    sys.modules[__name__] = plot
