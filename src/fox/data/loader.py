"""Reading a dataset for training (seeded, rank-aware, resumable windows) and evaluation (in order).

Two kinds of windows, named by the manifest's `windows` (corpus.windows):
- packed: a split is one token stream across its shards, documents joined by end-of-text; window w holds stream
  tokens [w L, w L + L + 1): inputs its first L, targets its last L. Windows cross documents (short documents).
- documents: windows lie inside one document and start with BOS (the tokenizer's end-of-text, 50256 for GPT-2),
  as the papers' loader feeds LongCrawl64: document d gives floor(len_d / L) windows, window k fed as
  inputs [BOS, d[kL : kL + L - 1]] and targets d[kL : kL + L]. Every document must be at least L long.
Splits are read from token shards (TokenStream) or in place from zarr arrays (ZarrDocuments).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from fox.data.shards import load_manifest, verify_shards
from fox.data.zarr_source import ZarrDocuments

ORDERS = ("shuffled", "sequential")


class TokenStream:
    """One split's shards as a single stream of tokens, read through read-only memmaps; documents are the runs
    between end-of-texts, located by the shards' indexes. Opening it verifies the split's files (once per file)."""

    def __init__(self, data_dir: str | Path, split: str):
        manifest = verify_shards(data_dir, [split])
        self.dtype = np.dtype(manifest["dtype"])
        shards = manifest["splits"][split]["shards"]
        self.paths = [Path(data_dir) / shard["file"] for shard in shards]
        self.index_paths = [Path(data_dir) / shard["index"] for shard in shards]
        # shard i holds tokens [starts[i], starts[i + 1]) of the stream
        self.starts = np.cumsum([0] + [shard["tokens"] for shard in shards])
        self.n_tokens = int(self.starts[-1])
        self._ends: np.ndarray | None = None

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) as int64."""
        out = np.empty(n, dtype=np.int64)
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        done = 0
        while done < n:
            offset = start + done - int(self.starts[i])
            take = min(n - done, int(self.starts[i + 1] - self.starts[i]) - offset)
            # a fresh memmap per read, as nanoGPT does: pages are read on demand and a long-lived map does not
            # pin tens of GB of page cache to this process's memory footprint
            shard = np.memmap(self.paths[i], dtype=self.dtype, mode="r")
            out[done : done + take] = shard[offset : offset + take]
            done += take
            i += 1
        return out

    def _document_ends(self) -> np.ndarray:
        if self._ends is None:
            self._ends = np.concatenate([np.fromfile(p, dtype=np.uint64) for p in self.index_paths]).astype(np.int64)
        return self._ends

    @property
    def n_docs(self) -> int:
        return len(self._document_ends())

    def lengths(self) -> np.ndarray:
        """Tokens of each document, its end-of-text not counted."""
        ends = self._document_ends()
        return ends - np.concatenate([[0], ends[:-1] + 1])

    def read_document(self, doc: int, start: int, n: int) -> np.ndarray:
        ends = self._document_ends()
        first = 0 if doc == 0 else int(ends[doc - 1]) + 1
        if start + n > int(ends[doc]) - first:
            raise IndexError(f"document {doc} has {int(ends[doc]) - first} tokens, fewer than {start + n}")
        return self.read(first + start, n)


def open_split(data_dir: str | Path, split: str) -> TokenStream | ZarrDocuments:
    """A split of a dataset folder, whatever its source."""
    manifest = load_manifest(data_dir)
    info = manifest["splits"][split]
    if "array" in info:
        return ZarrDocuments(info["array"], data_dir, split, info["metadata_sha256"])
    return TokenStream(data_dir, split)


class DocumentWindows:
    """Window w of a split in document mode: (document, start) for windows of L tokens that each lie in one
    document, listed document by document."""

    def __init__(self, docs: TokenStream | ZarrDocuments, seq_len: int, split: str, data_dir: str | Path):
        lengths = docs.lengths()
        self.docs, self.seq_len = docs, seq_len
        if len(lengths) == 0 or lengths.min() < seq_len:
            short = int((lengths < seq_len).sum())
            raise ValueError(f"{data_dir}: corpus.windows=documents needs {split} documents of at least {seq_len} "
                             f"tokens; {short} of {len(lengths)} are shorter (the shortest "
                             f"{int(lengths.min()) if len(lengths) else 0}): use corpus.windows: packed (documents "
                             "joined by end-of-text) or a length <= the shortest document")
        per_doc = lengths // seq_len
        self.uniform = int(per_doc.min()) == int(per_doc.max())
        self.per_doc = int(per_doc[0])
        self.offsets = np.concatenate([[0], np.cumsum(per_doc)])  # windows of docs before d
        self.n_windows = int(self.offsets[-1])

    def locate(self, w: int) -> tuple[int, int]:
        if self.uniform:
            doc, k = divmod(w, self.per_doc)
        else:
            doc = int(np.searchsorted(self.offsets, w, side="right")) - 1
            k = w - int(self.offsets[doc])
        return doc, k * self.seq_len

    def position_major(self, g: int) -> int:
        """The g-th window when windows are listed position first: window 0 of every document in document
        order, then window 1, ... (the papers' LongCrawl64 order)."""
        if self.uniform:
            k, doc = divmod(g, len(self.offsets) - 1)
            return doc * self.per_doc + k
        if not hasattr(self, "_by_position"):
            ks = np.arange(self.n_windows) - np.repeat(self.offsets[:-1], np.diff(self.offsets))
            self._by_position = np.lexsort((np.arange(self.n_windows), ks))
        return int(self._by_position[g])

    def window(self, w: int, bos: int) -> np.ndarray:
        """(L + 1) tokens whose first L are the inputs and last L the targets: BOS, then the window."""
        doc, start = self.locate(w)
        return np.concatenate([[bos], self.docs.read_document(doc, start, self.seq_len)])


