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

Budget (the expensive experiment; about 35 minutes on a 2-core CPU): each run
trains 150 steps of 64 images, one epoch of the first 9,600 training images
(``data.num_train_examples``), and evaluates the first 1,000 test images
(``data.num_test_examples``) at step 0 and every 25 steps. A probe of 20
steps of batch 128 on the 2-core CPU shared with other jobs ran 51 (ResNet-20)
and 79 (plain-20) images/s with BatchNorm, and a 1,000-image evaluation took
about 4 s; alone the machine is roughly 2.5 times faster
(``configs/resnet20.py`` measured 0.47-0.94 s per ResNet-20 step of 128,
136-270 images/s), which gives about 100 s per ResNet-20 run and 75 s per
plain-20 run with compilation. These are short runs: the curves show the
first 0.2 epochs of training, where the
effect of BatchNorm on the usable learning rate and on early progress shows;
they say nothing about final accuracy after full training.

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
NUM_TRAIN_EXAMPLES = 9600  # 150 steps of 64.
NUM_TEST_EXAMPLES = 1000
EVAL_EVERY_STEPS = 25


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
