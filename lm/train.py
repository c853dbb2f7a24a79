"""python -m lm.train ...: the same command as `lm train` (and train.py)."""

import sys

if __name__ == "__main__":
    from lm.cli import main

    main(["train", *sys.argv[1:]])
