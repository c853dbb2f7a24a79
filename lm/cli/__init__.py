"""The `lm` command line: every subcommand's flags and one error wrapper; what each command does
and prints is in lm.cli.commands (and lm.cli.generate).

    lm train --config C [key=value ...]          lm eval --run_dir RUN [--json]
    lm generate --run_dir RUN --prompt TEXT      lm hf import|export ...
    lm bench --config C                          lm aot --config C --topology v5e:2x4
    lm plot RUN ... -o curves.png                lm data prepare|bench|list ...
    lm info

train.py, eval.py and `python -m lm.X` are the same commands. Flags are parsed only here;
the library functions they call take plain arguments. A mistake in the user's input (an
LMError) ends as one line `error: ...` on stderr and exit code 2; `--debug` shows the traceback.
Ctrl-C ends as one line and exit code 130. Commands that take a config accept its key=value
overrides anywhere among their flags.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Callable

from lm.cli import commands, generate

# JAX's persistent compilation cache, on for every command: a second run of a config skips its
# compiles. JAX_COMPILATION_CACHE_DIR moves it; JAX_ENABLE_COMPILATION_CACHE=false turns it off.
# (`lm aot` compiles for TPU and GPU topologies without it: lm.tools.accelerators.deviceless_compile.)
COMPILATION_CACHE = {"JAX_COMPILATION_CACHE_DIR": os.path.join("~", ".cache", "lm", "jax"),
                     "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.1"}
STEP_HELP = "checkpoint step, or best: the lowest validation loss kept (checkpoint.keep_best); default: newest"
OVERRIDE = re.compile(r"[A-Za-z_][\w.-]*=")  # key=value, as lm.config.parse_overrides reads it


def main(argv: list[str] | None = None) -> None:
    """Runs `lm SUBCOMMAND ...` (argv defaults to sys.argv[1:])."""
    args, extras = parser().parse_known_args(argv)
    overrides = [a for a in extras if OVERRIDE.match(a)]
    unknown = [a for a in extras if not OVERRIDE.match(a)]
    if overrides and not hasattr(args, "overrides"):
        args.parser.error(f"unrecognized arguments: {' '.join(overrides)} (this command takes no key=value "
                          "config overrides: it uses the run's config.yaml)")
    if unknown:
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if overrides:  # key=value after a flag: argparse takes only the first run of them as the positional
        args.overrides = [*args.overrides, *overrides]
    run(lambda: args.command(args), args.debug)


def run(command: Callable[[], None], debug: bool = False) -> None:
    """Runs `command` with JAX's persistent compilation cache, turning user errors into one line
    on stderr and exit code 2, and a closed stdout (`| head`) into a quiet exit."""
    from absl import logging as absl_logging

    from lm.errors import Interrupted, LMError

    absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax's informational chatter
    for name, value in COMPILATION_CACHE.items():  # read when JAX is imported
        os.environ.setdefault(name, os.path.expanduser(value))
    try:
        command()
        sys.stdout.flush()  # inside the try: a reader gone by now is a closed pipe too
    except LMError as e:
        if debug:
            raise
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # always one line
        sys.exit(2)
    except BrokenPipeError:  # `lm generate ... | head`: the reader has gone; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit must not fail
        sys.exit(1)
    except KeyboardInterrupt as e:  # Ctrl-C: lm.training.loop checkpoints first (Interrupted says so)
        if debug:
            raise
        print(" ".join(str(e).split()) if isinstance(e, Interrupted) else "interrupted", file=sys.stderr)
        sys.exit(130)


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show full tracebacks")
    top = argparse.ArgumentParser(prog="lm", description="Pretrain, evaluate and sample decoder-only LMs.")
    top.set_defaults(debug=False)
    sub = top.add_subparsers(dest="name", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable, help: str, **kwargs) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help, description=help, **kwargs)
        p.set_defaults(parser=p)
        if handler:
            p.set_defaults(command=handler)
        return p

    def config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
        p.add_argument("--config", required=required, help="YAML experiment file, e.g. configs/shakespeare_cpu.yaml")
        p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. model.d_model=256")

    p = command("train", commands.train_command, "Train (or resume) a Transformer LM.",
                epilog="Example: python train.py --config configs/tiny.yaml train.steps=50")
    config_args(p, required=False)

    p = command("eval", commands.evaluate_command, "Perplexity and bits-per-byte of a trained run.")
    p.add_argument("--run_dir", required=True, help="directory train.py wrote")
    p.add_argument("--step", type=_step, help=STEP_HELP)
    p.add_argument("--text_file", help="score this UTF-8 file instead of the validation split")
    p.add_argument("--stride", type=int, help="sliding-window stride (default: seq_len, no overlap)")
    p.add_argument("--split", help="data.source=tfds or mixture: the split to score (default: data.eval_split, "
                   "or each source's eval_split)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = command("generate", generate.generate_command, "Generate text from a run.",
                epilog="Example: python -m lm.generate --run_dir runs/shakespeare_cpu --prompt ROMEO: "
                       "--max_new_tokens 500")
    p.add_argument("--run_dir", required=True, help="directory train.py (or lm hf import) wrote")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text to continue")
    prompt.add_argument("--prompt_file", help="continue the text of this UTF-8 file (a long prompt)")
    prompt.add_argument("--prompts", help="continue each line of this UTF-8 file, decoded in batches")
    p.add_argument("--max_new_tokens", type=int, default=200, help="new tokens per sample, any number (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--top_k", type=int, default=0, help="sample among the k likeliest tokens (0: all)")
    p.add_argument("--top_p", type=float, default=1.0, help="sample within this probability mass (1: all)")
    p.add_argument("--seed", type=int, default=0, help="sample k (from 0, in output order) draws with seed + k")
    p.add_argument("--num_samples", type=int, default=1, help="samples per prompt (default 1)")
    p.add_argument("--batch_size", type=int, default=16, help="samples decoded together (default 16)")
    p.add_argument("--ignore_eos", action="store_true", help="do not stop at the tokenizer's end-of-text id")
    p.add_argument("--json", action="store_true", help="print one JSON object per sample")
    p.add_argument("--step", type=_step, help=STEP_HELP)
    p.add_argument("--bench", action="store_true",
                   help="print greedy tokens/s for one prompt and a batch, with and without the KV cache")

    hf = command("hf", None, "Hugging Face import and export.")
    hf_sub = hf.add_subparsers(dest="hf_command", required=True, metavar="import|export")
    p = hf_sub.add_parser("import", parents=[common], help="HF model directory -> run directory")
    p.set_defaults(command=commands.hf_import_command, parser=p)
    p.add_argument("hf_dir")
    p.add_argument("run_dir")
    p.add_argument("--tokenizer", help="tokenizer.json / .model to use when HF_DIR has none, or 'byte'")
    p.add_argument("overrides", nargs="*", help="config overrides for the run, e.g. train.seq_len=256")
    p = hf_sub.add_parser("export", parents=[common], help="run directory -> HF model directory")
    p.set_defaults(command=commands.hf_export_command, parser=p)
    p.add_argument("run_dir")
    p.add_argument("hf_dir")
    p.add_argument("--step", type=_step, help=STEP_HELP)

    p = command("bench", commands.bench_command, "Time the train step of a config.",
                epilog="Example: lm bench --config configs/shakespeare_cpu.yaml --json")
    config_args(p)
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling (default 2)")
    p.add_argument("--max_seconds", type=float, default=120.0,
                   help="stop timing after this many seconds of steps, once 3 are timed (default 120)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = command("aot", commands.aot_command, "Compile the train step for a TPU slice or GPU host on this machine and "
                "report memory per device beside the counted floor, FLOPs, a step-time estimate and the MFU it "
                "implies; exit code 1 when it does not fit.",
                epilog="Example: lm aot --config configs/llama_1b.yaml --topology v5e:2x4 (or h100:8)")
    config_args(p)
    p.add_argument("--topology", required=True, help="TPU: v5e:2x4 (v5e-8), v6e:2x4, v4:2x2x1 (v4-8), v5p:2x2x1; "
                   "GPU (a100, a100-40g, h100, h200): h100:8 (one host of 8), h100:2x8 (two hosts of 8)")
    p.add_argument("--fit", action="store_true", help="search train.grad_accum_steps, model.remat and the "
                   "data/fsdp split for the fitting layout with the best estimated step time; print it as "
                   "key=value overrides (--json: a list under 'overrides')")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = command("plot", commands.plot_command, "Plot loss curves and tokens/s of training runs.",
                epilog="Example: lm plot runs/a runs/b -o curves.png")
    p.add_argument("run_dirs", nargs="+", help="run directories holding metrics.jsonl")
    p.add_argument("-o", "--output", default="curves.png", help="image to write (default curves.png)")

    data = command("data", None, "Corpora: list the packaged ones, build a config's, time its pipeline.")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="list|prepare|bench")
    p = data_sub.add_parser("list", parents=[common], help="the corpora packaged with lm (data.text_file=builtin:NAME)")
    p.set_defaults(command=commands.data_list_command, parser=p)
    p = data_sub.add_parser("prepare", parents=[common], help="build the config's corpus as a TFDS dataset")
    p.set_defaults(command=commands.data_prepare_command, parser=p)
    config_args(p)
    p = data_sub.add_parser("bench", parents=[common], help="the input pipeline's tokens/s next to the train step's")
    p.set_defaults(command=commands.data_bench_command, parser=p)
    config_args(p)
    p.add_argument("--batches", type=int, default=50, help="batches to time (default 50)")

    p = command("info", commands.info_command, "Versions, backend and devices, and known version mismatches.")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return top


def _step(text: str) -> int | str:
    """--step: a step number or 'best'."""
    if text == "best":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a step number nor 'best'") from None
