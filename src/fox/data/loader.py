"""Reading token shards for training (shuffled, rank-aware, resumable windows) and evaluation (sequential).

A split is read as one token stream across its shards; windows may cross document and shard boundaries (the
papers pack documents with end-of-text separators). Each window holds seq_len + 1 tokens: inputs are its first
seq_len, targets its last seq_len.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from fox.data.shards import load_manifest


class TokenStream:
    """One split's shards as a single stream of tokens, read through read-only memmaps."""

    def __init__(self, data_dir: str | Path, split: str):
        manifest = load_manifest(data_dir)
        self.dtype = np.dtype(manifest["dtype"])
        shards = manifest["splits"][split]["shards"]
        self.paths = [Path(data_dir) / shard["file"] for shard in shards]
        for path, shard in zip(self.paths, shards, strict=True):
            # a stat per shard catches a missing or truncated file now; verify_shards checks the contents
            if not path.is_file() or path.stat().st_size != shard["tokens"] * self.dtype.itemsize:
                raise ValueError(f"{split} shard {path} is missing or does not hold the manifest's "
                                 f"{shard['tokens']} tokens")
        # shard i holds tokens [starts[i], starts[i + 1]) of the stream
        self.starts = np.cumsum([0] + [shard["tokens"] for shard in shards])
        self.n_tokens = int(self.starts[-1])

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


class TrainWindows:
    """Seeded, rank-aware, resumable sampler of training windows from the train split.

    The split holds n = (N - 1) // seq_len windows, window w starting at token w * seq_len. Global sample
    g is window perm_e[g % n], e = g // n, with perm_e a permutation seeded by (seed, e): a new order each
    epoch.
    The k-th call on rank r of W takes g = (k * W + r) * B + i for i < B, so every rank sees disjoint
    samples, the global order does not depend on W, and the whole state is the number of samples consumed.
    """

    def __init__(self, data_dir: str | Path, seq_len: int, micro_batch_size: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0):
        for key, value in (("seq_len", seq_len), ("micro_batch_size", micro_batch_size),
                           ("world_size", world_size)):
            if value < 1:
                raise ValueError(f"{key}={value}: must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank}: must be in [0, world_size={world_size})")
        if seed < 0:
            raise ValueError(f"seed={seed}: must be >= 0")
        self.seq_len, self.micro_batch_size, self.seed = seq_len, micro_batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.stream = TokenStream(data_dir, "train")
        self.n_windows = (self.stream.n_tokens - 1) // seq_len
        if self.n_windows < 1:
            raise ValueError(f"{data_dir}: the train split holds {self.stream.n_tokens} tokens, fewer than "
                             f"seq_len + 1 = {seq_len + 1}")
        self.consumed = 0  # global samples handed out so far, over all ranks
        self._epoch, self._perm = -1, None

    def _window(self, g: int) -> int:
        epoch, pos = divmod(g, self.n_windows)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._epoch = epoch
        return int(self._perm[pos])

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, targets), each (micro_batch_size, seq_len) int64; targets are inputs shifted by one."""
        first = self.consumed + self.rank * self.micro_batch_size
        rows = [self.stream.read(self._window(g) * self.seq_len, self.seq_len + 1)
                for g in range(first, first + self.micro_batch_size)]
        self.consumed += self.micro_batch_size * self.world_size
        batch = torch.from_numpy(np.stack(rows))  # (B, T + 1)
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed, "seed": self.seed, "seq_len": self.seq_len,
                "n_windows": self.n_windows}

    def load_state_dict(self, state: dict) -> None:
        """Continue after state["consumed_samples"] global samples; the world size may differ from before."""
        for key in ("seed", "seq_len", "n_windows"):
            if state[key] != getattr(self, key):
                raise ValueError(f"data loader state: {key}={state[key]} but this loader has "
                                 f"{getattr(self, key)}; resuming would not continue the same sample order")
        self.consumed = state["consumed_samples"]


def validation_windows(data_dir: str | Path, seq_len: int, batch_size: int,
                       max_windows: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive non-overlapping windows of the validation split, in order, as (input_ids, targets) batches
    of (batch_size, seq_len) int64 (the last batch may be smaller); every token after the first is a target
    exactly once."""
    stream = TokenStream(data_dir, "val")
    n_windows = (stream.n_tokens - 1) // seq_len
    if n_windows < 1:
        raise ValueError(f"{data_dir}: the validation split holds {stream.n_tokens} tokens, fewer than "
                         f"seq_len + 1 = {seq_len + 1}")
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    return _sequential_batches(stream, seq_len, batch_size, n_windows)


def _sequential_batches(stream: TokenStream, seq_len: int, batch_size: int,
                        n_windows: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for first in range(0, n_windows, batch_size):
        rows = min(batch_size, n_windows - first)
        block = torch.from_numpy(stream.read(first * seq_len, rows * seq_len + 1))
        yield block[:-1].view(rows, seq_len), block[1:].view(rows, seq_len)  # (B, T) each
