"""Hugging Face interop: randomly initialised small Llama (GQA) and GPT-2 models from `transformers`
give the same logits through lm's model, survive export(import(x)), and eval.py's perplexity of an
imported GPT-2 equals the one transformers computes on the same token ids.

Bound: float32 rounding, max |logit diff| < 1e-4 (logits are O(1); observed ~3e-6).
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest

import jax.numpy as jnp
import torch  # the `hf` extra (pip install -e ".[test,hf]"), which CI installs
import transformers

from lm import hf
from lm.hf import families
from lm.cli import main as cli_main
from lm.config import load_config
from lm.errors import LMError

TOL = 1e-4


def _bpe_tokenizer_json(text: str, path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
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
    return {"llama": (llama_dir, llama), "gpt2": (gpt2_dir, gpt2), "text": text}


def _torch_logits(model, tokens_BxT: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens_BxT, dtype=torch.long)).logits.numpy()


def test_llama_checkpoint_is_sharded(hf_models):
    assert (hf_models["llama"][0] / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize("arch,overrides", [("llama", {}), ("llama", {"scan_layers": True}), ("gpt2", {})])
def test_logits_match_transformers(hf_models, arch, overrides):
    hf_dir, reference = hf_models[arch]
    model, params = hf.load(hf_dir, **overrides)
    tokens_BxT = np.random.RandomState(0).randint(0, model.cfg.vocab_size, (2, 24))
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(tokens_BxT)))
    theirs = _torch_logits(reference, tokens_BxT)
    assert np.abs(theirs).max() > 1.0  # not near-uniform: a wrong weight layout would show
    assert np.abs(ours - theirs).max() < TOL


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_export_of_import_reproduces_logits(hf_models, tmp_path, arch):
    hf_dir, reference = hf_models[arch]
    run_dir = hf.import_run(hf_dir, tmp_path / "run", ["train.seq_len=32", "train.batch_size=2"])
    out_dir = hf.export_run(run_dir, tmp_path / "exported")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
    assert type(reloaded) is type(reference)
    tokens_BxT = np.random.RandomState(1).randint(0, reference.config.vocab_size, (2, 16))
    assert np.abs(_torch_logits(reloaded, tokens_BxT) - _torch_logits(reference, tokens_BxT)).max() < TOL
    tokenizer_file = "tokenizer.model" if arch == "llama" else "tokenizer.json"
    assert (out_dir / tokenizer_file).read_bytes() == (hf_dir / tokenizer_file).read_bytes()


@pytest.mark.slow
def test_eval_perplexity_of_imported_gpt2_matches_transformers(hf_models, tmp_path, capsys):
    from tokenizers import Tokenizer

    hf_dir, reference = hf_models["gpt2"]
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
    (pickled / "config.json").write_text(json.dumps({"architectures": ["MistralForCausalLM"]}))
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


def test_export_refuses_models_without_hf_equivalent(tiny_config):
    from lm.config import replace

    cfg = replace(tiny_config(), **{"model.position": "sinusoidal"})
    with pytest.raises(LMError, match="no Hugging Face equivalent"):
        families.hf_config(cfg.model)


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


def test_train_with_hf_tokenizer_needs_an_imported_run(tiny_config):
    from lm.training.loop import train

    with pytest.raises(LMError, match="lm.hf import"):
        train(tiny_config("data.tokenizer=hf"))
