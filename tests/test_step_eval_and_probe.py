"""Tests for the workbench's step-wise evaluations, activation probe and training subset."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import load_config, overridden

from jbn.models import MLP
from jbn.train import (
    activation_probe,
    config_schema,
    data,
    distributed,
    loop,
    run_log,
    step_eval,
)


def _config(data_dir, **overrides):
    """configs/tiny.py with the BatchNorm paper's MLP (12-unit sigmoid layers), no crop + flip."""
    config = load_config("tiny.py", {"data.data_dir": str(data_dir), "data.augment": False})
    with config.unlocked():
        config.model.name = "mlp"
        config.model.widths = (12, 12, 12)
        config.model.activation = "sigmoid"  # A field of the MLP that tiny.py lacks.
    return overridden(config, overrides)


def _state(model, variables):
    tx = optax.sgd(0.1)
    return loop.TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=tx,
        batch_stats=variables.get("batch_stats", {}),
    )


@pytest.mark.parametrize("unit", [3, None])
def test_probe_percentiles_match_numpy(unit, tmp_path):
    """The probe's percentiles of layer 3's sigmoid inputs equal NumPy's on the same batch."""
    model = MLP(widths=(16, 16, 8))
    inputs = np.asarray(jax.random.normal(jax.random.key(0), (37, 8, 8, 3)))
    variables = model.init(jax.random.key(1), inputs, train=False)
    # Running statistics away from their initial values, so inference mode matters.
    stats = variables["batch_stats"]
    stats["bn2"]["mean"] = jnp.linspace(-1.0, 1.0, 8)
    stats["bn2"]["var"] = jnp.linspace(0.5, 2.0, 8)
    mesh = distributed.create_mesh({"data": -1})
    qs = (15.0, 50.0, 85.0, 2.5)
    probe = activation_probe.ActivationProbe(
        5,
        tmp_path,
        inputs,
        intermediate="pre_activation_3",
        unit=unit,
        percentiles=qs,
        mesh=mesh,
        start_step=0,
    )
    state = _state(model, variables)
    probe.start(state)
    probe.after_step(4, state)  # Not due.
    probe.after_step(10, state)

    # Float64 reference: layers 1-2 by NumPy, layer 3's Dense and BN with running stats.
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    h = inputs.reshape(len(inputs), -1).astype(np.float64)
    for i in range(3):
        h = h @ params[f"dense{i}"]["kernel"]
        bn_stats = jax.tree.map(lambda a: np.asarray(a, np.float64), stats[f"bn{i}"])
        h = (h - bn_stats["mean"]) / np.sqrt(bn_stats["var"] + 1e-5)
        h = h * params[f"bn{i}"]["scale"] + params[f"bn{i}"]["bias"]
        if i < 2:
            h = 1 / (1 + np.exp(-h))
    values = h if unit is None else h[:, unit]
    expected = np.percentile(values.reshape(-1), qs)

    records = activation_probe.read(tmp_path)
    assert [r["step"] for r in records] == [0, 10]
    for record in records:
        assert record["intermediate"] == "pre_activation_3" and record["unit"] == unit
        got = [record[activation_probe.percentile_key(q)] for q in qs]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert "p2.5" in records[0]


def test_probe_names_what_the_model_sows(tmp_path):
    model = MLP(widths=(4, 4))
    x = np.zeros((3, 2, 2, 3), np.float32)
    state = _state(model, model.init(jax.random.key(0), x, train=False))
    mesh = distributed.create_mesh({"data": -1})

    def probe(name, unit=0):
        kwargs = {"intermediate": name, "unit": unit, "percentiles": (50,), "mesh": mesh}
        return activation_probe.ActivationProbe(1, tmp_path, x, start_step=7, **kwargs)

    with pytest.raises(KeyError, match=r"sows \['pre_activation_1', 'pre_activation_2'\]"):
        probe("pre_activation_3").start(state)
    with pytest.raises(ValueError, match="unit=9: 'pre_activation_2' has 4 units"):
        probe("pre_activation_2", unit=9).start(state)
    with pytest.raises(ValueError, match="percentiles"):
        activation_probe.ActivationProbe(
            1, tmp_path, x, intermediate="a", unit=0, percentiles=(101,), mesh=mesh, start_step=0
        )
    probe("pre_activation_2").start(state)  # Resumed at step 7: nothing to log yet.
    assert activation_probe.read(tmp_path) == []


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"probe.intermediate": "pre_activation_9"},
            "config.probe.intermediate='pre_activation_9': must name a value that "
            "model.name='mlp' sows: pre_activation_1, pre_activation_2, pre_activation_3.",
        ),
        (
            {"probe.intermediate": "pre_activation_3", "probe.unit": 12},
            "config.probe.unit=12: must be an index on the last axis of 'pre_activation_3' "
            "(12 units), or None.",
        ),
    ],
)
def test_a_probe_the_model_cannot_give_stops_the_run_before_data_or_checkpoints(
    tmp_path, overrides, message
):
    # No data where the config points: the check must come before the data is loaded.
    config = _config(tmp_path / "no_data", **{"probe.every_steps": 5, **overrides})
    with pytest.raises(config_schema.ConfigError) as info:
        loop.train_and_evaluate(config, tmp_path / "run")
    assert info.value.problems == [message]
    assert not (tmp_path / "run").exists()


