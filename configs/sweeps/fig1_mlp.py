"""Sweep: the BatchNorm paper's Figure 1, a 3 x 100 sigmoid MLP with and without BatchNorm.

Ioffe & Szegedy (2015), section 4.1: a fully connected network with three
hidden layers of 100 sigmoid units (`jbn.models.MLP`, BatchNorm before each
sigmoid in the BN variant), trained with SGD on mini-batches of 60 images:
test accuracy against training steps, and the 15th, 50th and 85th percentiles
of the input to one sigmoid of the last hidden layer over training.

Six variants, ``seed<k>_bn`` and ``seed<k>_nobn`` for seeds 0, 1, 2 (the
sweep runs them in name order, so seed 0 of both first and a stopped sweep
still has a comparison), all from ``configs/default.py`` with:

- model ``mlp``, widths (100, 100, 100), activation sigmoid;
- batch 60 (the paper's), no augmentation (the paper's MNIST had none);
- SGD with Nesterov momentum 0.9 and weight decay 5e-4 as the default, but a
  constant learning rate of 0.1 (the paper gives no schedule);
- the test set evaluated at step 0 and every 250 steps
  (``eval_every_steps``), the probe every 100 steps on the first 1000 test
  images (``probe.intermediate="pre_activation_3"``, ``probe.unit=0``).

Data: the paper used MNIST; this runs on CIFAR-10 (no MNIST copy on these
machines), so the accuracies are CIFAR-10's (an MLP reaches about 50%). With
an MNIST directory (the four IDX files), ``--sweep.base.data.name=mnist
--sweep.base.data.data_dir=/path/to/mnist`` runs the same sweep on the
paper's data (60,000 images: 10 epochs are 10,000 steps of 60).

Budget: 10 epochs of the 50,000 training images (8,330 steps) per run; the
paper trained 50,000 steps. A probe of the training loop on a shared 2-core
CPU ran one epoch in about 11 s of training (4,500 images/s) and 20 s wall
with compilation and evaluations, so the six runs should take roughly 6-10
minutes.

Run with::

    python -m jbn.sweep --sweep configs/sweeps/fig1_mlp.py --root runs/fig1_mlp \
        --sweep.base.data.data_dir=/path/to/cifar-10-batches-py
    python -m jbn.report runs/fig1_mlp --out docs/experiments/fig1_mlp --thresholds 0.35,0.45
"""

import pathlib
import runpy

import ml_collections

# Loaded by path so the file works from any working directory (see configs/tiny.py).
_DEFAULT = runpy.run_path(str(pathlib.Path(__file__).parents[1] / "default.py"))

SEEDS = (0, 1, 2)
NUM_EPOCHS = 10


def get_config() -> ml_collections.ConfigDict:
    """Returns the sweep: ``base`` (shared budget applied) and ``variants``."""
    sweep = ml_collections.ConfigDict()
    base = sweep.base = _DEFAULT["get_config"]()
    base.num_epochs = NUM_EPOCHS
    base.model.name = "mlp"
    base.model.widths = (100, 100, 100)
    base.model.activation = "sigmoid"
    base.data.batch_size = 60
    base.data.augment = False
    base.optim.schedule = "constant"
    base.optim.learning_rate = 0.1
    base.eval_every_steps = 250
    base.probe.every_steps = 100
    base.probe.intermediate = "pre_activation_3"  # The last hidden layer's sigmoid inputs.
    base.probe.unit = 0
    base.probe.num_examples = 1000
    variants = {}
    for seed in SEEDS:
        for use_bn, prefix in ((True, "bn"), (False, "nobn")):
            variants[f"seed{seed}_{prefix}"] = {"model.use_batch_norm": use_bn, "seed": seed}
    sweep.variants = ml_collections.ConfigDict(variants, allow_dotted_keys=True)
    return sweep
