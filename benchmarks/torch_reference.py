"""The shakespeare_cpu model and training in idiomatic PyTorch: the step timed like `lm bench`,
or a whole run timed like `train.py`.

Same architecture (pre-norm GPT: learned positions, LayerNorm without bias, tanh-GELU MLP,
causal scaled-dot-product attention, tied embeddings, no biases, nanoGPT's init: std 0.02 and
0.02 / sqrt(2 x layers) for the two residual projections; --dropout on the embeddings and both
residual branches, --attention_dropout on the attention probabilities while training: nanoGPT's
four dropout sites), same optimizer (AdamW with warmup + cosine, global-norm clipping at 1.0),
same batch (12 x 64 byte tokens), float32. For comparing tokens/s on one machine:

    pip install torch==2.13.0   # CPU wheel
    python benchmarks/torch_reference.py --steps 50 --warmup 5
    python -m lm.bench --config configs/shakespeare_cpu.yaml --steps 50 --warmup 5

`--whole_run` trains `--steps` steps on the packaged tinyshakespeare or `--text_file` (90/10
split, random windows; the learning rate decays over those steps), with nanoGPT's schedule of
validation (`--eval_every`, `--eval_batches` batches) and checkpoints (`--checkpoint_every`,
model and optimizer tensors as safetensors), printing the loss like train.py; its wall time is
the whole process, imports included (benchmarks/vs_torch.py --whole_run times it against
train.py). Options set the shape (--n_layers, --d_model, --batch_size, --seq_len, ...), the
schedule (--lr, --lr_warmup) and `--seed` (weights, dropout and batches); --compile uses torch.compile.

On a GPU, nanoGPT's way (benchmarks/gpu.sh runs it beside lm at GPT-2 124M's shape):

    python benchmarks/torch_reference.py --device cuda --bf16 --compile --fused_adamw --bias \
        --n_layers 12 --d_model 768 --n_heads 12 --vocab_size 50304 --seq_len 1024 --batch_size 32

--bias gives the Linear and LayerNorm layers biases (GPT-2's); --bf16 runs forward and loss under
bf16 autocast (float32 weights, as lm's model.param_dtype); --fused_adamw uses AdamW's fused CUDA kernel.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float, attention_dropout: float = 0.0,
                 bias: bool = False):
        super().__init__()
        self.n_heads, self.attention_dropout = n_heads, attention_dropout
        self.drop = nn.Dropout(dropout)
        self.attn_norm = nn.LayerNorm(d_model, bias=bias)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.out = nn.Linear(d_model, d_model, bias=bias)
        self.mlp_norm = nn.LayerNorm(d_model, bias=bias)
        self.up = nn.Linear(d_model, 4 * d_model, bias=bias)
        self.down = nn.Linear(4 * d_model, d_model, bias=bias)

    def forward(self, x_BxTxD):
        B, T, D = x_BxTxD.shape
        q, k, v = self.qkv(self.attn_norm(x_BxTxD)).split(D, dim=-1)
        q, k, v = (t.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))
        attn_BxNxTxH = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                      dropout_p=self.attention_dropout if self.training else 0.0)
        x_BxTxD = x_BxTxD + self.drop(self.out(attn_BxNxTxH.transpose(1, 2).reshape(B, T, D)))
        return x_BxTxD + self.drop(self.down(F.gelu(self.up(self.mlp_norm(x_BxTxD)), approximate="tanh")))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, n_layers: int, d_model: int, n_heads: int, max_seq_len: int,
                 dropout: float, attention_dropout: float = 0.0, bias: bool = False):
        super().__init__()
        self.token_embed = nn.Embedding(vocab_size, d_model)
        self.pos_embed = nn.Embedding(max_seq_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, dropout, attention_dropout, bias)
                                    for _ in range(n_layers))
        self.final_norm = nn.LayerNorm(d_model, bias=bias)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                residual = name.endswith(("out.weight", "down.weight"))
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layers) if residual else 0.02)

    def forward(self, tokens_BxT):
        positions_T = torch.arange(tokens_BxT.shape[1], device=tokens_BxT.device)
        x_BxTxD = self.drop(self.token_embed(tokens_BxT) + self.pos_embed(positions_T))
        for block in self.blocks:
            x_BxTxD = block(x_BxTxD)
        return self.final_norm(x_BxTxD) @ self.token_embed.weight.T  # tied head


PACKAGED_TEXT = pathlib.Path(__file__).resolve().parents[1] / "lm" / "data" / "corpora" / "tinyshakespeare.txt"


def byte_splits(path: pathlib.Path) -> tuple[torch.Tensor, torch.Tensor]:
    """lm's byte tokenizer (byte b = id b + 3) and its 90/10 split by characters."""
    text = path.read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    return tuple(torch.from_numpy(np.frombuffer(part.encode("utf-8"), np.uint8).astype(np.int64) + 3)
                 for part in (text[:cut], text[cut:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("n_layers", 4), ("d_model", 128), ("n_heads", 4), ("batch_size", 12),
                          ("seq_len", 64), ("vocab_size", 259), ("steps", 50), ("warmup", 5), ("threads", 0),
                          ("grad_accum", 1), ("eval_every", 250), ("eval_batches", 20), ("checkpoint_every", 250),
                          ("log_every", 50), ("seed", 1337), ("lr_warmup", 100)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--attention_dropout", type=float, default=0.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--text_file", type=pathlib.Path, default=PACKAGED_TEXT, help="--whole_run: the text")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--bf16", action="store_true", help="forward and loss under bf16 autocast")
    parser.add_argument("--fused_adamw", action="store_true", help="AdamW's fused CUDA kernel")
    parser.add_argument("--bias", action="store_true", help="biases in the Linear and LayerNorm layers (GPT-2)")
    parser.add_argument("--whole_run", action="store_true", help="a whole training run with validation and "
                        "checkpoints on the packaged tinyshakespeare")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as nanoGPT
    model = GPT(args.vocab_size, args.n_layers, args.d_model, args.n_heads, args.seq_len, args.dropout,
                args.attention_dropout, args.bias).to(args.device)
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.99), eps=1e-8, fused=args.fused_adamw or None)
    total, warm = (args.steps if args.whole_run else max(args.steps, 2000)), args.lr_warmup
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / max(warm, 1), 0.1 + 0.45 * (
        1 + math.cos(math.pi * min(max(s - warm, 0) / (total - warm), 1.0)))))
    forward = torch.compile(model) if args.compile else model
    rng = np.random.default_rng(args.seed)
    if args.whole_run:
        data, val = byte_splits(args.text_file)
    else:
        data = torch.from_numpy(rng.integers(3, args.vocab_size, 1 << 20).astype(np.int64))

    def windows_of(tokens):
        starts = torch.from_numpy(rng.integers(0, len(tokens) - args.seq_len - 1, args.batch_size))
        return tokens[starts[:, None] + torch.arange(args.seq_len + 1)].to(args.device)

    autocast = torch.autocast(torch.device(args.device).type, torch.bfloat16, enabled=args.bf16)

    def step():
        windows = windows_of(data)
        opt.zero_grad(set_to_none=True)
        for micro in windows.chunk(args.grad_accum):  # the mean gradient over the whole batch
            with autocast:
                logits = forward(micro[:, :-1])
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), micro[:, 1:].reshape(-1))
            (loss / args.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        return loss.item()

    if args.whole_run:
        whole_run(args, model, forward, opt, step, lambda: windows_of(val))
        return
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        step()  # loss.item() waits for the device
        times.append(time.perf_counter() - start)
    times, first = times[args.warmup:], times[0]
    median = float(np.median(times))
    cuda = torch.device(args.device).type == "cuda"
    print(json.dumps({"framework": f"torch {torch.__version__}", "threads": torch.get_num_threads(),
                      "device": torch.cuda.get_device_name() if cuda else "cpu",
                      "compile": args.compile, "bf16": args.bf16, "fused_adamw": args.fused_adamw, "bias": args.bias,
                      "grad_accum": args.grad_accum, "tokens_per_sec": args.batch_size * args.seq_len / median,
                      "step_sec_median": median, "step_sec_p10": float(np.percentile(times, 10)),
                      "step_sec_p90": float(np.percentile(times, 90)), "steps": args.steps,
                      "first_step_sec": first, "flops_per_token": flops_per_token(model, args),
                      "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None}))


def flops_per_token(model: GPT, args) -> int:
    """lm's count (lm.observe.flops): 6 x matmul weights (the tied head once) + 6 x layers x seq_len x d_model."""
    matmul = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and "embed" not in name)
    return 6 * (matmul + args.vocab_size * args.d_model) + 6 * args.n_layers * args.seq_len * args.d_model


def whole_run(args, model, forward, opt, step, val_windows) -> None:
    """`args.steps` steps with validation and safetensors checkpoints on schedule, as train.py runs them."""
    from safetensors.torch import save_file

    run_dir = pathlib.Path(tempfile.mkdtemp(prefix="torch_run_"))
    for done in range(1, args.steps + 1):
        loss = step()
        if (args.log_every and done % args.log_every == 0) or done == args.steps:  # 0: the last only
            print(f"step {done:>6}/{args.steps} | loss {loss:.4f}", flush=True)
        if args.eval_every and (done % args.eval_every == 0 or done == args.steps):  # 0: none
            model.eval()
            with torch.no_grad():
                losses = [F.cross_entropy(forward(w[:, :-1]).flatten(0, 1), w[:, 1:].flatten()).item()
                          for w in (val_windows() for _ in range(args.eval_batches))]
            model.train()
            print(f"step {done:>6}/{args.steps} | val_loss {sum(losses) / len(losses):.4f}", flush=True)
        if (args.checkpoint_every and done % args.checkpoint_every == 0) or done == args.steps:
            tensors = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
            moments = {f"opt.{i}.{name}": t for i, state in enumerate(opt.state.values())
                       for name, t in state.items() if torch.is_tensor(t) and t.dim() > 0}
            save_file({**tensors, **moments}, str(run_dir / f"step_{done}.safetensors"))


if __name__ == "__main__":
    main()
