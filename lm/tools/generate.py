"""Text from a run: a prompt in, its continuation out (`lm generate`), and decoding speed.

The decoding itself (KV cache, sampling) is lm.model.decode; this module restores a run,
encodes and decodes text, and times it.
"""

from __future__ import annotations

import time

import numpy as np

from lm.config import ModelConfig
from lm.model.decode import Sampling, fit_prompt, generate
from lm.training.restore import RestoredRun, restore_run


def continue_text(run: RestoredRun, prompt: str, max_new_tokens: int = 200, sampling: Sampling = Sampling(),
                  seed: int = 0) -> tuple[str, bool]:
    """(the prompt's continuation by `run`, whether the prompt was cut to fit the context)."""
    sampling.check()
    ids = run.tokenizer.encode(prompt)
    cut = len(fit_prompt(ids, run.cfg.model.max_seq_len, max_new_tokens)) < len(ids)
    new = generate(run.params, run.cfg.model, ids, max_new_tokens, sampling, seed)
    return run.tokenizer.decode(new[0]), cut


def generate_text(run_dir: str, prompt: str, max_new_tokens: int = 200, sampling: Sampling = Sampling(),
                  seed: int = 0, step: int | None = None) -> str:
    """The prompt's continuation by the run's checkpoint at `step` (default newest); also `lm.generate`."""
    return continue_text(restore_run(run_dir, step, batch_size=1), prompt, max_new_tokens, sampling, seed)[0]


def benchmark(params, cfg: ModelConfig, prompt_ids, max_new_tokens: int, repeats: int = 3) -> dict[str, float]:
    """Greedy tokens generated per second (after one compile run), with and without the KV cache."""
    result = {}
    greedy = Sampling(temperature=0.0)
    for name, use_cache in (("with_cache", True), ("without_cache", False)):
        generate(params, cfg, prompt_ids, max_new_tokens, greedy, use_cache=use_cache)  # compile
        start = time.perf_counter()
        for _ in range(repeats):
            generate(params, cfg, np.asarray(prompt_ids), max_new_tokens, greedy, use_cache=use_cache)
        result[name] = repeats * max_new_tokens / (time.perf_counter() - start)
    return result
