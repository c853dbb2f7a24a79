"""What each `lm` command does with its parsed flags, and what it prints (lm.cli parses them;
`lm generate` is lm.cli.generate). Library code is imported inside each command, so a mistake in
the flags or the config surfaces before JAX is imported."""

from __future__ import annotations

import signal
import sys

from lm import jsonsafe


def checkpoint_step(args) -> int | None:
    """args.step with 'best' resolved, saying on stderr which step and validation loss that is."""
    if args.step != "best":
        return args.step
    from lm.training.restore import best_checkpoint

    step, val_loss = best_checkpoint(args.run_dir)
    print(f"best checkpoint: step {step} (val_loss {val_loss:.4f})", file=sys.stderr, flush=True)
    return step


def loaded_config(args):
    from lm.config import load_config

    return load_config(args.config, args.overrides)  # config mistakes surface before JAX is imported


def train_command(args) -> None:
    # Until the trainer catches it (lm.training.guards), Ctrl-C ends the process as the signal does, with
    # nothing written: a KeyboardInterrupt raised among JAX's imports can land in a callback that ignores it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    cfg = loaded_config(args)
    if args.config and not any(o.partition("=")[0].strip() == "run_dir" for o in args.overrides):
        from lm.rundir import check_own_config

        check_own_config(args.config, cfg)
    from lm.training.loop import train

    train(cfg)


def evaluate_command(args) -> None:
    from lm.tools.evaluate import evaluate

    result = evaluate(args.run_dir, checkpoint_step(args), args.text_file, args.stride, args.split)
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


def hf_import_command(args) -> None:
    from lm.hf import import_run

    from lm.rundir import read_config

    out = import_run(args.hf_dir, args.run_dir, args.overrides, args.tokenizer)
    data = read_config(out).data
    text = "" if data.text_file or data.packed else " --text_file FILE"  # the run names no text of its own
    print(f"imported {args.hf_dir} into {out}; evaluate with python eval.py --run_dir {out}{text}")


def hf_export_command(args) -> None:
    from lm.hf import export_run

    out = export_run(args.run_dir, args.hf_dir, checkpoint_step(args))
    print(f"exported {args.run_dir} to {out} ({', '.join(sorted(p.name for p in out.iterdir()))})")


def bench_command(args) -> None:
    from lm.tools.bench import bench, format_table

    result = bench(loaded_config(args), args.steps, args.warmup, args.max_seconds)
    print(jsonsafe.dumps(result) if args.json else format_table(result), flush=True)


def aot_command(args) -> None:
    from lm.errors import LMError
    from lm.tools import accelerators

    accelerators.quiet()  # before JAX is imported
    from lm.tools.aot import analyse, format_report
    from lm.tools.fit import fit, format_fit

    if not args.fit:
        report = analyse(loaded_config(args), args.topology)
        print(jsonsafe.dumps(report) if args.json else format_report(report), flush=True)
    else:
        report = fit(loaded_config(args), args.topology)
        if not (args.json or report["fits"]):
            raise LMError(format_fit(report))
        print(jsonsafe.dumps(report) if args.json else format_fit(report), flush=True)
    if not report["fits"]:
        sys.exit(1)


def plot_command(args) -> None:
    from lm.tools.plot import plot_runs

    print(plot_runs(args.run_dirs, args.output))


def data_list_command(args) -> None:
    from lm.data import packaged

    for name, corpus in packaged.CORPORA.items():
        print(f"{packaged.SCHEME}{name}: {corpus.description}; {corpus.size:,} bytes, sha256 {corpus.sha256[:16]}...; "
              f"{corpus.source}")


def data_prepare_command(args) -> None:
    from lm.data.corpus import data_dir, open_split, prepare
    from lm.data.mixture import naming, source_configs

    cfg = loaded_config(args)
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


def data_bench_command(args) -> None:
    from lm.tools.bench import data_bench

    r = data_bench(loaded_config(args), args.batches)
    mixture = f"mixture of {', '.join(r['sources'])}, " if r["sources"] else ""
    print(f"pipeline: {r['pipeline_tokens_per_sec']:,.0f} tokens/s ({mixture}{r['batches']} batches, data.workers="
          f"{r['workers']}) | train step: {r['step_tokens_per_sec']:,.0f} tokens/s on {r['n_devices']} "
          f"{r['platform']} device(s)")


def info_command(args) -> None:
    from lm.tools.info import format_info, info

    report = info()
    print(jsonsafe.dumps(report) if args.json else format_info(report))

