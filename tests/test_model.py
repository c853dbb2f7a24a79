import collections
import contextlib
import dataclasses
import io
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.config import ModelConfig
from lm.model.layers import Kernels
from lm.model.transformer import Transformer, count_params
from lm.training.step import init_params

BASE = ModelConfig(vocab_size=61, n_layers=2, d_model=32, n_heads=4, max_seq_len=16)
VARIANTS = {
    "gpt2": {},
    "llama": dict(norm="rmsnorm", mlp="swiglu", position="rope", n_kv_heads=2, use_bias=False, tie_embeddings=False),
    "mqa_sinusoidal": dict(position="sinusoidal", n_kv_heads=1),
    "layernorm_nobias_rope": dict(position="rope", use_bias=False),
    # Qwen3: explicit head width (d_head x n_heads != d_model), per-head q/k RMSNorm, q/k/v biases only
    "qwen3_style": dict(norm="rmsnorm", mlp="swiglu", position="rope", use_bias=False, qkv_bias=True, d_head=12,
                        qk_norm="head", n_kv_heads=2),
    # OLMo 2: post-norms only, q/k RMSNorm over all heads
    "olmo2_style": dict(norm="rmsnorm", mlp="swiglu", position="rope", use_bias=False, norm_placement="post",
                        qk_norm="all"),
    # Gemma 3: (1 + w) RMSNorm, sandwich norms, GeGLU, scaled embeddings and scores, local/global layers
    "gemma3_style": dict(norm="rmsnorm_plus_one", norm_placement="sandwich", mlp="geglu", position="rope",
                         use_bias=False, qk_norm="head", scale_embeddings=True, attn_scale_dim=6, sliding_window=3,
                         sliding_layers="1,0", rope_local_theta=100.0, rope_scaling="linear", rope_factor=2.0),
    # SmolLM3: RoPE on some layers; Llama 3.1 RoPE scaling
    "smollm3_style": dict(norm="rmsnorm", mlp="swiglu", position="rope", use_bias=False, rope_layers="0,1",
                          rope_scaling="llama3", rope_factor=8.0, rope_original_max_len=8),
}


def make(**kw):
    cfg = dataclasses.replace(BASE, **kw)
    model = Transformer(cfg)
    return model, init_params(model, jax.random.key(0), 8)


def tokens(b=2, t=12, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, BASE.vocab_size)


@pytest.mark.parametrize("variant", VARIANTS)
def test_shapes_and_causality(variant):
    model, params = make(**VARIANTS[variant])
    x = tokens()
    logits = model.apply({"params": params}, x)
    assert logits.shape == (2, 12, BASE.vocab_size)
    assert logits.dtype == jnp.float32
    changed = x.at[:, 7].set((x[:, 7] + 1) % BASE.vocab_size)
    logits2 = model.apply({"params": params}, changed)
    np.testing.assert_allclose(logits[:, :7], logits2[:, :7], atol=1e-6)  # the past ignores the future
    assert not np.allclose(logits[:, 7:], logits2[:, 7:])


def test_parameter_count_matches_hand_count():
    d, f, v, p, L = 32, 128, 61, 16, 2
    per_block = (2 * 2 * d) + (4 * (d * d + d)) + (d * f + f) + (f * d + d)  # 2 LayerNorms, qkvo, mlp
    expected = v * d + p * d + L * per_block + 2 * d  # tied head, final norm
    _, params = make()
    assert count_params(params) == expected


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_grouped_query_shapes(kv_heads):
    _, params = make(n_kv_heads=kv_heads)
    assert params["block_0"]["attn"]["key"]["kernel"].shape == (32, kv_heads, 8)
    assert params["block_0"]["attn"]["query"]["kernel"].shape == (32, 4, 8)


def test_untied_head_and_swiglu_have_their_own_weights():
    _, params = make(tie_embeddings=False, mlp="swiglu")
    assert params["head"]["kernel"].shape == (32, BASE.vocab_size)
    assert set(params["block_1"]["mlp"]) == {"up", "gate", "down"}


def test_dropout_is_random_only_when_training():
    model, params = make(dropout=0.5)
    x = tokens()
    a = model.apply({"params": params}, x)
    np.testing.assert_array_equal(a, model.apply({"params": params}, x))
    train = lambda seed: model.apply({"params": params}, x, deterministic=False, rngs={"dropout": jax.random.key(seed)})
    assert not np.allclose(train(1), train(2))
    assert not np.allclose(train(1), a)


