"""python -m lm COMMAND ...: the `lm` command line (lm/cli/)."""

from lm.cli import main

main()
