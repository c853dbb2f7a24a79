"""Generation: the KV cache reproduces the full forward pass, also past the context; sampling; end ids;
incremental decoding; the CLI (any length, samples, prompt files, JSON, Ctrl-C, --bench)."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.cli import main as cli_main
from lm.config import Config, ModelConfig, load_config
from lm.data.tokenizers import ByteTokenizer
from lm.errors import LMError
from lm.model import decode as gen
from lm.model.transformer import Transformer
from lm.tools import generate as tools
from lm.training.restore import RestoredRun
from lm.training.step import init_params

ROOT = pathlib.Path(__file__).resolve().parents[1]

# GPT-2 style, and Llama style with GQA, an untied head and scanned layers.
ARCHS = {
    "gpt2": dict(),
    "llama": dict(norm="rmsnorm", mlp="swiglu", position="rope", n_kv_heads=2, tie_embeddings=False,
                  use_bias=False, scan_layers=True),
    # Gemma 3 style: sliding window 3 (sequences of 12) on every other layer with its own RoPE base
    "windowed": dict(norm="rmsnorm_plus_one", norm_placement="sandwich", mlp="geglu", position="rope",
                     qk_norm="head", scale_embeddings=True, sliding_window=3, sliding_layers="1,0",
                     rope_local_theta=100.0, n_kv_heads=2, use_bias=False),
    # Mistral style: the window on every layer, scanned
    "windowed_scanned": dict(norm="rmsnorm", mlp="swiglu", position="rope", sliding_window=4, scan_layers=True),
}


def _model(arch: str):
    # A large init std makes the logits far from uniform, so argmax ties cannot hide a cache bug.
    cfg = ModelConfig(vocab_size=40, n_layers=2, d_model=32, n_heads=4, max_seq_len=24, init_std=0.3, **ARCHS[arch])
    return cfg, init_params(Transformer(cfg), jax.random.key(0), 8)


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_decoding_matches_full_forward(arch):
    cfg, params = _model(arch)
    tokens_BxT = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 12)))
    full_BxTxV = jax.jit(Transformer(cfg).apply)({"params": params}, tokens_BxT)

    # Prefill 5 positions, then feed the rest one token at a time through the cache.
    model = Transformer(cfg, decode=True)
    apply = jax.jit(lambda cache, tokens, positions: model.apply(
        {"params": params, "cache": cache}, tokens, positions, mutable=["cache"]))
    cache = jax.tree.map(jnp.zeros_like, jax.eval_shape(model.init, jax.random.key(1), tokens_BxT)["cache"])
    pieces = []
    for start, end in [(0, 5)] + [(t, t + 1) for t in range(5, 12)]:
        positions = jnp.broadcast_to(jnp.arange(start, end), (2, end - start))
        logits, updated = apply(cache, tokens_BxT[:, start:end], positions)
        cache = updated["cache"]
        pieces.append(logits)
    cached_BxTxV = jnp.concatenate(pieces, axis=1)
    assert float(jnp.abs(full_BxTxV).max()) > 1.0
    np.testing.assert_allclose(cached_BxTxV, full_BxTxV, atol=1e-5, rtol=0)


def test_window_start():
    # L = 24, shift 6: the whole sequence up to 24 tokens, then windows of 19..24 tokens.
    assert [gen.window_start(n, 24, 6) for n in (1, 24, 25, 30, 31, 36, 37)] == [0, 0, 6, 6, 12, 12, 18]
    assert int(gen.window_start(jnp.int32(31), 24, 6)) == 12


def _reference(params, cfg, prompt, n_new, sampling, seed):
    """Row by row, token by token: the model over each token's window (written out here), then `sample`."""
    L, shift = cfg.max_seq_len, cfg.max_seq_len // 4
    forward = jax.jit(lambda w: Transformer(cfg).apply({"params": params}, w))
    draw = jax.jit(gen.sample, static_argnums=2)
    seq = list(prompt)
    for i in range(n_new):
        n = len(seq)
        width = n if n <= L else L - shift + 1 + (n - L - 1) % shift  # 19, 20, ..., 24, 19, ...
        window = seq[n - width:] + [0] * (L - width)  # padded to one shape; causal attention ignores the pad
        logits_V = forward(jnp.asarray([window]))[0, width - 1]
        key = jax.random.fold_in(jax.random.key(seed), i)[None]
        seq.append(int(draw(logits_V[None], key, sampling)[0]))
    return np.asarray(seq[len(prompt):])


GREEDY, SAMPLED = gen.Sampling(temperature=0.0), gen.Sampling(1.0, top_k=8, top_p=0.9)


@pytest.mark.parametrize("arch,sampling,use_cache", [
    ("gpt2", GREEDY, True), ("gpt2", GREEDY, False), ("gpt2", SAMPLED, True), ("llama", SAMPLED, True)],
    ids=["gpt2-greedy", "gpt2-greedy-no_cache", "gpt2-sampled", "llama-sampled"])
