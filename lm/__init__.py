"""lm: readable, scalable, trustworthy pretraining of decoder-only language models."""

__version__ = "0.1.0"
