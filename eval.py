"""Evaluate a run: python eval.py --run_dir RUN [--step N] [--text_file F] [--stride S] [--json]"""

from lm.cli import eval_main

if __name__ == "__main__":
    eval_main()
