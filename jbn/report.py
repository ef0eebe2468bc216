"""``python -m jbn.report`` runs `jbn.experiments.report`; ``import jbn.report`` gives that module."""

import runpy
import sys

if __name__ == "__main__":
    runpy.run_module("jbn.experiments.report", run_name="__main__", alter_sys=True)
else:
    from jbn.experiments import report

    sys.modules[__name__] = report
