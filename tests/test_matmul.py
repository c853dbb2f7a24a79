"""lm.parallel.matmul: the CPU Dense matmul computes what lax.dot_general does, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from lm.parallel import matmul
from lm.parallel.matmul import cpu_dot_general, dense_dot_general


def dense_dims(x_ndim: int, n: int):
    """Flax Dense/DenseGeneral's contraction: x's last n axes with the kernel's first n."""
    return (tuple(range(x_ndim - n, x_ndim)), tuple(range(n))), ((), ())


@pytest.mark.parametrize("x_shape, w_shape, n", [
    ((3, 5, 8), (8, 24), 1),  # MLP up: the output is the wider activation
    ((3, 5, 24), (24, 8), 1),  # MLP down: the input is the wider one
    ((3, 5, 8), (8, 2, 4), 1),  # query/key/value projection to [heads, head_dim]
    ((3, 5, 2, 4), (2, 4, 8), 2),  # attention output projection
])
def test_values_and_gradients_match_lax(x_shape, w_shape, n):
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
    dims = dense_dims(len(x_shape), n)
    out_shape = x_shape[:len(x_shape) - n] + w_shape[n:]
    probe = jax.random.normal(kg, out_shape)

    def loss(dot):
        return lambda x, w: jnp.sum(jnp.tanh(dot(x, w, dims)) * probe)

    np.testing.assert_allclose(cpu_dot_general(x, w, dims), lax.dot_general(x, w, dims), rtol=1e-6)
    ours = jax.grad(loss(cpu_dot_general), argnums=(0, 1))(x, w)
    reference = jax.grad(loss(lax.dot_general), argnums=(0, 1))(x, w)
    for got, want in zip(ours, reference):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bfloat16_stays_bfloat16():
    x, w = jnp.ones((2, 3, 4), jnp.bfloat16), jnp.ones((4, 6), jnp.bfloat16)
    dx, dw = jax.grad(lambda x, w: cpu_dot_general(x, w, dense_dims(3, 1)).astype(jnp.float32).sum(), (0, 1))(x, w)
    assert cpu_dot_general(x, w, dense_dims(3, 1)).dtype == dx.dtype == dw.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(dw, np.float32), np.full((4, 6), 6.0))


def test_other_contractions_go_to_lax_unchanged():
    a, b = jnp.arange(24.0).reshape(2, 3, 4), jnp.arange(40.0).reshape(2, 4, 5)
    batched = (((2,), (1,)), ((0,), (0,)))
    np.testing.assert_array_equal(cpu_dot_general(a, b, batched), lax.dot_general(a, b, batched))


def test_used_on_cpu_only():
    assert dense_dot_general("cpu") is cpu_dot_general
    assert dense_dot_general("tpu") is None and dense_dot_general("gpu") is None
    assert dense_dot_general("cpu", "dots_saveable") is None  # remat policies that save matmul outputs


def test_compiler_options_drop_an_option_this_jaxlib_lacks(monkeypatch):
    assert matmul.cpu_compiler_options() == {**matmul.EIGEN_MATMULS, **matmul.FAST_MIN_MAX}  # this jaxlib has both
    monkeypatch.setattr(matmul, "EIGEN_MATMULS", {"xla_cpu_no_such_option": ""})
    matmul.cpu_compiler_options.cache_clear()
    assert matmul.cpu_compiler_options() == matmul.FAST_MIN_MAX
    monkeypatch.undo()
    matmul.cpu_compiler_options.cache_clear()
