"""python -m lm COMMAND ...: the `lm` command line (lm/cli.py)."""

from lm.cli import main

main()
