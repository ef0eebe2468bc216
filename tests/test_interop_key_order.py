"""PyTorch state dicts in any key order load as from ``state_dict()`` itself.

``dict(sorted(...))`` sorts the keys (``"10"`` before ``"2"``, ``bn1`` before
``conv1``), a safetensors file holds them by dtype, then name; reversed and
shuffled orders too. Every order here must give exactly the
variables of the registration order (and PyTorch's logits); where the keys
cannot tell two layers of equal shape apart, an error, never a silent swap.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbn
from jbn import interop_torch, models
from jbn.tools.torch_order import ModuleOrder
from jbn.tools.torch_pairing import links

torch = pytest.importorskip("torch")
torch_resnets = pytest.importorskip("torch_resnets")
seed_layouts = pytest.importorskip("test_interop_torch")  # The seed notebook's network.
torch.set_num_threads(1)


def _orders(state_dict):
    """The state dict re-keyed in other orders, as NumPy arrays (as a safetensors load gives)."""
    items = [(key, value.numpy()) for key, value in state_dict.items()]
    shuffled = [items[i] for i in np.random.default_rng(0).permutation(len(items))]
    return {
        "sorted": dict(sorted(items)),
        # A safetensors file's order: dtype alignment descending, then name.
        "safetensors": dict(sorted(items, key=lambda kv: (-kv[1].dtype.itemsize, kv[0]))),
        "reversed": dict(reversed(items)),
        "shuffled": dict(shuffled),
    }


def _assert_same_variables(ours, expected):
    assert jax.tree.structure(ours) == jax.tree.structure(expected)
    for path, leaf in jax.tree_util.tree_leaves_with_path(ours):
        want = functools.reduce(lambda tree, key: tree[key.key], path, expected)
        np.testing.assert_array_equal(leaf, want, err_msg=jax.tree_util.keystr(path))


def _check_every_order(torch_model, template, apply, images, atol):
    """Every order: the registration order's variables, PyTorch's logits, exact round trips."""
    state_dict = torch_model.state_dict()
    expected = interop_torch.from_torch(state_dict, template)
    with torch.no_grad():
        theirs = torch_model.eval()(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(apply(expected), theirs, rtol=0, atol=atol)
    for name, reordered in _orders(state_dict).items():
        variables = interop_torch.from_torch(reordered, template)
        _assert_same_variables(variables, expected)
        back = interop_torch.to_torch(expected, reordered)
        assert list(back) == list(reordered), name
        for key, value in reordered.items():
            np.testing.assert_array_equal(back[key], value, err_msg=f"{name}: {key}")


class DenseStack(nn.Module):
    """Dense layers with ReLUs between them (flax names Dense_0 ... Dense_11)."""

    depth: int
    width: int

    @nn.compact
    def __call__(self, x):
        for i in range(self.depth):
            x = nn.Dense(self.width)(x)
            x = nn.relu(x) if i < self.depth - 1 else x
        return x


def test_sequential_of_twelve_equal_linears():
    # Indices 0, 2, ..., 22: sorted as strings, "10" comes before "2".
    torch.manual_seed(0)
    modules = [torch.nn.ReLU() if i % 2 else torch.nn.Linear(16, 16) for i in range(23)]
    torch_model = torch.nn.Sequential(*modules)
    assert "22.weight" in torch_model.state_dict()
    model = DenseStack(depth=12, width=16)
    template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16)))
    images = np.random.default_rng(1).normal(size=(4, 16)).astype(np.float32)
    _check_every_order(
        torch_model, template, functools.partial(model.apply, x=images), images, 1e-5
    )


def test_torchvision_resnet18():
    torch.manual_seed(0)
    torch_model = torch_resnets.randomize_batch_norms(torch_resnets.torch_resnet("resnet18"))
    model = models.resnet18(
        norm=functools.partial(jbn.BatchNorm, unbiased_running_var=True, track_count=True)
    )
    template = jax.eval_shape(
        functools.partial(model.init, train=False), jax.random.key(0), jnp.zeros((1, 32, 32, 3))
    )
    images = np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype(np.float32)
    apply = jax.jit(lambda v: model.apply(v, images.transpose(0, 2, 3, 1), train=False))
    with torch.no_grad():
        scale = np.abs(torch_model.eval()(torch.from_numpy(images)).numpy()).max()
    _check_every_order(torch_model, template, apply, images, 1e-4 * scale)


@pytest.mark.parametrize("layout", seed_layouts.LAYOUTS)
def test_seed_small_bn_conv_net(layout):
    torch_model = seed_layouts._torch_model(seed=5, cls=layout)
    images = np.random.default_rng(1).normal(size=(4, 3, 32, 32)).astype(np.float32)
    apply = functools.partial(
        seed_layouts.JBN_MODEL.apply, x=seed_layouts._nhwc(images), train=False
    )
    _check_every_order(torch_model, seed_layouts.TEMPLATE, apply, images, seed_layouts.ATOL)


class TwoLinears(torch.nn.Module):
    """``b`` registered before ``a``: sorted keys put ``a`` first."""

    def __init__(self):
        super().__init__()
        self.b = torch.nn.Linear(8, 8)
        self.a = torch.nn.Linear(8, 8)


class JbnTwoDense(nn.Module):
    names: tuple = (None, None)

    @nn.compact
    def __call__(self, x):
        return nn.Dense(8, name=self.names[1])(nn.Dense(8, name=self.names[0])(x))


def test_equal_layers_in_an_unknown_order_are_an_error():
    torch.manual_seed(0)
    state_dict = TwoLinears().state_dict()
    model = JbnTwoDense()
    template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8)))
    in_order = interop_torch.from_torch(state_dict, template)  # PyTorch's order: b, a.
    np.testing.assert_array_equal(
        in_order["params"]["Dense_0"]["kernel"], state_dict["b.weight"].numpy().T
    )
    with pytest.raises(
        ValueError,
        match=r"ambiguous key order: PyTorch dense \(Linear\) layers 'a' and 'b' have the "
        r"same shape \(8, 8\), and the state dict's keys do not say",
    ):
        interop_torch.from_torch(dict(sorted(state_dict.items())), template)
    # Named as in PyTorch, the layers pair by name in any order.
    named = JbnTwoDense(names=("b", "a"))
    template = jax.eval_shape(named.init, jax.random.key(0), jnp.zeros((1, 8)))
    for reordered in _orders(state_dict).values():
        variables = interop_torch.from_torch(reordered, template)
        for name in "ab":
            np.testing.assert_array_equal(
                variables["params"][name]["kernel"], reordered[f"{name}.weight"].T
            )


def test_a_dense_layer_before_convolutions_in_an_unknown_order_is_an_error():
    # head: Linear(12, 12), Unflatten, Conv2d(3, 4, 1), Flatten, Linear(16, 4); tail: Linear.
    # Sorted keys: the numbered head is in order, but where tail sits is unknown, and
    # the first dense layer is not after the convolutions: which one reads a map?
    shapes = {
        "head.0.bias": (12,),
        "head.0.weight": (12, 12),
        "head.2.weight": (4, 3, 1, 1),
        "head.4.weight": (4, 16),
        "tail.weight": (4, 4),
    }
    dense = lambda i, o: {"kernel": (i, o)}  # noqa: E731
    variables = {
        "params": {
            "Conv_0": {"kernel": (1, 1, 3, 4)},
            "Dense_0": {**dense(12, 12), "bias": (12,)},
            "Dense_1": dense(16, 4),
            "Dense_2": dense(4, 4),
        }
    }
    variables = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s, jnp.float32),
        variables,
        is_leaf=lambda x: isinstance(x, tuple),
    )
    with pytest.raises(
        ValueError,
        match=r"ambiguous key order: PyTorch dense layer 'head.0' comes before convolution "
        r"'head.2'",
    ):
        links(shapes, variables)


def test_module_order_from_the_keys():
    registration = ["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "fc.weight"]
    order = ModuleOrder(registration)
    assert order.trusted and order.modules == ["conv1", "bn1", "fc"]
    for keys in (sorted(registration), registration[::-1]):
        order = ModuleOrder(keys)
        assert not order.trusted and not order.fully_certain
        assert not order.certain("conv1", "bn1") and order.certain("conv1", "conv1")
    numbered = [f"{i}.weight" for i in (0, 1, 10, 11, 2, 3)]  # Sorted as strings.
    order = ModuleOrder(numbered)
    assert order.modules == ["0", "1", "2", "3", "10", "11"] and order.fully_certain
    split = ["a.weight", "b.weight", "a.bias"]  # Not contiguous: not PyTorch's.
    assert not ModuleOrder(split).trusted
    nested = ModuleOrder(["head.1.weight", "block.10.weight", "block.9.weight"])
    assert nested.modules == ["head.1", "block.9", "block.10"]
    assert nested.certain("block.9", "block.10") and not nested.certain("head.1", "block.9")
