"""Tests for jbn.train.config_schema: every config field has a rule, bad values get one clear line."""

from __future__ import annotations

import importlib.util
import pathlib
import runpy

import ml_collections
import pytest
from conftest import load_config

from jbn.experiments import sweep
from jbn.models import registry
from jbn.train import config_schema

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((REPO / "configs").glob("*.py"))
SWEEP_FILES = sorted((REPO / "configs" / "sweeps").glob("*.py"))


def _load(path):
    return runpy.run_path(str(path))["get_config"]()


def _default(**overrides):
    return load_config("default.py", overrides)


def _training_configs():
    """(name, config) for every config file and every sweep base."""
    configs = [(path.name, _load(path)) for path in CONFIG_FILES]
    configs += [(f"sweeps/{path.name}:base", _load(path).base) for path in SWEEP_FILES]
    return configs


@pytest.mark.parametrize("name, config", _training_configs(), ids=lambda x: str(x)[:30])
def test_every_field_of_every_config_file_has_a_rule_and_passes(name, config):
    fields = [path for path, _ in config_schema.leaves(config)]
    missing = sorted(set(fields) - set(config_schema.FIELDS))
    assert not missing, f"{name}: add a rule to jbn.train.config_schema.FIELDS for {missing}"
    config_schema.validate(config)


def test_every_rule_names_a_field_of_some_config():
    fields = {path for _, config in _training_configs() for path, _ in config_schema.leaves(config)}
    assert set(config_schema.FIELDS) <= fields, sorted(set(config_schema.FIELDS) - fields)


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.name)
def test_every_sweep_variant_is_valid(path):
    spec = _load(path)
    for name in spec.variants:
        config_schema.validate(sweep.variant_config(spec.base, dict(spec.variants[name])))


