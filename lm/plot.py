"""python -m lm.plot ...: the same command as `lm plot` (the code is lm/tools/plot.py)."""

import sys

if __name__ == "__main__":
    from lm.cli import main

    main(["plot", *sys.argv[1:]])
