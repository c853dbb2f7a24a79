"""The `lm` command line: every subcommand's flags, one error wrapper, and what each prints.

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
import contextlib
import dataclasses
import os
import re
import signal
import sys
import threading
from typing import Callable, Iterator

from lm import jsonsafe

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

    p = command("train", _train, "Train (or resume) a Transformer LM.",
                epilog="Example: python train.py --config configs/tiny.yaml train.steps=50")
    config_args(p, required=False)

    p = command("eval", _eval, "Perplexity and bits-per-byte of a trained run.")
    p.add_argument("--run_dir", required=True, help="directory train.py wrote")
    p.add_argument("--step", type=_step, help=STEP_HELP)
    p.add_argument("--text_file", help="score this UTF-8 file instead of the validation split")
    p.add_argument("--stride", type=int, help="sliding-window stride (default: seq_len, no overlap)")
    p.add_argument("--split", help="data.source=tfds or mixture: the split to score (default: data.eval_split, "
                   "or each source's eval_split)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = command("generate", _generate, "Generate text from a run.",
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
    p.set_defaults(command=_hf_import, parser=p)
    p.add_argument("hf_dir")
    p.add_argument("run_dir")
    p.add_argument("--tokenizer", help="tokenizer.json / .model to use when HF_DIR has none, or 'byte'")
    p.add_argument("overrides", nargs="*", help="config overrides for the run, e.g. train.seq_len=256")
    p = hf_sub.add_parser("export", parents=[common], help="run directory -> HF model directory")
    p.set_defaults(command=_hf_export, parser=p)
    p.add_argument("run_dir")
    p.add_argument("hf_dir")
    p.add_argument("--step", type=_step, help=STEP_HELP)

    p = command("bench", _bench, "Time the train step of a config.",
                epilog="Example: lm bench --config configs/shakespeare_cpu.yaml --json")
    config_args(p)
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling (default 2)")
    p.add_argument("--max_seconds", type=float, default=120.0,
                   help="stop timing after this many seconds of steps, once 3 are timed (default 120)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = command("aot", _aot, "Compile the train step for a TPU slice or GPU host on this machine and report "
                "memory per device beside the counted floor, FLOPs, a step-time estimate and the MFU it implies; "
                "exit code 1 when it does not fit.",
                epilog="Example: lm aot --config configs/llama_1b.yaml --topology v5e:2x4 (or h100:8)")
    config_args(p)
    p.add_argument("--topology", required=True, help="TPU: v5e:2x4 (v5e-8), v6e:2x4, v4:2x2x1 (v4-8), v5p:2x2x1; "
                   "GPU (a100, a100-40g, h100, h200): h100:8 (one host of 8), h100:2x8 (two hosts of 8)")
    p.add_argument("--fit", action="store_true", help="search train.grad_accum_steps, model.remat and the "
                   "data/fsdp split for the fitting layout with the best estimated step time; print it as "
                   "key=value overrides (--json: a list under 'overrides')")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = command("plot", _plot, "Plot loss curves and tokens/s of training runs.",
                epilog="Example: lm plot runs/a runs/b -o curves.png")
    p.add_argument("run_dirs", nargs="+", help="run directories holding metrics.jsonl")
    p.add_argument("-o", "--output", default="curves.png", help="image to write (default curves.png)")

    data = command("data", None, "Corpora: list the packaged ones, build a config's, time its pipeline.")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="list|prepare|bench")
    p = data_sub.add_parser("list", parents=[common], help="the corpora packaged with lm (data.text_file=builtin:NAME)")
    p.set_defaults(command=_data_list, parser=p)
    p = data_sub.add_parser("prepare", parents=[common], help="build the config's corpus as a TFDS dataset")
    p.set_defaults(command=_data_prepare, parser=p)
    config_args(p)
    p = data_sub.add_parser("bench", parents=[common], help="the input pipeline's tokens/s next to the train step's")
    p.set_defaults(command=_data_bench, parser=p)
    config_args(p)
    p.add_argument("--batches", type=int, default=50, help="batches to time (default 50)")

    p = command("info", _info, "Versions, backend and devices, and known version mismatches.")
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


def _checkpoint_step(args) -> int | None:
    """args.step with 'best' resolved, saying on stderr which step and validation loss that is."""
    if args.step != "best":
        return args.step
    from lm.training.restore import best_checkpoint

    step, val_loss = best_checkpoint(args.run_dir)
    print(f"best checkpoint: step {step} (val_loss {val_loss:.4f})", file=sys.stderr, flush=True)
    return step


def _config(args):
    from lm.config import load_config

    return load_config(args.config, args.overrides)  # config mistakes surface before JAX is imported


def _train(args) -> None:
    # Until the trainer catches it (lm.training.guards), Ctrl-C ends the process as the signal does, with
    # nothing written: a KeyboardInterrupt raised among JAX's imports can land in a callback that ignores it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    cfg = _config(args)
    if args.config and not any(o.partition("=")[0].strip() == "run_dir" for o in args.overrides):
        from lm.rundir import check_own_config

        check_own_config(args.config, cfg)
    from lm.training.loop import train

    train(cfg)


def _eval(args) -> None:
    from lm.tools.evaluate import evaluate

    result = evaluate(args.run_dir, _checkpoint_step(args), args.text_file, args.stride, args.split)
    if args.json:
        print(jsonsafe.dumps(result))
    else:
        print(f"step {result['step']}: loss {result['loss']:.4f} | perplexity {result['perplexity']:.3f} | "
              f"bits/byte {result['bits_per_byte']:.4f} | {result['tokens']:,} tokens")
        if "sources" in result:
            print(_source_table(result["sources"]))


def _source_table(sources: dict) -> str:
    """A mixture's per-source evaluation figures, one row per source."""
    width = max(len("source"), *map(len, sources))
    lines = [f"{'source':<{width}}  {'loss':>8}  {'perplexity':>10}  {'bits/byte':>9}  {'tokens':>12}"]
    for name, r in sources.items():
        lines.append(f"{name:<{width}}  {r['loss']:>8.4f}  {r['perplexity']:>10.3f}  {r['bits_per_byte']:>9.4f}  "
                     f"{r['tokens']:>12,}")
    return "\n".join(lines)


