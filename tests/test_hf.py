"""Hugging Face interop: randomly initialised small models of every supported family, built with
`transformers`' own config and model classes (Llama 2 with GQA, GPT-2, and FAMILIES: Llama 3.1/3.2,
Qwen2.5, Qwen3, Mistral, SmolLM3, OLMo 2, Gemma 3 text, each with its distinguishing features on
and sequences longer than its sliding windows), give the same logits through lm's model, survive
export(import(x)), and eval.py's perplexity of imported GPT-2 / Qwen2.5 models equals the one
transformers computes on the same token ids. What lm cannot reproduce exactly is refused.

Bound: float32 rounding, max |logit diff| / max |logit| < 1e-4 (logits are O(1); observed < 1e-6).
These tests check against the transformers versions setup.cfg's `hf` extra allows.
"""

from __future__ import annotations

import copy
import io
import json
import math
import re
import shutil

import numpy as np
import pytest

import jax.numpy as jnp
import torch  # the `hf` extra (pip install -e ".[test,hf]"), which CI installs
import transformers

from lm import hf
from lm.hf import families
from lm.cli import main as cli_main
from lm.config import load_config
from lm.data.tokenizers import load_tokenizer
from lm.errors import LMError
from tests.conftest import ROOT

TOL = 1e-4
VOCAB = 300  # every family model: room for lm's byte ids (259), which their import uses
T = 24  # the test sequences: longer than every sliding window below (5)
QWEN_EOS = (1, 0)  # Qwen2.5's generation_config.json eos_token_id: <|im_end|>, <|endoftext|>
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, initializer_range=0.1, bos_token_id=None, eos_token_id=2, pad_token_id=None)
# name -> (model class, config class, its config.json features, the ModelConfig values the import must give)
FAMILIES = {
    "llama3": ("LlamaForCausalLM", "LlamaConfig", dict(
        num_hidden_layers=2, tie_word_embeddings=True, max_position_embeddings=128, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),  # all three frequency bands
        dict(rope_scaling="llama3", rope_factor=8.0, rope_original_max_len=64, tie_embeddings=True)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(num_hidden_layers=2, rope_parameters={
        "rope_type": "default", "rope_theta": 1e6}), dict(qkv_bias=True, use_bias=False, rope_theta=1e6)),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(
        num_hidden_layers=2, head_dim=16, use_sliding_window=True, sliding_window=5, max_window_layers=1,
        tie_word_embeddings=True), dict(d_head=16, qk_norm="head", sliding_window=5, sliding_layers="0,1")),
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(num_hidden_layers=2, head_dim=12, sliding_window=5),
                dict(d_head=12, sliding_window=5, sliding_layers="1")),
    "smollm3": ("SmolLM3ForCausalLM", "SmolLM3Config", dict(num_hidden_layers=4, no_rope_layer_interval=2),
                dict(rope_layers="1,0", tie_embeddings=True)),
    "olmo2": ("Olmo2ForCausalLM", "Olmo2Config", dict(num_hidden_layers=2, attention_dropout=0.1),
              dict(norm_placement="post", qk_norm="all", attention_dropout=0.1)),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(
        num_hidden_layers=3, head_dim=16, sliding_window=5, sliding_window_pattern=3, query_pre_attn_scalar=12,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e5},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}}),
        dict(norm="rmsnorm_plus_one", norm_placement="sandwich", qk_norm="head", mlp="geglu", scale_embeddings=True,
             attn_scale_dim=12, sliding_window=5, sliding_layers="1,1,0", rope_theta=1e5, rope_scaling="linear",
             rope_factor=2.0, rope_local_theta=1000.0, d_head=16)),
}


def _bpe_tokenizer_json(text: str, path, special_tokens=()) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path.parent.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=list(special_tokens),
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))
    return tok.get_vocab_size()