def test_remat_and_scan_compute_the_same_function():
    model, params = make()
    x = tokens()
    reference = model.apply({"params": params}, x)
    remat_model = Transformer(dataclasses.replace(BASE, remat="block"))
    np.testing.assert_allclose(remat_model.apply({"params": params}, x), reference, atol=1e-5)
    scan_model = Transformer(dataclasses.replace(BASE, scan_layers=True, remat="dots_saveable"))
    stacked = {k: v for k, v in params.items() if not k.startswith("block_")}
    stacked["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), params["block_0"], params["block_1"])
    scan_params = init_params(scan_model, jax.random.key(0), 8)
    assert jax.tree.structure(scan_params) == jax.tree.structure(stacked)
    np.testing.assert_allclose(scan_model.apply({"params": stacked}, x), reference, atol=1e-5)


@pytest.mark.parametrize("remat,saved", [("save_qkv", {"query", "key", "value"}),
                                          ("save_qkv_attn", {"query", "key", "value", "attention_out"})])
def test_named_remat_policies_save_their_activations(remat, saved, capsys):
    """The backward pass keeps exactly the named activations (also through the CPU's custom-VJP
    Dense, which these policies keep), and gradients do not change."""
    from jax.ad_checkpoint import print_saved_residuals

    from lm.training.runtime import platform_kernels

    model, params = make(**VARIANTS["llama"])
    cfg = dataclasses.replace(model.cfg, remat=remat)
    remat_model = Transformer(cfg, kernels=platform_kernels(cfg, "cpu"))
    assert remat_model.kernels.dot_general is not None
    x = tokens()
    loss = lambda m: lambda p: m.apply({"params": p}, x).astype(jnp.float32).std()  # noqa: E731
    print_saved_residuals(loss(remat_model), params)
    names = re.findall(r"named '(\w+)'", capsys.readouterr().out)
    assert set(names) == saved and len(names) == len(saved) * BASE.n_layers
    grads = [jax.jit(jax.grad(loss(m)))(params) for m in (model, remat_model)]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), *grads)


def _block_residuals(cfg: ModelConfig, kernels: Kernels) -> collections.Counter:
    """What one block keeps for the backward pass: the residuals of 2 layers less those of 1 (parameters aside)."""
    from jax.ad_checkpoint import print_saved_residuals

    kept = []
    for n_layers in (2, 1):
        layers_cfg = dataclasses.replace(cfg, n_layers=n_layers)
        params = init_params(Transformer(layers_cfg), jax.random.key(0), 8)
        model = Transformer(layers_cfg, kernels=kernels)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            print_saved_residuals(lambda p: model.apply({"params": p}, tokens(2, 16)).astype(jnp.float32).std(), params)
        kept.append(collections.Counter(re.sub(r" from (/|a constant).*", "", line) for line in out.getvalue().splitlines()
                                        if "from the argument" not in line and "from a constant" not in line))
    return kept[0] - kept[1]


@pytest.mark.parametrize("variant,norms", [("llama", 2), ("gemma3_style", 6)])  # sandwich norms and q/k norms: 4 + 2
def test_without_remat_a_fused_attention_keeps_only_the_floor(variant, norms):
    """model.remat=none with cuDNN's attention (traced here, not run) keeps per block every norm's
    input, q, k, v, the kernel's output and statistics, and the feed-forward's gate, up and product,
    in bf16: no float32 copies, nothing twice (lm.observe.memory counts the same)."""
    cfg = dataclasses.replace(BASE, **VARIANTS[variant], dtype="bfloat16", max_seq_len=16)
    kept = _block_residuals(cfg, Kernels(attention="cudnn"))
    norm_shapes = {"llama": ["bf16[2,16,32]"] * 2, "gemma3_style": ["bf16[2,16,32]"] * 4 + ["bf16[2,16,4,8]"] * 2}
    expected = collections.Counter(f"{shape} named 'norm_input'" for shape in norm_shapes[variant])
    k = cfg.kv_heads * cfg.head_dim
    expected.update(["bf16[2,16,32] named 'query'", f"bf16[2,16,{k}] named 'key'", f"bf16[2,16,{k}] named 'value'",
                     "bf16[2,16,4,8] output of dot_product_attention_fwd_wrapper",
                     "f32[2,4,16] output of dot_product_attention_fwd_wrapper"]
                    + [f"bf16[2,16,128] named '{name}'" for name in ("mlp_gate", "mlp_up", "mlp_hidden")])
    assert sum(expected.values()) == norms + 8 and kept == expected
    if variant == "llama":  # XLA's attention keeps its probabilities, which no policy names: left as it was
        assert any("f32" in residual for residual in _block_residuals(cfg, Kernels(attention="xla")))


def test_segments_do_not_attend_across_documents():
    model, params = make(position="rope")
    x = tokens(1, 12)
    segments = jnp.array([[1] * 5 + [2] * 7])
    positions = jnp.array([list(range(5)) + list(range(7))])
    out = model.apply({"params": params}, x, positions, segments)
    other_first_doc = x.at[:, :5].set((x[:, :5] + 3) % BASE.vocab_size)
    out2 = model.apply({"params": params}, other_first_doc, positions, segments)
    np.testing.assert_allclose(out[:, 5:], out2[:, 5:], atol=1e-5)
    alone = model.apply({"params": params}, x[:, 5:])  # the second document on its own
    np.testing.assert_allclose(out[:, 5:], alone, atol=1e-5)


