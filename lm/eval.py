"""python -m lm.eval ...: the same command as `lm eval` (and eval.py)."""

import sys

if __name__ == "__main__":
    from lm.cli import main

    main(["eval", *sys.argv[1:]])
