"""`fox tokenize`: documents -> token shards (raw numpy memmaps) with document indexes + manifest.json.

Layout of a dataset folder:
    train_0000.bin, train_0001.bin, ...  the train split, shard_tokens tokens per file (the last one shorter)
    train_0000.idx, ...                   uint64 stream positions of the end-of-text after each document that
                                          ends in that shard (document mode windows need the boundaries)
    val_0000.bin, val_0000.idx, ...       the validation split
    progress.json                         while tokenizing: the last complete shard of each split, for resuming
    manifest.json                         written last: its presence marks a complete dataset
Each document is followed by end-of-text, so a split is one stream `doc EOT doc EOT ...` cut into shards at
fixed token counts (a document may continue in the next shard; readers treat the shards as one stream).
Documents go to train or validation by a hash of (seed, document index): deterministic, independent of the
number of workers, and stable when max_documents or max_tokens change.

A killed tokenization resumes: every time a shard is complete, progress.json records the closed shards, how far
the open ones got and the next corpus document; a rerun with the same corpus, tokenizer and shard size cuts the
open shards back to that point and continues from that document without re-tokenizing what came before.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing as mp
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fox.data.sources import CorpusConfig, describe_source, iter_documents, matched_files
from fox.data.tokenizers import TokenizerConfig, get_tokenizer, token_dtype
from fox.files import write_atomic

MANIFEST = "manifest.json"
PROGRESS = "progress.json"
STAMPS = ".verified"
SPLITS = ("train", "val")
SHARD_TOKENS = 2**28  # 512 MiB of uint16: a few dozen files for a 760M-scale corpus
CHUNK_CHARS = 2**18  # documents are sent to workers in chunks of about this many characters
FORMAT = 2


def is_val(index: int, seed: int, val_fraction: float) -> bool:
    """Whether document `index` belongs to the validation split."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2**64


