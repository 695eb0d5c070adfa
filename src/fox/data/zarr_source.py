"""LongCrawl64 as distributed, read in place: 2-D zarr arrays of GPT-2 token ids, one document per row.

    <corpus.path>/train.zarr     (6,609,334 x 65,536) uint16, chunks 2048 x 2048, blosc    -> split train
    <corpus.path>/heldout.zarr   (52,131 x 65,536)                                         -> split val
corpus.path is a folder or any fsspec URL zarr can open (gs://... needs gcsfs). Nothing is copied: `fox tokenize`
checks the arrays (2-D, integer ids inside the vocabulary, every chunk stored) and writes a manifest that
pins their metadata and the checksums of a sample of chunks.

Reading decodes whole chunks (a 16k window of one document touches 8 chunks of 2048 documents) and keeps the
last few in memory, so reading documents in order, as the papers' loader does, decodes each chunk once.
Two silent failures of zarr are caught where a chunk is first read: a missing chunk file reads as zeros (a
partial download), and a changed chunk reads as other tokens. Every chunk's checksum is recorded the first
time fox reads it (chunk_sums/<split>/r<row>.json beside the manifest) and compared on every later read, so
what training and evaluation read is the same data, chunk for chunk, as the first read (cheap: one blake2b
per decoded chunk, one small file per row of chunks).
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path

import numpy as np

from fox.data.sources import CorpusConfig, describe_source
from fox.data.tokenizers import TokenizerConfig, get_tokenizer
from fox.files import write_atomic

ARRAYS = {"train": "train.zarr", "val": "heldout.zarr"}
SAMPLE_CHUNKS = 4  # chunks per split checksummed by fox tokenize, spread over the array
CACHED_CHUNKS = 32  # decoded chunks kept per reader: 32 x 8 MiB at LongCrawl64's chunking
MANIFEST = "manifest.json"


def open_array(url: str):
    import zarr

    try:
        return zarr.open_array(url, mode="r")
    except (FileNotFoundError, KeyError) as error:
        raise FileNotFoundError(f"corpus.path: no zarr array at {url} ({error})") from error
    except ImportError as error:  # a URL scheme whose fsspec backend is not installed, e.g. gcsfs for gs://
        raise ValueError(f"corpus.path: cannot open {url}: {error}") from error


def _array_url(path: str, split: str) -> str:
    """A URL as given; a local folder made absolute (the stages run from other working directories)."""
    root = path.rstrip("/") if "://" in path else str(Path(path).expanduser().resolve())
    return f"{root}/{ARRAYS[split]}"


def _metadata_sha256(array) -> str:
    return hashlib.sha256(json.dumps(array.metadata.to_dict(), sort_keys=True, default=str).encode()).hexdigest()


class ChunkSums:
    """Checksums of decoded chunks, recorded the first time a chunk is read and checked on every later read."""

    def __init__(self, data_dir: str | Path, split: str, url: str):
        self.root, self.url = Path(data_dir) / "chunk_sums" / split, url
        self.rows: dict[int, dict[str, str]] = {}

    def _path(self, row: int) -> Path:
        return self.root / f"r{row}.json"

    def _load(self, row: int) -> dict[str, str]:
        path = self._path(row)
        return json.loads(path.read_text()) if path.is_file() else {}

    def check(self, row: int, col: int, block: np.ndarray) -> None:
        digest = hashlib.blake2b(np.ascontiguousarray(block).tobytes(), digest_size=16).hexdigest()
        if row not in self.rows:
            self.rows[row] = self._load(row)
        known = self.rows[row].get(str(col))
        if known is None:
            # merge with what other readers recorded meanwhile, then write: one file per row of chunks
            self.rows[row] = {**self._load(row), **self.rows[row], str(col): digest}
            self.root.mkdir(parents=True, exist_ok=True)
            write_atomic(self._path(row), json.dumps(self.rows[row], sort_keys=True))
        elif known != digest:
            raise ValueError(f"{self.url}: chunk {row}.{col} changed since fox first read it (checksum {digest}, "
                             f"recorded {known} in {self._path(row)}); re-download that chunk file")


class ZarrDocuments:
    """One split of a zarr corpus: documents of equal length, read through a small cache of decoded chunks."""

    def __init__(self, url: str, data_dir: str | Path, split: str, metadata_sha256: str | None = None):
        """metadata_sha256: the manifest's record of the array; a reader refuses an array that changed since."""
        self.url = url
        self.array = open_array(url)
        if metadata_sha256 is not None and _metadata_sha256(self.array) != metadata_sha256:
            raise ValueError(f"{url}: its zarr metadata changed since fox tokenize described it in "
                             f"{Path(data_dir) / MANIFEST}; delete that manifest and rerun fox tokenize")
        self.n_docs, self.doc_len = self.array.shape
        self.chunk_rows, self.chunk_cols = self.array.chunks
        self.fill_value = self.array.fill_value
        self.n_tokens = self.n_docs * self.doc_len
        self.sums = ChunkSums(data_dir, split, self.url)
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def lengths(self) -> np.ndarray:
        return np.full(self.n_docs, self.doc_len, dtype=np.int64)

    def chunk(self, row: int, col: int) -> np.ndarray:
        """Decoded chunk (row, col), checked: not missing, and as it was when first read."""
        if (row, col) in self._cache:
            self._cache.move_to_end((row, col))
            return self._cache[(row, col)]
        rows = slice(row * self.chunk_rows, min((row + 1) * self.chunk_rows, self.n_docs))
        cols = slice(col * self.chunk_cols, min((col + 1) * self.chunk_cols, self.doc_len))
        block = np.asarray(self.array[rows, cols])
        if self.fill_value is not None and not (block != self.fill_value).any():
            raise ValueError(f"{self.url}: chunk {row}.{col} is missing (zarr reads a missing chunk as "
                             f"fill_value={self.fill_value}); re-download it")
        self.sums.check(row, col, block)
        self._cache[(row, col)] = block
        if len(self._cache) > CACHED_CHUNKS:
            self._cache.popitem(last=False)
        return block

    def read_document(self, doc: int, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) of document `doc` as int64."""
        if not (0 <= doc < self.n_docs and start >= 0 and start + n <= self.doc_len):
            raise IndexError(f"document {doc} tokens [{start}, {start + n}) are outside {self.url} "
                             f"({self.n_docs} x {self.doc_len})")
        row, within = divmod(doc, self.chunk_rows)
        out = np.empty(n, dtype=np.int64)
        done = 0
        while done < n:
            col, offset = divmod(start + done, self.chunk_cols)
            take = min(n - done, self.chunk_cols - offset)
            out[done:done + take] = self.chunk(row, col)[within, offset:offset + take]
            done += take
        return out

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) of the documents read one after another (no separators)."""
        out, done = np.empty(n, dtype=np.int64), 0
        while done < n:
            doc, offset = divmod(start + done, self.doc_len)
            take = min(n - done, self.doc_len - offset)
            out[done:done + take] = self.read_document(doc, offset, take)
            done += take
        return out