def _generate(args) -> None:
    from lm.model.decode import Sampling
    from lm.tools.generate import Generation, check_counts, read_prompts
    from lm.training.restore import restore_run

    check_counts(args.max_new_tokens, args.num_samples, args.batch_size)
    prompts = read_prompts(args.prompt, args.prompt_file, args.prompts)
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    sampling.check()
    run = restore_run(args.run_dir, _checkpoint_step(args), batch_size=1)
    if args.bench:
        _generate_bench(args, run, prompts)
        return
    gen = Generation(run, prompts, args.max_new_tokens, sampling, args.seed, args.num_samples, args.ignore_eos,
                     args.batch_size)
    if gen.long_prompts:
        print(f"note: {gen.long_prompts} prompt(s) longer than the {run.cfg.model.max_seq_len}-token context: "
              "the model sees the end of each", file=sys.stderr)
    live = len(gen.samples) == 1 and not args.json  # one sample: its text appears as it is generated
    if live:
        _write(prompts[0])
    shown = 0
    with _ctrl_c() as pressed:
        for texts in gen:
            if live:
                _write("".join(text for _, text in texts))
            else:
                shown = _show_samples(gen, shown, len(prompts), args)
            if pressed.is_set():
                break
    if pressed.is_set():
        texts = gen.interrupt()
        if live:
            _write("".join(text for _, text in texts) + "\n")
        else:
            _show_samples(gen, shown, len(prompts), args)
        print(f"interrupted after {sum(len(s.tokens) for s in gen.samples)} new tokens", file=sys.stderr)
        sys.exit(130)
    if live:
        _write("\n")


@contextlib.contextmanager
def _ctrl_c() -> Iterator[threading.Event]:
    """Within: the first Ctrl-C sets the event, for the caller to stop at its next device call (a
    KeyboardInterrupt could land in a callback that ignores it); a second one stops at once."""
    pressed = threading.Event()

    def handle(signum, frame) -> None:
        if pressed.is_set():
            os.write(2, b"interrupted again: stopped at once\n")  # os.write: safe inside a signal handler
            os._exit(130)
        pressed.set()

    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, previous)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _show_samples(gen, shown: int, n_prompts: int, args) -> int:
    """Prints the samples from `shown` on that have stopped, in order; returns how many are shown now."""
    while shown < len(gen.samples) and gen.samples[shown].stop_reason is not None:
        s = gen.samples[shown]
        if args.json:
            print(jsonsafe.dumps(dataclasses.asdict(s)), flush=True)
        else:
            where = [f"prompt {shown // args.num_samples + 1}/{n_prompts}"] if n_prompts > 1 else []
            where += [f"sample {s.sample + 1}/{args.num_samples} (seed {s.seed})"] if args.num_samples > 1 else []
            header = f"--- {', '.join(where)} ---\n" if where else ""
            print(header + s.prompt + s.text, flush=True)
        shown += 1
    return shown


