"""Tests for jbn.train.loop, train.py and jbn.plot on the tiny CIFAR-format fixture."""

import json
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config, overridden, write_cifar10_dir

from jbn.train import (
    data,
    distributed,
    epoch_metrics,
    evaluation,
    loop,
    plot,
    run_config,
    run_log,
)
from jbn.train.checkpoint import Checkpointer, CheckpointMismatchError

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mesh():
    return distributed.create_mesh({"data": -1})


def _batch(dataset, size, mesh, mask=False):
    batch = {"image": dataset.test_images[:size], "label": dataset.test_labels[:size]}
    if mask:
        batch["mask"] = np.ones(size, bool)
    return distributed.put_batch(batch, mesh)


def _assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def test_train_step_updates_and_eval_step_mutates_nothing(tiny, mesh, cifar_fixture_dir):
    dataset = data.load_cifar10(cifar_fixture_dir, download=False)
    state = loop.create_train_state(tiny, jax.random.key(0), mesh, steps_per_epoch=10)
    before = jax.device_get(state)
    step = loop.make_train_step(tiny, mesh)
    state, metrics = step(state, _batch(dataset, 32, mesh), jax.random.key(1))
    assert np.isfinite(metrics["loss"]) and bool(metrics["finite"])
    assert 0.0 <= float(metrics["accuracy"]) <= 1.0
    assert int(state.step) == 1
    for key in ("bn0", "bn1"):
        assert not np.allclose(state.batch_stats[key]["mean"], before.batch_stats[key]["mean"])
    after_train = jax.device_get(state)
    sums = loop.make_eval_step(mesh)(state, _batch(dataset, 16, mesh, mask=True))
    assert float(sums["count"]) == 16.0 and np.isfinite(sums["loss_sum"])
    _assert_trees_equal(state, after_train)


def test_no_retracing_after_first_step(tiny, mesh, cifar_fixture_dir, monkeypatch):
    traces = {"train": 0, "eval": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            traces[name] += 1  # Runs only while tracing.
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(loop, "train_step", counting("train", loop.train_step))
    monkeypatch.setattr(evaluation, "eval_step", counting("eval", evaluation.eval_step))
    dataset = data.load_cifar10(cifar_fixture_dir, download=False)
    state = loop.create_train_state(tiny, jax.random.key(0), mesh, steps_per_epoch=10)
    step = loop.make_train_step(tiny, mesh)
    evaluate = loop.make_eval_step(mesh)
    for i in range(4):
        state, _ = step(state, _batch(dataset, 32, mesh), jax.random.key(i))
        evaluate(state, _batch(dataset, 16, mesh, mask=True))
    assert traces == {"train": 1, "eval": 1}
    assert step._cache_size() == 1 and evaluate._cache_size() == 1


def test_no_bn_state_has_no_batch_stats(mesh, cifar_fixture_dir):
    config = load_config("no_bn.py", {"model.widths": (4, 8), "data.batch_size": 32})
    dataset = data.load_cifar10(cifar_fixture_dir, download=False)
    state = loop.create_train_state(config, jax.random.key(0), mesh, steps_per_epoch=10)
    assert state.batch_stats == {}
    assert set(state.params["conv0"]) == {"kernel", "bias"}
    state, metrics = loop.make_train_step(config, mesh)(
        state, _batch(dataset, 32, mesh), jax.random.key(0)
    )
    assert state.batch_stats == {} and bool(metrics["finite"])


def test_eval_counts_every_test_image_once(tiny, mesh, cifar_fixture_dir):
    dataset = data.load_cifar10(cifar_fixture_dir, download=False)
    assert len(dataset.test_images) % tiny.data.eval_batch_size != 0  # Padded last batch.
    state = loop.create_train_state(tiny, jax.random.key(0), mesh, steps_per_epoch=10)
    result = loop.evaluate(state, dataset, tiny, mesh, loop.make_eval_step(mesh))
    assert result["test_count"] == len(dataset.test_images)
    logits = state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats},
        data.preprocess(jnp.asarray(dataset.test_images)),
        train=False,
    )
    expected = float(np.mean(np.argmax(logits, -1) == dataset.test_labels))
    assert result["test_accuracy"] == pytest.approx(expected, abs=1e-6)