def default_workers() -> int:
    """Cores this process may use (a Slurm or taskset allocation, not the whole machine)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _sha256(path: Path, limit: int | None = None) -> hashlib._Hash:
    """sha256 of a file, or of its first `limit` bytes."""
    digest, left = hashlib.sha256(), limit if limit is not None else float("inf")
    with open(path, "rb") as f:
        while left > 0 and (block := f.read(int(min(2**24, left)))):
            digest.update(block)
            left -= len(block)
    return digest


class ShardWriter:
    """Appends one split's documents to fixed-size shards, hashing as it writes; a shard gets its final name as
    soon as it is complete, the open one stays under a temporary name until then."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int, dtype: np.dtype):
        self.out_dir, self.split, self.shard_tokens, self.dtype = out_dir, split, shard_tokens, dtype
        self.shards: list[dict] = []  # closed shards: file, tokens, sha256, index, index_sha256
        self.documents = self.tokens = 0
        self.min_document_tokens: int | None = None
        self._ends: list[int] = []  # stream positions of end-of-texts not yet in a closed shard's index
        self._file = None
        self._count = 0

    def _name(self, suffix: str) -> Path:
        return self.out_dir / f"{self.split}_{len(self.shards):04d}.{suffix}"

    def write_document(self, tokens: np.ndarray) -> bool:
        """Append a document (its end-of-text included); returns whether a shard was completed."""
        self.documents += 1
        length = len(tokens) - 1
        self.min_document_tokens = length if self.min_document_tokens is None else min(self.min_document_tokens,
                                                                                        length)
        self._ends.append(self.tokens + length)
        self.tokens += len(tokens)
        closed = False
        while len(tokens):
            if self._file is None:
                # open across many calls; _close_shard or close_files closes it
                self._file = open(self._name("bin.tmp"), "wb")  # noqa: SIM115
                self._hash, self._count = hashlib.sha256(), 0
            part, tokens = tokens[: self.shard_tokens - self._count], tokens[self.shard_tokens - self._count:]
            data = part.astype(self.dtype, copy=False).tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._count += len(part)
            if self._count == self.shard_tokens:
                self._close_shard()
                closed = True
        return closed

    def _close_shard(self) -> None:
        self._file.close()
        self._file = None
        shard_end = sum(s["tokens"] for s in self.shards) + self._count
        ends = np.asarray([e for e in self._ends if e < shard_end], dtype=np.uint64)
        self._ends = [e for e in self._ends if e >= shard_end]
        index = self._name("idx")
        write_atomic_bytes(index, ends.tobytes())
        os.replace(self._name("bin.tmp"), self._name("bin"))
        self.shards.append({"file": self._name("bin").name, "tokens": self._count, "sha256": self._hash.hexdigest(),
                            "index": index.name, "index_sha256": hashlib.sha256(ends.tobytes()).hexdigest()})
        self._count = 0

    def state(self) -> dict:
        """Where this split stands, for progress.json; the open shard is flushed first."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
        return {"shards": self.shards, "documents": self.documents, "tokens": self.tokens,
                "min_document_tokens": self.min_document_tokens, "open_tokens": self._count, "ends": self._ends}

    def restore(self, state: dict) -> None:
        """Continue from a state(): the open shard is cut back to what it held then and rehashed."""
        self.shards, self.documents, self.tokens = state["shards"], state["documents"], state["tokens"]
        self.min_document_tokens, self._ends = state["min_document_tokens"], list(state["ends"])
        self._count = state["open_tokens"]
        for shard in self.shards:
            path = self.out_dir / shard["file"]
            if not path.is_file() or path.stat().st_size != shard["tokens"] * self.dtype.itemsize:
                raise FileNotFoundError(f"{path}: a shard that {PROGRESS} lists as complete is missing or cut")
        # what the killed run wrote after that state: later shards go, the open one may have been completed
        for path in self.out_dir.glob(f"{self.split}_*.*"):
            number = int(path.name.split("_")[1].split(".")[0])
            if number > len(self.shards) or (number == len(self.shards) and path.suffix == ".idx"):
                path.unlink()
        if self._name("bin").is_file():
            os.replace(self._name("bin"), self._name("bin.tmp"))
        if self._count:
            path = self._name("bin.tmp")
            if not path.is_file() or path.stat().st_size < self._count * self.dtype.itemsize:
                raise FileNotFoundError(f"{path}: the open shard is shorter than {PROGRESS} records")
            os.truncate(path, self._count * self.dtype.itemsize)
            self._hash = _sha256(path)
            self._file = open(path, "ab")  # noqa: SIM115

    def commit(self) -> dict:
        """Close the last shard; returns this split's manifest entry."""
        if self._file is not None:
            self._close_shard()
        return {"documents": self.documents, "tokens": self.tokens, "min_document_tokens": self.min_document_tokens,
                "shards": self.shards}

    def close_files(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def write_atomic_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# Each worker process builds its tokenizer once; tiktoken Encodings are not sent between processes.
_encoding = None


def _init_worker(cfg: TokenizerConfig) -> None:
    global _encoding
    _encoding = get_tokenizer(cfg)


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, list[int]]:
    """Tokens of a chunk of documents, each followed by end-of-text, concatenated; and each one's length."""
    eot, dtype = _encoding.eot_token, token_dtype(_encoding.n_vocab)
    ids = [_encoding.encode_ordinary(text) + [eot] for text in texts]  # end-of-text inside a text stays text
    return np.concatenate([np.asarray(i, dtype=dtype) for i in ids]), [len(i) for i in ids]


def _chunks(documents: Iterable[str]) -> Iterator[list[str]]:
    chunk, chars = [], 0
    for text in documents:
        chunk.append(text)
        chars += len(text)
        if chars >= CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _split_result(result: tuple[np.ndarray, list[int]]) -> list[np.ndarray]:
    tokens, lengths = result
    return np.split(tokens, np.cumsum(lengths)[:-1])


def _encoded_documents(pool: ProcessPoolExecutor, documents: Iterable[str],
                       in_flight: int) -> Iterator[np.ndarray]:
    """Token arrays of the documents in order; at most `in_flight` chunks are queued, so a streaming source
    is read only as fast as the workers encode it."""
    pending = deque()
    for chunk in _chunks(documents):
        pending.append(pool.submit(_encode_chunk, chunk))
        if len(pending) >= in_flight:
            yield from _split_result(pending.popleft().result())
    while pending:
        yield from _split_result(pending.popleft().result())


def _token_documents(documents: Iterable[np.ndarray], n_vocab: int, eot: int, first: int) -> Iterator[np.ndarray]:
    """Pre-tokenized documents checked against the vocabulary, each followed by end-of-text."""
    for index, ids in enumerate(documents, first):
        ids = np.asarray(ids)
        if len(ids) and (ids.min() < 0 or ids.max() >= n_vocab):
            bad = int(ids.max() if ids.max() >= n_vocab else ids.min())
            raise ValueError(f"corpus document {index}: token id {bad} is outside the tokenizer's vocabulary "
                             f"[0, {n_vocab}): is tokenizer.name right?")
        yield np.append(ids.astype(np.int64), eot)


