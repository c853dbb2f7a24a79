"""The activation floor (lm.observe.memory), counted by hand for llama_1b and small variants."""

from __future__ import annotations

import dataclasses

from lm.config import ModelConfig, load_config
from lm.observe.memory import activation_floor, layer_bytes_per_token
from tests.conftest import ROOT

LLAMA = load_config(ROOT / "configs" / "llama_1b.yaml", []).model  # 22 layers, d 2048, 32/4 heads of 64, ff 5632, bf16
TOKENS = 16 * 2048  # batch 16 on one device


def test_llama_1b_without_remat_keeps_37_gb_per_16_sequences():
    # Per layer and token, bf16: two norm inputs, q, k and v, the attention output, gate, up and
    # their product; and a float32 log-sum-exp per query head.
    per_token = (2 * 2048 + (2048 + 2 * 256) + 2048 + 3 * 5632) * 2 + 32 * 4
    floor = activation_floor(dataclasses.replace(LLAMA, remat="none"), TOKENS, loss_tokens=2048)
    assert floor["layers"] == 22 * TOKENS * per_token == 37_002_149_888  # the "about 37 GiB" (GB)
    assert floor["recomputed_block"] == 0
    assert floor["loss"] == TOKENS * 2048 * 2 + 2048 * 32000 * 2  # final norm input, one slice's bf16 logits


def test_remat_policies_keep_less_and_recompute_one_block():
    full = sum(layer_bytes_per_token(LLAMA).values())
    kept = {remat: activation_floor(dataclasses.replace(LLAMA, remat=remat), TOKENS, TOKENS)
            for remat in ("none", "save_qkv_attn", "save_qkv", "block", "nothing_saveable", "dots_saveable")}
    block_input = 2048 * 2
    assert kept["block"]["layers"] == kept["nothing_saveable"]["layers"] == 22 * TOKENS * block_input
    assert kept["save_qkv"]["layers"] == 22 * TOKENS * (block_input + (2048 + 2 * 256) * 2)
    assert kept["save_qkv_attn"]["layers"] == 22 * TOKENS * (block_input + (2 * 2048 + 2 * 256) * 2 + 32 * 4)
    assert kept["dots_saveable"]["layers"] == 22 * TOKENS * (block_input + (2048 + 2 * 256 + 2 * 2048 + 2 * 5632) * 2)
    for remat, floor in kept.items():
        per_token_kept = floor["layers"] // (22 * TOKENS)
        assert floor["recomputed_block"] == (0 if remat == "none" else TOKENS * (full - per_token_kept))
    # The whole loss keeps every token's logits, as the bf16 head computes them.
    assert kept["block"]["loss"] == TOKENS * (2048 * 2 + 32000 * 2)


def test_norm_placement_qk_norm_gelu_tensor_and_dtype():
    base = ModelConfig(vocab_size=1000, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=256, dtype="bfloat16")
    per_token = sum(layer_bytes_per_token(base).values())
    assert per_token == (2 * 64 + (64 + 2 * 32) + 64 + 2 * 256) * 2 + 4 * 4  # GELU: up and its activation
    sandwich = dataclasses.replace(base, norm_placement="sandwich", qk_norm="head")
    assert sum(layer_bytes_per_token(sandwich).values()) == per_token + (2 * 64 + 64 + 32) * 2
    # Tensor parallelism splits heads, key/value heads and the feed-forward width, not d_model.
    split = layer_bytes_per_token(base, tensor=2)
    assert split["qkv"] == (32 + 2 * 16) * 2 and split["mlp"] == 2 * 128 * 2 and split["norm_inputs"] == 2 * 64 * 2
    assert sum(layer_bytes_per_token(dataclasses.replace(base, dtype="float32")).values()) == 2 * per_token - 4 * 4
