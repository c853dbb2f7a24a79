"""Text corpora as TFDS datasets: own files built locally, or named datasets, both array_record.

Own corpora (plain text files, globs, or JSONL files with a `text` field) become a TFDS
dataset `lm_text/<id>` with `train` and `validation` splits, one example per document,
written as array_record so neither building nor reading needs TensorFlow. The id hashes
the inputs (paths, sizes, times) and the split settings, so a changed corpus is rebuilt.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import pathlib
from typing import Any, Sequence

from lm.config import DataConfig
from lm.errors import LMError
from lm.data.packaged import is_packaged
from lm.data.text import read_text, split_text, text_path

BUILDER_NAME = "lm_text"


def data_dir(cfg: DataConfig) -> str:
    return os.path.expanduser(cfg.tfds_data_dir or os.path.join(cfg.cache_dir, "tfds"))


def corpus_files(cfg: DataConfig, key: str = "data.files") -> list[pathlib.Path]:
    """The files named by data.files (comma-separated paths or globs), or data.text_file;
    `key` is the config key that names them, for messages."""
    if not cfg.files:
        if not cfg.text_file:
            raise LMError("no corpus: set data.files=PATHS (text or .jsonl files, globs allowed), "
                          "data.text_file=PATH, or data.tfds_name=NAME.")
        return [text_path(cfg.text_file, cfg.sha256, cfg.cache_dir)]
    files = []
    for pattern in (p.strip() for p in cfg.files.split(",") if p.strip()):
        if is_packaged(pattern):
            files.append(text_path(pattern))
            continue
        found = sorted(glob.glob(str(pathlib.Path(pattern).expanduser())))
        if not found:
            raise LMError(f"{key} entry '{pattern}' matches no file; fix the path or glob.")
        files += [pathlib.Path(f) for f in found]
    return files


def _jsonl_documents(path: pathlib.Path, key: str) -> list[str]:
    docs = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                text = record[key]
            except (ValueError, KeyError, TypeError):
                raise LMError(f"{path}:{number} is not a JSON object with a '{key}' field; "
                              "fix the line or set data.text_key.") from None
            if not isinstance(text, str):
                raise LMError(f"{path}:{number} has a non-string '{key}'; every line needs text there.")
            docs.append(text)
    return docs


def read_documents(cfg: DataConfig) -> list[str]:
    """Every document of the corpus, in file order (text files with their line endings made \\n)."""
    separator = cfg.doc_separator.replace("\\n", "\n")
    docs = []
    for path in corpus_files(cfg):
        if path.suffix == ".jsonl":
            docs += _jsonl_documents(path, cfg.text_key)
        else:
            text = read_text(DataConfig(text_file=str(path))).replace("\r\n", "\n")
            docs += [d for d in text.split(separator) if d.strip()] if separator else [text]
    if not docs:
        raise LMError(f"the corpus {cfg.files or cfg.text_file} holds no documents; add text to it.")
    return docs


def split_documents(docs: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """The last val_fraction of the documents validate; a single document is split by characters."""
    if len(docs) == 1:
        train, val = split_text(docs[0], val_fraction)
        return [train], [val]
    n_val = max(1, round(len(docs) * val_fraction))
    return list(docs[:-n_val]), list(docs[-n_val:])


def corpus_id(cfg: DataConfig) -> str:
    """Names a built corpus by its inputs, so changing a file or a split setting rebuilds it."""
    stamp = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in corpus_files(cfg)]
    key = json.dumps([stamp, cfg.doc_separator, cfg.val_fraction, cfg.text_key])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@functools.cache
def _builder_class():
    import tensorflow_datasets as tfds

    class LmText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Local documents as train/validation splits (one example per document)."""

        name = BUILDER_NAME
        VERSION = tfds.core.Version("1.0.0")

        def __init__(self, *, splits: dict[str, list[str]] | None = None, **kwargs):
            self._splits = splits or {}
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, description="lm: documents from local text/JSONL files.",
                                         features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {name: self._generate_examples(docs) for name, docs in self._splits.items()}

        def _generate_examples(self, docs):
            for i, doc in enumerate(docs):
                yield i, {"text": doc}

        def _log_download_bytes(self):  # TFDS's "Downloading and preparing dataset Unknown size ...": nothing
            pass                        # is downloaded here

        def _log_download_done(self):
            pass

    return LmText


def prepare(cfg: DataConfig):
    """Builds the own-corpus dataset once (if absent) and returns its directory (an epath)."""
    import tensorflow_datasets as tfds
    from etils import epath

    config = tfds.core.BuilderConfig(name=corpus_id(cfg))
    target = epath.Path(data_dir(cfg)) / BUILDER_NAME / config.name / "1.0.0"
    if not (target / "dataset_info.json").exists():
        train, val = split_documents(read_documents(cfg), cfg.val_fraction)
        builder = _builder_class()(splits={"train": train, "validation": val}, config=config,
                                   data_dir=data_dir(cfg), file_format="array_record")
        tfds.disable_progress_bar()
        builder.download_and_prepare()
    return target


def _named_source(cfg: DataConfig, split: str):
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(cfg.tfds_name, split=split, data_dir=data_dir(cfg), download=False)
    except tfds.core.registered.DatasetNotFoundError:
        raise LMError(f"data.tfds_name={cfg.tfds_name!r} is not a TFDS dataset; check the name "
                      "(see tfds.list_builders()).") from None
    except NotImplementedError:  # not prepared, or prepared as TFRecord
        build = f"tfds build {cfg.tfds_name} --data_dir={data_dir(cfg)} --file_format=array_record"
        if tfds.builder(cfg.tfds_name, data_dir=data_dir(cfg)).is_prepared():
            raise LMError(f"{cfg.tfds_name} in {data_dir(cfg)} is stored as TFRecord, which needs TensorFlow; "
                          f"rebuild it as array_record: pip install '.[tf]' && {build}") from None
        raise LMError(f"{cfg.tfds_name} is not prepared in {data_dir(cfg)}; prepare it with {build} "
                      "(or set data.tfds_data_dir to where it is).") from None
    except (AssertionError, FileNotFoundError, ValueError) as e:
        raise LMError(f"cannot read split '{split}' of {cfg.tfds_name} in {data_dir(cfg)} "
                      f"({str(e).splitlines()[0][:160] if str(e) else type(e).__name__}); prepare it with "
                      f"tfds build {cfg.tfds_name} --data_dir={data_dir(cfg)} --file_format=array_record, "
                      "or fix data.train_split / data.eval_split.") from None


def open_split(cfg: DataConfig, split: str) -> Any:
    """A random-access source (len, [i] -> {text_key: bytes}) of one split."""
    if cfg.tfds_name:
        source = _named_source(cfg, split)
    else:
        import tensorflow_datasets as tfds

        builder = tfds.builder_from_directory(prepare(cfg))
        if split not in builder.info.splits:
            raise LMError(f"the corpus built from {cfg.files or cfg.text_file} has splits "
                          f"{', '.join(builder.info.splits)}, not '{split}'; use train or validation.")
        source = builder.as_data_source(split)
    if len(source) == 0:
        raise LMError(f"split '{split}' of {cfg.tfds_name or 'the corpus'} is empty; choose another split.")
    return source


def document_text(record: dict, key: str) -> str:
    """The text of one example (TFDS gives bytes; mocks give str)."""
    try:
        text = record[key]
    except KeyError:
        raise LMError(f"the dataset's examples have fields {', '.join(record)}, not '{key}'; "
                      "set data.text_key to the text field.") from None
    return text.decode("utf-8") if isinstance(text, bytes) else str(text)
