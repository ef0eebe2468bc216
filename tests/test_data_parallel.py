"""Data-parallel train steps on 8 fake CPU devices against single-device references.

- global statistics: the sharded step equals the one-device step on the same
  global batch (params, batch stats, loss within 1e-5);
- local and ghost statistics: equal their definition written out by hand
  (per-group BatchNorm on one device, gradients and statistics averaged).
"""

import pathlib
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jbn.models import make_model
from jbn.train import data, distributed, loop

REPO = pathlib.Path(__file__).resolve().parents[1]
TOL = 1e-5
BATCH = 32


def _config(data_dir, **model):
    config = runpy.run_path(str(REPO / "configs" / "tiny.py"))["get_config"]()
    config.data.data_dir = str(data_dir)
    config.data.batch_size = BATCH
    for key, value in model.items():
        config.model[key] = value
    return config


def _step(config, mesh, batch):
    state = loop.create_train_state(config, jax.random.key(0), mesh, steps_per_epoch=10)
    step = loop.make_train_step(config, mesh)
    new_state, metrics = step(state, distributed.put_batch(batch, mesh), jax.random.key(1))
    return jax.device_get((new_state.params, new_state.batch_stats, metrics["loss"]))


def _assert_close(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=TOL, atol=TOL), a, b)


@pytest.fixture(scope="module")
def batch(cifar_fixture_dir):
    dataset = data.load_cifar10(str(cifar_fixture_dir), download=False)
    return {"image": dataset.train_images[:BATCH], "label": dataset.train_labels[:BATCH]}


def test_sharded_step_equals_single_device_step(cifar_fixture_dir, batch):
    config = _config(cifar_fixture_dir)
    assert jax.device_count() == 8
    eight = distributed.create_mesh({"data": -1})
    one = distributed.create_mesh({"data": 1}, devices=jax.devices()[:1])
    _assert_close(_step(config, eight, batch), _step(config, one, batch))


def _by_hand(config, batch, group_size):
    """Per-group BatchNorm on one device; gradients and statistics averaged."""
    one = distributed.create_mesh({"data": 1}, devices=jax.devices()[:1])
    global_config = _config(config.data.data_dir)
    global_config.data.augment = False
    state = loop.create_train_state(global_config, jax.random.key(0), one, steps_per_epoch=10)
    model = make_model(global_config.model)
    images = data.preprocess(jnp.asarray(batch["image"]))
    labels = jnp.asarray(batch["label"])

    def group_loss(params, x, y):
        logits, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates[
            "batch_stats"
        ]

    group_grad = jax.jit(jax.value_and_grad(group_loss, has_aux=True))
    results = [
        group_grad(state.params, images[i : i + group_size], labels[i : i + group_size])
        for i in range(0, BATCH, group_size)
    ]
    loss = np.mean([r[0][0] for r in results])
    stats = jax.tree.map(lambda *s: jnp.mean(jnp.stack(s), 0), *[r[0][1] for r in results])
    grads = jax.tree.map(lambda *g: jnp.mean(jnp.stack(g), 0), *[r[1] for r in results])
    new_state = state.apply_gradients(grads=grads)
    return jax.device_get((new_state.params, stats, loss))


@pytest.mark.parametrize(
    "mode,virtual_batch_size,group_size", [("local", None, BATCH // 8), ("ghost", 8, 8)]
)
def test_local_and_ghost_statistics_equal_their_definition(
    cifar_fixture_dir, batch, mode, virtual_batch_size, group_size
):
    config = _config(cifar_fixture_dir, bn_stats=mode, virtual_batch_size=virtual_batch_size)
    config.data.augment = False
    eight = distributed.create_mesh({"data": -1})
    params, stats, loss = _step(config, eight, batch)
    ref_params, ref_stats, ref_loss = _by_hand(config, batch, group_size)
    np.testing.assert_allclose(loss, ref_loss, rtol=TOL)
    _assert_close(stats, ref_stats)
    _assert_close(params, ref_params)


def test_local_statistics_differ_from_global(cifar_fixture_dir, batch):
    eight = distributed.create_mesh({"data": -1})
    _, local_stats, _ = _step(_config(cifar_fixture_dir, bn_stats="local"), eight, batch)
    _, global_stats, _ = _step(_config(cifar_fixture_dir), eight, batch)
    # Mean of per-device variances < global variance (the spread of the device means
    # is missing), diluted by momentum 0.9 in the running statistics.
    gap = global_stats["bn0"]["var"] - local_stats["bn0"]["var"]
    assert np.all(gap > 0) and np.max(gap) > 1e-4, gap


@pytest.mark.parametrize(
    "mode,vbs,message",
    [
        (
            "ghost",
            None,
            "bn_stats='ghost' needs a virtual_batch_size dividing the batch size 32, got None",
        ),
        (
            "ghost",
            5,
            "bn_stats='ghost' needs a virtual_batch_size dividing the batch size 32, got 5",
        ),
        ("global", 8, "virtual_batch_size is set but bn_stats='global'"),
        ("sync", None, "Unknown batch-stats mode 'sync'"),
    ],
)
def test_bad_mode_configs_raise(mode, vbs, message):
    mesh = distributed.create_mesh({"data": -1})
    with pytest.raises(ValueError, match=message):
        distributed.batch_stats_group_size(mode, 32, mesh, vbs)


def test_create_mesh_takes_the_first_devices_when_asked_for_fewer():
    # `train.py --config.mesh.data=1` on a host with several devices (README).
    assert jax.device_count() == 8
    for size in (1, 2, 4):
        mesh = distributed.create_mesh({"data": size})
        assert list(mesh.devices.flat) == jax.devices()[:size]
    assert mesh.devices.size == 4 and mesh.axis_names == ("data",)
    assert distributed.create_mesh({"data": -1}).devices.size == 8
    assert distributed.create_mesh({"data": 2, "model": -1}).devices.shape == (2, 4)
    with pytest.raises(ValueError, match=r"Mesh \{'data': 16\} needs 16 devices, have 8"):
        distributed.create_mesh({"data": 16})
    with pytest.raises(ValueError, match=r"needs 1 devices, have 2"):
        distributed.create_mesh({"data": 1}, devices=jax.devices()[:2])  # explicit: all of them
    with pytest.raises(ValueError, match=r"Mesh axis sizes must be positive or -1"):
        distributed.create_mesh({"data": 0})
