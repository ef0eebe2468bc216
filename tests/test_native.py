"""Tests for jbn.ops.native (the compiled CPU kernel of the RGB input convolution).

References: a float64 NumPy convolution and its hand-written gradients, and
jbn.ops.patch_conv (XLA's path) in SmallBNConvNet. Tolerances: relative to the
largest entry of each reference, 1e-6 for the forward pass and the kernel
gradient (a sum over every pixel of the batch; 2e-6 at the train step's shape,
measured 8.4e-7), which is also the same bits on one thread as on several.

The kernel is built with the C++ compiler; where there is none, these tests
skip. Where there is one, a failed build fails them.
"""

import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import python_output_on_one_device

from jbn.models import SmallBNConvNet
from jbn.native import library
from jbn.ops import native
from jbn.ops.conv import PatchConv
from jbn.ops.patch_conv import patch_conv
from jbn.train import distributed
from jbn.train import state as train_state

REPO = pathlib.Path(__file__).resolve().parents[1]

# These check what happens on the CPU; on other platforms the XLA path runs.
on_cpu_only = pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU lowering")

SHAPES = [  # (N, H, W, C, O)
    (4, 8, 8, 3, 16),
    (2, 5, 12, 1, 8),
    (3, 6, 4, 4, 32),
    (2, 7, 8, 2, 16),
]


@pytest.fixture(scope="module", autouse=True)
def built():
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no C++ compiler: jbn.ops.native uses XLA's convolution instead")
    assert native.available(), "a C++ compiler is present but the native kernel did not build"


def _float64_conv_and_grads(x, kernel, dy):
    """Forward, input gradient and kernel gradient of a SAME 3x3 convolution in float64."""
    x, kernel, dy = (np.asarray(a, np.float64) for a in (x, kernel, dy))
    n, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    y = np.zeros((n, h, w, kernel.shape[-1]))
    dpadded = np.zeros_like(padded)
    dkernel = np.zeros_like(kernel)
    for i in range(3):
        for j in range(3):
            window = padded[:, i : i + h, j : j + w, :]
            y += window @ kernel[i, j]
            dkernel[i, j] = np.einsum("nhwc,nhwo->co", window, dy)
            dpadded[:, i : i + h, j : j + w, :] += dy @ kernel[i, j].T
    return y, dpadded[:, 1:-1, 1:-1, :], dkernel


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_reference(shape):
    n, h, w, c, o = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, h, w, c)).astype(np.float32) + 3.0
    kernel = (0.3 * rng.standard_normal((3, 3, c, o))).astype(np.float32)
    dy = rng.standard_normal((n, h, w, o)).astype(np.float32)
    y, vjp = jax.jit(lambda x, k: jax.vjp(native.conv3x3_small, x, k))(x, kernel)
    dx, dkernel = jax.jit(vjp)(jnp.asarray(dy))
    y_ref, dx_ref, dkernel_ref = _float64_conv_and_grads(x, kernel, dy)
    for got, ref, rel in ((y, y_ref, 1e-6), (dx, dx_ref, 1e-6), (dkernel, dkernel_ref, 1e-6)):
        np.testing.assert_allclose(got, ref, rtol=0, atol=rel * np.abs(ref).max())


def test_small_bn_conv_net_same_logits_and_gradients_as_xla_path():
    x = jax.random.normal(jax.random.key(0), (16, 32, 32, 3))
    labels = jax.random.randint(jax.random.key(1), (16,), 0, 10)
    variables = SmallBNConvNet().init(jax.random.key(2), x, train=False)

    def loss(params, model):
        logits, _ = model.apply(
            {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
        )
        log_probs = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], 1)), logits

    value_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (value, logits), grads = value_and_grad(
        variables["params"], SmallBNConvNet(native_input_conv=True)
    )
    (ref_value, ref_logits), ref_grads = value_and_grad(variables["params"], SmallBNConvNet())
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    # Measured: at most 1.1e-6 of a leaf's largest entry.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max()),
        grads,
        ref_grads,
    )


def _lowered_text(module, x):
    variables = module.init(jax.random.key(0), x)
    return jax.jit(module.apply).lower(variables, x).as_text()


