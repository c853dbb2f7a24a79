"""python -m lm.data prepare|bench --config FILE [key=value ...]

prepare: builds the own corpus as a TFDS dataset (or checks a named one), prints its splits.
bench:   tokens/s of the input pipeline alone next to tokens/s of the train step.
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

from lm.cli import _run


def prepare(cfg) -> None:
    from lm.data.corpus import data_dir, open_split, prepare as build

    if not cfg.data.tfds_name:
        print(f"corpus: {build(cfg.data)}")
    for split in (cfg.data.train_split, cfg.data.eval_split):
        print(f"{cfg.data.tfds_name or 'lm_text'} [{split}]: {len(open_split(cfg.data, split)):,} documents "
              f"in {data_dir(cfg.data)}")


def bench(cfg, batches: int) -> None:
    import jax
    import numpy as np

    from lm.data import make_data, run_tokenizer
    from lm.runtime import build

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = run_tokenizer(cfg, pathlib.Path(tmp))
    data = make_data(cfg, tokenizer)
    data.batch(0)  # start workers, open files
    start, tokens = time.perf_counter(), 0
    for step in range(1, batches + 1):
        batch = data.batch(step)
        tokens += int(np.asarray(batch.get("weights", np.ones_like(batch["targets"]))).sum())
    pipeline_rate = tokens / (time.perf_counter() - start)

    rt = build(cfg, tokenizer)
    state = rt.init(jax.random.key(cfg.seed))
    placed = [rt.place_batch(data.batch(step)) for step in range(4)]
    state, metrics = rt.train_step(state, placed[0])  # compile
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for batch in placed[1:]:
        state, metrics = rt.train_step(state, batch)
    jax.block_until_ready(metrics)
    step_rate = 3 * cfg.train.batch_size * cfg.train.seq_len / (time.perf_counter() - start)
    print(f"pipeline: {pipeline_rate:,.0f} tokens/s ({batches} batches, data.workers={cfg.data.workers}) | "
          f"train step: {step_rate:,.0f} tokens/s on {jax.device_count()} {jax.devices()[0].platform} device(s)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lm.data", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("prepare", "bench"))
    parser.add_argument("--config", help="YAML experiment file")
    parser.add_argument("--batches", type=int, default=50, help="bench: batches to time")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_intermixed_args(argv)

    def run():
        from lm.config import load_config

        cfg = load_config(args.config, args.overrides)
        prepare(cfg) if args.command == "prepare" else bench(cfg, args.batches)

    _run(run, args.debug)


if __name__ == "__main__":
    main()
