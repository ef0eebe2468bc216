"""``python -m jbn.sweep`` runs `jbn.experiments.sweep`; ``import jbn.sweep`` gives that module."""

import runpy
import sys

if __name__ == "__main__":
    runpy.run_module("jbn.experiments.sweep", run_name="__main__", alter_sys=True)
else:
    from jbn.experiments import sweep

    sys.modules[__name__] = sweep
