"""lm: readable, scalable, trustworthy pretraining of decoder-only language models.

The public API, imported on first use so `import lm` stays cheap (no JAX):

    cfg = lm.load_config("configs/tiny.yaml", ["train.steps=50"])
    records = lm.train(cfg)                      # train (or resume) cfg.run_dir
    run = lm.restore_run(cfg.run_dir)            # config, tokenizer, runtime, params, step
    lm.evaluate(cfg.run_dir)                     # {"loss", "perplexity", "bits_per_byte", ...}
    lm.generate(cfg.run_dir, "ROMEO:", 100)      # text
    rt = lm.build(cfg, tokenizer)                # the compiled steps, for your own loop

The layers, from the bottom: errors, storage, config, rundir; model, data, parallel; observe; training;
tools; hf; the command line (cli). Each imports only from the layers below it.
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import sys

from lm.parallel.gpu import set_gpu_flags

__version__ = "0.1.0"


def _start_on_cpu_without_accelerators() -> None:
    """With libtpu (the `tpu` extra) or jax's CUDA plugin (the `gpu-aot` extra) installed on a
    machine with no TPU chip and no GPU, JAX's probes print errors before it falls back to the
    CPU; start on the CPU directly. A TPU VM (TPU chips on the PCI bus), a GPU host and an
    explicit JAX_PLATFORMS are left alone, and so is a JAX already imported (it has read its platforms)."""
    if os.environ.get("JAX_PLATFORMS") or "jax" in sys.modules \
            or not any(importlib.util.find_spec(name) for name in ("libtpu", "jax_plugins")):
        return
    tpu_chips = [path for path in glob.glob("/sys/bus/pci/devices/*/vendor")
                 if open(path).read().strip() == "0x1ae0"]  # Google's PCI vendor id
    gpus = [path for path in ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd") if os.path.exists(path)]
    if not tpu_chips and not gpus:
        os.environ["JAX_PLATFORMS"] = "cpu"


_start_on_cpu_without_accelerators()
set_gpu_flags()  # XLA reads XLA_FLAGS when JAX starts its backend: before any lm code runs

_API = {
    "load_config": ("lm.config", "load_config"),
    "build": ("lm.training.runtime", "build"),
    "train": ("lm.training.loop", "train"),
    "restore_run": ("lm.training.restore", "restore_run"),
    "evaluate": ("lm.tools.evaluate", "evaluate"),
    "generate": ("lm.tools.generate", "generate_text"),
    "LMError": ("lm.errors", "LMError"),
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'lm' has no attribute {name!r}")
    module, attribute = _API[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