@pytest.mark.parametrize(
    "overrides, message",
    [
        # The three values of issue 15.
        ({"data.batch_size": 0}, "config.data.batch_size=0: must be an integer >= 1."),
        ({"num_epochs": 0}, "config.num_epochs=0: must be an integer >= 1."),
        (
            {"optim.learning_rate": -1.0},
            "config.optim.learning_rate=-1.0: must be a finite number >= 0.",
        ),
        # One per kind of rule.
        ({"seed": -3}, "config.seed=-3: must be an integer >= 0."),
        ({"max_steps": 0}, "config.max_steps=0: must be an integer >= 1, or None."),
        ({"optim.learning_rate": float("nan")}, "config.optim.learning_rate=nan: must be a finite"),
        ({"optim.weight_decay": -5e-4}, "config.optim.weight_decay=-0.0005: must be a finite number >= 0."),
        ({"optim.momentum": 1.5}, "config.optim.momentum=1.5: must be a finite number in [0, 1]."),
        ({"optim.warmup_fraction": 1.0}, "config.optim.warmup_fraction=1.0: must be a finite number in [0, 1)."),
        ({"optim.div_factor": 0.0}, "config.optim.div_factor=0.0: must be a finite number > 0."),
        ({"model.bn_epsilon": 0.0}, "config.model.bn_epsilon=0.0: must be a finite number > 0."),
        ({"model.bn_momentum": -0.1}, "config.model.bn_momentum=-0.1: must be a finite number in [0, 1]."),
        ({"model.widths": (16, 0)}, "config.model.widths=(16, 0): must be a non-empty sequence of integers >= 1."),
        ({"model.widths": ()}, "config.model.widths=(): must be a non-empty sequence"),
        ({"model.name": "ResNet"}, "config.model.name='ResNet': must be one of 'SmallBNConvNet'"),
        ({"model.norm": "torch"}, "config.model.norm='torch': must be one of 'jbn', 'flax', 'renorm'."),
        ({"model.bn_stats": "sync"}, "config.model.bn_stats='sync': must be one of 'global', 'local', 'ghost'."),
        ({"optim.name": "adam"}, "config.optim.name='adam': must be one of 'sgd'"),
        ({"optim.schedule": "cosine"}, "config.optim.schedule='cosine': must be one of 'onecycle', 'constant'."),
        ({"data.name": "svhn"}, "config.data.name='svhn': must be one of 'cifar10', 'cifar100', 'mnist'."),
        ({"data.checksums": "yes"}, "config.data.checksums='yes': must be one of 'warn', 'strict', 'off'."),
        ({"data.data_dir": ""}, "config.data.data_dir='': must be a non-empty path, or None."),
        ({"data.prefetch": -1}, "config.data.prefetch=-1: must be an integer >= 0."),
        ({"mesh.data": 0}, "config.mesh.data=0: must be an integer >= 1, or -1."),
        ({"keep_checkpoints": 0}, "config.keep_checkpoints=0: must be an integer >= 1, or None."),
        ({"checkpoint_every_steps": 0}, "config.checkpoint_every_steps=0: must be an integer >= 1."),
        ({"log_every_steps": 0}, "config.log_every_steps=0: must be an integer >= 1."),
        ({"eval_every_steps": 0}, "config.eval_every_steps=0: must be an integer >= 1, or None."),
        ({"data.num_train_examples": 0}, "config.data.num_train_examples=0: must be an integer >= 1, or None."),
        ({"probe.percentiles": (15, 101)}, "config.probe.percentiles=(15, 101): must be a non-empty sequence of integers in [0, 100]."),
        ({"probe.intermediate": ""}, "config.probe.intermediate='': must be a non-empty name, or None."),
        # Checks across fields.
        ({"data.name": "cifar100"}, "config.model.num_classes=10: must be 100, the number of classes of data.name='cifar100'."),
        ({"data.name": "mnist"}, "config.data.augment=True: must be False for data.name='mnist'"),
        ({"model.bn_stats": "ghost"}, "config.model.virtual_batch_size=None: must be an integer dividing data.batch_size=128 when model.bn_stats='ghost'."),
        ({"model.bn_stats": "ghost", "model.virtual_batch_size": 48}, "config.model.virtual_batch_size=48: must be an integer dividing"),
        ({"model.virtual_batch_size": 32}, "config.model.virtual_batch_size=32: must be None unless model.bn_stats='ghost'."),
        ({"model.norm": "flax", "model.bn_stats": "local"}, "config.model.bn_stats='local': must be 'global' with model.norm='flax'"),
        ({"model.norm": "renorm", "model.bn_stats": "local"}, "config.model.bn_stats='local': must be 'global' with model.norm='renorm' (jbn.BatchRenorm has no batch groups)."),
        ({"optim.momentum": 0.0}, "config.optim.nesterov=True: must be False when optim.momentum=0"),
        ({"probe.every_steps": 100}, "config.probe.intermediate=None: must be the name of a value the model sows (e.g. 'pre_activation_3' of the mlp) when probe.every_steps=100."),
    ],
)  # fmt: skip
def test_bad_value_gets_one_line_naming_field_value_and_rule(overrides, message):
    with pytest.raises(config_schema.ConfigError) as info:
        config_schema.validate(_default(**overrides))
    assert len(info.value.problems) == 1 and str(info.value).count("\n") == 0
    assert str(info.value).startswith(message), str(info.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model.activation": "gelu"}, "config.model.activation='gelu': must be one of 'relu', 'sigmoid', 'tanh'."),
        ({"model.name": "plain20", "model.shortcut": "B"}, "config.model.shortcut='B': must be None or 'none' for model.name='plain20' (a plain network has no shortcuts)."),
        ({"model.name": "plain56", "model.shortcut": "A"}, "config.model.shortcut='A': must be None or 'none' for model.name='plain56' (a plain network has no shortcuts)."),
    ],
)  # fmt: skip
def test_bad_value_of_a_resnet_field(overrides, message):
    with pytest.raises(config_schema.ConfigError) as info:
        config_schema.validate(load_config("resnet20.py", overrides))
    assert info.value.problems == [message]


@pytest.mark.parametrize(
    "name, shortcut",
    [("plain20", None), ("plain32", "none"), ("resnet20", "B"), ("resnet56", "none")],
)
def test_every_valid_shortcut_builds(name, shortcut):
    config = load_config("resnet20.py", {"model.name": name, "model.shortcut": shortcut})
    config_schema.validate(config)
    registry.make_model(config.model)  # Passes validation, so it builds.