def _generate_bench(args, run, prompts: list[str]) -> None:
    import jax

    from lm.tools.generate import benchmark, encode_prompt

    ids = [encode_prompt(run.tokenizer, run.cfg.model.vocab_size, p, run.cfg.data.packed)
           for p in prompts][:args.batch_size]
    ids = ids if len(ids) > 1 else ids * args.batch_size  # one prompt: a batch of copies
    rows = benchmark(run.params, run.cfg.model, ids, args.max_new_tokens)
    device = jax.devices()[0]
    if args.json:
        print(jsonsafe.dumps({"max_new_tokens": args.max_new_tokens, "prompt_tokens": [len(i) for i in ids],
                              "platform": device.platform, "device_kind": device.device_kind, "rows": rows}))
        return
    lengths = sorted({len(i) for i in ids})
    span = f"{lengths[0]}" if len(lengths) == 1 else f"{lengths[0]}-{lengths[-1]}"
    kind = "" if device.device_kind == device.platform else f" ({device.device_kind})"
    print(f"greedy decoding of {args.max_new_tokens} new tokens after {span}-token prompts on {device.platform}"
          f"{kind}; new tokens/s of the whole batch:")
    for r in rows:
        print(f"  batch {r['batch']:>3}: {r['with_cache']:,.1f} tok/s with the KV cache | "
              f"{r['without_cache']:,.1f} without ({r['with_cache'] / r['without_cache']:.1f}x)")


def _hf_import(args) -> None:
    from lm.hf import import_run

    from lm.rundir import read_config

    out = import_run(args.hf_dir, args.run_dir, args.overrides, args.tokenizer)
    data = read_config(out).data
    text = "" if data.text_file or data.packed else " --text_file FILE"  # the run names no text of its own
    print(f"imported {args.hf_dir} into {out}; evaluate with python eval.py --run_dir {out}{text}")


def _hf_export(args) -> None:
    from lm.hf import export_run

    out = export_run(args.run_dir, args.hf_dir, _checkpoint_step(args))
    print(f"exported {args.run_dir} to {out} ({', '.join(sorted(p.name for p in out.iterdir()))})")


def _bench(args) -> None:
    from lm.tools.bench import bench, format_table

    result = bench(_config(args), args.steps, args.warmup, args.max_seconds)
    print(jsonsafe.dumps(result) if args.json else format_table(result), flush=True)


def _aot(args) -> None:
    from lm.errors import LMError
    from lm.tools import accelerators

    accelerators.quiet()  # before JAX is imported
    from lm.tools.aot import analyse, format_report
    from lm.tools.fit import fit, format_fit

    if not args.fit:
        report = analyse(_config(args), args.topology)
        print(jsonsafe.dumps(report) if args.json else format_report(report), flush=True)
    else:
        report = fit(_config(args), args.topology)
        if not (args.json or report["fits"]):
            raise LMError(format_fit(report))
        print(jsonsafe.dumps(report) if args.json else format_fit(report), flush=True)
    if not report["fits"]:
        sys.exit(1)


def _plot(args) -> None:
    from lm.tools.plot import plot_runs

    print(plot_runs(args.run_dirs, args.output))


def _data_list(args) -> None:
    from lm.data import packaged

    for name, corpus in packaged.CORPORA.items():
        print(f"{packaged.SCHEME}{name}: {corpus.description}; {corpus.size:,} bytes, sha256 {corpus.sha256[:16]}...; "
              f"{corpus.source}")


def _data_prepare(args) -> None:
    from lm.data.corpus import data_dir, open_split, prepare
    from lm.data.mixture import naming, source_configs

    cfg = _config(args)
    if cfg.data.source == "text_file":  # read as it is (a URL is fetched into data.cache_dir now)
        from lm.data.text import read_text, text_path

        chars, path = len(read_text(cfg.data)), text_path(cfg.data.text_file, cfg.data.sha256, cfg.data.cache_dir)
        print(f"nothing to build: data.source=text_file reads {path} ({chars:,} characters) as it is; "
              "data.source=tfds would make it documents.")
        return
    sources = source_configs(cfg.data) if cfg.data.source == "mixture" else {"": cfg.data}
    for name, data in sources.items():
        label = f"{name}: " if name else ""
        with naming(name):
            if not data.tfds_name:
                print(f"{label}corpus: {prepare(data)}")
            for split in (data.train_split, data.eval_split):
                print(f"{label}{data.tfds_name or 'lm_text'} [{split}]: {len(open_split(data, split)):,} documents "
                      f"in {data_dir(data)}")


def _data_bench(args) -> None:
    from lm.tools.bench import data_bench

    r = data_bench(_config(args), args.batches)
    mixture = f"mixture of {', '.join(r['sources'])}, " if r["sources"] else ""
    print(f"pipeline: {r['pipeline_tokens_per_sec']:,.0f} tokens/s ({mixture}{r['batches']} batches, data.workers="
          f"{r['workers']}) | train step: {r['step_tokens_per_sec']:,.0f} tokens/s on {r['n_devices']} "
          f"{r['platform']} device(s)")


def _info(args) -> None:
    from lm.tools.info import format_info, info

    report = info()
    print(jsonsafe.dumps(report) if args.json else format_info(report))
