"""Where documents come from: the Python standard library, local txt/jsonl files, or a HF `datasets` dataset.

Every source yields plain strings in a deterministic order; empty documents are dropped here so that document
counts mean the same thing for every source.
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

SOURCES = ("stdlib", "files", "hf")


@dataclass(frozen=True, kw_only=True)
class CorpusConfig:
    name: str = "stdlib"  # names the data folder results/data/{name}/{tokenizer}
    source: Literal["stdlib", "files", "hf"] = "stdlib"
    files: tuple[str, ...] = ()  # globs for source=files: a .jsonl file holds a document per line, others one
    data_files: tuple[str, ...] = ()  # for source=hf with a local builder, e.g. hf_dataset="json"
    text_field: str = "text"  # field holding the text in jsonl / hf records
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
        if self.source == "files" and not self.files:
            raise ValueError(f"corpus.files={list(self.files)!r}: a glob is required for source=files")
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


def _record_text(record: dict, field: str, where: str) -> str:
    if field not in record:
        raise ValueError(f"corpus.text_field={field!r}: not in the record from {where} "
                         f"(keys: {', '.join(map(str, record))})")
    return record[field]


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
                        yield _record_text(json.loads(line), cfg.text_field, f"{path}:{lineno}")
        else:
            yield Path(path).read_text(encoding="utf-8")


def _hf_documents(cfg: CorpusConfig) -> Iterator[str]:
    import datasets  # slow import, only needed here

    dataset = datasets.load_dataset(cfg.hf_dataset, cfg.hf_config, split=cfg.hf_split,
                                    streaming=cfg.streaming, data_files=list(cfg.data_files) or None)
    for i, record in enumerate(dataset):
        yield _record_text(record, cfg.text_field, f"{cfg.hf_dataset} row {i}")


def iter_documents(cfg: CorpusConfig) -> Iterator[str]:
    """Non-empty documents of the corpus in a deterministic order, at most max_documents of them."""
    if cfg.source == "stdlib":
        documents = _stdlib_documents()
    elif cfg.source == "files":
        documents = _file_documents(cfg)
    else:
        documents = _hf_documents(cfg)
    count = 0
    for text in documents:
        if not text:
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
    elif cfg.source == "files":
        info["matched_files"] = len(matched_files(cfg.files))
    return info