def _worker_pool(tokenizer: TokenizerConfig, workers: int) -> ProcessPoolExecutor:
    # Workers come from a fork server, never from this process: forking a process that already runs threads
    # (tqdm's monitor, datasets streaming, torch) can deadlock the child. The server imports fox.data once.
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["fox.data.shards"])
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(tokenizer,))


def _write_splits(corpus: CorpusConfig, tokenizer: TokenizerConfig, writers: dict[str, ShardWriter],
                  workers: int, first: int, save_progress) -> None:
    """Encode the corpus from document `first` on and append each document to its split, in corpus order;
    save_progress(next_document) runs after every document that completed a shard."""
    documents = itertools.islice(iter_documents(corpus), first, None)
    pre_tokenized = corpus.source == "npy" or corpus.token_field is not None
    pool = None if pre_tokenized else _worker_pool(tokenizer, workers)
    try:
        if pre_tokenized:
            encoding = get_tokenizer(tokenizer)
            encoded = _token_documents(documents, encoding.n_vocab, encoding.eot_token, first)
        else:
            encoded = _encoded_documents(pool, documents, in_flight=2 * workers)
        with tqdm(total=corpus.max_tokens, initial=writers["train"].tokens, unit="tok", unit_scale=True,
                  mininterval=1.0, desc=f"tokenize {corpus.name}") as bar:
            for index, tokens in enumerate(encoded, first):
                split = "val" if is_val(index, corpus.seed, corpus.val_fraction) else "train"
                if writers[split].write_document(tokens):
                    save_progress(index + 1)
                if split == "train":
                    bar.update(len(tokens))
                    if corpus.max_tokens is not None and writers["train"].tokens >= corpus.max_tokens:
                        return
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _clear(out_dir: Path) -> None:
    """Remove a previous dataset, manifest first, so the folder never looks complete while it is rewritten."""
    (out_dir / MANIFEST).unlink(missing_ok=True)
    (out_dir / PROGRESS).unlink(missing_ok=True)
    for split in SPLITS:
        for path in out_dir.glob(f"{split}_*.*"):
            path.unlink()
    for path in out_dir.glob(f"{STAMPS}/*"):
        path.unlink()


def _identity(corpus: CorpusConfig, tokenizer: TokenizerConfig, shard_tokens: int) -> dict:
    """What decides the shards' content: a resumed tokenization must match it exactly."""
    files = {}
    if corpus.source in ("files", "npy") or (corpus.source == "hf" and corpus.data_files):
        for path in matched_files(corpus.files or corpus.data_files):
            stat = os.stat(path)
            files[path] = [stat.st_size, stat.st_mtime_ns]
    return {"format": FORMAT, "source": describe_source(corpus), "files": files, "tokenizer": asdict(tokenizer),
            "shard_tokens": shard_tokens}


def tokenize_corpus(corpus: CorpusConfig, tokenizer: TokenizerConfig, out_dir: str | Path,
                    workers: int | None = None, *, shard_tokens: int = SHARD_TOKENS) -> dict:
    """Tokenize the corpus into out_dir (shards, then manifest.json), resuming an interrupted run of the same
    corpus; returns the manifest. source=zarr is not copied: its manifest describes the arrays in place."""
    if corpus.source == "zarr":
        from fox.data.zarr_source import describe_zarr

        return describe_zarr(corpus, tokenizer, out_dir)
    encoding = get_tokenizer(tokenizer)  # fails here, not in every worker, on a bad rank file or no network
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    identity = _identity(corpus, tokenizer, shard_tokens)
    progress = json.loads((out_dir / PROGRESS).read_text()) if (out_dir / PROGRESS).is_file() else None
    dtype = token_dtype(encoding.n_vocab)
    writers = {split: ShardWriter(out_dir, split, shard_tokens, dtype) for split in SPLITS}
    first = 0
    if progress is not None and progress["identity"] == identity and not (out_dir / MANIFEST).is_file():
        try:
            for split, writer in writers.items():
                writer.restore(progress["splits"][split])
            first = progress["next_document"]
            print(f"[fox] tokenize {corpus.name}: resuming at document {first} ({writers['train'].tokens} train "
                  f"tokens already in {len(writers['train'].shards)} shards)", flush=True)
        except FileNotFoundError as error:
            print(f"[fox] tokenize {corpus.name}: cannot resume ({error}); starting afresh", flush=True)
            for writer in writers.values():
                writer.close_files()
            writers = {split: ShardWriter(out_dir, split, shard_tokens, dtype) for split in SPLITS}
    if first == 0:
        _clear(out_dir)

    def save_progress(next_document: int) -> None:
        state = {split: writer.state() for split, writer in writers.items()}
        write_atomic(out_dir / PROGRESS, json.dumps({"identity": identity, "next_document": next_document,
                                                     "splits": state}))

    try:
        _write_splits(corpus, tokenizer, writers, workers or default_workers(), first, save_progress)
        for split, writer in writers.items():
            if writer.tokens == 0:
                n_docs = sum(w.documents for w in writers.values())
                raise ValueError(f"corpus {corpus.name!r}: the {split} split is empty after {n_docs} "
                                 f"documents (corpus.val_fraction={corpus.val_fraction}, max_documents="
                                 f"{corpus.max_documents}, max_tokens={corpus.max_tokens}): raise the "
                                 "fraction or the caps")
        splits = {split: writer.commit() for split, writer in writers.items()}
    finally:
        for writer in writers.values():
            writer.close_files()
    manifest = {
        "format": FORMAT,
        "source": describe_source(corpus),
        "windows": corpus.windows,
        "tokenizer": {**asdict(tokenizer), "n_vocab": encoding.n_vocab, "eot": encoding.eot_token},
        "dtype": dtype.name,
        "shard_tokens": shard_tokens,
        "splits": splits,
    }
    write_atomic(out_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    (out_dir / PROGRESS).unlink(missing_ok=True)
    return manifest


def load_manifest(out_dir: str | Path) -> dict:
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the dataset was never tokenized or its tokenization "
                                "did not finish (run fox tokenize)")
    return json.loads(path.read_text())


