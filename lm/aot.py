"""python -m lm.aot ...: the same command as `lm aot` (the code is lm/tools/aot.py)."""

import sys

if __name__ == "__main__":
    from lm.cli import main

    main(["aot", *sys.argv[1:]])
