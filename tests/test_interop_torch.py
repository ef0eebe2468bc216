"""PyTorch SmallBNConvNet <-> jbn: same logits (eval, train), same SGD step, round trip.

Both PyTorch layouts of the seed network: the notebook's own ``Sequential``
blocks (``block1.0``, ``block1.1``, ``head.1``) and the ``conv1``/``bn1``/``fc``
variant. ResNets: test_interop_resnet.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jbn
from jbn import interop_torch
from jbn.models import SmallBNConvNet

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

ATOL = 1e-5


class TorchSmallBNConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(16)
        self.conv2 = torch.nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(32)
        self.fc = torch.nn.Linear(32 * 8 * 8, 10)

    def forward(self, x):
        x = torch.nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        x = torch.nn.functional.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(torch.flatten(x, 1))


class NotebookSmallBNConvNet(torch.nn.Module):
    """The seed notebook's network, exactly as written there."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.block1 = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1, bias=False),
            torch.nn.BatchNorm2d(16),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
        )
        self.block2 = torch.nn.Sequential(
            torch.nn.Conv2d(16, 32, 3, padding=1, bias=False),
            torch.nn.BatchNorm2d(32),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
        )
        self.head = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(32 * 8 * 8, num_classes)
        )

    def forward(self, x):
        return self.head(self.block2(self.block1(x)))


def _torch_model(seed=0, cls=TorchSmallBNConvNet):
    torch.manual_seed(seed)
    model = cls()
    with torch.no_grad():
        bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for bn in bns:
            n = bn.num_features
            bn.weight.copy_(torch.rand(n) + 0.5)
            bn.bias.copy_(torch.randn(n) * 0.2)
            bn.running_mean.copy_(torch.randn(n) * 0.1)
            bn.running_var.copy_(torch.rand(n) * 0.5 + 0.5)
            bn.num_batches_tracked.fill_(7)
    return model


# PyTorch conventions: momentum 0.1 <-> 0.9, unbiased running var, step count.
JBN_MODEL = SmallBNConvNet(
    norm=functools.partial(jbn.BatchNorm, momentum=0.9, unbiased_running_var=True, track_count=True)
)
# Shapes and dtypes of its variables: all that from_torch reads.
TEMPLATE = jax.eval_shape(
    functools.partial(JBN_MODEL.init, train=False), jax.random.key(0), jnp.zeros((1, 32, 32, 3))
)
LAYOUTS = [TorchSmallBNConvNet, NotebookSmallBNConvNet]


def _batch(seed=1, n=8):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n, 3, 32, 32)).astype(np.float32)
    labels = rng.integers(0, 10, n)
    return images, labels