def test_resume_is_bitwise_identical(tiny, tmp_path, mesh):
    # 10 steps per epoch, checkpoint every 4: the split (6) is mid-epoch and off-interval.
    straight, split = tmp_path / "straight", tmp_path / "split"
    loop.train_and_evaluate(overridden(tiny, max_steps=13), straight)
    loop.train_and_evaluate(overridden(tiny, max_steps=6), split)
    assert Checkpointer(split / "checkpoints").all_steps() == [4, 6]
    loop.train_and_evaluate(overridden(tiny, max_steps=13), split)

    target = loop.create_train_state(tiny, jax.random.key(0), mesh, steps_per_epoch=10)
    states = []
    for workdir in (straight, split):
        checkpointer = Checkpointer(workdir / "checkpoints", tiny.keep_checkpoints)
        assert checkpointer.all_steps() == [12, 13]  # keep_checkpoints=2.
        state, step = checkpointer.restore_latest(target)
        checkpointer.close()
        assert step == 13 and int(state.step) == 13
        states.append(state)
    _assert_trees_equal(states[0].params, states[1].params)
    _assert_trees_equal(states[0].batch_stats, states[1].batch_stats)
    _assert_trees_equal(states[0].opt_state, states[1].opt_state)
    # The metrics log of the resumed run has the same epochs as the straight one,
    # and the same records: epoch 1's train metrics cover steps 1-6 of the first
    # run (their sums are in checkpoint 6) and steps 7-10 of the resumed one.
    records = [run_log.read(w) for w in (straight, split)]
    assert [r["epoch"] for r in records[0]] == [1.0, 1.3]
    assert [r["epoch"] for r in records[1]] == [0.6, 1.0, 1.3]
    assert [_without_timing(r) for r in records[0]] == [_without_timing(r) for r in records[1][1:]]


def _without_timing(record):
    return {k: v for k, v in record.items() if k not in ("images_per_sec", "wall_time_s")}


def _as_legacy_checkpoints(workdir):
    """Rewrites the workdir's checkpoints as jbn wrote them before ``progress`` (one unnamed item)."""
    for step_dir in (workdir / "checkpoints").iterdir():
        if step_dir.name.isdigit():
            (step_dir / "state").rename(step_dir / "default")
            shutil.rmtree(step_dir / "progress")


@pytest.mark.parametrize("legacy", [False, True], ids=["checkpoint", "legacy checkpoint"])
def test_rerunning_a_run_that_stopped_mid_epoch_at_max_steps_adds_nothing(tiny, tmp_path, legacy):
    # 10 steps per epoch; max_steps=15 stops in the middle of epoch 2.
    config = overridden(tiny, max_steps=15)
    first = loop.train_and_evaluate(config, tmp_path)
    records = run_log.read(tmp_path)
    assert [r["step"] for r in records] == [10, 15]
    if legacy:  # Without the epoch's train sums (older checkpoints).
        _as_legacy_checkpoints(tmp_path)
    again = loop.train_and_evaluate(config, tmp_path)
    assert run_log.read(tmp_path) == records  # Not a second step-15 record.
    assert again["step"] == 15 and again["test_accuracy"] == first["test_accuracy"]
    assert again["train_loss"] == first["train_loss"]  # The record read back.