def _sample_chunks(shape: tuple[int, int], chunks: tuple[int, int]) -> list[tuple[int, int]]:
    """The first chunk (read first in document order) and a few spread over rows and columns."""
    rows, cols = -(-shape[0] // chunks[0]), -(-shape[1] // chunks[1])
    picks = [(round(i * (rows - 1) / max(1, SAMPLE_CHUNKS - 1)), (i * 7) % cols) for i in range(SAMPLE_CHUNKS)]
    return list(dict.fromkeys([(0, 0), *picks]))


def describe_zarr(corpus: CorpusConfig, tokenizer: TokenizerConfig, out_dir: str | Path) -> dict:
    """Check the zarr arrays of corpus.path and write their manifest into out_dir; returns it."""
    encoding = get_tokenizer(tokenizer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    splits = {}
    for split in ARRAYS:
        url = _array_url(corpus.path, split)
        array = open_array(url)
        if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"{url}: a {array.ndim}-D {array.dtype} array; a zarr corpus holds 2-D integer "
                             "token ids, one document per row")
        if (stored := array.nchunks_initialized) != array.nchunks:
            raise ValueError(f"{url}: {array.nchunks - stored} of its {array.nchunks} chunks are missing (an "
                             "unfinished download?); zarr would read them as zeros")
        reader = ZarrDocuments(url, out_dir, split)
        for row, col in _sample_chunks(array.shape, array.chunks):
            block = reader.chunk(row, col)
            if block.max() >= encoding.n_vocab:
                raise ValueError(f"{url}: chunk {row}.{col} holds token id {int(block.max())}, outside the "
                                 f"vocabulary of tokenizer.name={tokenizer.name!r} ({encoding.n_vocab} ids)")
        n_docs, doc_len = array.shape
        metadata = _metadata_sha256(array)
        splits[split] = {"array": url, "documents": n_docs, "tokens": n_docs * doc_len, "min_document_tokens": doc_len,
                         "document_tokens": doc_len, "chunks": list(array.chunks), "dtype": str(array.dtype),
                         "metadata_sha256": metadata,
                         "sampled_chunks": reader.sums.rows,
                         # one "shard" per array: what the training identity and the readers key on
                         "shards": [{"file": url, "tokens": n_docs * doc_len, "sha256": metadata}]}
    manifest = {"format": 2, "source": describe_source(corpus), "windows": corpus.windows,
                "tokenizer": {**asdict(tokenizer), "n_vocab": encoding.n_vocab, "eot": encoding.eot_token},
                "dtype": splits["train"]["dtype"], "splits": splits}
    write_atomic(out_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest
