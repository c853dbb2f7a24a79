"""python -m lm.data list|prepare|bench ...: the same command as `lm data`."""

import sys

from lm.cli import main

main(["data", *sys.argv[1:]])
