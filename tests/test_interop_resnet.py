"""PyTorch ResNets (torchvision's layout, written in tests/torch_resnets.py) <-> jbn.models.

Same logits in eval and train mode (float32, within 1e-4 of the largest), the
same SGD step as PyTorch in float64, exact round trips that PyTorch loads
strictly, and errors that name the offending key.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jbn
from jbn import interop_torch, models

torch = pytest.importorskip("torch")
torch_resnets = pytest.importorskip("torch_resnets")
torch.set_num_threads(1)

# PyTorch's BatchNorm conventions: momentum 0.1 <-> 0.9, unbiased running var, step count.
TORCH_NORM = functools.partial(
    jbn.BatchNorm, momentum=0.9, unbiased_running_var=True, track_count=True
)
RTOL = 1e-4  # Of the largest logit.


def _torch_model(name, seed=0, **kwargs):
    torch.manual_seed(seed)
    return torch_resnets.randomize_batch_norms(torch_resnets.torch_resnet(name, **kwargs), seed)


def _jbn_model(name, **kwargs):
    return getattr(models, name)(norm=TORCH_NORM, **kwargs)


def _template(model, hw):
    init = functools.partial(model.init, train=False)
    return jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, hw, hw, 3)))


def _images(n, hw, seed=1):
    return np.random.default_rng(seed).normal(size=(n, 3, hw, hw)).astype(np.float32)


def _nhwc(images):
    return jnp.asarray(images.transpose(0, 2, 3, 1))


def _assert_close(ours, theirs, rtol=RTOL):
    theirs = np.asarray(theirs)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=rtol * np.abs(theirs).max())


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_round_trip_is_exact_and_loads_strictly(name):
    torch_model = _torch_model(name, seed=3)
    state_dict = torch_model.state_dict()
    variables = interop_torch.from_torch(state_dict, _template(_jbn_model(name), 64))
    leaves = jax.tree.leaves(variables)
    assert all(isinstance(leaf, jax.Array) for leaf in leaves)  # Every leaf filled.
    assert sum(leaf.size for leaf in jax.tree.leaves(variables["params"])) == sum(
        p.numel() for p in torch_model.parameters()
    )
    back = interop_torch.to_torch(variables, state_dict)
    assert list(back) == list(state_dict)
    for key, value in state_dict.items():
        assert back[key].dtype == value.numpy().dtype, key
        np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)
    fresh = torch_resnets.torch_resnet(name)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


@pytest.mark.parametrize(
    "name, kwargs, hw",
    [
        ("resnet18", {}, 64),
        ("resnet50", {}, 64),
        ("resnet20", {}, 32),  # Shortcut "A": the zero channels must sit where PyTorch's do.
        ("resnet20", {"shortcut": "B"}, 32),
        ("plain20", {"activation": "sigmoid"}, 32),
    ],
)
def test_eval_and_train_logits_match(name, kwargs, hw):
    torch_model = _torch_model(name, **kwargs)
    model = _jbn_model(name, **kwargs)
    variables = interop_torch.from_torch(torch_model.state_dict(), _template(model, hw))
    images = _images(4, hw)
    apply = jax.jit(model.apply, static_argnames="train")
    with torch.no_grad():
        theirs_eval = torch_model.eval()(torch.from_numpy(images)).numpy()
        theirs_train = torch_model.train()(torch.from_numpy(images)).numpy()
    _assert_close(apply(variables, _nhwc(images), train=False), theirs_eval)
    ours_train, updates = jax.jit(
        functools.partial(model.apply, train=True, mutable=["batch_stats"])
    )(variables, _nhwc(images))
    _assert_close(ours_train, theirs_train)
    # The running statistics moved as PyTorch's did (unbiased variance, momentum 0.1).
    expected = interop_torch.from_torch(torch_model.state_dict(), variables)["batch_stats"]
    for path, ours in jax.tree_util.tree_leaves_with_path(updates["batch_stats"]):
        theirs = functools.reduce(lambda t, k: t[k.key], path, expected)
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5, err_msg=str(path))


def _sgd_step(model):
    tx = optax.sgd(0.1)

    @jax.jit
    def step(variables, x, y):
        def loss_fn(params):
            logits, updates = model.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, updates["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        updates, _ = tx.update(grads, tx.init(variables["params"]))
        return {"params": optax.apply_updates(variables["params"], updates), "batch_stats": stats}

    return step


def test_one_sgd_step_matches_pytorch_in_float64():
    # ResNet-18 on 64x64 images, batch 8: layer4's BatchNorm sees 2x2 pixels x 8 images
    # per channel, where train-mode BatchNorm is ill-conditioned; PyTorch's own float32
    # update is then far from its float64 one, so float64 is the reference.
    torch_model = _torch_model("resnet18", num_classes=10).train()
    model = _jbn_model("resnet18", num_classes=10)
    state_dict = torch_model.state_dict()
    variables = interop_torch.from_torch(state_dict, _template(model, 64))
    images, labels = _images(8, 64), np.random.default_rng(2).integers(0, 10, 8)

    reference = torch_model.double()
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    loss = torch.nn.functional.cross_entropy(
        reference(torch.from_numpy(images).double()), torch.from_numpy(labels)
    )
    loss.backward()
    optimizer.step()
    after = reference.state_dict()

    new = _sgd_step(model)(variables, _nhwc(images), jnp.asarray(labels))
    delta = jax.tree.map(jnp.subtract, new["params"], variables["params"])
    ours = interop_torch.to_torch({**new, "params": delta}, after)  # float64, torch layout.
    names = {name for name, _ in reference.named_parameters()}
    worst = 0.0
    for key in names:
        expected = (after[key] - before[key]).numpy()
        error = np.abs(ours[key] - expected).max() / np.abs(expected).max()
        worst = max(worst, error)
        assert error < 1e-3, (key, error)
    assert worst > 0  # float32 against float64: not bitwise equal, so not vacuous.
    print(f"largest update error, relative to the update: {worst:.2e}")
    stats = interop_torch.to_torch(new, after)
    for key in set(after) - names:
        np.testing.assert_allclose(
            stats[key], after[key].numpy(), rtol=1e-4, atol=1e-6, err_msg=key
        )


def _resnet18_state_dict():
    return _torch_model("resnet18", num_classes=10).state_dict()


@pytest.fixture(scope="module")
def resnet18_template():
    return _template(_jbn_model("resnet18", num_classes=10), 64)


def test_missing_key_is_named(resnet18_template):
    state_dict = _resnet18_state_dict()
    del state_dict["layer2.0.bn1.running_var"]
    with pytest.raises(ValueError, match="missing key 'layer2.0.bn1.running_var'"):
        interop_torch.from_torch(state_dict, resnet18_template)
    state_dict = _resnet18_state_dict()
    del state_dict["layer3.1.bn2.weight"]
    with pytest.raises(ValueError, match="missing key 'layer3.1.bn2.weight' for jbn layer3_1/bn2"):
        interop_torch.from_torch(state_dict, resnet18_template)


def test_unexpected_keys_are_named(resnet18_template):
    state_dict = _resnet18_state_dict()
    state_dict["layer1.0.conv1.weight_orig"] = state_dict["layer1.0.conv1.weight"]
    with pytest.raises(ValueError, match="unexpected key 'layer1.0.conv1.weight_orig'"):
        interop_torch.from_torch(state_dict, resnet18_template)
    state_dict = _resnet18_state_dict()
    state_dict["extra.weight"] = np.zeros((8, 512, 1, 1), np.float32)
    with pytest.raises(
        ValueError, match=r"unexpected keys \['extra.weight'\]: the state dict has 21"
    ):
        interop_torch.to_torch(resnet18_template, state_dict)
    state_dict = _resnet18_state_dict()
    state_dict["layer1.0.conv2.bias"] = np.zeros(64, np.float32)
    with pytest.raises(
        ValueError, match="unexpected key 'layer1.0.conv2.bias': jbn layer1_0/conv2 has no bias"
    ):
        interop_torch.from_torch(state_dict, resnet18_template)
    state_dict = {**_resnet18_state_dict(), "pos_embedding": np.zeros((1, 4))}
    with pytest.raises(ValueError, match=r"unexpected keys \['pos_embedding'\]"):
        interop_torch.from_torch(state_dict, resnet18_template)


def test_mis_shaped_keys_and_other_networks_are_named(resnet18_template):
    state_dict = _torch_model("resnet18").state_dict()  # 1000 classes, not 10.
    with pytest.raises(
        ValueError,
        match=r"mis-shaped key 'fc.weight': \(1000, 512\) in the state dict, but jbn fc/kernel needs \(10, 512\)",
    ):
        interop_torch.from_torch(state_dict, resnet18_template)
    state_dict = _torch_model("resnet34", num_classes=10).state_dict()
    with pytest.raises(
        ValueError, match="the state dict has 36 convolution layers, the jbn variables 20"
    ):
        interop_torch.from_torch(state_dict, resnet18_template)
    template = _template(_jbn_model("resnet34", num_classes=10), 64)
    with pytest.raises(
        ValueError,
        match=r"missing keys: the state dict has 20 convolution layers, the jbn variables 36; "
        r"pairing them in order leaves jbn \['layer3_1/conv2', .*, 'layer4_2/conv2'\] over",
    ):
        interop_torch.from_torch(_resnet18_state_dict(), template)
    state_dict = _resnet18_state_dict()
    state_dict["layer2.0.conv2.weight"] = np.zeros((128, 128, 1, 1), np.float32)
    with pytest.raises(
        ValueError, match=r"mis-shaped key 'layer2.0.conv2.weight': \(128, 128, 1, 1\)"
    ):
        interop_torch.to_torch(resnet18_template, state_dict)
