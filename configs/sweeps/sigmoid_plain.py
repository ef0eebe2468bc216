"""Sweep: a saturating nonlinearity in depth, the 20-layer plain network with sigmoids.

The BatchNorm paper's BN-x5-Sigmoid point (section 4.2.2): without BatchNorm
a deep network of sigmoids barely trains; with it, it does. Here: ``plain20``
(He et al. 2016, no shortcuts) with ``model.activation="sigmoid"``, with and
without BatchNorm, at peak one-cycle learning rates 0.1 and 1.0, seeds 0 and
1: 8 variants ``seed<k>_<bn|nobn>_lr<lr>`` (run in name order: seed 0 first).

Everything else and the budget as ``depth_lr.py`` (``configs/resnet20.py``'s
recipe; 300 steps of 64 images from the first 19,200 training images, the
first 1,000 test images evaluated every 50 steps), so
the ReLU cells of that sweep are this one's reference: about 80 s per run on
a 2-core CPU, 11 minutes in all. ``--sweep.base.model.name=plain56`` runs the
56-layer plain network instead (about 2.8 times the cost).

Run with::

    python -m jbn.sweep --sweep configs/sweeps/sigmoid_plain.py --root runs/sigmoid_plain \
        --sweep.base.data.data_dir=/path/to/cifar-10-batches-py
    python -m jbn.report runs/sigmoid_plain --out docs/experiments/sigmoid_plain \
        --thresholds 0.2,0.3
"""

import pathlib
import runpy

import ml_collections

# Loaded by path so the file works from any working directory (see configs/tiny.py).
_DEPTH = runpy.run_path(str(pathlib.Path(__file__).with_name("depth_lr.py")))

LEARNING_RATES = (0.1, 1.0)
SEEDS = (0, 1)


def get_config() -> ml_collections.ConfigDict:
    """Returns the sweep: ``base`` (shared budget applied) and ``variants``."""
    sweep = ml_collections.ConfigDict()
    sweep.base = _DEPTH["base_config"]()
    sweep.base.model.name = "plain20"
    sweep.base.model.activation = "sigmoid"
    variants = {}
    for seed in SEEDS:
        for use_bn, prefix in ((True, "bn"), (False, "nobn")):
            for lr in LEARNING_RATES:
                variants[f"seed{seed}_{prefix}_lr{lr:g}"] = {
                    "model.use_batch_norm": use_bn,
                    "optim.learning_rate": lr,
                    "seed": seed,
                }
    sweep.variants = ml_collections.ConfigDict(variants, allow_dotted_keys=True)
    return sweep
