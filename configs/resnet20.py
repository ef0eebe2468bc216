"""ResNet-20 on CIFAR-10 (He et al. 2016, section 4.2), fitted to 30 minutes of a 2-core CPU.

The paper's recipe (SGD, momentum 0.9, weight decay 1e-4, batch 128, random
crop + flip; plain cross-entropy) with the schedule shortened to the budget:
6 epochs (2,340 steps: 390 an epoch, whose last 80 of the 50,000 shuffled
images make no full batch and are left out) of a one-cycle LR peaking at 0.2
after 1.2 epochs. The paper trains 64k steps at 0.1 with two step decays; a
one-cycle schedule reaches a good optimum in far fewer steps (Smith & Topin
2019), and with BatchNorm the net takes the doubled peak rate.

Measured on the shared CIFAR-10 copy (2026-11-30, 2-core Intel Xeon machine):
4 epochs reached 77.99% in 14.5 minutes (too few); 6 epochs reached
80.85% in 22.7 minutes (``/usr/bin/time``; the first epoch shared the cores
with a test run and took 387 s, the others 190-210 s). A ResNet-20 step of 128 takes about 0.5 s there; the 2-core AMD EPYC
machines of other days run about 2x slower, where 6 epochs would take about
45 minutes (``python -m bench.bench_resnet_step`` measures a machine).

Run with ``python train.py --config configs/resnet20.py --workdir workdir_resnet20``.
The same config runs the rest of the zoo: ``--config.model.name=resnet56``
(or ``plain20``, ``resnet18``, ...), ``--config.model.norm=flax`` (or
``renorm``), ``--config.model.use_batch_norm=False``,
``--config.model.shortcut=B``, ``--config.model.activation=sigmoid``; ghost
batches: ``--config.model.bn_stats=ghost --config.model.virtual_batch_size=32``.
"""

import pathlib
import runpy

import ml_collections

# Loaded by path so the file works from any working directory (see configs/tiny.py).
_DEFAULT = runpy.run_path(str(pathlib.Path(__file__).with_name("default.py")))


def get_config() -> ml_collections.ConfigDict:
    """Returns the ResNet-20 configuration."""
    config = _DEFAULT["get_config"]()
    config.num_epochs = 6

    model = config.model
    model.name = "resnet20"  # Any of jbn.models.model_names().
    for field in ("widths", "patch_conv_channels", "native_input_conv"):
        del model[field]  # SmallBNConvNet's fields (it takes its defaults from here).
    # The ResNets' own fields.
    # None keeps the model's default: shortcut "A" for the CIFAR ResNets, "B" for
    # resnet18/34/50; stem "cifar" (3x3, no pooling) suits 32x32 images for all.
    model.stem = "cifar"
    model.shortcut = ml_collections.FieldReference(None, field_type=str)
    model.activation = "relu"  # Or "sigmoid", "tanh".
    model.zero_init_residual = False
    # norm="renorm" (jbn.BatchRenorm): final clips r_max/d_max, reached after a
    # warm-up of plain BatchNorm and a linear ramp; neither set: fixed clips.
    model.renorm_r_max = 3.0
    model.renorm_d_max = 5.0
    model.renorm_warmup_steps = ml_collections.FieldReference(None, field_type=int)
    model.renorm_ramp_steps = ml_collections.FieldReference(None, field_type=int)

    optim = config.optim
    optim.learning_rate = 0.2  # Peak of the one-cycle schedule.
    optim.momentum = 0.9
    optim.nesterov = True
    optim.weight_decay = 1e-4
    optim.warmup_fraction = 0.2  # 1.2 epochs of the six rising to the peak.
    optim.div_factor = 10.0  # Starts at 0.02.
    optim.final_div_factor = 1e3  # Ends at 2e-5.

    config.data.batch_size = 128
    config.data.augment = True  # Random crop (zero pad 4) + horizontal flip.
    return config