@on_cpu_only
def test_patch_conv_uses_the_kernel_only_where_supported():
    x = jnp.ones((2, 8, 8, 3))
    assert "JbnConv3x3SmallForward" in _lowered_text(PatchConv(16, native=True), x)
    assert "JbnConv3x3SmallForward" not in _lowered_text(PatchConv(16), x)
    # 4 outputs, a 5x5 kernel, a width of 6, float64: XLA's patches.
    assert "JbnConv3x3Small" not in _lowered_text(PatchConv(4, native=True), x)
    assert "JbnConv3x3Small" not in _lowered_text(PatchConv(16, (5, 5), native=True), x)
    assert "JbnConv3x3Small" not in _lowered_text(PatchConv(16, native=True), x[:, :, :6])
    assert not native.supports((2, 8, 8, 3), (3, 3, 3, 16), jnp.float64)


@pytest.mark.parametrize(
    "x,kernel",
    [
        (jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))),  # 4 outputs
        (jnp.ones((2, 8, 8, 5)), jnp.ones((3, 3, 5, 16))),  # 5 channels
        (jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 16), jnp.bfloat16)),  # bfloat16 kernel
        (jnp.ones((2, 8, 8, 3), jnp.bfloat16), jnp.ones((3, 3, 3, 16))),  # bfloat16 input
        (jnp.ones((2, 8, 8, 3), jnp.int32), jnp.ones((3, 3, 3, 16))),  # int32 input
        (jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 16, 1))),  # 5-D kernel
        # 5-D with 16 last: the old check read only the last dimension, and this one
        # reached the FFI call (bad operands) instead of this ValueError.
        (jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 1, 16))),
        (jnp.ones((8, 8, 3)), jnp.ones((3, 3, 3, 16))),  # 3-D input
    ],
)
def test_unsupported_input_is_rejected_with_a_clear_error(x, kernel):
    with pytest.raises(ValueError, match="conv3x3_small: unsupported"):
        native.conv3x3_small(x, kernel)
    assert not native.supports(x.shape, kernel.shape, x.dtype, kernel.dtype)


@on_cpu_only
@pytest.mark.parametrize("target", ["forward", "kernel_grad"])
def test_the_handlers_check_the_result_shape(target):
    # Called directly, past supports(): a result of the wrong shape is an error,
    # never a write out of bounds.
    x = jnp.ones((2, 8, 8, 3))
    if target == "forward":
        name, second, wrong = native._FORWARD, jnp.ones((3, 3, 3, 16)), (2, 8, 8, 32)
        message = r"the result must be \(N, H, W, O\)"
    else:
        name, second, wrong = native._KERNEL_GRAD, jnp.ones((2, 8, 8, 16)), (3, 3, 3, 32)
        message = r"the result must be \(3, 3, C, O\)"
    call = jax.ffi.ffi_call(name, jax.ShapeDtypeStruct(wrong, jnp.float32))
    with pytest.raises(jax.errors.JaxRuntimeError, match=message):
        jax.block_until_ready(jax.jit(call)(x, second))


def _kernel_grad_at_the_train_step_shape():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((128, 32, 32, 3)).astype(np.float32) + 3.0
    dy = rng.standard_normal((128, 32, 32, 16)).astype(np.float32)
    kernel = jnp.zeros((3, 3, 3, 16))
    grad = jax.jit(lambda x, dy: jax.vjp(native.conv3x3_small, x, kernel)[1](dy)[1])
    return x, dy, np.asarray(grad(x, dy))


def test_kernel_gradient_is_accurate_at_the_train_step_shape():
    x, dy, dkernel = _kernel_grad_at_the_train_step_shape()
    padded = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    ref = np.stack(
        [
            np.stack(
                [
                    np.einsum("nhwc,nhwo->co", padded[:, i : i + 32, j : j + 32], dy)
                    for j in range(3)
                ]
            )
            for i in range(3)
        ]
    )
    # Measured: 8.4e-7 (one float32 chain per thread before: 1.0e-5 on 2 threads).
    assert np.abs(dkernel - ref).max() <= 2e-6 * np.abs(ref).max()


@on_cpu_only
def test_kernel_gradient_is_the_same_bits_on_one_thread():
    # A resumed run on a machine with another core count must compute the same
    # bits: the same kernel gradient in a process pinned to one CPU.
    code = (
        "import sys; sys.path.insert(0, 'tests'); import numpy as np;"
        "from test_native import _kernel_grad_at_the_train_step_shape as f;"
        "sys.stdout.buffer.write(f()[2].tobytes())"
    )
    one_thread = python_output_on_one_device(code, pinned_to_one_cpu=True)
    here = _kernel_grad_at_the_train_step_shape()[2]
    assert np.frombuffer(one_thread, np.float32).tobytes() == here.tobytes()