def _sentencepiece_model(text: str, path) -> int:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text.splitlines()), model_writer=model, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, minloglevel=2)
    path.write_bytes(model.getvalue())
    return spm.SentencePieceProcessor(model_file=str(path)).get_piece_size()


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory, request):
    """{'llama': (dir, torch model), 'gpt2': ...}; weights drawn with a larger std so logits are far from uniform."""
    from conftest import SHAKESPEARE

    text = SHAKESPEARE.read_text(encoding="utf-8")[:100_000]
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    llama_dir, gpt2_dir = root / "llama", root / "gpt2"
    llama_dir.mkdir()
    gpt2_dir.mkdir()
    llama_vocab = _sentencepiece_model(text, llama_dir / "tokenizer.model")
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=llama_vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=500.0, rms_norm_eps=1e-5,
        initializer_range=0.1, tie_word_embeddings=False)).eval()
    llama.save_pretrained(llama_dir, max_shard_size="100KB")  # sharded: model.safetensors.index.json
    gpt2_vocab = _bpe_tokenizer_json(text, gpt2_dir / "tokenizer.json")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=gpt2_vocab, n_embd=64, n_layer=2, n_head=4, n_positions=64, initializer_range=0.1,
        bos_token_id=0, eos_token_id=0)).eval()
    gpt2.save_pretrained(gpt2_dir)
    models = {"llama": (llama_dir, llama), "gpt2": (gpt2_dir, gpt2), "text": text}
    for name, (model_class, config_class, features, _) in FAMILIES.items():
        torch.manual_seed(0)
        model = getattr(transformers, model_class)(getattr(transformers, config_class)(**{**COMMON, **features})).eval()
        with torch.no_grad():  # norms start at 1 (or 0) and biases at 0: draw them, so a swapped one would show
            for param_name, param in model.named_parameters():
                if "norm" in param_name or "bias" in param_name:
                    param.add_(0.3 * torch.randn_like(param))
        models[name] = (root / name, model)
        if name == "qwen2":  # a byte-level BPE tokenizer.json with Qwen's end tokens, and two end ids
            assert _bpe_tokenizer_json(text, root / name / "tokenizer.json", ["<|endoftext|>", "<|im_end|>"]) == VOCAB
            model.generation_config.eos_token_id = list(QWEN_EOS)
        model.save_pretrained(root / name)
    return models


def _torch_logits(model, tokens_BxT: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens_BxT, dtype=torch.long)).logits.numpy()


def test_llama_checkpoint_is_sharded(hf_models):
    assert (hf_models["llama"][0] / "model.safetensors.index.json").is_file()


def _relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    assert np.abs(theirs).max() > 1.0  # not near-uniform: a wrong weight layout would show
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def test_transformers_is_a_version_these_tests_check_against():
    from packaging.specifiers import SpecifierSet

    allowed = re.search(r"^\s*transformers(\S+)$", (ROOT / "setup.cfg").read_text(), re.M).group(1)
    assert transformers.__version__ in SpecifierSet(allowed), (transformers.__version__, allowed)


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_import_maps_each_family_onto_its_flags(hf_models, arch):
    cfg = hf.read_config(hf_models[arch][0])
    assert {key: getattr(cfg, key) for key in FAMILIES[arch][3]} == FAMILIES[arch][3]
    assert cfg.sliding_window < T


@pytest.mark.parametrize("arch,overrides", [("llama", {}), ("llama", {"scan_layers": True}), ("gpt2", {})]
                         + [(arch, {}) for arch in FAMILIES] + [("mistral", {"scan_layers": True})])
def test_logits_match_transformers(hf_models, arch, overrides):
    hf_dir, reference = hf_models[arch]
    model, params = hf.load(hf_dir, **overrides)
    tokens_BxT = np.random.RandomState(0).randint(0, model.cfg.vocab_size, (2, T))
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(tokens_BxT)))
    assert _relative_error(ours, _torch_logits(reference, tokens_BxT)) < TOL


