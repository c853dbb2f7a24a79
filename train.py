"""Train a Transformer LM: python train.py --config configs/tiny.yaml [key=value ...] (the same as `lm train`)."""

import sys

from lm.cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
