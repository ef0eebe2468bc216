"""jbn against torch.nn.BatchNorm{1,2,3}d in train and eval mode over several steps.

PyTorch's momentum=0.1 is jbn's momentum=0.9; PyTorch stores the unbiased
variance (unbiased_running_var=True) and counts steps (with_count=True).
Tolerance: atol 1e-5 on outputs, running statistics and gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbn

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

ATOL = 1e-5


def _torch_bn(ndim, num_features, momentum):
    cls = {
        2: torch.nn.BatchNorm1d,
        3: torch.nn.BatchNorm1d,
        4: torch.nn.BatchNorm2d,
        5: torch.nn.BatchNorm3d,
    }[ndim]
    bn = cls(num_features, momentum=momentum).double()
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, num_features))
        bn.bias.copy_(torch.linspace(-0.2, 0.3, num_features))
    return bn


@pytest.mark.parametrize(
    "shape,torch_momentum",
    [
        ((4, 3), 0.1),
        ((4, 3), None),
        ((5, 3, 7), 0.1),
        ((4, 3, 5, 5), 0.1),
        ((4, 3, 5, 5), None),
        ((2, 3, 3, 4, 4), 0.2),
    ],
)
def test_matches_torch_over_several_train_steps_then_eval(shape, torch_momentum):
    rng = np.random.default_rng(0)
    num_features = shape[1]
    bn = _torch_bn(len(shape), num_features, torch_momentum)
    params = {
        "scale": jnp.asarray(bn.weight.detach().numpy(), jnp.float32),
        "bias": jnp.asarray(bn.bias.detach().numpy(), jnp.float32),
    }
    stats = jbn.init_batch_stats(num_features, with_count=True)
    momentum = None if torch_momentum is None else 1.0 - torch_momentum

    @jax.jit
    def train(x, params, stats, dy):
        def f(x, params):
            return jbn.batch_norm(
                x,
                params,
                stats,
                training=True,
                axis=1,
                momentum=momentum,
                unbiased_running_var=True,
            )

        (y, new_stats), vjp = jax.vjp(f, x, params)
        dx, dparams = vjp((dy, jax.tree.map(jnp.zeros_like, new_stats)))
        return y, new_stats, dx, dparams

    for step in range(4):
        x = rng.normal(step, 1.0 + step, shape)
        dy = rng.normal(size=shape)
        xt = torch.tensor(x, requires_grad=True)
        yt = bn.train()(xt)
        yt.backward(torch.tensor(dy))
        y, stats, dx, dparams = train(
            jnp.asarray(x, jnp.float32), params, stats, jnp.asarray(dy, jnp.float32)
        )
        np.testing.assert_allclose(y, yt.detach().numpy(), atol=ATOL)
        np.testing.assert_allclose(stats["mean"], bn.running_mean.numpy(), atol=ATOL)
        np.testing.assert_allclose(stats["var"], bn.running_var.numpy(), atol=ATOL)
        assert int(stats["count"]) == int(bn.num_batches_tracked)
        np.testing.assert_allclose(dx, xt.grad.numpy(), atol=ATOL)
        np.testing.assert_allclose(dparams["scale"], bn.weight.grad.numpy(), atol=ATOL)
        np.testing.assert_allclose(dparams["bias"], bn.bias.grad.numpy(), atol=ATOL)
        bn.zero_grad()

    x = rng.normal(size=shape)
    y, same = jbn.batch_norm(jnp.asarray(x, jnp.float32), params, stats, training=False, axis=1)
    with torch.no_grad():
        np.testing.assert_allclose(y, bn.eval()(torch.tensor(x)).numpy(), atol=ATOL)
    np.testing.assert_array_equal(same["mean"], stats["mean"])


def test_the_reference_notebook_batchnorm1d_on_a_4x3_batch():
    bn = torch.nn.BatchNorm1d(3)
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0], [10.0, 11.0, 13.0]])
    params, stats = jbn.init_params(3), jbn.init_batch_stats(3)
    y, stats = jbn.batch_norm(
        x.numpy(), params, stats, training=True, momentum=0.9, unbiased_running_var=True
    )
    with torch.no_grad():
        np.testing.assert_allclose(y, bn.train()(x).numpy(), atol=ATOL)
        np.testing.assert_allclose(stats["var"], bn.running_var.numpy(), atol=ATOL)
        y_eval, _ = jbn.batch_norm(x.numpy(), params, stats, training=False)
        np.testing.assert_allclose(y_eval, bn.eval()(x).numpy(), atol=ATOL)


def test_one_value_per_channel_raises_like_torch():
    with pytest.raises(ValueError, match="Expected more than 1 value per"):
        torch.nn.BatchNorm1d(3).train()(torch.ones(1, 3))
    with pytest.raises(ValueError, match="Expected more than 1 value per"):
        jbn.batch_norm(jnp.ones((1, 3)), None, jbn.init_batch_stats(3), training=True)
