"""Train a Transformer LM: python train.py --config configs/tiny.yaml [key=value ...]"""

from lm.cli import train_main

if __name__ == "__main__":
    train_main()
