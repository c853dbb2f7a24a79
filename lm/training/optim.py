"""The optimizer named by optim.name, from Optax, with its schedule and weight-decay mask (clipping is the step's).

- adamw: `optax.adamw` on every parameter, warmup + cosine decay.
- muon: `optax.contrib.muon` on the hidden matrices (attention and MLP kernels, each orthogonalised as
  the [inputs, outputs] matrix it is, a scanned layer axis as a batch axis) at optim.muon.lr, and the
  adamw above on embeddings, head, norms and biases at optim.lr; both on the warmup + cosine shape.
- lion: `optax.lion`, warmup + cosine decay.
- schedule_free_adamw: `optax.contrib.schedule_free` around Adam without momentum, with the decay
  mask; warmup then a constant rate. It is evaluated at its average (`eval_params`).
"""

from __future__ import annotations

import jax
import optax

from lm.config import OptimConfig

# Parents of the attention kernels: [D, N, H] projections in, the [N, H, D] projection out.
_ATTENTION_IN, _ATTENTION_OUT = ("query", "key", "value"), "out"


def make_schedule(cfg: OptimConfig, total_steps: int, peak: float | None = None) -> optax.Schedule:
    """Linear warmup to `peak` (default optim.lr), then cosine decay to peak * min_lr_ratio.

    The update that makes step s+1 uses the rate at s+1, so the first update is not wasted
    on a zero learning rate.
    """
    peak = cfg.lr if peak is None else peak
    decay = cfg.decay_steps or total_steps
    warmup = warmup_steps(cfg, total_steps)
    base = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(decay, warmup + 1), end_value=peak * cfg.min_lr_ratio)
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


def _matrix_axes(path) -> optax.contrib.MuonDimensionNumbers | None:
    """How Muon sees one parameter: (input axes, output axes) of a hidden matrix, None for the rest.

    Axes count from the end, so a leading layer axis (model.scan_layers) is a batch axis.
    """
    names = [getattr(entry, "key", None) for entry in path]
    parent = names[-2] if len(names) > 1 else None
    if names[-1] != "kernel" or names[0] == "head":
        return None
    if parent in _ATTENTION_IN:
        return optax.contrib.MuonDimensionNumbers(reduction_axis=-3, output_axis=(-2, -1))
    if parent == _ATTENTION_OUT:
        return optax.contrib.MuonDimensionNumbers(reduction_axis=(-3, -2), output_axis=-1)
    return optax.contrib.MuonDimensionNumbers(reduction_axis=-2, output_axis=-1)


def hidden_matrices(params):
    """`_matrix_axes` of every parameter (a tree of MuonDimensionNumbers and None)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _matrix_axes(path), params)


def _adamw(cfg: OptimConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                       mask=lambda params: decay_mask(params, cfg.decay_embeddings))


def _muon(cfg: OptimConfig, total_steps: int, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Muon on the hidden matrices, `_adamw` on the rest: two groups of `optax.partition`."""
    m = cfg.muon
    muon = optax.contrib.muon(
        make_schedule(cfg, total_steps, m.lr), beta=m.beta, ns_steps=m.ns_steps, nesterov=m.nesterov,
        weight_decay=m.weight_decay, consistent_rms=m.consistent_rms or None,
        muon_weight_dimension_numbers=hidden_matrices)  # its own Adam group stays empty

    def labels(params):
        return jax.tree_util.tree_map_with_path(lambda path, _: "adamw" if _matrix_axes(path) is None else "muon",
                                                params)

    return optax.partition({"muon": muon, "adamw": _adamw(cfg, schedule)}, labels)


def _schedule_free(cfg: OptimConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """optax.contrib.schedule_free_adamw's composition, with the decay mask: warmup, then optim.lr."""
    sf = cfg.schedule_free_adamw
    base = optax.warmup_constant_schedule(0.0, cfg.lr, cfg.warmup_steps)
    schedule = lambda step: base(step + 1)  # noqa: E731  schedule_free itself counts from 1
    adam = optax.chain(
        optax.scale_by_rms(decay=sf.b2, eps=cfg.eps, eps_in_sqrt=False, bias_correction=True),
        optax.add_decayed_weights(cfg.weight_decay, lambda params: decay_mask(params, cfg.decay_embeddings)),
        optax.scale_by_learning_rate(schedule))
    return optax.contrib.schedule_free(adam, base, b1=sf.b1, weight_lr_power=sf.weight_lr_power), schedule


def make_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optim.name's transformation, the schedule of optim.lr).

    The train step clips the gradients itself (`lm.training.step.train_step`'s `clip_norm`), on
    the global norm it already computes for its metrics, instead of a second norm and per-tensor
    select in `optax.clip_by_global_norm`. For adamw the link that held that clip stays
    (`optax.identity`, the same empty state), so optimizer states keep their layout and older
    checkpoints restore.
    """
    if cfg.name == "schedule_free_adamw":
        return _schedule_free(cfg)
    schedule = make_schedule(cfg, total_steps)
    if cfg.name == "muon":
        return _muon(cfg, total_steps, schedule), schedule
    if cfg.name == "lion":
        return optax.lion(schedule, b1=cfg.lion.b1, b2=cfg.lion.b2, weight_decay=cfg.weight_decay,
                          mask=lambda params: decay_mask(params, cfg.decay_embeddings)), schedule
    adamw = _adamw(cfg, schedule)
    if cfg.grad_clip > 0:
        return optax.chain(optax.identity(), adamw), schedule
    return adamw, schedule


def evaluated_apart(cfg: OptimConfig) -> bool:
    """Whether evaluation uses other parameters than the trained ones (computed with the optimizer state)."""
    return cfg.name == "schedule_free_adamw"


def eval_params(cfg: OptimConfig, params, opt_state):
    """The parameters to validate, evaluate, sample and export: schedule-free's average x (from its z
    and the trained y); the trained parameters themselves for every other optimizer."""
    if evaluated_apart(cfg):
        return optax.contrib.schedule_free_eval_params(opt_state, params)
    return params
