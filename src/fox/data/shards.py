"""`fox tokenize`: documents -> token shards (raw numpy memmaps) + manifest.json with checksums.

Layout of a dataset folder:
    train_0000.bin, train_0001.bin, ...  the train split, shard_tokens tokens per file (the last one shorter)
    val_0000.bin, ...                     the validation split
    manifest.json                         written last: its presence marks a complete dataset
Each document is followed by end-of-text, so a split is one stream `doc EOT doc EOT ...` cut into shards at
fixed token counts (a document may continue in the next shard; readers treat the shards as one stream).
Documents go to train or validation by a hash of (seed, document index): deterministic, independent of the
number of workers, and stable when max_documents or max_tokens change.
"""

from __future__ import annotations

import hashlib
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

from fox.data.sources import CorpusConfig, describe_source, iter_documents
from fox.data.tokenizers import TokenizerConfig, get_tokenizer, token_dtype

MANIFEST = "manifest.json"
SPLITS = ("train", "val")
SHARD_TOKENS = 2**28  # 512 MiB of uint16: a few dozen files for a 760M-scale corpus
CHUNK_CHARS = 2**18  # documents are sent to workers in chunks of about this many characters


def is_val(index: int, seed: int, val_fraction: float) -> bool:
    """Whether document `index` belongs to the validation split."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2**64


def default_workers() -> int:
    """Cores this process may use (a Slurm or taskset allocation, not the whole machine)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class ShardWriter:
    """Appends one split's tokens to fixed-size shards under temporary names, hashing as it writes."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.shards: list[dict] = []  # closed shards: file, tokens, sha256
        self.documents = self.tokens = 0
        self._file = None

    def write_document(self, tokens: np.ndarray) -> None:
        self.documents += 1
        self.tokens += len(tokens)
        while len(tokens):
            if self._file is None:
                # open across many calls; commit or abort closes it
                self._file = open(self.out_dir / f"{self.split}_{len(self.shards):04d}.bin.tmp", "wb")  # noqa: SIM115
                self._hash, self._count = hashlib.sha256(), 0
            room = self.shard_tokens - self._count
            part, tokens = tokens[:room], tokens[room:]
            data = part.tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._count += len(part)
            if self._count == self.shard_tokens:
                self._close_shard()

    def _close_shard(self) -> None:
        self._file.close()
        self._file = None
        name = f"{self.split}_{len(self.shards):04d}.bin"
        self.shards.append({"file": name, "tokens": self._count, "sha256": self._hash.hexdigest()})

    def commit(self) -> dict:
        """Rename the shards to their final names; returns this split's manifest entry."""
        if self._file is not None:
            self._close_shard()
        for shard in self.shards:
            os.replace(self.out_dir / f"{shard['file']}.tmp", self.out_dir / shard["file"])
        return {"documents": self.documents, "tokens": self.tokens, "shards": self.shards}

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
        for path in self.out_dir.glob(f"{self.split}_*.bin.tmp"):
            path.unlink()


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


def _worker_pool(tokenizer: TokenizerConfig, workers: int) -> ProcessPoolExecutor:
    # Workers come from a fork server, never from this process: forking a process that already runs threads
    # (tqdm's monitor, datasets streaming, torch) can deadlock the child. The server imports fox.data once.
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["fox.data.shards"])
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(tokenizer,))


def _write_splits(corpus: CorpusConfig, tokenizer: TokenizerConfig, writers: dict[str, ShardWriter],
                  workers: int) -> None:
    """Encode the corpus on `workers` processes and append each document to its split, in corpus order."""
    pool = _worker_pool(tokenizer, workers)
    try:
        documents = _encoded_documents(pool, iter_documents(corpus), in_flight=2 * workers)
        with tqdm(total=corpus.max_tokens, unit="tok", unit_scale=True, mininterval=1.0,
                  desc=f"tokenize {corpus.name}") as bar:
            for index, tokens in enumerate(documents):
                split = "val" if is_val(index, corpus.seed, corpus.val_fraction) else "train"
                writers[split].write_document(tokens)
                if split == "train":
                    bar.update(len(tokens))
                    if corpus.max_tokens is not None and writers["train"].tokens >= corpus.max_tokens:
                        return
    finally:
        pool.shutdown(cancel_futures=True)


def _clear(out_dir: Path) -> None:
    """Remove a previous dataset, manifest first, so the folder never looks complete while it is rewritten."""
    (out_dir / MANIFEST).unlink(missing_ok=True)
    for split in SPLITS:
        for path in [*out_dir.glob(f"{split}_*.bin"), *out_dir.glob(f"{split}_*.bin.tmp")]:
            path.unlink()


def tokenize_corpus(corpus: CorpusConfig, tokenizer: TokenizerConfig, out_dir: str | Path,
                    workers: int | None = None, *, shard_tokens: int = SHARD_TOKENS) -> dict:
    """Tokenize the corpus into out_dir (shards, then manifest.json); returns the manifest."""
    encoding = get_tokenizer(tokenizer)  # fails here, not in every worker, on a bad rank file or no network
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear(out_dir)
    dtype = token_dtype(encoding.n_vocab)
    writers = {split: ShardWriter(out_dir, split, shard_tokens) for split in SPLITS}
    try:
        _write_splits(corpus, tokenizer, writers, workers or default_workers())
        for split, writer in writers.items():
            if writer.tokens == 0:
                n_docs = sum(w.documents for w in writers.values())
                raise ValueError(f"corpus {corpus.name!r}: the {split} split is empty after {n_docs} "
                                 f"documents (corpus.val_fraction={corpus.val_fraction}, max_documents="
                                 f"{corpus.max_documents}, max_tokens={corpus.max_tokens}): raise the "
                                 "fraction or the caps")
        splits = {split: writer.commit() for split, writer in writers.items()}
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    manifest = {
        "format": 1,
        "source": describe_source(corpus),
        "tokenizer": {**asdict(tokenizer), "n_vocab": encoding.n_vocab, "eot": encoding.eot_token},
        "dtype": dtype.name,
        "shard_tokens": shard_tokens,
        "splits": splits,
    }
    tmp = out_dir / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out_dir / MANIFEST)
    return manifest


def load_manifest(out_dir: str | Path) -> dict:
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the dataset was never tokenized or its tokenization "
                                "did not finish (run fox tokenize)")
    return json.loads(path.read_text())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(2**24):
            digest.update(block)
    return digest.hexdigest()


def verify_shards(out_dir: str | Path) -> dict:
    """Recompute every shard's size and sha256; returns the manifest, raises ValueError naming a bad shard."""
    manifest = load_manifest(out_dir)
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            path = Path(out_dir) / shard["file"]
            if not path.is_file():
                raise ValueError(f"{split} shard {path} is missing")
            if (size := path.stat().st_size) != shard["tokens"] * itemsize:
                raise ValueError(f"{split} shard {path} is corrupt: {size} bytes, the manifest says "
                                 f"{shard['tokens']} tokens of {itemsize} bytes")
            if (actual := _sha256(path)) != shard["sha256"]:
                raise ValueError(f"{split} shard {path} is corrupt: sha256 {actual} does not match the "
                                 f"manifest's {shard['sha256']}")
    return manifest
