"""An attention kernel against XLA's float32 attention: error and speed at the GPU configs' shapes.

    python benchmarks/attention_check.py [--implementation cudnn] [--batch 4] [CONFIG ...]

For each config (default: gpt2_124m and llama_1b) it draws random bf16 queries, keys and
values of the config's attention shape (heads, key/value heads, head width, train.seq_len),
runs causal `jax.nn.dot_product_attention` with `--implementation` and with XLA, both in
bf16, and prints each one's largest error against XLA in float32 (output, and the gradient
of a random projection of it with respect to the queries), and each one's forward+backward
time. `cudnn` needs an NVIDIA GPU; `--implementation xla` runs anywhere.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from lm.config import load_config

DEFAULT_CONFIGS = ("configs/gpt2_124m.yaml", "configs/llama_1b.yaml")


def attention_and_grad(implementation: str | None):
    """jitted (q, k, v, probe) -> (causal attention output, d<output, probe>/dq)."""
    def loss(q, k, v, probe):
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
        return jnp.sum(out.astype(jnp.float32) * probe), out

    return jax.jit(jax.grad(loss, has_aux=True))


def best_seconds(fn, *args, repeats: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def check(config: str, implementation: str, batch: int) -> dict:
    m, t = (cfg := load_config(config)).model, cfg.train
    kq, kk, kv, kp = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (batch, t.seq_len, m.n_heads, m.head_dim), jnp.float32)
    k = jax.random.normal(kk, (batch, t.seq_len, m.kv_heads, m.head_dim), jnp.float32)
    v = jax.random.normal(kv, (batch, t.seq_len, m.kv_heads, m.head_dim), jnp.float32)
    probe = jax.random.normal(kp, q.shape, jnp.float32)
    bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    ref_grad, ref_out = attention_and_grad("xla")(q, k, v, probe)
    result = {"config": config, "shape": [batch, t.seq_len, m.n_heads, m.kv_heads, m.head_dim]}
    for name in dict.fromkeys((implementation, "xla")):
        fn = attention_and_grad(name)
        grad, out = fn(*bf16, probe)
        result[name] = {
            "max_abs_err_out": float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref_out))),
            "max_abs_err_grad": float(jnp.max(jnp.abs(grad.astype(jnp.float32) - ref_grad))),
            "fwd_bwd_ms": 1e3 * best_seconds(fn, *bf16, probe),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", default=list(DEFAULT_CONFIGS))
    parser.add_argument("--implementation", default="cudnn", choices=("cudnn", "xla"))
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    if args.implementation == "cudnn" and jax.default_backend() != "gpu":
        raise SystemExit(f"error: --implementation cudnn needs an NVIDIA GPU, but JAX runs on "
                         f"{jax.default_backend()}; pass --implementation xla.")
    for config in args.configs:
        print(json.dumps(check(config, args.implementation, args.batch)), flush=True)


if __name__ == "__main__":
    main()