def test_generation_past_the_context_matches_full_forward_passes(arch, sampling, use_cache):
    """60 new tokens with a 24-token context, prompts of 3, 7 and 30 tokens in one batch: every token is
    what a full forward pass over its window gives (greedy, and sampled with each row's seed), with the
    KV cache refilled as the window slides, and without a cache (the --bench reference)."""
    cfg, params = _model(arch)
    rng = np.random.RandomState(0)
    prompts = [rng.randint(0, cfg.vocab_size, n) for n in (3, 7, 30)]
    got = gen.generate(params, cfg, prompts, 60, sampling, seed=3, use_cache=use_cache)
    for b, (row, prompt) in enumerate(zip(got, prompts)):
        np.testing.assert_array_equal(row, _reference(params, cfg, prompt, 60, sampling, seed=3 + b))


def test_sampling_options():
    rng = jax.random.key(0)
    logits_BxV = jax.random.normal(jax.random.key(1), (64, 50)) * 3
    greedy = np.asarray(jnp.argmax(logits_BxV, -1))
    np.testing.assert_array_equal(gen.sample(logits_BxV, rng, gen.Sampling(0.0)), greedy)
    np.testing.assert_array_equal(gen.sample(logits_BxV, rng, gen.Sampling(1.0, top_k=1)), greedy)
    np.testing.assert_array_equal(gen.sample(logits_BxV, rng, gen.Sampling(1.0, top_p=1e-6)), greedy)
    free = np.asarray(gen.sample(logits_BxV, rng, gen.Sampling(1.0)))
    assert (free != greedy).any()
    top5 = np.asarray(jax.lax.top_k(logits_BxV, 5)[1])
    for seed in range(3):
        ids = np.asarray(gen.sample(logits_BxV, jax.random.key(seed), gen.Sampling(2.0, top_k=5)))
        assert all(i in row for i, row in zip(ids, top5))
    # One key per row: each row draws as it would alone.
    keys = jnp.stack([jax.random.key(s) for s in range(4)])
    rows = gen.sample(logits_BxV[:4], keys, gen.Sampling(1.0))
    alone = [int(gen.sample(logits_BxV[b:b + 1], keys[b:b + 1], gen.Sampling(1.0))[0]) for b in range(4)]
    assert rows.tolist() == alone
    with pytest.raises(LMError, match="top_p"):
        gen.Sampling(1.0, top_p=0.0).check()


def _alphabet_run(d_model: int = 264) -> RestoredRun:
    """A byte-level model that continues every byte with the next one, except that 'e' is followed by
    EOS (id 2): one-hot embeddings, blocks that add nothing, and a head holding the successor table."""
    tok = ByteTokenizer()
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layers=1, d_model=d_model, n_heads=4, max_seq_len=8,
                      norm="rmsnorm", position="rope", tie_embeddings=False)
    params = jax.tree.map(jnp.zeros_like, init_params(Transformer(cfg), jax.random.key(0), 1))
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.ones_like(x) if "scale" in jax.tree_util.keystr(path) else x, params)
    successor = np.arange(tok.vocab_size) + 1
    successor[tok.encode("e")[0]] = 2
    params["token_embed"]["embedding"] = jnp.eye(tok.vocab_size, d_model)
    head = np.zeros((d_model, tok.vocab_size), np.float32)
    head[np.arange(tok.vocab_size - 1), successor[:-1]] = 1.0
    params["head"]["kernel"] = jnp.asarray(head)
    return RestoredRun(Config(model=cfg), tok, None, params, 0)


def test_rows_stop_at_their_own_eos():
    run = _alphabet_run()
    prompts = ["abc", "pq", "Xa"]  # with an 8-token context, 12 new tokens go past the window too
    samples = tools.Generation(run, prompts, 12, gen.Sampling(temperature=0.0), batch_size=3).run_all()
    assert [(s.text, s.stop_reason) for s in samples] == [
        ("de", "eos"), ("rstuvwxyz{|}", "max_new_tokens"), ("bcde", "eos")]
    assert samples[0].tokens == list(run.tokenizer.encode("de"))
    going_on = tools.Generation(run, prompts, 12, gen.Sampling(temperature=0.0), ignore_eos=True).run_all()[0]
    assert going_on.tokens[:5] == [*run.tokenizer.encode("de"), 2, 3, 4] and going_on.text.startswith("de\x00\x01")
    # Two samples each, in two batches of three rows.
    twice = tools.Generation(run, prompts, 12, gen.Sampling(temperature=0.0), num_samples=2, batch_size=3).run_all()
    assert [s.text for s in twice] == ["de", "de", "rstuvwxyz{|}", "rstuvwxyz{|}", "bcde", "bcde"]
    assert [(s.sample, s.seed) for s in twice] == [(0, 0), (1, 1), (0, 2), (1, 3), (0, 4), (1, 5)]


