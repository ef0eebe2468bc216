"""Sweep: SmallBNConvNet with and without BatchNorm across peak learning rates.

Ten variants, ``bn_lr<lr>`` and ``nobn_lr<lr>`` for peak one-cycle learning
rates 0.01, 0.05, 0.1, 0.4 and 1.0, all from ``configs/default.py`` with the
same seed, data order, augmentation, optimizer (SGD, Nesterov momentum 0.9,
weight decay 5e-4) and budget. Only ``model.use_batch_norm`` and
``optim.learning_rate`` change.

Budget: 5 epochs per run (the default trains 10). One epoch of the default run,
measured before choosing, took 24 s including compilation and evaluation
(2,561 images/s) on the 2-core CPU machines here with other jobs running; the
ten runs then took 1010 s from scratch (docs/experiments/bn_vs_lr), well under
the hour allowed.

Run with::

    python -m jbn.sweep --sweep configs/sweeps/bn_vs_lr.py --root runs/bn_vs_lr \
        --sweep.base.data.data_dir=/path/to/cifar-10-batches-py
"""

import pathlib
import runpy

import ml_collections

# Loaded by path so the file works from any working directory (see configs/tiny.py).
_DEFAULT = runpy.run_path(str(pathlib.Path(__file__).parents[1] / "default.py"))

LEARNING_RATES = (0.01, 0.05, 0.1, 0.4, 1.0)
NUM_EPOCHS = 5


def get_config() -> ml_collections.ConfigDict:
    """Returns the sweep: ``base`` (shared budget applied) and ``variants``."""
    sweep = ml_collections.ConfigDict()
    sweep.base = _DEFAULT["get_config"]()
    sweep.base.num_epochs = NUM_EPOCHS  # Shared budget.
    sweep.base.seed = 0  # Shared seed: same init, data order and augmentation.
    variants = {}
    for use_bn, prefix in ((True, "bn"), (False, "nobn")):
        for lr in LEARNING_RATES:
            variants[f"{prefix}_lr{lr:g}"] = {
                "model.use_batch_norm": use_bn,
                "optim.learning_rate": lr,
            }
    sweep.variants = ml_collections.ConfigDict(variants, allow_dotted_keys=True)
    return sweep
