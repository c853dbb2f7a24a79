"""`lm generate`: text from a run, streamed as it is decoded, Ctrl-C ending it at the next device
call with the text so far (exit 130); `--json` prints each sample as it stops; `--bench` times
decoding with and without the KV cache."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import threading
from typing import Iterator

from lm import jsonsafe
from lm.cli.commands import checkpoint_step


def generate_command(args) -> None:
    from lm.model.decode import Sampling
    from lm.tools.generate import Generation, check_counts, read_prompts
    from lm.training.restore import restore_run

    check_counts(args.max_new_tokens, args.num_samples, args.batch_size)
    prompts = read_prompts(args.prompt, args.prompt_file, args.prompts)
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    sampling.check()
    run = restore_run(args.run_dir, checkpoint_step(args), batch_size=1)
    if args.bench:
        _generate_bench(args, run, prompts)
        return
    gen = Generation(run, prompts, args.max_new_tokens, sampling, args.seed, args.num_samples, args.ignore_eos,
                     args.batch_size)
    if gen.long_prompts:
        print(f"note: {gen.long_prompts} prompt(s) longer than the {run.cfg.model.max_seq_len}-token context: "
              "the model sees the end of each", file=sys.stderr)
    live = len(gen.samples) == 1 and not args.json  # one sample: its text appears as it is generated
    if live:
        _write(prompts[0])
    shown = 0
    with ctrl_c() as pressed:
        for texts in gen:
            if live:
                _write("".join(text for _, text in texts))
            else:
                shown = _show_samples(gen, shown, len(prompts), args)
            if pressed.is_set():
                break
    if pressed.is_set():
        texts = gen.interrupt()
        if live:
            _write("".join(text for _, text in texts) + "\n")
        else:
            _show_samples(gen, shown, len(prompts), args)
        print(f"interrupted after {sum(len(s.tokens) for s in gen.samples)} new tokens", file=sys.stderr)
        sys.exit(130)
    if live:
        _write("\n")


@contextlib.contextmanager
def ctrl_c() -> Iterator[threading.Event]:
    """Within: the first Ctrl-C sets the event, for the caller to stop at its next device call (a
    KeyboardInterrupt could land in a callback that ignores it); a second one stops at once."""
    pressed = threading.Event()

    def handle(signum, frame) -> None:
        if pressed.is_set():
            os.write(2, b"interrupted again: stopped at once\n")  # os.write: safe inside a signal handler
            os._exit(130)
        pressed.set()

    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, previous)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _show_samples(gen, shown: int, n_prompts: int, args) -> int:
    """Prints the samples from `shown` on that have stopped, in order; returns how many are shown now."""
    while shown < len(gen.samples) and gen.samples[shown].stop_reason is not None:
        s = gen.samples[shown]
        if args.json:
            print(jsonsafe.dumps(dataclasses.asdict(s)), flush=True)
        else:
            where = [f"prompt {shown // args.num_samples + 1}/{n_prompts}"] if n_prompts > 1 else []
            where += [f"sample {s.sample + 1}/{args.num_samples} (seed {s.seed})"] if args.num_samples > 1 else []
            header = f"--- {', '.join(where)} ---\n" if where else ""
            print(header + s.prompt + s.text, flush=True)
        shown += 1
    return shown


def _generate_bench(args, run, prompts: list[str]) -> None:
    import jax

    from lm.tools.generate import benchmark, encode_prompt

    ids = [encode_prompt(run.tokenizer, run.cfg.model.vocab_size, p, run.cfg.data.packed)
           for p in prompts][:args.batch_size]
    ids = ids if len(ids) > 1 else ids * args.batch_size  # one prompt: a batch of copies
    rows = benchmark(run.params, run.cfg.model, ids, args.max_new_tokens)
    device = jax.devices()[0]
    if args.json:
        print(jsonsafe.dumps({"max_new_tokens": args.max_new_tokens, "prompt_tokens": [len(i) for i in ids],
                              "platform": device.platform, "device_kind": device.device_kind, "rows": rows}))
        return
    lengths = sorted({len(i) for i in ids})
    span = f"{lengths[0]}" if len(lengths) == 1 else f"{lengths[0]}-{lengths[-1]}"
    kind = "" if device.device_kind == device.platform else f" ({device.device_kind})"
    print(f"greedy decoding of {args.max_new_tokens} new tokens after {span}-token prompts on {device.platform}"
          f"{kind}; new tokens/s of the whole batch:")
    for r in rows:
        print(f"  batch {r['batch']:>3}: {r['with_cache']:,.1f} tok/s with the KV cache | "
              f"{r['without_cache']:,.1f} without ({r['with_cache'] / r['without_cache']:.1f}x)")