@pytest.mark.parametrize("arch", ["llama", "gpt2", *FAMILIES])
def test_export_of_import_reproduces_logits(hf_models, tmp_path, arch):
    hf_dir, reference = hf_models[arch]
    tokenizer_file = next((p for p in (hf_dir / "tokenizer.model", hf_dir / "tokenizer.json") if p.is_file()), None)
    run_dir = hf.import_run(hf_dir, tmp_path / "run", ["train.seq_len=32", "train.batch_size=2"],
                            tokenizer=None if tokenizer_file else "byte")
    out_dir = hf.export_run(run_dir, tmp_path / "exported")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
    assert type(reloaded) is type(reference)
    assert getattr(reloaded.config, "attention_dropout", None) == getattr(reference.config, "attention_dropout", None)
    tokens_BxT = np.random.RandomState(1).randint(0, reference.config.vocab_size, (2, T))
    assert _relative_error(_torch_logits(reloaded, tokens_BxT), _torch_logits(reference, tokens_BxT)) < TOL
    eos = reloaded.config.eos_token_id
    assert ([eos] if isinstance(eos, int) else eos) == list(load_tokenizer(run_dir).eos_ids)
    if tokenizer_file:
        assert (out_dir / tokenizer_file.name).read_bytes() == tokenizer_file.read_bytes()


def test_imported_runs_carry_the_models_eos_ids(hf_models, tmp_path):
    from lm.data.tokenizers.hf import HFTokenizer
    from lm.hf.convert import read_eos_ids

    hf_dir = hf_models["qwen2"][0]
    run_dir = hf.import_run(hf_dir, tmp_path / "run", ["train.seq_len=32", "train.batch_size=2"])
    assert load_tokenizer(run_dir).eos_ids == QWEN_EOS  # generation_config.json's list, before config.json's 2
    assert json.loads((run_dir / "tokenizer.json").read_text())["eos_ids"] == list(QWEN_EOS)

    bare = tmp_path / "bare"  # no generation_config.json: config.json's eos_token_id (an int) ...
    bare.mkdir()
    shutil.copy(hf_dir / "tokenizer.json", bare / "tokenizer.json")
    tok = HFTokenizer(bare / "tokenizer.json")
    assert read_eos_ids(bare, {"eos_token_id": 2}, tok, VOCAB) == (2,)
    assert read_eos_ids(bare, {}, tok, VOCAB) == ()  # ... else the tokenizer's own EOS token, if it names one
    (bare / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}}))
    assert read_eos_ids(bare, {"eos_token_id": None}, tok, VOCAB) == (1,)
    import sentencepiece

    spm_file = hf_models["llama"][0] / "tokenizer.model"
    eos = sentencepiece.SentencePieceProcessor(model_file=str(spm_file)).eos_id()
    assert eos >= 0 and HFTokenizer(spm_file).declared_eos_ids() == (eos,)  # a SentencePiece model's own eos id
    with pytest.raises(LMError, match="eos_token_id"):
        read_eos_ids(bare, {"eos_token_id": [1, VOCAB]}, tok, VOCAB)


def _saved_config(hf_models, arch: str) -> dict:
    return json.loads((hf_models[arch][0] / "config.json").read_text())


def test_transformers_v4_configs_read_like_v5(hf_models):
    """v4 wrote rope_theta + rope_scaling (`type`, the old rope_type) and Gemma 3's rope_local_base_freq
    and sliding_window_pattern where v5 writes rope_parameters and layer_types."""
    v5 = _saved_config(hf_models, "llama3")
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    scaling = {k: v for k, v in v5["rope_parameters"].items() if k not in ("rope_type", "rope_theta")}
    v4.update(rope_theta=v5["rope_parameters"]["rope_theta"], rope_scaling={"type": "llama3", **scaling})
    assert families.model_config(v4) == families.model_config(v5)

    v5 = _saved_config(hf_models, "gemma3")
    v4 = {k: v for k, v in v5.items() if k not in ("rope_parameters", "layer_types", "_sliding_window_pattern")}
    v4.update(rope_theta=1e5, rope_local_base_freq=1000.0, rope_scaling={"rope_type": "linear", "factor": 2.0},
              sliding_window_pattern=3)
    assert families.model_config(v4) == families.model_config(v5)


