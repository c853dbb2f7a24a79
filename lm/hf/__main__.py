"""python -m lm.hf import|export ...: the same command as `lm hf`."""

import sys

from lm.cli import main

main(["hf", *sys.argv[1:]])
