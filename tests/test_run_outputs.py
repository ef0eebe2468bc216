"""What a training run writes besides checkpoints: TensorBoard events, and its first lines."""

import importlib.util
import io
import pathlib
import runpy
import shutil
from contextlib import redirect_stdout

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbn.models import make_model
from jbn.train import data, loop, run_log, run_summary, tensorboard_log

REPO = pathlib.Path(__file__).resolve().parents[1]
HAS_TENSORBOARD_X = importlib.util.find_spec("tensorboardX") is not None


def _tiny(data_dir):
    config = runpy.run_path(str(REPO / "configs" / "tiny.py"))["get_config"]()
    config.data.data_dir = str(data_dir)
    return config


def _train(config, workdir):
    out = io.StringIO()
    with redirect_stdout(out):
        loop.train_and_evaluate(config, workdir)
    return out.getvalue()


@pytest.fixture(scope="module")
def resumed_run(cifar_fixture_dir, tmp_path_factory):
    """A tiny run (2 epochs of 10 steps), "killed" after its last record and resumed.

    Removing the step-20 checkpoint makes the second run resume from step 16:
    it drops the step-20 record (and events) of the first run and writes its
    own. Returns the workdir and the stdout of both runs.
    """
    workdir = tmp_path_factory.mktemp("run")
    config = _tiny(cifar_fixture_dir)  # config.log.tensorboard: None, written when installed.
    first = _train(config, workdir)
    shutil.rmtree(workdir / loop.CHECKPOINT_DIR / "20")
    second = _train(config, workdir)
    return workdir, first, second


def test_run_starts_with_model_and_devices(resumed_run):
    workdir, first, second = resumed_run
    # SmallBNConvNet, widths (4, 8): conv 3x3x3x4 (no bias), BN(4), conv 3x3x4x8,
    # BN(8), Dense(8 * 8 * 8 -> 10) with bias.
    params = 3 * 3 * 3 * 4 + 2 * 4 + 3 * 3 * 4 * 8 + 2 * 8 + 8 * 8 * 8 * 10 + 10
    stats = 2 * (4 + 8)
    expected = [
        f"Model: SmallBNConvNet (widths=(4, 8), norm=jbn): {params:,} parameters "
        f"({4 * params / 1024:.1f} KiB), {stats} BatchNorm statistics",
        f"Devices: {jax.device_count()} x cpu in 1 process, mesh data={jax.device_count()}",
    ]
    assert first.splitlines()[:2] == expected
    assert second.splitlines()[:3] == [*expected, second.splitlines()[2]]
    assert second.splitlines()[2].startswith("Resumed from")
    assert run_log.read(workdir)[-1]["step"] == 20


def test_summary_counts_shapes_without_initialising(cifar_fixture_dir):
    config = _tiny(cifar_fixture_dir)
    model = make_model(config.model)
    images = jnp.zeros((1, *data.IMAGE_SHAPE))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
    variables = model.init(jax.random.key(0), images, train=False)
    for collection in ("params", "batch_stats"):
        leaves = jax.tree.leaves(variables[collection])
        assert run_summary.count_elements(shapes[collection]) == sum(np.size(a) for a in leaves)
        assert run_summary.count_bytes(shapes[collection]) == sum(a.nbytes for a in leaves)
    config.model.use_batch_norm = False
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    line = run_summary.describe(config.model, {"w": jnp.zeros((3, 512))}, {}, mesh).splitlines()
    assert line == [
        "Model: SmallBNConvNet (widths=(4, 8), no BatchNorm): 1,536 parameters (6.0 KiB)",
        "Devices: 1 x cpu in 1 process, mesh data=1",
    ]


def test_tensorboard_events_match_metrics_jsonl(resumed_run):
    pytest.importorskip("tensorboardX")  # The writer: without it, a skip that CI fails.
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator"
    )
    workdir, _, _ = resumed_run
    assert len(list(workdir.glob("events.out.tfevents.*"))) == 2  # One per run.
    events = event_accumulator.EventAccumulator(
        str(workdir), size_guidance={event_accumulator.SCALARS: 0}
    )
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == sorted(tensorboard_log.TAGS.values())
    records = run_log.read(workdir)
    assert [r["step"] for r in records] == [10, 20]
    for key, tag in tensorboard_log.TAGS.items():
        scalars = events.Scalars(tag)
        # One value per step: the first run's step-20 events are purged on resume.
        assert [s.step for s in scalars] == [10, 20], tag
        # Event files hold float32: the record's value rounded to it, exactly.
        assert [s.value for s in scalars] == [float(np.float32(r[key])) for r in records], tag


def test_tensorboard_setting(tmp_path, monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    if HAS_TENSORBOARD_X:
        assert tensorboard_log.wanted(None) and tensorboard_log.wanted(True)
        # Only process 0 writes, even when asked explicitly.
        writer = tensorboard_log.open_writer(
            tmp_path, {"tensorboard": True}, start_step=0, is_main=False
        )
        writer.write({"step": 1, "train_loss": 1.0})
        writer.close()
        assert not writer.enabled and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name: None if name == "tensorboardX" else find_spec(name),
    )
    assert not tensorboard_log.wanted(None) and not tensorboard_log.wanted(False)
    with pytest.raises(
        ImportError, match=r'needs tensorboardX: pip install -e "\.\[tensorboard\]"'
    ):
        tensorboard_log.wanted(True)
    writer = tensorboard_log.open_writer(tmp_path, None, start_step=0, is_main=True)
    assert not writer.enabled
    assert "TensorBoard logging off: tensorboardX is not installed" in capsys.readouterr().out