class TrainWindows:
    """Seeded, rank-aware, resumable sampler of training windows from the train split.

    The split holds n windows (see the module docstring). Global sample g is window order_e(g % n), e = g // n:
    with order "shuffled", order_e is a permutation seeded by (seed, e), a new one each epoch; with
    "sequential", windows in order (documents mode: position first, the papers' LongCrawl64 order).
    The k-th call on rank r of W takes g = (k * W + r) * B + i for i < B, so every rank sees disjoint
    samples, the global order does not depend on W, and the whole state is the number of samples consumed.
    """

    def __init__(self, data_dir: str | Path, seq_len: int, micro_batch_size: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, order: str = "shuffled"):
        for key, value in (("seq_len", seq_len), ("micro_batch_size", micro_batch_size),
                           ("world_size", world_size)):
            if value < 1:
                raise ValueError(f"{key}={value}: must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank}: must be in [0, world_size={world_size})")
        if seed < 0:
            raise ValueError(f"seed={seed}: must be >= 0")
        if order not in ORDERS:
            raise ValueError(f"train.data_order={order!r}: allowed are {', '.join(ORDERS)}")
        self.seq_len, self.micro_batch_size, self.seed, self.order = seq_len, micro_batch_size, seed, order
        self.rank, self.world_size = rank, world_size
        manifest = load_manifest(data_dir)
        self.mode, self.bos = manifest.get("windows", "packed"), manifest["tokenizer"]["eot"]
        self.split = open_split(data_dir, "train")
        if self.mode == "documents":
            self.documents = DocumentWindows(self.split, seq_len, "train", data_dir)
            self.n_windows = self.documents.n_windows
        else:
            self.n_windows = (self.split.n_tokens - 1) // seq_len
        if self.n_windows < 1:
            raise ValueError(f"{data_dir}: the train split holds {self.split.n_tokens} tokens, fewer than "
                             f"seq_len + 1 = {seq_len + 1}")
        self.consumed = 0  # global samples handed out so far, over all ranks
        self._epoch, self._perm = -1, None

    def _window(self, g: int) -> int:
        epoch, pos = divmod(g, self.n_windows)
        if self.order == "sequential":
            return self.documents.position_major(pos) if self.mode == "documents" else pos
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._epoch = epoch
        return int(self._perm[pos])

    def _row(self, w: int) -> np.ndarray:
        if self.mode == "documents":
            return self.documents.window(w, self.bos)
        return self.split.read(w * self.seq_len, self.seq_len + 1)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, targets), each (micro_batch_size, seq_len) int64; targets are inputs shifted by one."""
        first = self.consumed + self.rank * self.micro_batch_size
        rows = [self._row(self._window(g)) for g in range(first, first + self.micro_batch_size)]
        self.consumed += self.micro_batch_size * self.world_size
        batch = torch.from_numpy(np.stack(rows))  # (B, T + 1)
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed, "seed": self.seed, "seq_len": self.seq_len,
                "n_windows": self.n_windows, "order": self.order, "windows": self.mode}

    def load_state_dict(self, state: dict) -> None:
        """Continue after state["consumed_samples"] global samples; the world size may differ from before."""
        for key, mine in (("seed", self.seed), ("seq_len", self.seq_len), ("n_windows", self.n_windows),
                          ("order", self.order), ("windows", self.mode)):
            if state.get(key, mine) != mine:
                raise ValueError(f"data loader state: {key}={state[key]} but this loader has {mine}; resuming "
                                 "would not continue the same sample order")
        self.consumed = state["consumed_samples"]


def validation_windows(data_dir: str | Path, seq_len: int, batch_size: int,
                       max_windows: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The validation split's windows in order, as (input_ids, targets) batches of (batch_size, seq_len) int64
    (the last batch may be smaller). Packed: consecutive non-overlapping windows of the stream, every token
    after the first a target exactly once. Documents: each document's windows from its start, with BOS."""
    manifest = load_manifest(data_dir)
    split = open_split(data_dir, "val")
    if manifest.get("windows", "packed") == "documents":
        windows = DocumentWindows(split, seq_len, "val", data_dir)
        n_windows = windows.n_windows if max_windows is None else min(windows.n_windows, max_windows)
        rows = (windows.window(w, manifest["tokenizer"]["eot"]) for w in range(n_windows))
        return _batches(rows, n_windows, batch_size)
    n_windows = (split.n_tokens - 1) // seq_len
    if n_windows < 1:
        raise ValueError(f"{data_dir}: the validation split holds {split.n_tokens} tokens, fewer than "
                         f"seq_len + 1 = {seq_len + 1}")
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    return _batches((split.read(w * seq_len, seq_len + 1) for w in range(n_windows)), n_windows, batch_size)


def _batches(rows: Iterator[np.ndarray], n_windows: int,
             batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for first in range(0, n_windows, batch_size):
        block = torch.from_numpy(np.stack([next(rows) for _ in range(min(batch_size, n_windows - first))]))
        yield block[:, :-1].contiguous(), block[:, 1:].contiguous()  # (B, T) each
