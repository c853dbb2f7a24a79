"""The config's sections: one frozen dataclass each, their defaults and choices, and their plain-dict form."""

from __future__ import annotations

import dataclasses
from typing import Any

REMAT_POLICIES = (
    "none",
    "block",
    "save_qkv",  # save each block's query/key/value projections; recompute attention and the MLP
    "save_qkv_attn",  # also the attention output: only norms and the MLP are recomputed
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "nothing_saveable",
    "everything_saveable",
)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 0  # 0: the tokenizer's vocabulary size
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int = 0  # 0: n_heads (multi-head); 1: multi-query; else grouped-query
    d_head: int = 0  # width of one attention head; 0: d_model // n_heads
    d_ff: int = 0  # 0: 4 * d_model
    max_seq_len: int = 1024
    norm: str = "layernorm"  # layernorm, rmsnorm, or rmsnorm_plus_one (scale 1 + w, w starting at 0: Gemma)
    norm_eps: float = 1e-5
    norm_placement: str = "pre"  # pre: x + f(norm(x)); post: x + norm(f(x)) (OLMo 2); sandwich: x + norm(f(norm(x)))
    qk_norm: str = "none"  # norm of queries and keys before RoPE: none, head (per head), all (over all heads)
    mlp: str = "gelu"  # gelu, swiglu (silu gate) or geglu (tanh-GELU gate)
    position: str = "learned"
    rope_theta: float = 10000.0
    rope_scaling: str = "none"  # none, linear (positions / rope_factor) or llama3 (Llama 3.1 frequency bands)
    rope_factor: float = 1.0  # linear and llama3 scaling factor
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above original_max_len / this are divided by rope_factor
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below original_max_len / this are kept
    rope_original_max_len: int = 8192  # llama3: the context length the model was first trained at
    rope_local_theta: float = 0.0  # RoPE base of sliding-window layers, unscaled (Gemma 3); 0: as the other layers
    rope_layers: str = "1"  # which layers apply RoPE: comma-separated 0/1 flags, repeated over the layers
    sliding_window: int = 0  # key j visible to query i iff i - W < j <= i on sliding layers; 0: no window
    sliding_layers: str = "1"  # which layers use sliding_window: comma-separated 0/1 flags, repeated over the layers
    attn_scale_dim: int = 0  # attention scores are scaled by attn_scale_dim ** -0.5; 0: head width
    scale_embeddings: bool = False  # token embeddings times sqrt(d_model) (in the activation dtype)
    tie_embeddings: bool = True
    use_bias: bool = True
    qkv_bias: bool = False  # biases on the query, key and value projections even when use_bias is false (Qwen2)
    dropout: float = 0.0  # on the embeddings and both residual branches
    attention_dropout: float = 0.0  # on the attention probabilities (nanoGPT's attn_dropout, HF's attention_dropout)
    init_std: float = 0.02
    dtype: str = "auto"  # activations; auto: bfloat16 on GPU and TPU, float32 on CPU (resolved by the runtime)
    param_dtype: str = "float32"
    attention: str = "auto"  # xla, cudnn (GPU), splash (TPU), or auto: the platform's fastest that applies
    splash_block_q: int = 512  # model.attention=splash: query rows per kernel tile (a multiple of 128)
    splash_block_kv: int = 512  # and key columns per tile; both shrink to divide the sequence
    remat: str = "none"
    scan_layers: bool = False

    @property
    def head_dim(self) -> int:
        return self.d_head or self.d_model // self.n_heads

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of block `layer`, or None for full causal attention."""
        return self.sliding_window if self.sliding_window and _flag(self.sliding_layers, layer) else None

    def layer_rope(self, layer: int) -> tuple[float, bool] | None:
        """(RoPE base, whether rope_scaling applies) for block `layer`, or None where it has no RoPE."""
        if self.position != "rope" or not _flag(self.rope_layers, layer):
            return None
        if self.rope_local_theta and self.layer_window(layer):
            return self.rope_local_theta, False
        return self.rope_theta, True

    @property
    def uniform_layers(self) -> bool:
        """Whether every block attends and rotates alike (what model.scan_layers stacks)."""
        kinds = {(self.layer_window(i), self.layer_rope(i)) for i in range(self.n_layers)}
        return len(kinds) == 1

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ff_dim(self) -> int:
        return self.d_ff or 4 * self.d_model


def _flag(flags: str, layer: int) -> bool:
    """Flag `layer` of a per-layer pattern such as "1,1,1,0" (repeated over the layers)."""
    values = flags.split(",")
    return values[layer % len(values)].strip() == "1"


def is_layer_flags(flags: str) -> bool:
    return all(v.strip() in ("0", "1") for v in flags.split(","))


@dataclasses.dataclass(frozen=True)
class MixtureSource:
    """One entry of data.mixture: own files or a named TFDS dataset, and its share of the training tokens.

    The data keys mean what the single-source keys of the same name mean (docs/data.md).
    """

    name: str = ""  # names the source in metrics, evaluation and overrides (letters, digits, _ and -)
    weight: float = 0.0  # expected share of training tokens; normalised over the entries
    files: str = ""  # comma-separated paths or globs of .txt / .jsonl files (or builtin:NAME)
    doc_separator: str = ""
    text_key: str = "text"
    tfds_name: str = ""
    train_split: str = "train"
    eval_split: str = "validation"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    text_file: str = ""  # local path, or an http(s)/file URL fetched once into cache_dir
    sha256: str = ""  # expected SHA-256 of a fetched text_file (checked when set)
    cache_dir: str = "~/.cache/lm"
    val_fraction: float = 0.1
    tokenizer: str = "byte"
    vocab_size: int = 4096  # sentencepiece: vocabulary to train
    spm_algorithm: str = "bpe"
    tokenizer_model: str = ""  # sentencepiece: an existing .model file instead of training one
    source: str = "text_file"  # text_file: random windows of one file; tfds: packed documents (grain); mixture
    files: str = ""  # tfds source, own corpus: comma-separated paths or globs of .txt / .jsonl files
    doc_separator: str = ""  # cut text files into documents at this string ("\n" = newline); "": whole file
    text_key: str = "text"  # the text field of JSONL lines and of named datasets
    tfds_name: str = ""  # a named TFDS dataset (prepared as array_record), e.g. tiny_shakespeare
    tfds_data_dir: str = ""  # "": cache_dir/tfds
    train_split: str = "train"
    eval_split: str = "validation"
    workers: int = 0  # grain worker processes (0: in the training process); per source of a mixture
    mixture: tuple[MixtureSource, ...] = ()  # data.source=mixture: the weighted sources

    @property
    def packed(self) -> bool:
        """Whether batches are packed documents (with segment ids), not windows of one text."""
        return self.source in ("tfds", "mixture")

    @property
    def source_names(self) -> tuple[str, ...]:
        """The names of the mixture's sources; () for a single source."""
        return tuple(entry.name for entry in self.mixture) if self.source == "mixture" else ()


