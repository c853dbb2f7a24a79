"""Own corpora as TFDS datasets, named datasets, SentencePiece, packing, exact resume and eval."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import config as config_lib
from lm.data import eval_batches, make_data
from lm.data.corpus import open_split, prepare, read_documents, split_documents
from lm.data.pipeline import from_json_state, packed_dataset
from lm.errors import LMError
from lm.model.transformer import Transformer
from lm.data.tokenizers import BOS_ID, EOS_ID, ByteTokenizer



def _cfg(tmp_path, *overrides):
    from tests.conftest import ROOT

    return config_lib.load_config(ROOT / "configs" / "tiny.yaml", [
        f"run_dir={tmp_path / 'run'}", "data.source=tfds", f"data.tfds_data_dir={tmp_path / 'tfds'}",
        *overrides])


def _texts(source, key="text"):
    return [(r[key].decode() if isinstance(r[key], bytes) else r[key]) for r in source]


def test_corpus_from_grimm_text_file(tmp_path, grimm):
    cfg = _cfg(tmp_path, f"data.text_file={grimm}", r"data.doc_separator=\n\n\n")
    docs = grimm.read_bytes().decode("utf-8").replace("\r\n", "\n").split("\n\n\n")
    docs = [d for d in docs if d.strip()]
    assert read_documents(cfg.data) == docs and len(docs) > 100
    path = prepare(cfg.data)
    assert (path / "dataset_info.json").is_file()
    train, val = _texts(open_split(cfg.data, "train")), _texts(open_split(cfg.data, "validation"))
    n_val = round(len(docs) * 0.1)
    assert sorted(train) == sorted(docs[:-n_val]) and sorted(val) == sorted(docs[-n_val:])
    assert prepare(cfg.data) == path  # built once, then reused


def test_corpus_from_jsonl_and_errors(tmp_path):
    docs = [f"document {i}: " + "word " * i for i in range(20)]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for part in range(2):
        (corpus / f"part{part}.jsonl").write_text(
            "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs[part * 10:part * 10 + 10])))
    cfg = _cfg(tmp_path, f"data.files={corpus}/*.jsonl", "data.val_fraction=0.2")
    assert sorted(_texts(open_split(cfg.data, "train"))) == sorted(docs[:16])
    assert sorted(_texts(open_split(cfg.data, "validation"))) == sorted(docs[16:])
    with pytest.raises(LMError, match="not 'test'"):
        open_split(cfg.data, "test")
    (corpus / "part1.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(LMError, match=r"part1.jsonl:1 .*'text' field"):
        open_split(cfg.data, "train")
    with pytest.raises(LMError, match="matches no file"):
        open_split(_cfg(tmp_path, f"data.files={tmp_path}/missing/*.txt").data, "train")


def test_split_documents_single_document_splits_by_characters():
    assert split_documents(["abcdefghij"], 0.2) == (["abcdefgh"], ["ij"])


def test_packing_scores_every_token_once_with_document_positions():
    docs = [{"text": "x" * n} for n in (3, 40, 0, 7, 25, 1)]
    batches = list(packed_dataset(docs, ByteTokenizer(), "text", 16, 3))
    targets = np.concatenate([b["targets"][b["weights"] == 1] for b in batches])
    expected = np.concatenate([np.r_[ByteTokenizer().encode(d["text"]), EOS_ID] for d in docs])
    np.testing.assert_array_equal(targets, expected)  # every target once, in order
    for b in batches:
        inputs, seg, pos = b["inputs"], b["segment_ids"], b["positions"]
        starts = inputs == BOS_ID
        assert np.all(pos[starts] == 0)  # each document starts its own positions
        same = seg[:, 1:] == seg[:, :-1]
        np.testing.assert_array_equal(pos[:, 1:][same & (seg[:, 1:] > 0)], pos[:, :-1][same & (seg[:, 1:] > 0)] + 1)
        assert np.all(b["weights"] == (seg > 0))


def test_documents_never_attend_across_boundaries():
    cfg = config_lib.ModelConfig(vocab_size=259, n_layers=2, d_model=32, n_heads=4, max_seq_len=32)
    model = Transformer(cfg)
    rows = list(packed_dataset([{"text": "first doc"}, {"text": "the second"}], ByteTokenizer(), "text", 32, 1))
    batch = rows[0]
    params = model.init(jax.random.key(0), jnp.asarray(batch["inputs"]))
    doc2 = batch["segment_ids"] == 2
    changed = np.where(batch["segment_ids"] == 1, (batch["inputs"] + 7) % 259, batch["inputs"])

    def logits(inputs, packed=True):
        extra = (jnp.asarray(batch["positions"]), jnp.asarray(batch["segment_ids"])) if packed else ()
        return np.asarray(model.apply(params, jnp.asarray(inputs), *extra))

    np.testing.assert_allclose(logits(changed)[doc2], logits(batch["inputs"])[doc2], rtol=0, atol=1e-6)
    # Without segment ids the second document does see the first: the check above can fail.
    assert np.abs(logits(changed, False)[doc2] - logits(batch["inputs"], False)[doc2]).max() > 1e-3


def test_sentencepiece_round_trip_and_fixed_ids(tmp_path, grimm):
    from lm.data.tokenizers import sentencepiece as sp_tokenizer
    from lm.data.tokenizers import load_tokenizer, save_tokenizer

    text = grimm.read_text(encoding="utf-8")
    tok = sp_tokenizer.train([text[:200_000]], 512, "bpe")
    sample = "Once upon a time,\n\n  a king’s daughter 123 ✓\tsaid: «hi»\n"
    ids = tok.encode(sample)
    assert tok.decode(ids) == sample and tok.vocab_size == 512
    assert tok.byte_lengths(ids).sum() == len(sample.encode("utf-8"))
    assert len(tok.encode(text[:5000])) < 0.6 * len(text[:5000].encode())  # subwords, not bytes
    assert (tok._sp.pad_id(), tok._sp.bos_id(), tok._sp.eos_id()) == (0, 1, 2)
    save_tokenizer(tok, tmp_path)
    np.testing.assert_array_equal(load_tokenizer(tmp_path).encode(sample), ids)
    # An existing .model file is copied into a new run and used as is.
    from lm.data import run_tokenizer
    from lm.data.tokenizers import save_tokenizer

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = _cfg(tmp_path, "data.tokenizer=sentencepiece", f"data.tokenizer_model={tmp_path / 'tokenizer.model'}")
    loaded = run_tokenizer(cfg, run_dir)
    np.testing.assert_array_equal(loaded.encode(sample), ids)
    save_tokenizer(loaded, run_dir)  # the trainer saves it once the run has started
    assert (run_dir / "tokenizer.model").read_bytes() == tok.model_proto
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(LMError, match="not a SentencePiece model"):
        sp_tokenizer.SentencePieceTokenizer.from_file(tmp_path / "bad.model")


@pytest.mark.slow
def test_sentencepiece_training_resumes_exactly_and_evaluates_bits_per_byte(tmp_path, grimm):
    from lm.tools.evaluate import evaluate
    from lm.data.tokenizers import load_tokenizer
    from lm.training.loop import train

    common = [f"data.text_file={grimm}", r"data.doc_separator=\n\n\n", "data.tokenizer=sentencepiece",
              "data.vocab_size=512", "optim.decay_steps=8", "checkpoint.every=4", "eval.every=0",
              "log.every=1", "checkpoint.async_save=false"]
    full = train(_cfg(tmp_path, *common, "train.steps=8", f"run_dir={tmp_path / 'full'}"))
    train(_cfg(tmp_path, *common, "train.steps=4", f"run_dir={tmp_path / 'resumed'}"))
    resumed = train(_cfg(tmp_path, *common, "train.steps=8", f"run_dir={tmp_path / 'resumed'}"))
    full_loss = {r["step"]: r["loss"] for r in full}
    assert [r["step"] for r in resumed] == [5, 6, 7, 8]
    assert [full_loss[r["step"]] for r in resumed] == [r["loss"] for r in resumed]
    assert full_loss[8] < full_loss[1]

    result = evaluate(str(tmp_path / "full"))
    tok = load_tokenizer(tmp_path / "full")
    val = _texts(open_split(_cfg(tmp_path, *common).data, "validation"))
    assert result["tokens"] == sum(len(tok.encode(d)) + 1 for d in val)  # every token (and EOS) once
    n_bytes = sum(len(d.encode("utf-8")) for d in val)
    expected_bpb = result["loss"] * result["tokens"] / math.log(2) / n_bytes
    assert result["bits_per_byte"] == pytest.approx(expected_bpb, rel=1e-6)
    assert 1.0 < result["bits_per_byte"] < 8.0


def test_named_dataset_through_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    cfg = _cfg(tmp_path, "data.tfds_name=tiny_shakespeare", "data.train_split=train", "data.eval_split=test")
    with tfds.testing.mock_data(num_examples=6):
        data = make_data(cfg, ByteTokenizer())
        first = [data.batch(i) for i in range(3)]
        state = json.loads(json.dumps(data.state()))
        after = [data.batch(i) for i in range(3, 5)]
        again = make_data(cfg, ByteTokenizer())
        again.restore(state)
        for a, b in zip(after, [again.batch(i) for i in range(3, 5)]):
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])
        evals = list(eval_batches(cfg.data, ByteTokenizer(), cfg.train.seq_len, 4))
    assert first[0]["inputs"].shape == (cfg.train.batch_size, cfg.train.seq_len)
    assert first[0]["weights"].sum() > 0 and sum(int(b["weights"].sum()) for b in evals) > 0


def test_named_dataset_from_a_locally_built_copy(tmp_path, grimm):
    own = _cfg(tmp_path, f"data.text_file={grimm}", r"data.doc_separator=\n\n\n")
    path = prepare(own.data)
    named = _cfg(tmp_path, f"data.tfds_name=lm_text/{path.parent.name}")
    assert _texts(open_split(named.data, "validation")) == _texts(open_split(own.data, "validation"))


def test_named_dataset_errors(tmp_path):
    with pytest.raises(LMError, match="is not a TFDS dataset"):
        open_split(_cfg(tmp_path, "data.tfds_name=no_such_dataset_xyz").data, "train")
    with pytest.raises(LMError, match="not prepared in .*tfds build tiny_shakespeare"):
        open_split(_cfg(tmp_path, "data.tfds_name=tiny_shakespeare").data, "train")


@pytest.mark.slow
def test_worker_processes_resume_from_saved_state():
    docs = [{"text": f"doc {i} " * (i % 5 + 1)} for i in range(40)]

    def pipeline():
        return iter(packed_dataset(docs, ByteTokenizer(), "text", 16, 2, seed=1, workers=2))

    it = pipeline()
    expected = [next(it) for _ in range(6)]
    it = pipeline()
    [next(it) for _ in range(3)]
    state = json.loads(json.dumps(it.get_state()))
    it = pipeline()
    it.set_state(from_json_state(state))
    for a, b in zip(expected[3:], [next(it) for _ in range(3)]):
        for key in a:
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))
