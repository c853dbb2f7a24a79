"""Text from a run: prompts in, continuations out (`lm generate`), streamed, batched, and timed.

The decoding itself (windows past the context, KV cache, sampling, end ids) is lm.model.decode.
This module reads and encodes prompts, runs prompts x samples in batches, decodes the new ids
incrementally (so text can be shown as it is generated) and times decoding. Nothing here prints.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Iterator, Sequence

import numpy as np

from lm.config import ModelConfig
from lm.data.text import read_utf8
from lm.data.tokenizers import BOS_ID, Tokenizer
from lm.errors import LMError
from lm.model import decode
from lm.model.decode import Sampling
from lm.training.restore import RestoredRun, restore_run


def read_prompts(prompt: str | None = None, prompt_file: str | None = None,
                 prompts_file: str | None = None) -> list[str]:
    """The prompts of `--prompt TEXT`, `--prompt_file F` (the whole file) or `--prompts F` (one per line)."""
    if prompt is not None:
        return [prompt]
    if prompt_file is not None:
        return [read_utf8(pathlib.Path(prompt_file).expanduser(), f"--prompt_file '{prompt_file}'")]
    lines = read_utf8(pathlib.Path(prompts_file).expanduser(), f"--prompts '{prompts_file}'").splitlines()
    return [line for line in lines if line.strip()]  # blank lines are no prompts


def check_counts(max_new_tokens: int, num_samples: int = 1, batch_size: int = 1) -> None:
    for name, value in (("max_new_tokens", max_new_tokens), ("num_samples", num_samples),
                        ("batch_size", batch_size)):
        if value < 1:
            raise LMError(f"--{name}={value} must be at least 1; raise it.")


def encode_prompt(tokenizer: Tokenizer, vocab_size: int, prompt: str, packed: bool = False) -> np.ndarray:
    """The prompt's ids, or an LMError when it is not text or encodes outside the model's vocabulary.

    A run trained on packed documents (`packed`) saw BOS at the start of every document
    (lm.data.pipeline), so its prompts get BOS first too. An empty prompt samples unconditionally:
    from BOS, or where the tokenizer has none, from its end-of-text id (GPT-2's <|endoftext|>).
    """
    shown = repr(prompt if len(prompt) <= 40 else prompt[:37] + "...")
    try:
        ids = np.asarray(tokenizer.encode(prompt), np.int64)
    except UnicodeError:
        raise LMError(f"the prompt {shown} is not valid UTF-8 text; pass the prompt as UTF-8.") from None
    if packed:
        start = [BOS_ID]
    else:
        start = [tokenizer.bos_id] if tokenizer.bos_id is not None else list(tokenizer.eos_ids[:1])
    if packed or len(ids) == 0:
        ids = np.concatenate([np.asarray(start, np.int64), ids])
    if len(ids) == 0:
        raise LMError(f"the prompt {shown} encodes to no tokens, and the tokenizer has no BOS or end-of-text id to "
                      "start from; pass a non-empty prompt.")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise LMError(f"the prompt {shown} encodes to id {int(ids.max())}, outside the model's vocabulary of "
                      f"{vocab_size}; the run's tokenizer does not match its model.")
    return ids.astype(np.int32)


class TextStream:
    """Turns ids arriving a few at a time into text pieces that join to tokenizer.decode(all the ids).

    A piece is held back while the text ends in an incomplete character (U+FFFD, e.g. half of
    a UTF-8 byte sequence); each decode starts at the previous piece's ids, so tokenizers that
    drop a leading space at the start of a decode still join correctly.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._start = 0  # decodes start here: the ids of the last piece given out ...
        self._given = 0  # ... up to here

    def push(self, ids) -> str:
        """The text the new `ids` complete ('' while it is held back)."""
        self.ids.extend(int(i) for i in ids)
        return self._piece(final=False)

    def finish(self) -> str:
        """Whatever is still held back."""
        return self._piece(final=True)

    def _piece(self, final: bool) -> str:
        before = self.tokenizer.decode(self.ids[self._start:self._given])
        after = self.tokenizer.decode(self.ids[self._start:])
        if not final and (len(after) <= len(before) or after.endswith("\ufffd")):
            return ""
        self._start, self._given = self._given, len(self.ids)
        return after[len(before):]


@dataclasses.dataclass
class Sample:
    """One continuation (what `lm generate --json` prints, one object per sample)."""

    prompt: str
    sample: int  # which of the prompt's samples, from 0
    seed: int
    text: str = ""  # the continuation: tokenizer.decode(tokens)
    tokens: list[int] = dataclasses.field(default_factory=list)  # the new ids (an end id not included)
    stop_reason: str | None = None  # "eos", "max_new_tokens" or "interrupted"; None while it runs


class Generation:
    """`num_samples` continuations of each prompt by a restored run, decoded in batches of `batch_size` rows.

    Sample k (in output order: prompts first, then their samples) draws with seed + k. Iterating runs it:
    after every device call
    it yields (sample index, new text) for the samples that got text, and `samples` fills
    in as they stop (each at its own end id unless `ignore_eos`). When the caller stops early
    (Ctrl-C), `interrupt()` ends the samples under way, drops those not started, and returns
    their held-back text.
    """

    def __init__(self, run: RestoredRun, prompts: Sequence[str], max_new_tokens: int = 200,
                 sampling: Sampling = Sampling(), seed: int = 0, num_samples: int = 1, ignore_eos: bool = False,
                 batch_size: int = 16):
        check_counts(max_new_tokens, num_samples, batch_size)
        sampling.check()
        if not prompts:
            raise LMError("there are no prompts; pass --prompt TEXT or a file with one prompt per line.")
        self.run, self.max_new_tokens, self.sampling, self.batch_size = run, max_new_tokens, sampling, batch_size
        self.eos_ids = () if ignore_eos else tuple(run.tokenizer.eos_ids)
        ids = [encode_prompt(run.tokenizer, run.cfg.model.vocab_size, p, run.cfg.data.packed) for p in prompts]
        self.long_prompts = sum(len(i) > run.cfg.model.max_seq_len for i in ids)  # the model sees their ends
        self.samples = [Sample(p, s, seed + i * num_samples + s)
                        for i, p in enumerate(prompts) for s in range(num_samples)]
        self._ids = [i for i in ids for _ in range(num_samples)]
        self._streams = [TextStream(run.tokenizer) for _ in self.samples]
        for sample, text_stream in zip(self.samples, self._streams):
            sample.tokens = text_stream.ids
        self._started = 0

    def __iter__(self) -> Iterator[list[tuple[int, str]]]:
        for first in range(0, len(self.samples), self.batch_size):
            rows = range(first, min(first + self.batch_size, len(self.samples)))
            self._started = rows.stop
            for pieces, stops in decode.stream(self.run.params, self.run.cfg.model, [self._ids[i] for i in rows],
                                               self.max_new_tokens, self.sampling,
                                               [self.samples[i].seed for i in rows], eos_ids=self.eos_ids):
                texts = []
                for i, ids, stop in zip(rows, pieces, stops):
                    if self.samples[i].stop_reason is not None:
                        continue
                    text = self._streams[i].push(ids) + (self._stop(i, stop) if stop else "")
                    if text:
                        texts.append((i, text))
                yield texts

    def run_all(self) -> list[Sample]:
        for _ in self:
            pass
        return self.samples

    def interrupt(self) -> list[tuple[int, str]]:
        """Ends the samples under way ("interrupted") and drops those not started; returns their last text."""
        self.samples = self.samples[:self._started]
        return [(i, self._stop(i, "interrupted")) for i, s in enumerate(self.samples) if s.stop_reason is None]

    def _stop(self, i: int, reason: str) -> str:
        sample = self.samples[i]
        sample.stop_reason, sample.text = reason, self.run.tokenizer.decode(sample.tokens)
        return self._streams[i].finish()


def generate_text(run_dir: str, prompt: str, max_new_tokens: int = 200, sampling: Sampling = Sampling(),
                  seed: int = 0, step: int | str | None = None, ignore_eos: bool = False) -> str:
    """The prompt's continuation by the run's checkpoint at `step` (default newest; "best": the lowest
    validation loss kept); also `lm.generate`."""
    run = restore_run(run_dir, step, batch_size=1)
    return Generation(run, [prompt], max_new_tokens, sampling, seed, ignore_eos=ignore_eos).run_all()[0].text


def benchmark(params, cfg: ModelConfig, prompt_ids: Sequence[np.ndarray], max_new_tokens: int,
              repeats: int = 3) -> list[dict]:
    """Greedy new tokens per second (after one compile run), with and without the KV cache,
    for the first prompt alone and for all of `prompt_ids` as one batch: [{batch, with_cache, without_cache}]."""
    greedy = Sampling(temperature=0.0)
    result = []
    for batch in [[prompt_ids[0]]] + ([list(prompt_ids)] if len(prompt_ids) > 1 else []):
        rates = {"batch": len(batch)}
        for name, use_cache in (("with_cache", True), ("without_cache", False)):
            decode.generate(params, cfg, batch, max_new_tokens, greedy, use_cache=use_cache)  # compile
            start = time.perf_counter()
            for _ in range(repeats):
                decode.generate(params, cfg, batch, max_new_tokens, greedy, use_cache=use_cache)
            rates[name] = repeats * len(batch) * max_new_tokens / (time.perf_counter() - start)
        result.append(rates)
    return result
