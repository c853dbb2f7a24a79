"""Checksums of array trees, recorded in each checkpoint's meta and checked on restore.

Orbax notices missing or truncated files, but a flipped byte inside a chunk restores
silently as a different number. The fingerprint of a tree is a SHA-256 over one uint32
per leaf: the sum, modulo 2**32, of each element's bits times an odd weight that depends
on its position. Any change to a single element changes it, integer sums do not depend
on reduction order, and it runs as one jitted reduction on whatever mesh holds the arrays.
"""

from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np

_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _leaf_sum(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    bits = jax.lax.bitcast_convert_type(x, _UINT[x.dtype.itemsize]).astype(jnp.uint32)
    weights = (jnp.arange(x.size, dtype=jnp.uint32) * 2 + 1).reshape(x.shape)
    return jnp.sum(bits * weights, dtype=jnp.uint32)


_leaf_sums = jax.jit(lambda tree: [_leaf_sum(x) for x in jax.tree.leaves(tree)])


def fingerprint(tree) -> str:
    """A hex digest that changes when any element, shape or tree path of `tree` changes."""
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    shapes = [(tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(tree)]
    sums = np.asarray(jax.device_get(_leaf_sums(tree)), dtype=np.uint32)
    return hashlib.sha256(repr((paths, shapes)).encode() + sums.tobytes()).hexdigest()
