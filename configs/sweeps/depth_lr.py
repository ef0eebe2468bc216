"""Sweep: higher learning rates and faster training in depth, with and without BatchNorm.

The 20-layer plain network and ResNet-20 of He et al. 2016 (``plain20``,
``resnet20``; `jbn.models.cifar_resnet`), each with and without BatchNorm
(without: the convolutions get a bias), at peak one-cycle learning rates
0.01, 0.1 and 1.0, seeds 0 and 1: 24 variants named
``seed<k>_<model>_<bn|nobn>_lr<lr>``; the sweep runs them in name order, so
every seed-0 run comes first and a stopped sweep still covers every cell
once. Everything else as ``configs/resnet20.py`` (the paper's recipe: SGD +
Nesterov momentum 0.9, weight decay 1e-4, crop + flip, ReLU; a one-cycle
schedule rising for a quarter of the steps).

The report shows final accuracy against the learning rate, steps to a
threshold (from the step-wise evaluations) and divergence, and whether each
BN / no-BN difference exceeds the seed-to-seed spread.

Budget (the expensive experiment; about 40 minutes on a 2-core CPU): each run
trains 300 steps of 64 images, one epoch of the first 19,200 training images
(``data.num_train_examples``), and evaluates the first 1,000 test images
(``data.num_test_examples``) at step 0 and every 50 steps. On the 2-core Intel
machine of 2026-11-30 a ResNet-20 step of 128 took about 0.5 s
(``configs/resnet20.py``), so a run takes roughly 80-100 s with compilation and
evaluations (the AMD machines of other days are about 2x slower). These are
short runs: the curves show the first 0.4 epochs' worth of training, where
the effect of BatchNorm on the usable learning rate and on early progress
shows; they say nothing about final accuracy after full training.

Run with::

    python -m jbn.sweep --sweep configs/sweeps/depth_lr.py --root runs/depth_lr \
        --sweep.base.data.data_dir=/path/to/cifar-10-batches-py
    python -m jbn.report runs/depth_lr --out docs/experiments/depth_lr --thresholds 0.25,0.35
"""

import pathlib
import runpy

import ml_collections

# Loaded by path so the file works from any working directory (see configs/tiny.py).
_RESNET20 = runpy.run_path(str(pathlib.Path(__file__).parents[1] / "resnet20.py"))

MODELS = ("plain20", "resnet20")
LEARNING_RATES = (0.01, 0.1, 1.0)
SEEDS = (0, 1)
BATCH_SIZE = 64
NUM_TRAIN_EXAMPLES = 19200  # 300 steps of 64.
NUM_TEST_EXAMPLES = 1000
EVAL_EVERY_STEPS = 50


def base_config() -> ml_collections.ConfigDict:
    """``configs/resnet20.py`` on the shared budget (also the base of ``sigmoid_plain.py``)."""
    base = _RESNET20["get_config"]()
    base.num_epochs = 1
    base.data.batch_size = BATCH_SIZE
    base.data.num_train_examples = NUM_TRAIN_EXAMPLES
    base.data.num_test_examples = NUM_TEST_EXAMPLES
    base.eval_every_steps = EVAL_EVERY_STEPS
    return base


def get_config() -> ml_collections.ConfigDict:
    """Returns the sweep: ``base`` (shared budget applied) and ``variants``."""
    sweep = ml_collections.ConfigDict()
    sweep.base = base_config()
    variants = {}
    for seed in SEEDS:
        for model in MODELS:
            for use_bn, prefix in ((True, "bn"), (False, "nobn")):
                for lr in LEARNING_RATES:
                    variants[f"seed{seed}_{model}_{prefix}_lr{lr:g}"] = {
                        "model.name": model,
                        "model.use_batch_norm": use_bn,
                        "optim.learning_rate": lr,
                        "seed": seed,
                    }
    sweep.variants = ml_collections.ConfigDict(variants, allow_dotted_keys=True)
    return sweep
