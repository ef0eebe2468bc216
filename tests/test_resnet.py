"""jbn.models ResNets and plain nets: sizes, options, registry (PyTorch parity: test_interop_resnet)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import jbn
from jbn import cpu_tuning, models
from jbn.models.blocks import BasicBlock, shortcut_a


def _shapes(model, hw=32):
    x = jnp.zeros((1, hw, hw, 3))
    return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)


def _init(model, x):
    # The one-off init compiled as jbn.train.loop compiles it (XLA -O0: faster to build).
    options = cpu_tuning.init_compiler_options(jax.default_backend())
    init = jax.jit(functools.partial(model.init, train=False), compiler_options=options)
    return init(jax.random.key(0), x)


def _count(variables):
    return sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize(
    "name, expected",
    [
        ("resnet18", 11_689_512),  # torchvision's published counts, 1000 classes.
        ("resnet34", 21_797_672),
        ("resnet50", 25_557_032),
    ],
)
def test_torchvision_parameter_counts(name, expected):
    assert _count(_shapes(getattr(models, name)(), hw=64)) == expected


@pytest.mark.parametrize(
    "name, expected",
    [
        ("resnet20", 269_722),  # He et al. 2016: 0.27 M.
        ("resnet32", 464_154),  # 0.46 M.
        ("resnet56", 853_018),  # 0.85 M.
        ("resnet110", 1_727_962),  # 1.7 M.
        ("plain20", 269_722),  # Shortcut "A" has no parameters.
    ],
)
def test_cifar_parameter_counts(name, expected):
    assert _count(_shapes(getattr(models, name)())) == expected


def test_counts_equal_the_pytorch_references():
    torch_resnets = pytest.importorskip("torch_resnets")
    for name, kwargs in [
        ("resnet18", {}),
        ("resnet34", {}),
        ("resnet20", {}),
        ("resnet20", {"shortcut": "B"}),
        ("resnet56", {}),
        ("plain20", {}),
    ]:
        ours = _count(_shapes(getattr(models, name)(**kwargs), hw=64))
        theirs = torch_resnets.num_parameters(torch_resnets.torch_resnet(name, **kwargs))
        assert ours == theirs, (name, kwargs)


def test_resnet20_variables_and_output():
    model = models.resnet20()
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    variables = _init(model, x)
    params = variables["params"]
    assert set(params) == {
        "conv1",
        "bn1",
        *[f"layer{s}_{b}" for s in (1, 2, 3) for b in range(3)],
        "fc",
    }
    assert "downsample_0" not in params["layer2_0"]  # Shortcut "A": no projection.
    assert params["layer3_0"]["conv1"]["kernel"].shape == (3, 3, 32, 64)
    assert params["fc"]["kernel"].shape == (64, 10)
    train = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))
    logits, updates = train(variables, x)
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(
        variables["batch_stats"]
    )


def test_stems_and_strides():
    imagenet = _shapes(models.resnet18(num_classes=7), hw=64)["params"]
    assert imagenet["conv1"]["kernel"].shape == (7, 7, 3, 64)
    assert imagenet["layer2_0"]["downsample_0"]["kernel"].shape == (1, 1, 64, 128)
    cifar = _shapes(models.resnet18(num_classes=7, stem="cifar"))["params"]
    assert cifar["conv1"]["kernel"].shape == (3, 3, 3, 64)
    x = jnp.zeros((2, 32, 32, 3))
    model = models.resnet18(num_classes=7, stem="cifar")
    out = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x, train=False)[0])
    assert out.shape == (2, 7)
    # v1.5: the Bottleneck strides in its 3x3 convolution, not the first 1x1.
    shapes = {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if tuple(context.module.path) in (("layer2_0", "conv1"), ("layer2_0", "conv2")):
            shapes[context.module.path[-1]] = out.shape
        return out

    resnet50 = models.resnet50()
    with nn.intercept_methods(record):
        jax.eval_shape(
            functools.partial(resnet50.init, train=False),
            jax.random.key(0),
            jnp.zeros((1, 64, 64, 3)),
        )
    assert shapes == {"conv1": (1, 16, 16, 128), "conv2": (1, 8, 8, 128)}


def test_shortcut_a_subsamples_and_pads_channels_evenly():
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 16))
    y = shortcut_a(x, 32, 2)
    expected = np.zeros((2, 2, 2, 32), np.float32)
    expected[..., 8:24] = np.asarray(x)[:, ::2, ::2, :]
    np.testing.assert_array_equal(y, expected)
    with pytest.raises(ValueError, match="cannot reduce 16 channels to 8"):
        shortcut_a(x, 8, 1)


def test_zero_init_residual_starts_each_block_as_its_shortcut():
    model = models.resnet_cifar(14, zero_init_residual=True)
    variables = _init(model, jnp.zeros((1, 32, 32, 3)))
    for s in (1, 2, 3):
        for b in range(2):
            block = variables["params"][f"layer{s}_{b}"]
            np.testing.assert_array_equal(block["bn2"]["scale"], 0.0)
            np.testing.assert_array_equal(block["bn1"]["scale"], 1.0)
    bottleneck = _shapes(models.resnet50(zero_init_residual=True), hw=64)
    assert "bn3" in bottleneck["params"]["layer1_0"]
    # With a zero bn2 scale (and zero bias) a block is relu(shortcut(x)).
    x = jax.random.normal(jax.random.key(2), (2, 8, 8, 16))
    block = BasicBlock(
        16, norm=functools.partial(jbn.BatchNorm, momentum=0.9), zero_init_residual=True
    )
    block_vars = block.init(jax.random.key(3), x, train=False)
    np.testing.assert_allclose(block.apply(block_vars, x, train=False), nn.relu(x), atol=1e-6)


def test_without_batch_norm_convs_have_biases():
    variables = _shapes(models.resnet20(use_batch_norm=False, shortcut="B"))
    assert set(variables) == {"params"}
    assert set(variables["params"]["layer2_0"]) == {"conv1", "conv2", "downsample_0"}
    assert set(variables["params"]["layer2_0"]["conv1"]) == {"kernel", "bias"}


def test_plain_nets_have_no_shortcut_and_take_an_activation():
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    relu_net = models.resnet_cifar(8, shortcut="none")
    sigmoid_net = relu_net.clone(activation="sigmoid")
    variables = _init(relu_net, x)
    relu_out = jax.jit(functools.partial(relu_net.apply, train=False))(variables, x)
    sigmoid_out = jax.jit(functools.partial(sigmoid_net.apply, train=False))(variables, x)
    assert not np.allclose(relu_out, sigmoid_out)
    # No shortcut: zeroing a middle block's last BN (scale and bias) zeroes its output,
    # so every later layer sees constants and the logits no longer depend on x.
    params = jax.tree.map(lambda a: a, variables["params"])
    params["layer2_0"]["bn2"] = jax.tree.map(jnp.zeros_like, params["layer2_0"]["bn2"])
    cut = jax.jit(functools.partial(relu_net.apply, train=False))(
        {**variables, "params": params}, x
    )
    np.testing.assert_allclose(cut[0], cut[1], atol=1e-6)
    with pytest.raises(ValueError, match="plain20 has no shortcuts"):
        models.plain20(shortcut="A")


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="6n \\+ 2 layers"):
        models.resnet_cifar(21)
    x = jnp.zeros((1, 32, 32, 3))
    for kwargs, message in [
        ({"block": "wide"}, "Unknown block 'wide'"),
        ({"stem": "tiny"}, "Unknown stem 'tiny'"),
        ({"shortcut": "C"}, "Unknown shortcut 'C'"),
        ({"activation": "gelu"}, "Unknown activation 'gelu'"),
        ({"widths": (16, 32)}, "4 stage sizes but 2 widths"),
    ]:
        with pytest.raises(ValueError, match=message):
            models.ResNet(stage_sizes=(1, 1, 1, 1), **kwargs).init(
                jax.random.key(0), x, train=False
            )


@pytest.mark.parametrize("norm", ["jbn", "flax", "renorm"])
def test_registry_builds_the_zoo_with_each_norm(norm):
    config = ml_collections.ConfigDict(
        {
            "name": "resnet20",
            "num_classes": 10,
            "widths": (16, 32),  # SmallBNConvNet's field: ignored by the ResNets.
            "use_batch_norm": True,
            "norm": norm,
            "bn_momentum": 0.9,
            "bn_epsilon": 1e-5,
            "virtual_batch_size": None,
            "stem": None,
            "shortcut": None,
            "activation": "relu",
            "zero_init_residual": False,
        }
    )
    model = models.make_model(config)
    assert isinstance(model, models.ResNet) and model.shortcut == "A"
    expected = {"jbn": jbn.BatchNorm, "flax": nn.BatchNorm, "renorm": jbn.BatchRenorm}[norm]
    layers = []

    def record(next_fun, args, kwargs, context):
        layers.append(type(context.module))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(
            functools.partial(model.init, train=False), jax.random.key(0), jnp.zeros((1, 32, 32, 3))
        )
    assert layers.count(expected) == 19  # The stem's norm and two per block.
    config.name, config.shortcut, config.stem = "resnet18", None, "cifar"
    model = models.make_model(config)
    assert (model.shortcut, model.stem, model.stage_sizes) == ("B", "cifar", (2, 2, 2, 2))
    assert {"resnet20", "resnet56", "plain56", "resnet50", "SmallBNConvNet"} <= set(
        models.model_names()
    )
    assert models.NORM_NAMES == ("jbn", "flax", "renorm")


def test_registry_ghost_batches_need_jbn():
    config = ml_collections.ConfigDict(
        {
            "name": "plain20",
            "num_classes": 10,
            "use_batch_norm": True,
            "norm": "flax",
            "bn_momentum": 0.9,
            "bn_epsilon": 1e-5,
            "virtual_batch_size": 32,
        }
    )
    with pytest.raises(ValueError, match="virtual_batch_size needs norm='jbn'"):
        models.make_model(config)
    config.norm = "jbn"
    assert models.make_model(config).virtual_batch_size == 32