@dataclasses.dataclass(frozen=True)
class MuonConfig:
    """optim.name=muon: Muon (Jordan 2024) on the hidden matrices; AdamW (optim.lr, b1, b2, eps) on the rest."""

    lr: float = 0.02  # peak rate of the hidden matrices, on optim's schedule (Jordan's 0.02)
    beta: float = 0.95  # momentum of the hidden matrices
    nesterov: bool = True
    ns_steps: int = 5  # Newton-Schulz iterations of the orthogonalisation
    weight_decay: float = 0.0  # decoupled decay of the hidden matrices, times muon.lr (optim.weight_decay: the rest)
    consistent_rms: float = 0.0  # 0: updates scaled by sqrt(max(1, fan_out / fan_in)); > 0 (0.2: Moonlight): by
    #                              consistent_rms * sqrt(max(fan_in, fan_out)), AdamW's update size


@dataclasses.dataclass(frozen=True)
class LionConfig:
    """optim.name=lion (Chen et al. 2023): sign updates, rate and decay on optim.lr and optim.weight_decay."""

    b1: float = 0.9  # interpolation of momentum and gradient inside the sign
    b2: float = 0.99  # momentum decay


@dataclasses.dataclass(frozen=True)
class ScheduleFreeConfig:
    """optim.name=schedule_free_adamw (Defazio et al. 2024): no decay schedule; evaluated at the average."""

    b1: float = 0.9  # interpolation between the average and the iterate where gradients are taken
    b2: float = 0.999  # second-moment decay
    weight_lr_power: float = 2.0  # the average weights step t by its lr ** weight_lr_power


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"  # adamw, muon, lion or schedule_free_adamw; keys of one optimizer live under optim.NAME.*
    lr: float = 1e-3  # peak rate (muon: of its AdamW group, the hidden matrices use optim.muon.lr)
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio after cosine decay (not schedule_free_adamw)
    warmup_steps: int = 100
    decay_steps: int = 0  # 0: train.steps (not schedule_free_adamw)
    weight_decay: float = 0.1
    decay_embeddings: bool = False
    b1: float = 0.9  # AdamW's (adamw, and muon's AdamW group)
    b2: float = 0.95  # AdamW's (adamw, and muon's AdamW group)
    eps: float = 1e-8  # Adam's (adamw, muon's AdamW group, schedule_free_adamw)
    grad_clip: float = 1.0  # 0 disables global-norm clipping
    muon: MuonConfig = MuonConfig()
    lion: LionConfig = LionConfig()
    schedule_free_adamw: ScheduleFreeConfig = ScheduleFreeConfig()


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8  # global, in sequences
    seq_len: int = 128
    grad_accum_steps: int = 1
    loss_chunk_tokens: int = -1  # tokens per device in one chunk of the cross-entropy; -1: auto, 0: whole
    skip_nonfinite: bool = False  # drop updates whose loss or gradients are NaN/Inf (else stop the run)
    max_consecutive_skips: int = 10  # skip_nonfinite: stop the run after this many skipped steps in a row; 0: never
    preemption_grace_s: float = 30.0  # after SIGTERM: finish the step, checkpoint, exit within this time


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 500  # 0: no periodic checkpoints, only at the end (and on SIGTERM / Ctrl-C)
    keep: int = 3  # the newest this many are kept
    keep_best: bool = False  # also keep the lowest validation loss's, saved at every validation that improves on it
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    every: int = 250  # 0 disables in-training validation
    batches: int = 20  # validation batches per in-training estimate (at least 1; eval.every=0 turns it off)
    batch_size: int = 0  # 0: train.batch_size


