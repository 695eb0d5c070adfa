"""Where documents come from: the Python standard library, local txt/jsonl files, a HF `datasets` dataset (text,
or a column of token ids), .npy arrays of token ids, or LongCrawl64-style zarr arrays read in place.

Every source but zarr yields documents in a deterministic order, as strings or as arrays of token ids; empty
documents are dropped here so that document counts mean the same thing for every source. A zarr source is
never copied: `fox tokenize` only checks it and writes its manifest (fox.data.zarr_source).
"""

from __future__ import annotations

import glob
import json
import os
import platform
import sysconfig
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

SOURCES = ("stdlib", "files", "hf", "npy", "zarr")
WINDOWS = ("packed", "documents")


@dataclass(frozen=True, kw_only=True)
class CorpusConfig:
    name: str = "stdlib"  # names the data folder results/data/{name}/{tokenizer}
    source: Literal["stdlib", "files", "hf", "npy", "zarr"] = "stdlib"
    windows: Literal["packed", "documents"] = "packed"
    """packed: documents joined by end-of-text into one stream cut into windows (short documents);
    documents: each window lies inside one document and starts with BOS (LongCrawl64, the papers' protocol)."""
    files: tuple[str, ...] = ()  # globs for source=files (.jsonl: a document per line, others one) or npy
    path: str | None = None  # source=zarr: folder or fsspec URL holding train.zarr and heldout.zarr
    data_files: tuple[str, ...] = ()  # for source=hf with a local builder, e.g. hf_dataset="json"
    text_field: str = "text"  # field holding the text in jsonl / hf records
    token_field: str | None = None  # field holding token ids instead (a pre-tokenized hf dataset or jsonl)
    hf_dataset: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"
    streaming: bool = True
    max_documents: int | None = None
    max_tokens: int | None = None  # stop once the train split holds this many tokens
    val_fraction: float = 0.02
    seed: int = 0  # seeds the train/validation split

    def __post_init__(self):
        # YAML lists arrive as lists; tuples keep the frozen config hashable
        object.__setattr__(self, "files", tuple(self.files))
        object.__setattr__(self, "data_files", tuple(self.data_files))
        if self.source not in SOURCES:
            raise ValueError(f"corpus.source={self.source!r}: allowed are {', '.join(SOURCES)}")
        if self.windows not in WINDOWS:
            raise ValueError(f"corpus.windows={self.windows!r}: allowed are {', '.join(WINDOWS)}")
        if self.source in ("files", "npy") and not self.files:
            raise ValueError(f"corpus.files={list(self.files)!r}: a glob is required for source={self.source}")
        if self.source == "zarr" and not self.path:
            raise ValueError(f"corpus.path={self.path!r}: the folder (or URL) holding train.zarr and heldout.zarr "
                             "is required for source=zarr")
        if self.source == "hf" and not self.hf_dataset:
            raise ValueError(f"corpus.hf_dataset={self.hf_dataset!r}: a name is required for source=hf")
        for key in ("max_documents", "max_tokens"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"corpus.{key}={value!r}: allowed are null or an integer >= 1")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"corpus.val_fraction={self.val_fraction!r}: allowed is a number in (0, 1)")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The standard library's .py files sorted by relative path; installed packages are not the stdlib."""
    root = stdlib_root()
    paths = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__")]
        paths += [Path(folder, name) for name in names if name.endswith(".py")]
    return sorted(paths, key=lambda p: p.relative_to(root).as_posix())


def _stdlib_documents() -> Iterator[str]:
    # A handful of files are deliberately not UTF-8 (encoding tests); they are skipped rather than decoded
    # with replacement characters, so the corpus holds only real source text.
    for path in stdlib_files():
        try:
            yield path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue


def _record_document(record: dict, cfg: CorpusConfig, where: str) -> str | np.ndarray:
    """The text of a record, or its token ids when corpus.token_field names them."""
    key, field = ("token_field", cfg.token_field) if cfg.token_field else ("text_field", cfg.text_field)
    if field not in record:
        raise ValueError(f"corpus.{key}={field!r}: not in the record from {where} "
                         f"(keys: {', '.join(map(str, record))})")
    return np.asarray(record[field], dtype=np.int64) if cfg.token_field else record[field]


def matched_files(patterns: tuple[str, ...]) -> list[str]:
    """Files matched by the globs, each pattern's matches sorted, in pattern order, without repeats."""
    paths: dict[str, None] = {}  # an ordered set
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            raise ValueError(f"corpus.files: {pattern!r} matches no file")
        paths.update((m, None) for m in matches if os.path.isfile(m))
    return list(paths)


def _file_documents(cfg: CorpusConfig) -> Iterator[str]:
    for path in matched_files(cfg.files):
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        yield _record_document(json.loads(line), cfg, f"{path}:{lineno}")
        else:
            yield Path(path).read_text(encoding="utf-8")


def _hf_documents(cfg: CorpusConfig) -> Iterator[str]:
    import datasets  # slow import, only needed here

    dataset = datasets.load_dataset(cfg.hf_dataset, cfg.hf_config, split=cfg.hf_split,
                                    streaming=cfg.streaming, data_files=list(cfg.data_files) or None)
    for i, record in enumerate(dataset):
        yield _record_document(record, cfg, f"{cfg.hf_dataset} row {i}")


def _npy_documents(cfg: CorpusConfig) -> Iterator[np.ndarray]:
    """Token ids from .npy files: a 1-D array is one document, each row of a 2-D array is one."""
    for path in matched_files(cfg.files):
        array = np.load(path, mmap_mode="r")
        if array.ndim not in (1, 2) or not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"corpus.files: {path} holds a {array.ndim}-D {array.dtype} array; allowed are 1-D "
                             "(one document) or 2-D (a document per row) arrays of integer token ids")
        yield from (array[None] if array.ndim == 1 else array)


def iter_documents(cfg: CorpusConfig) -> Iterator[str | np.ndarray]:
    """Non-empty documents of the corpus in a deterministic order, at most max_documents of them: strings, or
    arrays of token ids for pre-tokenized sources (npy, token_field)."""
    if cfg.source == "zarr":
        raise ValueError("corpus.source='zarr' is read in place, not document by document (fox.data.zarr_source)")
    if cfg.source == "stdlib":
        documents = _stdlib_documents()
    elif cfg.source == "npy":
        documents = _npy_documents(cfg)
    elif cfg.source == "files":
        documents = _file_documents(cfg)
    else:
        documents = _hf_documents(cfg)
    count = 0
    for text in documents:
        if len(text) == 0:
            continue
        yield text
        count += 1
        if cfg.max_documents is not None and count >= cfg.max_documents:
            return


def describe_source(cfg: CorpusConfig) -> dict:
    """The corpus config plus what it resolved to on this machine, for the manifest."""
    info = asdict(cfg)
    info["files"], info["data_files"] = list(cfg.files), list(cfg.data_files)
    if cfg.source == "stdlib":
        info["stdlib"] = {"path": str(stdlib_root()), "python": platform.python_version()}
    elif cfg.source in ("files", "npy"):
        info["matched_files"] = len(matched_files(cfg.files))
    return info
