"""The Optax chain: warmup + cosine schedule, global-norm clipping, AdamW with a decay mask."""

from __future__ import annotations

import jax
import optax

from lm.config import OptimConfig


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to optim.lr, then cosine decay to lr * min_lr_ratio.

    The update that makes step s+1 uses the rate at s+1, so the first update is not wasted
    on a zero learning rate.
    """
    decay = cfg.decay_steps or total_steps
    warmup = min(cfg.warmup_steps, decay)
    base = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
        decay_steps=max(decay, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio)
    return lambda step: base(step + 1)


def decay_mask(params, decay_embeddings: bool = False):
    """True for weight matrices; False for norms and biases (and embeddings unless asked)."""

    def wants_decay(path, _):
        name = path[-1].key
        return name == "kernel" or (decay_embeddings and name == "embedding")

    return jax.tree_util.tree_map_with_path(wants_decay, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(cfg, total_steps)
    adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                        mask=lambda params: decay_mask(params, cfg.decay_embeddings))
    if cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw), schedule
    return adamw, schedule