def check_manifest(manifest: dict, data_dir: str | Path, tokenizer: dict, windows: str) -> None:
    """The dataset must be the one the config asks for: same tokenizer (ids mean the same tokens) and windows."""
    made = manifest["tokenizer"]
    for key in ("name", "json_escape"):
        if made.get(key, False) != tokenizer.get(key, False):
            raise ValueError(f"{Path(data_dir) / MANIFEST}: made with tokenizer.{key}={made.get(key, False)!r} but "
                             f"the config says {tokenizer.get(key, False)!r}; rerun fox tokenize (snakemake does) "
                             "or fix the config")
    if manifest.get("windows", "packed") != windows:
        raise ValueError(f"{Path(data_dir) / MANIFEST}: made with corpus.windows={manifest.get('windows')!r} but the "
                         f"config says {windows!r}; rerun fox tokenize (snakemake does) or fix the config")


def _verify_file(path: Path, size: int, sha256: str, what: str) -> None:
    """Check size and sha256 once; a stamp (size, mtime, hash) remembers a verified file until it changes."""
    if not path.is_file():
        raise ValueError(f"{what} {path} is missing: rerun fox tokenize (delete {path.parent / MANIFEST} first)")
    stat = path.stat()
    stamp_path = path.parent / STAMPS / f"{path.name}.json"
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}
    if stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
        return
    if stat.st_size != size:
        raise ValueError(f"{what} {path} is corrupt: {stat.st_size} bytes, the manifest says {size}; delete "
                         f"{path.parent / MANIFEST} and rerun fox tokenize")
    if (actual := _sha256(path).hexdigest()) != sha256:
        raise ValueError(f"{what} {path} is corrupt: sha256 {actual} does not match the manifest's {sha256}; "
                         f"delete {path.parent / MANIFEST} and rerun fox tokenize")
    stamp_path.parent.mkdir(exist_ok=True)
    write_atomic(stamp_path, json.dumps(stamp))


def verify_shards(out_dir: str | Path, splits: Iterable[str] = SPLITS) -> dict:
    """Check every shard and index of the splits against the manifest (each file hashed once, then remembered
    by a stamp keyed on its size and mtime); returns the manifest, raises ValueError naming a bad file."""
    manifest = load_manifest(out_dir)
    if manifest.get("format", 1) < FORMAT:
        raise ValueError(f"{Path(out_dir) / MANIFEST}: format {manifest.get('format', 1)}, written by an older fox "
                         "without document indexes; delete it and rerun fox tokenize")
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for split in splits:
        for shard in manifest["splits"][split]["shards"]:
            _verify_file(Path(out_dir) / shard["file"], shard["tokens"] * itemsize, shard["sha256"], f"{split} shard")
            index = Path(out_dir) / shard["index"]
            size = index.stat().st_size if index.is_file() else 0
            _verify_file(index, size, shard["index_sha256"], f"{split} index")
    return manifest