@dataclasses.dataclass(frozen=True)
class LogConfig:
    every: int = 10  # 0: only the first and the last step
    tensorboard: bool = True  # event files in run_dir (tensorboardX)
    sample_tokens: int = 64  # greedy continuation logged to TensorBoard at eval steps; 0: none


@dataclasses.dataclass(frozen=True)
class ProfileConfig:
    start_step: int = 0  # first traced step
    steps: int = 0  # steps traced into run_dir/profile; 0: no trace


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    mode: str = "mesh"
    data: int = -1  # -1: all devices not used by fsdp and tensor
    fsdp: int = 1
    tensor: int = 1
    cpu_devices: int = 0  # JAX devices a CPU host is split into; 0: one per core (lm.parallel.cpu)
    cpu_chunk_tokens: int = 1024  # CPU: tokens per device in one pass of a step (lm.parallel.cpu); 0: one pass
    coordinator_address: str = ""
    num_processes: int = 0
    process_id: int = -1


@dataclasses.dataclass(frozen=True)
class Config:
    run_dir: str = "runs/default"
    seed: int = 0
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    log: LogConfig = LogConfig()
    profile: ProfileConfig = ProfileConfig()
    parallel: ParallelConfig = ParallelConfig()


CHOICES = {
    "model.norm": ("layernorm", "rmsnorm", "rmsnorm_plus_one"),
    "model.norm_placement": ("pre", "post", "sandwich"),
    "model.qk_norm": ("none", "head", "all"),
    "model.mlp": ("gelu", "swiglu", "geglu"),
    "model.position": ("learned", "sinusoidal", "rope"),
    "model.rope_scaling": ("none", "linear", "llama3"),
    "model.dtype": ("float32", "bfloat16", "auto"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.attention": ("xla", "cudnn", "splash", "auto"),
    "model.remat": REMAT_POLICIES,
    "data.tokenizer": ("byte", "sentencepiece", "hf"),
    "data.spm_algorithm": ("bpe", "unigram"),
    "data.source": ("text_file", "tfds", "mixture"),
    "parallel.mode": ("mesh", "pmap"),
    "optim.name": ("adamw", "muon", "lion", "schedule_free_adamw"),
}


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{key}."))
        else:
            flat[key] = value
    return flat


def to_dict(config: Config) -> dict[str, Any]:
    """The config as plain YAML/JSON values (the entries of data.mixture as a list of mappings)."""
    tree = dataclasses.asdict(config)
    tree["data"]["mixture"] = list(tree["data"]["mixture"])
    return tree
