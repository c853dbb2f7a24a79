"""Evaluate a run: python eval.py --run_dir RUN [--step N] [--text_file F] [--stride S] [--json] (`lm eval`)."""

import sys

from lm.cli import main

if __name__ == "__main__":
    main(["eval", *sys.argv[1:]])
