"""Sweep: Ghost BatchNorm and batch size, SmallBNConvNet with BatchNorm.

Four variants from ``configs/default.py``, same seed and budget as
``bn_vs_lr.py`` (5 epochs):

- ``b128``: batch 128, statistics over the whole batch, peak lr 0.1 (the default);
- ``b128_ghost32``: batch 128 normalised in 4 ghost batches of 32;
- ``b512``: batch 512, peak lr 0.4 (linear scaling), whole-batch statistics;
- ``b512_ghost128``: batch 512 normalised in 4 ghost batches of 128, so the
  normalisation noise matches ``b128`` while the SGD step sees 512 images.

Run with::

    python -m jbn.sweep --sweep configs/sweeps/ghost_bn.py --root runs/ghost_bn \
        --sweep.base.data.data_dir=/path/to/cifar-10-batches-py
"""

import pathlib
import runpy

import ml_collections

# Loaded by path so the file works from any working directory (see configs/tiny.py).
_DEFAULT = runpy.run_path(str(pathlib.Path(__file__).parents[1] / "default.py"))

NUM_EPOCHS = 5


def get_config() -> ml_collections.ConfigDict:
    """Returns the sweep: ``base`` (shared budget applied) and ``variants``."""
    sweep = ml_collections.ConfigDict()
    sweep.base = _DEFAULT["get_config"]()
    sweep.base.num_epochs = NUM_EPOCHS  # Shared budget (as bn_vs_lr.py).
    sweep.base.seed = 0
    sweep.base.model.use_batch_norm = True
    variants = {}
    for batch, lr in ((128, 0.1), (512, 0.4)):
        for ghost in (None, batch // 4):
            name = f"b{batch}" + ("" if ghost is None else f"_ghost{ghost}")
            variants[name] = {
                "data.batch_size": batch,
                "optim.learning_rate": lr,
                "model.bn_stats": "global" if ghost is None else "ghost",
                "model.virtual_batch_size": ghost,
            }
    sweep.variants = ml_collections.ConfigDict(variants, allow_dotted_keys=True)
    return sweep
