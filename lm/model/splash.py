"""Pallas splash attention on TPU: causal, packed documents, grouped heads, sliding windows, soft caps.

The kernel (`jax.experimental.pallas.ops.tpu.splash_attention`) walks the [T, S] score matrix
in tiles held in VMEM, skipping tiles its mask hides, so no [B, N, T, S] scores ever reach HBM.
Mosaic kernels are not partitioned by the compiler: `splash_attention` runs the kernel under
`jax.shard_map`, each chip taking its rows of the batch and its share of the heads.
`Splash` (built by the runtime, handed to the model in `Kernels.attention`) says how.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

LANES = 128  # the TPU vector lane width: kernel tiles are multiples of it
NAME = "splash"


@dataclasses.dataclass(frozen=True)
class Splash:
    """How to run the splash kernel: tile sizes, and the mesh its shard_map splits.

    `mesh` None runs the kernel on arrays that are already one device's (pmap, one chip).
    `interpret` runs it through Pallas' interpreter on any backend (tests on CPU).
    """

    block_q: int = 512
    block_kv: int = 512
    mesh: Mesh | None = None
    batch_axes: tuple[str, ...] = ()  # mesh axes the batch is split over
    head_axis: str | None = None  # mesh axis the heads are split over
    interpret: bool = False
    name: ClassVar[str] = NAME

    def shards(self, axes) -> int:
        """How many ways the mesh splits along `axes` (1 without a mesh)."""
        return 1 if self.mesh is None else math.prod(self.mesh.shape[a] for a in axes)


def tile(seq_len: int, block: int) -> int:
    """The largest multiple of 128 that divides `seq_len` and is at most `block` (`seq_len` % 128 == 0)."""
    return next(b for b in range(min(block, seq_len) // LANES * LANES, 0, -LANES) if seq_len % b == 0)


def causal_pairs(seq_len: int, block: int) -> int:
    """Query-key pairs the causal kernel computes: whole tiles on or below the diagonal, T (T + b) / 2."""
    b = tile(seq_len, block)
    return seq_len * (seq_len + b) // 2


def applies(spec: Splash, batch: int, seq_len: int) -> bool:
    """Whether the kernel can take this call: whole tiles, and a batch the mesh splits evenly
    (initialisation traces one row; XLA attention serves it)."""
    return seq_len % LANES == 0 and batch % spec.shards(spec.batch_axes) == 0


def splash_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT=None, *, window: int | None,
                     scale: float, softcap: float | None, spec: Splash, checkpoint_name: str) -> jax.Array:
    """Causal attention [B, T, N, H] through the splash kernel (see lm.model.attention.attend).

    `checkpoint_name` names the kernel's saved output and log-sum-exp for remat policies.
    """
    N, K = q_BxTxNxH.shape[2], k_BxSxKxH.shape[2]
    head_ways = spec.shards((spec.head_axis,) if spec.head_axis else ())
    if K % head_ways:  # each chip needs whole groups of query heads with their key/value head
        k_BxSxKxH, v_BxSxKxH = (jnp.repeat(x, N // K, axis=2) for x in (k_BxSxKxH, v_BxSxKxH))
    # The kernel takes [heads, T, H] and leaves the scale to its caller.
    q_BxNxTxH = (q_BxTxNxH * jnp.asarray(scale, q_BxTxNxH.dtype)).transpose(0, 2, 1, 3)
    k_BxKxSxH, v_BxKxSxH = (x.transpose(0, 2, 1, 3) for x in (k_BxSxKxH, v_BxSxKxH))

    def local(q, k, v, segments):
        kernel = _kernel(q.shape[1], q.shape[2], window, softcap, spec, checkpoint_name)
        if segments is None:
            return jax.vmap(kernel)(q, k, v)
        from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

        return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=SegmentIds(s, s)))(q, k, v, segments)

    if spec.mesh is not None:
        heads = P(spec.batch_axes or None, spec.head_axis)
        rows = P(spec.batch_axes or None)
        local = jax.shard_map(local, mesh=spec.mesh, in_specs=(heads, heads, heads, rows), out_specs=heads,
                              check_vma=False)
    return local(q_BxNxTxH, k_BxKxSxH, v_BxKxSxH, segment_ids_BxT).transpose(0, 2, 1, 3)


def _kernel(heads: int, seq_len: int, window: int | None, softcap: float | None, spec: Splash,
            checkpoint_name: str):
    """The kernel for one row: [heads, T, H] queries against [K, T, H] keys and values."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    shape = (seq_len, seq_len)
    one = sa.CausalMask(shape) if window is None else sa.LocalMask(shape, (window - 1, 0), 0)
    bq, bkv = tile(seq_len, spec.block_q), tile(seq_len, spec.block_kv)
    blocks = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                           block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    return sa.make_splash_mha(sa.MultiHeadMask([one] * heads), block_sizes=blocks, head_shards=1, q_seq_shards=1,
                              attn_logits_soft_cap=softcap, residual_checkpoint_name=checkpoint_name,
                              interpret=spec.interpret)