@pytest.mark.parametrize("variant", ["llama", "gemma3_style", "olmo2_style"])
def test_logical_axis_names_cover_every_parameter(variant):
    model = Transformer(dataclasses.replace(BASE, **VARIANTS[variant]))
    abstract = jax.eval_shape(lambda r: model.init({"params": r}, jnp.zeros((1, 8), jnp.int32)), jax.random.key(0))
    specs = nn.get_partition_spec(abstract)["params"]
    leaves = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
    assert leaves and all(len(s) >= 1 for s in leaves)
    assert specs["token_embed"]["embedding"] == jax.sharding.PartitionSpec("vocab", "embed")


def test_sliding_window_limits_what_a_position_sees():
    """Window 3 in each of 2 layers: position i sees tokens i-4..i, so token 0 reaches positions 0-4 only."""
    model, params = make(position="rope", sliding_window=3)
    x = tokens()
    changed = x.at[:, 0].set((x[:, 0] + 1) % BASE.vocab_size)
    a, b = model.apply({"params": params}, x), model.apply({"params": params}, changed)
    np.testing.assert_allclose(a[:, 5:], b[:, 5:], atol=1e-6)
    assert not np.allclose(a[:, 4], b[:, 4])


def test_new_flags_add_only_their_own_parameters():
    _, params = make(**VARIANTS["gemma3_style"])
    block = params["block_0"]
    assert set(block) == {"attn_norm", "attn_post_norm", "mlp_norm", "mlp_post_norm", "attn", "mlp"}
    assert block["attn"]["query"]["kernel"].shape == (32, 4, 8) and block["attn"]["query_norm"]["scale"].shape == (8,)
    assert float(jnp.abs(block["attn_norm"]["scale"]).max()) == 0  # (1 + w) with w starting at 0
    _, params = make(**VARIANTS["qwen3_style"])
    attn = params["block_0"]["attn"]
    assert attn["query"]["kernel"].shape == (32, 4, 12) and attn["out"]["kernel"].shape == (4, 12, 32)
    assert "bias" in attn["value"] and "bias" not in attn["out"] and "bias" not in params["block_0"]["mlp"]["up"]
    _, params = make(**VARIANTS["olmo2_style"])
    assert set(params["block_0"]) == {"attn_post_norm", "mlp_post_norm", "attn", "mlp"}
    assert params["block_0"]["attn"]["key_norm"]["scale"].shape == (4 * 8,)  # all K x H of the key projection


def test_scan_refuses_layers_that_differ():
    from lm.errors import LMError

    with pytest.raises(LMError, match="identical blocks"):
        make(position="rope", rope_layers="1,0", scan_layers=True)


def test_dropout_keeps_its_share_scales_and_follows_its_rng():
    """lm's hashed dropout: the kept share is 1 - rate, survivors scaled by 1 / (1 - rate), masks a
    function of the rng (same rng, same mask; another rng, another mask), neighbours uncorrelated."""
    from lm.model.layers import Dropout, hashed_bits

    x = jnp.ones((64, 128, 96))
    drop = Dropout(0.2, deterministic=False)
    y = drop.apply({}, x, rngs={"dropout": jax.random.key(0)})
    kept = np.asarray(y != 0)
    assert abs(kept.mean() - 0.8) < 0.005
    np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.8, rtol=1e-6)
    assert (np.asarray(drop.apply({}, x, rngs={"dropout": jax.random.key(0)})) == np.asarray(y)).all()
    other = np.asarray(drop.apply({}, x, rngs={"dropout": jax.random.key(1)})) != 0
    assert abs((kept == other).mean() - (0.8 ** 2 + 0.2 ** 2)) < 0.01  # independent masks agree this often
    flat = kept.reshape(-1).astype(float)
    assert abs(np.corrcoef(flat[:-1], flat[1:])[0, 1]) < 0.01
    bits = np.asarray(hashed_bits((4096,), jnp.array([7, 9], jnp.uint32)))
    assert len(np.unique(bits)) == 4096 and abs(np.unpackbits(bits.view(np.uint8)).mean() - 0.5) < 0.01
    assert (Dropout(0.2, deterministic=True).apply({}, x) == x).all()
    for shape in ((1, 65536, 65536), (1, 1, 65536, 65536)):  # exactly 2**32 elements (traced, not computed)
        assert jax.eval_shape(lambda: hashed_bits(shape, jnp.array([7, 9], jnp.uint32))).shape == shape