def test_text_stream_joins_to_the_decoded_text(shakespeare):
    from lm.data.tokenizers import sentencepiece

    text = "Où est le café? — 東京 🙂 " * 3 + shakespeare.read_text()[:300]
    sp = sentencepiece.train([shakespeare.read_text()[:20000]], vocab_size=400, algorithm="bpe")
    rng = np.random.RandomState(0)
    for tokenizer in (ByteTokenizer(), sp):
        ids = list(tokenizer.encode(text))
        for _ in range(3):
            stream, pieces, i = tools.TextStream(tokenizer), [], 0
            while i < len(ids):
                step = rng.randint(1, 4)
                pieces.append(stream.push(ids[i:i + step]))
                i += step
            pieces.append(stream.finish())
            assert "".join(pieces) == tokenizer.decode(ids) == text
            assert not any("\ufffd" in p for p in pieces)  # half characters were held back, never shown


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from lm.training.loop import train

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"run_dir={tmp_path_factory.mktemp('gen') / 'run'}",
                                                       "train.steps=5", "eval.every=0", "checkpoint.async_save=false"])
    train(cfg)
    return cfg.run_dir


def _cli_json(capsys, *argv) -> list[dict]:
    capsys.readouterr()
    cli_main(["generate", *argv])
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.mark.slow
def test_cli_any_length_streamed_samples_prompt_files(trained, tmp_path, capsys, monkeypatch):
    run = ["--run_dir", trained]
    # 500 new tokens from a 64-token context; the streamed text is the non-streamed text.
    capsys.readouterr()
    cli_main(["generate", *run, "--prompt", "ROMEO:", "--max_new_tokens", "500", "--seed", "4", "--ignore_eos"])
    streamed = capsys.readouterr().out
    text = tools.generate_text(trained, "ROMEO:", 500, gen.Sampling(0.8), seed=4, ignore_eos=True)
    assert streamed == "ROMEO:" + text + "\n"
    [record] = _cli_json(capsys, *run, "--prompt", "ROMEO:", "--max_new_tokens", "500", "--seed", "4",
                         "--ignore_eos", "--json")
    assert len(record["tokens"]) == 500 and record["stop_reason"] == "max_new_tokens" and record["text"] == text

    # Three samples: seeds 0, 1, 2, three different texts.
    records = _cli_json(capsys, *run, "--prompt", "ROMEO:", "--max_new_tokens", "24", "--num_samples", "3", "--json")
    assert [r["seed"] for r in records] == [0, 1, 2] and len({r["text"] for r in records}) == 3

    # Four prompts from a file, one batched run; a long prompt from a file.
    calls = []
    stream = gen.stream
    monkeypatch.setattr(gen, "stream", lambda params, cfg, rows, *a, **k: calls.append(len(rows)) or
                        stream(params, cfg, rows, *a, **k))
    lines = ["ROMEO:", "JULIET:", "", "To be, or not", "Où est"]
    (tmp_path / "prompts.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    records = _cli_json(capsys, *run, "--prompts", str(tmp_path / "prompts.txt"), "--max_new_tokens", "8", "--json")
    assert calls == [4] and [r["prompt"] for r in records] == [line for line in lines if line]
    assert all(r["text"] for r in records)
    (tmp_path / "long.txt").write_text("ROMEO:\n" + "x" * 100, encoding="utf-8")
    cli_main(["generate", *run, "--prompt_file", str(tmp_path / "long.txt"), "--max_new_tokens", "8"])
    captured = capsys.readouterr()
    assert "longer than the 64-token context" in captured.err and captured.out.startswith("ROMEO:\n" + "x" * 100)

    cli_main(["generate", *run, "--prompt", "ROMEO:", "--max_new_tokens", "8", "--batch_size", "2", "--bench"])
    out = capsys.readouterr().out
    assert "batch   1:" in out and "batch   2:" in out and "tok/s with the KV cache" in out


@pytest.mark.slow
def test_a_reader_that_stops_early_ends_generation_quietly(trained):
    """`lm generate ... | head`: no BrokenPipeError traceback once the reader has gone."""
    proc = subprocess.Popen([sys.executable, "-m", "lm.generate", "--run_dir", trained, "--prompt", "ROMEO:",
                             "--max_new_tokens", "1000000", "--ignore_eos"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert os.read(proc.stdout.fileno(), 16)  # text is arriving
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and err == b"", err.decode()


@pytest.mark.slow
def test_ctrl_c_stops_with_the_text_so_far(trained):
    proc = subprocess.Popen([sys.executable, "-m", "lm.generate", "--run_dir", trained, "--prompt", "ROMEO:",
                             "--max_new_tokens", "1000000", "--ignore_eos"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    shown = b""
    while len(shown) < 100:  # text arrives through the pipe while it is generated
        chunk = os.read(proc.stdout.fileno(), 4096)
        assert chunk, proc.stderr.read().decode()
        shown += chunk
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert (shown + out).startswith(b"ROMEO:") and (shown + out).endswith(b"\n")
    assert err.decode().startswith("interrupted after ") and err.decode().count("\n") == 1