REFUSED = {  # family, config.json change, the phrase of the one-line error
    "yarn": ("llama3", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
             "RoPE scaling 'yarn'"),
    "longrope_v4": ("llama3", {"rope_parameters": None, "rope_scaling": {"type": "longrope", "factor": 4.0}},
                    "RoPE scaling 'longrope'"),
    "dynamic": ("qwen2", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "RoPE scaling 'dynamic'"),
    "partial_rotary": ("llama3", {"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    "phi3_fused": ("llama3", {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3"}, "fuses q, k, v"),
    "attention_softcap": ("gemma3", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0"),
    "final_softcap": ("gemma3", {"final_logit_softcapping": 30.0}, "final_logit_softcapping=30.0"),
    "local_rope_scaled": ("gemma3", {"rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 1e5},
        "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e3}}}, "sliding-window layers"),
    "qwen3_attention_bias": ("qwen3", {"attention_bias": True}, "attention_bias=true"),
    "llama_bias_mismatch": ("llama3", {"attention_bias": True, "mlp_bias": False}, "attention_bias != mlp_bias"),
    "activation": ("mistral", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    "unknown": ("llama3", {"architectures": ["MambaForCausalLM"]}, "lm imports only"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_lm_cannot_reproduce_is_refused_in_one_line(hf_models, case):
    arch, change, phrase = REFUSED[case]
    with pytest.raises(LMError, match=re.escape(phrase)) as info:
        families.model_config({**_saved_config(hf_models, arch), **change})
    assert "\n" not in str(info.value)


def test_unknown_or_leftover_tensors_are_refused(hf_models, tmp_path):
    from safetensors.numpy import load_file, save_file

    hf_dir = tmp_path / "extra"
    shutil.copytree(hf_models["olmo2"][0], hf_dir)
    tensors = load_file(str(hf_dir / "model.safetensors"))
    save_file({**tensors, "model.layers.0.self_attn.rotary_scale.weight": np.ones(4, np.float32)},
              str(hf_dir / "model.safetensors"))
    with pytest.raises(LMError, match="does not use .*rotary_scale"):
        hf.load(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())  # OLMo 2's norms under Llama's pre-norm names
    (hf_dir / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLM"]}))
    save_file(tensors, str(hf_dir / "model.safetensors"))
    with pytest.raises(LMError, match="no tensor 'model.layers.0.input_layernorm.weight'"):
        hf.load(hf_dir)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_eval_perplexity_of_imported_model_matches_transformers(hf_models, tmp_path, capsys, arch):
    from tokenizers import Tokenizer

    hf_dir, reference = hf_models[arch]
    seq_len = 32
    run_dir = hf.import_run(hf_dir, tmp_path / "run", [f"train.seq_len={seq_len}", "train.batch_size=4"])
    text_file = tmp_path / "eval.txt"
    text_file.write_text(hf_models["text"][-3000:], encoding="utf-8")
    cli_main(["eval", "--run_dir", str(run_dir), "--text_file", str(text_file), "--json"])
    ours = json.loads(capsys.readouterr().out)

    ids = np.array(Tokenizer.from_file(str(hf_dir / "tokenizer.json")).encode(text_file.read_text()).ids)
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, seq_len):  # the same windows eval.py scores
        window = torch.tensor(ids[start:start + seq_len + 1])[None]
        with torch.no_grad():
            logits = reference(window[:, :-1]).logits[0]
        loss = torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum")
        total, count = total + float(loss), count + window.shape[1] - 1
    theirs = math.exp(total / count)
    assert ours["tokens"] == count == len(ids) - 1
    assert ours["perplexity"] == pytest.approx(theirs, rel=1e-4)
    # Far from a uniform guess (perplexity = vocab size), so a wrong weight would show.
    assert abs(math.log(ours["perplexity"]) - math.log(reference.config.vocab_size)) > 0.1


@pytest.mark.slow
def test_imported_run_continues_training(hf_models, tmp_path, shakespeare):
    import jax

    from lm.training.checkpoint import Checkpoints
    from lm.training.restore import restore_run
    from lm.training.loop import train

    hf_dir, _ = hf_models["llama"]
    run_dir = hf.import_run(hf_dir, tmp_path / "run", [f"data.text_file={shakespeare}", "train.seq_len=32",
                                                       "train.batch_size=4", "train.steps=2", "eval.every=0",
                                                       "checkpoint.async_save=false", "optim.lr=1e-3"])
    records = train(load_config(run_dir / "config.yaml"))
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    ckpts = Checkpoints(run_dir / "checkpoints", read_only=True)
    assert ckpts.steps() == [0, 2]
    ckpts.close()
    # Training started from the imported weights (a fresh init would differ by ~init_std = 0.1).
    _, imported = hf.load(hf_dir)
    trained = restore_run(run_dir, step=2).params
    diffs = [float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
             zip(jax.tree.leaves(imported), jax.tree.leaves(trained))]
    assert 0 < max(diffs) < 0.01


def test_import_errors(hf_models, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "vocab_size": 10,
                                                     "n_embd": 8, "n_layer": 1, "n_head": 2, "n_positions": 8}))
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(LMError, match="pickle"):
        hf.load(pickled)
    (pickled / "config.json").write_text(json.dumps({"architectures": ["MambaForCausalLM"]}))
    with pytest.raises(LMError, match="imports only"):
        hf.load(pickled)

    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((hf_models["gpt2"][0] / name).read_bytes())
    with pytest.raises(LMError, match="--tokenizer"):
        hf.import_run(no_tokenizer, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing written before the check
    with pytest.raises(LMError, match="architecture"):
        hf.import_run(hf_models["gpt2"][0], tmp_path / "run2", ["model.d_model=32"])


def test_hf_tokenizers_round_trip_and_count_bytes(hf_models, tmp_path):
    from lm.data.tokenizers import hf as hf_tokenizer

    text = hf_models["text"][:5000]
    bpe = hf_tokenizer.HFTokenizer(hf_models["gpt2"][0] / "tokenizer.json")
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert bpe.byte_lengths(ids).sum() == len(text.encode("utf-8"))  # byte-level BPE: exact
    spm = hf_tokenizer.HFTokenizer(hf_models["llama"][0] / "tokenizer.model")
    ids = spm.encode(text)
    assert spm.decode(ids).split() == text.split()  # SentencePiece normalises whitespace
    assert abs(spm.byte_lengths(ids).sum() / len(text.encode("utf-8")) - 1) < 0.05
    with pytest.raises(LMError, match="cannot read tokenizer"):
        hf_tokenizer.HFTokenizer(tmp_path / "missing.json")


def test_greedy_generation_of_an_imported_model_stops_at_its_eos(hf_models, tmp_path):
    """Weights that make the model's end id (config.json eos_token_id=0) the argmax everywhere: it stops there."""
    from lm.model.decode import Sampling
    from lm.tools.generate import Generation
    from lm.training.restore import restore_run

    model = copy.deepcopy(hf_models["gpt2"][1])
    eos_dir = tmp_path / "eos_model"
    shutil.copytree(hf_models["gpt2"][0], eos_dir)
    with torch.no_grad():  # the final hidden state is ln_f's bias, pointing at the (longest) EOS embedding
        wte = model.transformer.wte.weight
        wte[0] = 10 * wte[0] / wte[0].norm() * wte.norm(dim=1).max()
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(wte[0])
    model.save_pretrained(eos_dir)
    run_dir = hf.import_run(eos_dir, tmp_path / "run", ["train.seq_len=32", "train.batch_size=2"])
    run = restore_run(run_dir, batch_size=1)
    assert run.tokenizer.eos_ids == (0,)
    greedy = Sampling(temperature=0.0)
    [stopped] = Generation(run, ["To be"], 12, greedy).run_all()
    assert stopped.stop_reason == "eos" and stopped.tokens == []
    [kept_going] = Generation(run, ["To be"], 12, greedy, ignore_eos=True).run_all()
    assert kept_going.stop_reason == "max_new_tokens" and kept_going.tokens == [0] * 12
