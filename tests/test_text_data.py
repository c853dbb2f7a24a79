import hashlib

import numpy as np
import pytest

from lm.config import DataConfig
from lm.errors import LMError
from lm.data.text import TRAIN_STREAM, VAL_STREAM, TextData, random_windows, read_text, split_text
from lm.data.tokenizers import ByteTokenizer


def test_split_is_nanogpt_split(shakespeare):
    text = read_text(DataConfig(text_file=str(shakespeare)))
    train, val = split_text(text, 0.1)
    assert train + val == text
    assert len(train) == int(len(text) * 0.9)


def test_windows_are_a_pure_function_of_seed_and_step():
    tokens = np.arange(1000, dtype=np.int32)
    a = random_windows(tokens, 0, 5, TRAIN_STREAM, 8, 16)
    b = random_windows(tokens, 0, 5, TRAIN_STREAM, 8, 16)
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    np.testing.assert_array_equal(a["targets"], a["inputs"] + 1)  # targets are the next tokens
    assert a["inputs"].shape == (8, 16)
    assert not np.array_equal(a["inputs"], random_windows(tokens, 0, 6, TRAIN_STREAM, 8, 16)["inputs"])
    assert not np.array_equal(a["inputs"], random_windows(tokens, 1, 5, TRAIN_STREAM, 8, 16)["inputs"])
    assert not np.array_equal(a["inputs"], random_windows(tokens, 0, 5, VAL_STREAM, 8, 16)["inputs"])
    host = random_windows(tokens, 0, 5, TRAIN_STREAM, 8, 16, rows=slice(4, 8))
    np.testing.assert_array_equal(host["inputs"], a["inputs"][4:8])


def test_windows_reach_the_last_token():
    tokens = np.arange(20, dtype=np.int32)
    last = max(random_windows(tokens, 0, s, TRAIN_STREAM, 4, 16)["targets"].max() for s in range(200))
    assert last == 19


def test_byte_tokenizer_round_trips():
    tok = ByteTokenizer()
    text = "Ünïcode — ok\n"
    ids = tok.encode(text)
    assert ids.min() >= 3 and ids.max() < tok.vocab_size
    assert tok.decode(ids) == text
    assert tok.byte_lengths(ids).sum() == len(text.encode("utf-8"))


@pytest.mark.parametrize("content, match", [
    (None, "does not exist"),
    (b"", "empty"),
    (b"  \n\n", "empty"),
    (b"abc\x00def", "binary"),
    (b"caf\xe9 au lait", "not UTF-8"),
])
def test_bad_text_files(tmp_path, content, match):
    path = tmp_path / "data.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(LMError, match=match):
        read_text(DataConfig(text_file=str(path)))


def test_too_short_for_seq_len(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("hello world, this is short")
    with pytest.raises(LMError, match="too short"):
        TextData.load(DataConfig(text_file=str(path)), ByteTokenizer(), seq_len=64)


def test_url_is_fetched_once_and_checked(tmp_path):
    source = tmp_path / "corpus.txt"
    source.write_text("some text " * 100)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    cfg = DataConfig(text_file=source.as_uri(), sha256=digest, cache_dir=str(tmp_path / "cache"))
    assert read_text(cfg) == source.read_text()
    source.unlink()  # the cached copy serves from now on
    assert read_text(cfg).startswith("some text")
    wrong = DataConfig(text_file=(tmp_path / "gone.txt").as_uri(), cache_dir=str(tmp_path / "cache2"))
    with pytest.raises(LMError, match="could not download"):
        read_text(wrong)


def test_checksum_mismatch_is_an_error(tmp_path):
    source = tmp_path / "corpus.txt"
    source.write_text("other text " * 100)
    cfg = DataConfig(text_file=source.as_uri(), sha256="0" * 64, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(LMError, match="does not match data.sha256"):
        read_text(cfg)