def test_eval_every_steps_cadence_probe_and_subset_through_the_loop(cifar_fixture_dir, tmp_path):
    # 256 of the 320 fixture images at batch 32: 8 steps per epoch, 2 epochs.
    config = _config(
        cifar_fixture_dir,
        **{
            "data.num_train_examples": 256,
            "eval_every_steps": 4,
            "probe.every_steps": 5,
            "probe.intermediate": "pre_activation_3",
            "probe.num_examples": 20,
            "checkpoint_every_steps": 4,
        },
    )
    # Left over from an earlier attempt in this workdir: dropped by a start from scratch.
    run_log.append(tmp_path, {"step": 0, "test_accuracy": -1.0}, step_eval.EVALS_FILE)
    run_log.append(tmp_path, {"step": 0, "p50": 1e9}, activation_probe.PROBE_FILE)
    # Stopped at step 10 (mid-epoch, just checkpointed), then resumed to the end.
    loop.train_and_evaluate(overridden(config, max_steps=10), tmp_path)
    assert [r["step"] for r in step_eval.read(tmp_path)] == [0, 4, 8, 10]
    assert step_eval.read(tmp_path)[0]["test_accuracy"] >= 0
    # As if killed after evaluating step 12 but before checkpointing it: dropped on resume.
    run_log.append(tmp_path, {"step": 12, "test_accuracy": -1.0}, step_eval.EVALS_FILE)
    run_log.append(tmp_path, {"step": 12, "p50": 1e9}, activation_probe.PROBE_FILE)
    loop.train_and_evaluate(config, tmp_path)
    evals = step_eval.read(tmp_path)
    # Step 0, every multiple of 4, the epoch ends (8, 16; and 10, where the first
    # run stopped) evaluated once, by the epoch record.
    assert [r["step"] for r in evals] == [0, 4, 8, 10, 12, 16]
    assert [r["epoch"] for r in evals] == [0, 0.5, 1, 1.25, 1.5, 2]
    assert all(r["test_accuracy"] >= 0 and r["test_count"] == 50 for r in evals)
    epochs = run_log.read(tmp_path)
    assert [r["step"] for r in epochs] == [8, 10, 16]
    for record in epochs:
        (copy,) = [r for r in evals if r["step"] == record["step"]]
        assert copy["test_accuracy"] == record["test_accuracy"]
    probes = activation_probe.read(tmp_path)
    assert [r["step"] for r in probes] == [0, 5, 10, 15]
    assert all(r["p15"] <= r["p50"] <= r["p85"] < 1e9 for r in probes)


def test_step_evaluations_off_by_default_and_bad_values_named(tmp_path):
    evals = step_eval.StepEvaluations(
        None, tmp_path, lambda s: 1 / 0, steps_per_epoch=10, start_step=0
    )
    evals.start(None)
    evals.after_step(10, None, epoch_end=False)
    evals.add_epoch_record({"step": 10})
    assert not evals.enabled and not (tmp_path / step_eval.EVALS_FILE).exists()
    with pytest.raises(ValueError, match="eval_every_steps=0"):
        step_eval.StepEvaluations(0, tmp_path, None, steps_per_epoch=10, start_step=0)


def test_take_examples_keeps_the_first_of_each_split():
    rng = np.random.default_rng(0)
    dataset = data.Dataset(*(rng.integers(0, 9, (n, 2)) for n in (10, 10, 6, 6)))
    cut = data.take_examples(dataset, {"num_train_examples": 4, "num_test_examples": 3})
    np.testing.assert_array_equal(cut.train_images, dataset.train_images[:4])
    np.testing.assert_array_equal(cut.train_labels, dataset.train_labels[:4])
    np.testing.assert_array_equal(cut.test_images, dataset.test_images[:3])
    np.testing.assert_array_equal(cut.test_labels, dataset.test_labels[:3])
    assert data.take_examples(dataset, {"num_train_examples": None}) is dataset
    with pytest.raises(ValueError, match=r"num_train_examples=11: must be an integer in \[1, 10\]"):
        data.take_examples(dataset, {"num_train_examples": 11})
    with pytest.raises(ValueError, match="num_test_examples=0"):
        data.take_examples(dataset, {"num_test_examples": 0})
