"""python -m lm.generate ...: the same command as `lm generate` (the code is lm/tools/generate.py)."""

import sys

if __name__ == "__main__":
    from lm.cli import main

    main(["generate", *sys.argv[1:]])