def test_epoch_metrics_without_steps_say_so():
    sums = epoch_metrics.EpochMetrics.resume({}, step=15, steps_per_epoch=10)
    assert (sums.epoch, sums.steps) == (1, 0)
    with pytest.raises(ValueError, match="no train step of epoch 2 was summed"):
        sums.means()
    sums.add({"loss": jnp.float32(1.5), "accuracy": jnp.float32(0.25)})
    sums.add({"loss": jnp.float32(0.5), "accuracy": jnp.float32(0.75)})
    assert sums.means() == {"train_loss": 1.0, "train_accuracy": 0.5}


def test_non_finite_loss_stops_and_is_not_checkpointed(tiny, tmp_path):
    config = overridden(tiny, checkpoint_every_steps=1)
    config.optim.learning_rate = 1e30
    with pytest.raises(FloatingPointError, match=r"at train step \d+") as info:
        loop.train_and_evaluate(config, tmp_path)
    bad_step = int(re.search(r"train step (\d+)", str(info.value)).group(1))
    steps = Checkpointer(tmp_path / "checkpoints").all_steps()
    assert all(s < bad_step for s in steps), (steps, bad_step)


def test_train_py_config_overrides_metrics_and_plots(cifar_fixture_dir, tmp_path):
    workdir = tmp_path / "run"
    cmd = [
        sys.executable,
        "train.py",
        "--config=configs/tiny.py",
        "--config.num_epochs=1",
        "--config.optim.learning_rate=0.2",
        f"--config.data.data_dir={cifar_fixture_dir}",
        f"--workdir={workdir}",
    ]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done: step 10" in result.stdout
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["optim"]["learning_rate"] == 0.2 and saved["num_epochs"] == 1
    (record,) = run_log.read(workdir)
    expected_keys = {"epoch", "step", "train_loss", "train_accuracy", "test_loss"}
    expected_keys |= {"test_accuracy", "images_per_sec", "lr", "wall_time_s"}
    assert expected_keys <= set(record) and record["step"] == 10
    assert (workdir / "curves.png").stat().st_size > 0

    # Two runs side by side through the plot CLI.
    other = tmp_path / "other"
    other.mkdir()
    run_log.append(other, {**record, "test_accuracy": 0.5})
    out = tmp_path / "both.png"
    plot.main([str(workdir), str(other), "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "config_file, fixture, classes, image_shape",
    [
        ("cifar100.py", "cifar100_fixture_dir", 100, (32, 32, 3)),
        ("mnist.py", "mnist_fixture_dir", 10, (28, 28, 1)),
    ],
)
def test_trains_on_the_other_data_sets(
    config_file, fixture, classes, image_shape, request, tmp_path
):
    data_dir = request.getfixturevalue(fixture)
    config = load_config(
        config_file,
        {
            "model.widths": (4, 8),
            "data.data_dir": str(data_dir),
            "data.batch_size": 32,
            "data.eval_batch_size": 8,
            "num_epochs": 1,
            "max_steps": 3,
        },
    )
    record = loop.train_and_evaluate(config, tmp_path)
    assert record["step"] == 3 and record["test_count"] == 40
    assert np.isfinite(record["train_loss"]) and np.isfinite(record["test_loss"])
    with Checkpointer(tmp_path / "checkpoints") as checkpointer:
        state = jax.device_get(
            checkpointer.restore(
                3,
                loop.create_train_state(
                    config,
                    jax.random.key(0),
                    distributed.create_mesh({"data": 1}, jax.devices()[:1]),
                ),
            )
        )
    assert state.params["head"]["kernel"].shape[-1] == classes
    assert state.params["conv0"]["kernel"].shape[2] == image_shape[2]
    assert config.data.augment == (image_shape[2] == 3)  # No crop + flip for digits.


def test_resume_with_another_config_is_refused_and_touches_nothing(tiny, tmp_path, capsys):
    loop.train_and_evaluate(overridden(tiny, max_steps=2), tmp_path)
    saved = (tmp_path / "config.json").read_text()
    other = overridden(tiny, max_steps=4)
    other.model.widths = (8, 16)
    other.optim.learning_rate = 0.2
    with pytest.raises(run_config.ResumeMismatchError) as info:
        loop.train_and_evaluate(other, tmp_path)
    message = str(info.value)
    assert message.startswith(f"Cannot resume {tmp_path}: its checkpoints were trained with")
    assert "  model.widths: [4, 8] -> [8, 16]" in message
    assert "  optim.learning_rate: 0.1 -> 0.2" in message
    assert "start afresh with another --workdir" in message and "num_epochs, max_steps" in message
    assert (tmp_path / "config.json").read_text() == saved
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == [2]

    # Fields that may change do not stop it; a longer one-cycle schedule is noted.
    capsys.readouterr()
    allowed = overridden(tiny, max_steps=4, num_epochs=3, log_every_steps=3)
    allowed.data.eval_batch_size = 24
    assert loop.train_and_evaluate(allowed, tmp_path)["step"] == 4
    assert (
        "Note: num_epochs: 2 -> 3; the onecycle learning-rate schedule" in capsys.readouterr().out
    )


def test_resume_compares_fields_the_new_config_lacks(tmp_path):
    sigmoid = load_config("resnet20.py", {"model.activation": "sigmoid", "max_steps": 5})
    run_config.write(tmp_path, sigmoid)
    without = overridden(sigmoid, max_steps=8)
    with without.unlocked():
        del without.model["activation"]  # The model's default: ReLU.
    with pytest.raises(run_config.ResumeMismatchError) as info:
        run_config.check_resume(tmp_path, without)
    assert "  model.activation: 'sigmoid' -> (absent)" in str(info.value).splitlines()
    # None in the saved config and an absent field both mean the model's default.
    assert sigmoid.model.shortcut is None
    del without.model["shortcut"]
    without.model.activation = "sigmoid"
    assert run_config.check_resume(tmp_path, without) == []
    # A field the saved config lacks (written by an older version) is not compared.
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["model"]["zero_init_residual"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert (
        run_config.check_resume(tmp_path, overridden(sigmoid, {"model.zero_init_residual": True}))
        == []
    )


def test_checkpoint_of_another_model_without_config_json_gets_a_clear_error(tiny, tmp_path):
    loop.train_and_evaluate(overridden(tiny, max_steps=2), tmp_path)
    (tmp_path / "config.json").unlink()  # Nothing to compare with: orbax finds the mismatch.
    other = overridden(tiny, max_steps=4)
    other.model.widths = (8, 16)
    with pytest.raises(CheckpointMismatchError, match=r"Checkpoint 2 in .* does not fit"):
        loop.train_and_evaluate(other, tmp_path)


def test_train_py_from_another_directory_fails_cleanly(tmp_path, cifar_fixture_dir):
    def run(*args):
        cmd = [sys.executable, str(REPO / "train.py"), f"--workdir={tmp_path / 'wd'}", *args]
        return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)

    # The default config is found next to train.py; the bad value is one line, exit 2.
    result = run("--config.num_epochs=0")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "config.num_epochs=0: must be an integer >= 1.\n"

    # A data file that would run code: refused, named, nothing executed, exit 3.
    evil = write_cifar10_dir(tmp_path / "evil" / "cifar-10-batches-py", 4, 4)
    marker = tmp_path / "marker"
    with open(evil / "test_batch", "wb") as f:
        f.write(pickle_payload(f"touch {marker}"))
    result = run(f"--config={REPO / 'configs' / 'tiny.py'}", f"--config.data.data_dir={evil}")
    assert result.returncode == 3 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"{evil / 'test_batch'}: refused to load: the pickle asks for posix.system"
    )
    assert not marker.exists()


def pickle_payload(command):
    """A pickle that runs ``os.system(command)`` when unpickled with pickle.load."""
    import os
    import pickle

    class Payload:
        def __reduce__(self):
            return os.system, (command,)

    return pickle.dumps({b"data": Payload(), b"labels": []}, protocol=2)
