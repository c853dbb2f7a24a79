"""Hugging Face interop: import checkpoints of the supported families as runs, export runs back.

    lm hf import HF_DIR RUN_DIR [--tokenizer FILE|byte] [key=value ...]    (or python -m lm.hf import ...)
    lm hf export RUN_DIR HF_DIR [--step N]

In a notebook, `model, params = lm.hf.load(HF_DIR)`. families.py maps config.json onto
lm's ModelConfig, weights.py the tensors onto lm's parameter tree, convert.py does the rest.
"""

from lm.hf.convert import export_run, import_run, load, read_config, read_params

__all__ = ["export_run", "import_run", "load", "read_config", "read_params"]