@pytest.mark.parametrize("conv", ["native", "patch_conv"])
def test_an_empty_batch_gives_an_empty_output_and_zero_kernel_gradient(conv):
    fn = native.conv3x3_small if conv == "native" else patch_conv
    x, kernel = jnp.ones((0, 8, 8, 3)), jnp.ones((3, 3, 3, 16))
    assert fn(x, kernel).shape == (0, 8, 8, 16)
    dx, dkernel = jax.grad(lambda x, k: jnp.sum(fn(x, k)), (0, 1))(x, kernel)
    assert dx.shape == x.shape
    np.testing.assert_array_equal(dkernel, np.zeros(kernel.shape))


def test_vmap_and_sharded_batch_give_the_same_values():
    x = jax.random.normal(jax.random.key(0), (8, 8, 8, 3))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 3, 16))
    expected = native.conv3x3_small(x, kernel)
    mapped = jax.vmap(native.conv3x3_small, in_axes=(0, None))(x.reshape(2, 4, 8, 8, 3), kernel)
    np.testing.assert_array_equal(mapped.reshape(expected.shape), expected)
    # Not split by XLA's sharding (the custom call runs on the gathered batch), but exact.
    mesh = distributed.create_mesh({"data": -1})
    sharded_x = jax.device_put(x, distributed.batch_sharding(mesh))
    np.testing.assert_allclose(jax.jit(native.conv3x3_small)(sharded_x, kernel), expected)


@on_cpu_only
def test_train_loop_keeps_the_kernel_only_on_one_cpu_device():
    config = ml_collections.ConfigDict(
        {
            "model": {"name": "SmallBNConvNet", "native_input_conv": True, "bn_stats": "global"},
            "data": {"batch_size": 128},
        }
    )
    one = distributed.create_mesh({"data": 1}, devices=jax.devices()[:1])
    eight = distributed.create_mesh({"data": -1})
    assert train_state._model_config(config, one).native_input_conv is True
    assert train_state._model_config(config, eight).native_input_conv is False


def _python(code, **env):
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result


def test_opt_out_and_failed_build_fall_back(tmp_path):
    code = "from jbn.ops import native; print(native.available())"
    assert _python(code, JBN_NO_NATIVE="1").stdout.strip() == "False"
    # A compiler that fails: a warning that names the library, then XLA's path.
    failed = _python(code, CXX="false", JBN_CACHE_DIR=str(tmp_path))
    assert failed.stdout.strip() == "False"
    assert "could not build or load" in failed.stderr
    assert not list(tmp_path.rglob("*.so"))


FAKE_COMPILER = """#!/bin/sh
# Stands in for g++: "builds" by copying an already built library to the -o path.
while [ $# -gt 1 ]; do
  if [ "$1" = "-o" ]; then cp "{library}" "$2"; exit 0; fi
  shift
done
exit 1
"""


@pytest.mark.parametrize("size", [0, 4096, "half"])
def test_a_damaged_cached_library_is_rebuilt_not_loaded(tmp_path, monkeypatch, size):
    good = library.library_path(native.SOURCE, library.compiler())
    compiler = tmp_path / "fake-g++"
    compiler.write_text(FAKE_COMPILER.format(library=good))
    compiler.chmod(0o755)
    monkeypatch.setenv("JBN_CACHE_DIR", str(tmp_path / "cache"))
    cached = library.library_path(native.SOURCE, str(compiler))
    cached.parent.mkdir(parents=True)
    data = good.read_bytes()
    cached.write_bytes(data[: len(data) // 2 if size == "half" else size])
    # The checksum of the good library beside the damaged one, as after a crash mid-copy.
    library.checksum_path(cached).write_text(library.sha256(good))
    code = (
        "import jax.numpy as jnp; from jbn.ops import native; print(native.available());"
        "print(float(native.conv3x3_small(jnp.ones((1, 4, 4, 3)), jnp.ones((3, 3, 3, 8)))[0, 1, 1, 0]))"
    )
    result = _python(code, CXX=str(compiler), JBN_CACHE_DIR=str(tmp_path / "cache"))
    assert result.stdout.split() == ["True", "27.0"]
    assert "does not match its checksum" in result.stderr and "rebuilding" in result.stderr
    assert cached.read_bytes() == data and library.is_intact(cached)
