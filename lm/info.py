"""python -m lm.info ...: the same command as `lm info` (the code is lm/tools/info.py)."""

import sys

if __name__ == "__main__":
    from lm.cli import main

    main(["info", *sys.argv[1:]])