def _nhwc(images):
    return jnp.asarray(images.transpose(0, 2, 3, 1))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_eval_logits_match(layout):
    model = _torch_model(cls=layout).eval()
    images, _ = _batch()
    variables = interop_torch.from_torch(model.state_dict(), TEMPLATE)
    ours = JBN_MODEL.apply(variables, _nhwc(images), train=False)
    with torch.no_grad():
        theirs = model(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(ours, theirs, atol=ATOL)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_train_logits_and_one_sgd_step_match(layout):
    model = _torch_model(cls=layout).train()
    images, labels = _batch()
    variables = interop_torch.from_torch(model.state_dict(), TEMPLATE)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.zero_grad()
    torch_logits = model(torch.from_numpy(images))
    loss = torch.nn.functional.cross_entropy(torch_logits, torch.from_numpy(labels))
    loss.backward()
    optimizer.step()

    tx = optax.sgd(0.1)

    @jax.jit
    def step(variables, x, y):
        def loss_fn(params):
            logits, updates = JBN_MODEL.apply(
                {"params": params, "batch_stats": variables["batch_stats"]},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, (logits, updates["batch_stats"])

        (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            variables["params"]
        )
        updates, _ = tx.update(grads, tx.init(variables["params"]))
        params = optax.apply_updates(variables["params"], updates)
        return {"params": params, "batch_stats": stats}, logits, loss

    new_variables, logits, jbn_loss = step(variables, _nhwc(images), jnp.asarray(labels))
    np.testing.assert_allclose(logits, torch_logits.detach().numpy(), atol=ATOL)
    np.testing.assert_allclose(jbn_loss, loss.item(), atol=ATOL)

    expected = interop_torch.from_torch(model.state_dict(), TEMPLATE)
    assert jax.tree.structure(new_variables) == jax.tree.structure(expected)
    for path, ours in jax.tree_util.tree_leaves_with_path(new_variables):
        theirs = functools.reduce(lambda t, k: t[k.key], path, expected)
        np.testing.assert_allclose(ours, theirs, atol=ATOL, err_msg=jax.tree_util.keystr(path))
    assert int(new_variables["batch_stats"]["bn0"]["count"]) == 8
    # The step moved things: the comparison is not vacuous.
    assert not np.allclose(
        new_variables["params"]["head"]["kernel"], variables["params"]["head"]["kernel"]
    )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_is_exact(layout):
    state_dict = _torch_model(seed=3, cls=layout).state_dict()
    back = interop_torch.to_torch(interop_torch.from_torch(state_dict, TEMPLATE), state_dict)
    assert list(back) == list(state_dict)
    for key, value in state_dict.items():
        assert back[key].dtype == value.numpy().dtype, key
        np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)
    # ... and torch loads it strictly.
    model = layout()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_numpy_state_dict_gives_the_same_variables():
    state_dict = _torch_model(seed=4).state_dict()
    from_tensors = interop_torch.from_torch(state_dict, TEMPLATE)
    from_arrays = interop_torch.from_torch({k: v.numpy() for k, v in state_dict.items()}, TEMPLATE)
    jax.tree.map(np.testing.assert_array_equal, from_arrays, from_tensors)
    assert int(from_arrays["batch_stats"]["bn0"]["count"]) == 7


def test_variables_do_not_alias_the_torch_tensors():
    model = _torch_model(seed=6)
    variables = interop_torch.from_torch(model.state_dict(), TEMPLATE)
    before = np.array(variables["params"]["conv0"]["kernel"])
    with torch.no_grad():
        model.conv1.weight.add_(1.0)  # In place, as optimizer.step() does.
        model.bn1.running_mean.add_(1.0)
    np.testing.assert_array_equal(variables["params"]["conv0"]["kernel"], before)
    assert not np.allclose(variables["batch_stats"]["bn0"]["mean"], model.bn1.running_mean.numpy())


def test_without_a_count_num_batches_tracked_is_ignored_and_exported_as_zero():
    state_dict = _torch_model(seed=4).state_dict()
    template = jax.eval_shape(
        functools.partial(SmallBNConvNet().init, train=False),
        jax.random.key(0),
        jnp.zeros((1, 32, 32, 3)),
    )
    variables = interop_torch.from_torch(state_dict, template)
    assert "count" not in variables["batch_stats"]["bn0"]
    exported = interop_torch.to_torch(variables, state_dict)
    assert exported["bn1.num_batches_tracked"] == 0
    assert exported["bn1.num_batches_tracked"].dtype == np.int64


def test_a_non_square_map_needs_its_spatial_shape():
    # A 32x16 input: the flattened map is 8x4, which from_torch cannot guess.
    torch.manual_seed(5)
    model = TorchSmallBNConvNet()
    model.fc = torch.nn.Linear(32 * 8 * 4, 10)
    model.eval()
    jbn_model = SmallBNConvNet(norm=JBN_MODEL.norm)
    x = jnp.zeros((1, 32, 16, 3))
    template = jax.eval_shape(functools.partial(jbn_model.init, train=False), jax.random.key(0), x)
    with pytest.raises(ValueError, match="'fc.weight' takes 1024 inputs after a 32-channel"):
        interop_torch.from_torch(model.state_dict(), template)
    variables = interop_torch.from_torch(model.state_dict(), template, spatial_shape=(8, 4))
    images = np.random.default_rng(0).normal(size=(2, 3, 32, 16)).astype(np.float32)
    with torch.no_grad():
        theirs = model(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(
        jbn_model.apply(variables, _nhwc(images), train=False), theirs, atol=ATOL
    )
    back = interop_torch.to_torch(variables, model.state_dict(), spatial_shape=(8, 4))
    np.testing.assert_array_equal(back["fc.weight"], model.fc.weight.detach().numpy())


def test_flatten_permutation_on_a_tiny_map():
    # Linear over a (C=2, H=1, W=3) map: NCHW index c*3 + w, NHWC index w*2 + c.
    weight = np.arange(6.0, dtype=np.float32)[None]
    kernel = interop_torch.dense_from_torch_after_flatten(weight, None, (2, 1, 3))["kernel"]
    np.testing.assert_array_equal(kernel[:, 0], [0, 3, 1, 4, 2, 5])
    back = interop_torch.dense_to_torch_before_flatten(kernel, (2, 1, 3))
    np.testing.assert_array_equal(back, weight)
    with pytest.raises(ValueError, match="does not take C\\*H\\*W=6 inputs"):
        interop_torch.dense_from_torch_after_flatten(np.zeros((1, 5)), None, (2, 1, 3))
