"""Matmuls on CPU: a Dense backward pass XLA:CPU compiles without slow transposes, and its kernel choice.

A weight gradient dW = x^T g contracts over the token axis of two activations, and XLA:CPU
materializes one of them transposed first. Left to itself it often picks the wider one
(e.g. the [tokens, 4*d_model] MLP activation), and a transposed write of that is slower than
the matmul. Here the narrower one is transposed instead: same math, up to float rounding.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

# XLA:CPU fuses matmuls into experimental YNNPACK kernels by default; Eigen's run the
# shakespeare train steps faster (shakespeare_char: ~1.15-1.35x on 2 cores; docs/benchmarks.md, "Against PyTorch on CPU").
EIGEN_MATMULS = {"xla_cpu_experimental_ynn_fusion_type": ""}
# XLA:CPU's max and min propagate NaN with a compare and select per element; without that a
# softmax's row max runs ~2.7x faster and the shakespeare_cpu step ~2% (docs/benchmarks.md).
# A NaN still reaches the loss and the gradient norm through exp and sums, where the step's
# nonfinite check sees it.
FAST_MIN_MAX = {"xla_cpu_enable_fast_min_max": True}


def _contract_lead(a, b, lead: int):
    """Sums a and b over their first `lead` axes: [L..., A...] x [L..., B...] -> [A..., B...]."""
    axes = tuple(range(lead))
    return lax.dot_general(a, b, ((axes, axes), ((), ())))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dense(x, w, n: int):
    """x's last n axes against w's first n axes."""
    return lax.dot_general(x, w, ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))), ((), ())))


def _dense_fwd(x, w, n):
    return _dense(x, w, n), (x, w)


def _dense_bwd(n, residuals, g):
    x, w = residuals
    n_out = w.ndim - n
    dx = lax.dot_general(g, w, ((tuple(range(g.ndim - n_out, g.ndim)), tuple(range(n, w.ndim))), ((), ())))
    lead = x.ndim - n
    if math.prod(x.shape[lead:]) <= math.prod(g.shape[lead:]):
        dw = _contract_lead(x, g, lead)
    else:  # transpose g, the narrower activation; the barrier keeps XLA from folding the transpose back
        dw_t = lax.optimization_barrier(_contract_lead(g, x, lead))
        dw = dw_t.transpose(tuple(range(n_out, w.ndim)) + tuple(range(n_out)))
    return dx.astype(x.dtype), dw.astype(w.dtype)


_dense.defvjp(_dense_fwd, _dense_bwd)


def dense_dot_general(platform: str, remat: str = "none"):
    """The `dot_general` for Dense layers on `platform`: `cpu_dot_general` on CPU, None (XLA's own) elsewhere.

    Not under a `dots_*` remat policy: those save matmul outputs, and cannot see inside a custom VJP.
    """
    return cpu_dot_general if platform == "cpu" and "dots" not in remat else None


def cpu_dot_general(x, w, dimension_numbers, precision=None, preferred_element_type=None):
    """Drop-in `dot_general` for Flax Dense/DenseGeneral; other contractions (or an explicit
    precision or result type) go to XLA unchanged."""
    (x_axes, w_axes), batch = dimension_numbers
    n = len(x_axes)
    dense = batch == ((), ()) and tuple(x_axes) == tuple(range(x.ndim - n, x.ndim)) and tuple(w_axes) == tuple(range(n))
    if not dense or precision is not None or preferred_element_type is not None:
        return lax.dot_general(x, w, dimension_numbers, precision, preferred_element_type)
    return _dense(x, w, n)


@functools.cache
def cpu_compiler_options() -> dict:
    """Compiler options for train/eval steps on CPU: EIGEN_MATMULS and FAST_MIN_MAX, each where this
    jaxlib knows it (one probe compile when it knows both)."""
    def known(option: dict) -> bool:
        try:
            jax.jit(lambda x: x @ x, compiler_options=option).lower(jnp.ones((2, 2))).compile()
        except jax.errors.JaxRuntimeError:  # a jaxlib without the option: keep XLA's default
            return False
        return True

    both = {**EIGEN_MATMULS, **FAST_MIN_MAX}
    if known(both):
        return both
    return {k: v for option in (EIGEN_MATMULS, FAST_MIN_MAX) if known(option) for k, v in option.items()}
