"""Command lines of train.py and eval.py (also installed as `lm-train` and `lm-eval`)."""

from __future__ import annotations

import argparse
import json
import sys


def _run(main, debug: bool) -> None:
    """Runs `main`, turning user errors into one line on stderr and exit code 2."""
    from absl import logging as absl_logging

    from lm.errors import LMError

    absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax's informational chatter
    try:
        main()
    except LMError as e:
        if debug:
            raise
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # always one line
        sys.exit(2)


def train_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train (or resume) a Transformer LM.",
                                     epilog="Example: python train.py --config configs/tiny.yaml train.steps=50")
    parser.add_argument("--config", help="YAML experiment file, e.g. configs/shakespeare_cpu.yaml")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. model.d_model=256")
    args = parser.parse_args(argv)

    def main():
        from lm.config import load_config

        cfg = load_config(args.config, args.overrides)  # config mistakes surface before JAX is imported
        from lm.trainer import train

        train(cfg)

    _run(main, args.debug)


def eval_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Perplexity and bits-per-byte of a trained run.")
    parser.add_argument("--run_dir", required=True, help="directory train.py wrote")
    parser.add_argument("--step", type=int, help="checkpoint step (default: newest)")
    parser.add_argument("--text_file", help="score this UTF-8 file instead of the validation split")
    parser.add_argument("--stride", type=int, help="sliding-window stride (default: seq_len, no overlap)")
    parser.add_argument("--split", help="data.source=tfds: the split to score (default: data.eval_split)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    args = parser.parse_args(argv)

    def main():
        from lm.evaluate import evaluate

        result = evaluate(args.run_dir, args.step, args.text_file, args.stride, args.split)
        if args.json:
            print(json.dumps(result))
        else:
            print(f"step {result['step']}: loss {result['loss']:.4f} | perplexity {result['perplexity']:.3f} | "
                  f"bits/byte {result['bits_per_byte']:.4f} | {result['tokens']:,} tokens")

    _run(main, args.debug)
