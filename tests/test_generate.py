"""Generation: the KV cache reproduces the full forward pass; sampling options; the CLI."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.cli import main as cli_main

from lm.model import decode as gen
from lm.tools.generate import generate_text
from lm.config import ModelConfig
from lm.errors import LMError
from lm.model.transformer import Transformer
from lm.training.step import init_params

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


def test_cached_generation_matches_full_forward_generation():
    """Greedy and seeded sampling with the cache equal re-running the whole window per token."""
    cfg, params = _model("gpt2")
    prompt = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 6))
    for sampling in (gen.Sampling(temperature=0.0), gen.Sampling(1.0, top_k=8, top_p=0.9)):
        cached = gen.generate(params, cfg, prompt, 10, sampling, seed=3)
        full = gen.generate(params, cfg, prompt, 10, sampling, seed=3, use_cache=False)
        np.testing.assert_array_equal(cached, full)


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
    with pytest.raises(LMError, match="top_p"):
        gen.Sampling(1.0, top_p=0.0).check()


def test_long_prompts_keep_their_end():
    ids = np.arange(30)
    np.testing.assert_array_equal(gen.fit_prompt(ids, max_seq_len=24, max_new_tokens=4), np.arange(10, 30))
    np.testing.assert_array_equal(gen.fit_prompt(ids[:5], max_seq_len=24, max_new_tokens=4), np.arange(5))
    with pytest.raises(LMError, match="max_new_tokens"):
        gen.fit_prompt(ids, max_seq_len=24, max_new_tokens=24)
    with pytest.raises(LMError, match="prompt"):
        gen.fit_prompt(ids[:0], max_seq_len=24, max_new_tokens=4)


@pytest.mark.slow
def test_cli_generates_and_benchmarks(tiny_config, capsys):
    from lm.training.loop import train

    cfg = tiny_config("train.steps=5", "eval.every=0", "checkpoint.async_save=false")
    train(cfg)
    capsys.readouterr()
    prompt = "ROMEO:\n" + "x" * 70  # longer than the 64-token context: cut to its end
    cli_main(["generate", "--run_dir", cfg.run_dir, "--prompt", prompt, "--max_new_tokens", "16", "--temperature", "0"])
    captured = capsys.readouterr()
    assert "prompt cut" in captured.err
    greedy = generate_text(cfg.run_dir, prompt, 16, gen.Sampling(temperature=0.0))
    assert captured.out == prompt + greedy + "\n" and greedy

    cli_main(["generate", "--run_dir", cfg.run_dir, "--prompt", prompt, "--max_new_tokens", "16", "--bench"])
    assert "tok/s with KV cache" in capsys.readouterr().out

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["generate", "--run_dir", cfg.run_dir, "--prompt", "ROMEO:", "--max_new_tokens", "64"])
    assert exit_info.value.code == 2 and "max_new_tokens" in capsys.readouterr().err
