"""Default config: SmallBNConvNet on CIFAR-10, 10 epochs, SGD + Nesterov, one-cycle LR.

Run with ``python train.py --config configs/default.py --workdir ./workdir`` and
override any field from the command line, e.g. ``--config.optim.learning_rate=0.2``.
What each field accepts, and which may change when a run resumes, is in
``jbn/train/config_schema.py``.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Returns the default training configuration."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.num_epochs = 10
    # Stop after this many steps in total (None: train all epochs). The LR
    # schedule still spans num_epochs, so a run split by max_steps and resumed
    # is bitwise identical to a straight run.
    config.max_steps = ml_collections.FieldReference(None, field_type=int)

    config.model = ml_collections.ConfigDict()
    config.model.name = "SmallBNConvNet"
    config.model.num_classes = 10
    config.model.widths = (16, 32)
    config.model.use_batch_norm = True
    config.model.norm = "jbn"  # "jbn" (jbn.BatchNorm) or "flax" (flax.linen.BatchNorm).
    config.model.bn_momentum = 0.9  # Flax decay convention; PyTorch momentum=0.1.
    config.model.bn_epsilon = 1e-5
    # Convolutions with at most this many input channels (the RGB input) run as
    # jbn.ops.conv.PatchConv: same maths as nn.Conv, faster on XLA:CPU. 0: never.
    config.model.patch_conv_channels = 4
    # On one CPU device, run that RGB convolution with jbn.ops.native's compiled
    # kernel (built with the C++ compiler on first use; XLA's path without one).
    config.model.native_input_conv = True
    # Which examples share BatchNorm statistics in training: "global" (the whole
    # global batch, exact as on one device), "local" (each device's shard, like
    # PyTorch DDP without SyncBatchNorm) or "ghost" (virtual_batch_size groups).
    config.model.bn_stats = "global"
    config.model.virtual_batch_size = ml_collections.FieldReference(None, field_type=int)

    config.optim = ml_collections.ConfigDict()
    config.optim.name = "sgd"
    config.optim.learning_rate = 0.1  # Peak of the one-cycle schedule.
    config.optim.momentum = 0.9
    config.optim.nesterov = True
    # Coupled L2 (added to the gradient before momentum, like torch.optim.SGD).
    config.optim.weight_decay = 5e-4
    config.optim.weight_decay_on = "all"  # "all" params (as PyTorch) or "kernels" only.
    config.optim.schedule = "onecycle"  # "onecycle" (cosine) or "constant".
    config.optim.warmup_fraction = 0.3  # Fraction of steps rising to the peak.
    config.optim.div_factor = 25.0  # Initial LR = peak / div_factor.
    config.optim.final_div_factor = 1e4  # Final LR = initial / final_div_factor.

    config.data = ml_collections.ConfigDict()
    config.data.name = "cifar10"  # "cifar10", "cifar100" or "mnist" (jbn.train.datasets).
    config.data.data_dir = ml_collections.FieldReference(None, field_type=str)
    config.data.download = True
    # Files that differ from the official release's checksums: "warn" and train
    # on them (e.g. a re-encoded copy), "strict" refuses them, "off" skips hashing.
    config.data.checksums = "warn"
    config.data.batch_size = 128
    config.data.eval_batch_size = 1000
    config.data.augment = True  # Random crop (zero pad 4) + horizontal flip, on device.
    config.data.prefetch = 2  # Batches transferred ahead by a background thread (0: off).
    # Train / evaluate on the first N images of each split only (None: all), to fit a budget.
    config.data.num_train_examples = ml_collections.FieldReference(None, field_type=int)
    config.data.num_test_examples = ml_collections.FieldReference(None, field_type=int)

    # Device mesh: axis name -> size; -1 takes the remaining devices.
    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1

    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3
    config.log_every_steps = 50
    # Also evaluate the test set at step 0 and every N steps (None: only after
    # each epoch); all evaluations go to workdir/evals.jsonl (jbn.train.step_eval).
    config.eval_every_steps = ml_collections.FieldReference(None, field_type=int)
    # Percentiles of a value the model sows, on the first num_examples test
    # images, at step 0 and every every_steps steps (None: off), into
    # workdir/probe.jsonl (jbn.train.activation_probe). E.g. the MLP's
    # intermediate="pre_activation_3", unit=0: one sigmoid input of its last layer.
    config.probe = ml_collections.ConfigDict()
    config.probe.every_steps = ml_collections.FieldReference(None, field_type=int)
    config.probe.intermediate = ml_collections.FieldReference(None, field_type=str)
    config.probe.unit = ml_collections.FieldReference(0, field_type=int)  # None: all units.
    config.probe.percentiles = (15, 50, 85)
    config.probe.num_examples = 1000
    config.log = ml_collections.ConfigDict()
    # TensorBoard event files in the workdir (jbn.train.tensorboard_log): None
    # writes them when tensorboardX is installed (pip install -e ".[tensorboard]").
    config.log.tensorboard = ml_collections.FieldReference(None, field_type=bool)
    return config
