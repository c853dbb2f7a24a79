"""The tokenizer files `lm hf export` writes beside the weights, by the run's tokenizer kind.

- hf: the imported model's own tokenizer.json or tokenizer.model, as imported.
- sentencepiece: the run's SentencePiece model as tokenizer.model (load it with sentencepiece:
  the same pieces and ids; lm trains it without a dummy prefix or normalisation).
- byte: a Hugging Face `tokenizers` tokenizer.json giving UTF-8 byte b the id b + 3 and the
  specials 0 PAD, 1 BOS, 2 EOS (as `<|pad|>`, `<|bos|>`, `<|eos|>`), with a tokenizer_config.json,
  so `transformers.AutoTokenizer.from_pretrained` encodes text to the run's ids.
"""

from __future__ import annotations

import json
import pathlib

from lm.data.tokenizers import BOS_ID, EOS_ID, PAD_ID, Tokenizer
from lm.data.tokenizers import hf as hf_tokenizer
from lm.errors import LMError

BYTE_SPECIALS = {PAD_ID: "<|pad|>", BOS_ID: "<|bos|>", EOS_ID: "<|eos|>"}


def special_ids(tokenizer: Tokenizer) -> dict:
    """config.json's bos_token_id (the tokenizer's; None if it has none) and pad_token_id (lm's own
    tokenizers: 0; an imported one's is not recorded: None)."""
    return {"bos_token_id": tokenizer.bos_id, "pad_token_id": PAD_ID if tokenizer.kind != "hf" else None}


def write_tokenizer(tokenizer: Tokenizer, hf_dir: pathlib.Path) -> None:
    if isinstance(tokenizer, hf_tokenizer.HFTokenizer):
        (hf_dir / f"tokenizer{tokenizer.path.suffix}").write_bytes(tokenizer.path.read_bytes())  # also from gs://
    elif tokenizer.kind == "sentencepiece":
        (hf_dir / "tokenizer.model").write_bytes(tokenizer.model_proto)
    elif tokenizer.kind == "byte":
        _byte_tokenizer().save(str(hf_dir / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BYTE_SPECIALS[BOS_ID],
                  "eos_token": BYTE_SPECIALS[EOS_ID], "pad_token": BYTE_SPECIALS[PAD_ID]}
        (hf_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def byte_characters() -> list[str]:
    """The character byte-level BPE (GPT-2's) writes for each byte 0-255: printable Latin-1 bytes stand
    for themselves, the others for 256, 257, ... in byte order."""
    kept = [*range(33, 127), *range(161, 173), *range(174, 256)]
    moved = iter(range(256, 512))
    return [chr(b) if b in kept else chr(next(moved)) for b in range(256)]


def _byte_tokenizer():
    """lm's byte ids as a `tokenizers` BPE without merges over the 256 byte characters."""
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    except ImportError:
        raise LMError("exporting a byte-level run's tokenizer needs the 'tokenizers' package; install it with "
                      "pip install -e '.[hf]'.") from None

    offset = len(BYTE_SPECIALS)
    vocab = {**{token: i for i, token in BYTE_SPECIALS.items()},
             **{char: b + offset for b, char in enumerate(byte_characters())}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(token, special=True) for token in BYTE_SPECIALS.values()])
    return tok
