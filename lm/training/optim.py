"""The Optax chain: warmup + cosine schedule, AdamW with a decay mask (global-norm clipping is the step's)."""

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
    warmup = warmup_steps(cfg, total_steps)
    base = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
        decay_steps=max(decay, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio)
    return lambda step: base(step + 1)


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    """The schedule's warmup: optim.warmup_steps, at most the decay's length (optim.decay_steps or train.steps)."""
    return min(cfg.warmup_steps, cfg.decay_steps or total_steps)


def warmup_warning(cfg: OptimConfig, total_steps: int) -> str | None:
    """A sentence when the warmup does not end before the last step (the run never trains past it)."""
    if warmup_steps(cfg, total_steps) < total_steps:
        return None
    return (f"optim.warmup_steps={cfg.warmup_steps} does not end before the last step (train.steps={total_steps}): "
            f"the learning rate warms up for the whole run (optim.lr={cfg.lr:g} is reached at the last step at "
            f"best); set optim.warmup_steps below {total_steps}.")


def decay_mask(params, decay_embeddings: bool = False):
    """True for weight matrices; False for norms and biases (and embeddings unless asked)."""

    def wants_decay(path, _):
        name = path[-1].key
        return name == "kernel" or (decay_embeddings and name == "embedding")

    return jax.tree_util.tree_map_with_path(wants_decay, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(AdamW after a stateless first link when optim.grad_clip > 0, the schedule).

    The train step clips the gradients itself (`lm.training.step.train_step`'s `clip_norm`), on
    the global norm it already computes for its metrics, instead of a second norm and per-tensor
    select in `optax.clip_by_global_norm`. The link that held that clip stays (`optax.identity`,
    the same empty state), so optimizer states keep their layout and older checkpoints restore.
    """
    schedule = make_schedule(cfg, total_steps)
    adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                        mask=lambda params: decay_mask(params, cfg.decay_embeddings))
    if cfg.grad_clip > 0:
        return optax.chain(optax.identity(), adamw), schedule
    return adamw, schedule
