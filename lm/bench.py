"""python -m lm.bench ...: the same command as `lm bench` (the code is lm/tools/bench.py)."""

import sys

if __name__ == "__main__":
    from lm.cli import main

    main(["bench", *sys.argv[1:]])