def test_tensorboard_true_without_tensorboardx_is_a_config_error(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "tensorboardX" else find_spec(name, *args),
    )
    config_schema.validate(_default(**{"log.tensorboard": None}))  # Off, with one line.
    with pytest.raises(config_schema.ConfigError) as info:
        config_schema.validate(_default(**{"log.tensorboard": True}))
    assert info.value.problems == [
        "config.log.tensorboard=True: must be None or False: tensorboardX is not installed "
        '(pip install -e ".[tensorboard]").'
    ]


def test_types_are_checked_beyond_ml_collections():
    # ml_collections keeps a field's type once set; a config file can still start wrong.
    fields = _default().to_dict()
    fields["data"]["augment"] = 1  # An int where a bool belongs.
    fields["num_epochs"] = True  # A bool is no epoch count.
    config = ml_collections.ConfigDict(fields)
    with pytest.raises(config_schema.ConfigError) as info:
        config_schema.validate(config)
    assert info.value.problems == [
        "config.num_epochs=True: must be an integer >= 1.",
        "config.data.augment=1: must be True or False.",
    ]


def test_unknown_and_missing_fields_are_refused():
    config = _default()
    config.unlock()
    config.model.dropout = 0.1
    del config.data["checksums"]
    with pytest.raises(config_schema.ConfigError) as info:
        config_schema.validate(config)
    assert info.value.problems == [
        "config.data.checksums: missing; must be one of 'warn', 'strict', 'off'.",
        "config.model.dropout: unknown field (no rule in jbn.train.config_schema).",
    ]


def test_model_names_come_from_the_registry(monkeypatch):
    # A model registered after config_schema was imported is accepted and listed.
    monkeypatch.setitem(registry._MODELS, "wide_resnet16", registry._MODELS["SmallBNConvNet"])
    config_schema.validate(_default(**{"model.name": "wide_resnet16"}))
    with pytest.raises(config_schema.ConfigError, match="'resnet56', 'wide_resnet16'"):
        config_schema.validate(_default(**{"model.name": "resnet21"}))


def test_batch_sizes_must_divide_over_devices_and_processes():
    config = _default(**{"data.batch_size": 100, "data.eval_batch_size": 1000})
    config_schema.validate(config, data_axis_size=4, process_count=2)
    with pytest.raises(config_schema.ConfigError) as info:
        config_schema.validate(config, data_axis_size=8, process_count=2)
    assert info.value.problems == [
        "config.data.batch_size=100: must be a multiple of 8, the number of devices."
    ]
    config.data.batch_size = 96
    with pytest.raises(config_schema.ConfigError) as info:
        config_schema.validate(config, data_axis_size=2, process_count=3)
    assert info.value.problems == [
        "config.data.eval_batch_size=1000: must be a multiple of 3, the number of processes."
    ]


def test_resumable_fields_are_documented_in_readme():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Running on a cluster") :]
    for field in config_schema.resumable_fields():
        assert f"`{field}`" in section, f"README's 'Running on a cluster' lacks {field}"


def test_a_batch_must_fit_in_the_training_set():
    config = _default(**{"data.batch_size": 400})
    config_schema.check_batch_fits(config, 400, "CIFAR-10")
    with pytest.raises(config_schema.ConfigError) as info:
        config_schema.check_batch_fits(config, 320, "CIFAR-10")
    assert info.value.problems == [
        "config.data.batch_size=400: must be at most 320, the training images of CIFAR-10."
    ]


def test_mesh_that_does_not_fit_the_devices_is_a_config_error():
    # Fewer devices than the host has are the first ones (README: --config.mesh.data=1).
    with pytest.raises(
        config_schema.ConfigError,
        match=r"config.mesh=\{'data': 16\}: Mesh .* needs 16 devices, have 8",
    ):
        config_schema.create_mesh(_default(**{"mesh.data": 16}))
    mesh = config_schema.create_mesh(
        _default(**{"data.batch_size": 64, "data.eval_batch_size": 80})
    )
    assert mesh.shape == {"data": 8}
