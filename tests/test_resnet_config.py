"""configs/resnet20.py: the paper's recipe, the zoo from the command line, a short run on the fixture."""

import functools
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from absl import flags
from ml_collections import config_flags

from jbn import models
from jbn.train import loop, run_log

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "resnet20.py"


def _parse(*overrides):
    """The config as ``train.py --config configs/resnet20.py <overrides>`` parses it."""
    argv = ["train.py", f"--config={CONFIG}", *overrides]
    flag_values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file(
        "config", str(CONFIG), flag_values=flag_values, lock_config=True, sys_argv=argv
    )
    flag_values(argv)
    return holder.value


def _num_params(model):
    init = functools.partial(model.init, train=False)
    shapes = jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    return sum(leaf.size for leaf in jax.tree.leaves(shapes["params"]))


def test_the_papers_recipe():
    config = _parse()
    assert (config.data.batch_size, config.data.augment) == (128, True)
    assert (config.optim.name, config.optim.momentum, config.optim.weight_decay) == (
        "sgd",
        0.9,
        1e-4,
    )
    model = models.make_model(config.model)
    assert isinstance(model, models.ResNet)
    assert (model.stage_sizes, model.shortcut, model.stem) == ((3, 3, 3), "A", "cifar")
    assert _num_params(model) == 269_722


def test_command_line_runs_the_zoo():
    config = _parse("--config.model.name=resnet56", "--config.model.norm=flax")
    model = models.make_model(config.model)
    assert model.stage_sizes == (9, 9, 9) and model.norm.func is nn.BatchNorm
    config = _parse(
        "--config.model.name=plain20",
        "--config.model.activation=sigmoid",
        "--config.model.use_batch_norm=False",
    )
    model = models.make_model(config.model)
    assert (model.shortcut, model.activation, model.use_batch_norm) == ("none", "sigmoid", False)
    config = _parse("--config.model.shortcut=B", "--config.model.zero_init_residual=True")
    model = models.make_model(config.model)
    assert (model.shortcut, model.zero_init_residual) == ("B", True)
    assert _num_params(model) == 272_474
    config = _parse("--config.model.name=resnet18")
    model = models.make_model(config.model)
    assert (model.stem, model.shortcut, model.num_classes) == ("cifar", "B", 10)
    config = _parse("--config.model.norm=renorm", "--config.model.renorm_warmup_steps=100")
    assert (
        models.make_model(config.model).norm.keywords["clip_schedule"].keywords["warmup_steps"]
        == 100
    )
    config = _parse("--config.model.name=SmallBNConvNet")
    assert isinstance(models.make_model(config.model), models.SmallBNConvNet)
    with pytest.raises(ValueError, match="Unknown model 'resnet99'"):
        models.make_model(_parse("--config.model.name=resnet99").model)


def test_resnet20_trains_and_evaluates_on_the_fixture(cifar_fixture_dir, tmp_path):
    config = _parse(
        f"--config.data.data_dir={cifar_fixture_dir}",
        "--config.data.download=False",
        "--config.data.batch_size=16",
        "--config.data.eval_batch_size=16",
        "--config.num_epochs=1",
        "--config.max_steps=2",
        "--config.log_every_steps=1",
    )
    record = loop.train_and_evaluate(config, tmp_path)
    assert record["step"] == 2 and record["test_count"] == 50
    assert 0.0 < record["train_loss"] < 10.0 and 0.0 <= record["test_accuracy"] <= 1.0
    assert run_log.read(tmp_path)[-1]["step"] == 2
