"""Tokenizers, all tiktoken Encodings: GPT-2 BPE (the papers') and a byte-level one that needs no download."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import tiktoken
import tiktoken.load
import tiktoken_ext.openai_public

TOKENIZERS = ("bytes", "gpt2")
EOT = "<|endoftext|>"
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # tiktoken's r50k_base


@dataclass(frozen=True, kw_only=True)
class TokenizerConfig:
    name: Literal["bytes", "gpt2"] = "bytes"
    rank_file: str | None = None  # local gpt2.tiktoken for offline machines; None lets tiktoken download it

    def __post_init__(self):
        if self.name not in TOKENIZERS:
            raise ValueError(f"tokenizer.name={self.name!r}: allowed are {', '.join(TOKENIZERS)}")
        if self.rank_file is not None and self.name != "gpt2":
            raise ValueError(f"tokenizer.rank_file={self.rank_file!r}: allowed only with name='gpt2'")


def byte_encoding() -> tiktoken.Encoding:
    """256 single-byte ranks plus end-of-text = 256: every text encodes, nothing to download."""
    return tiktoken.Encoding(
        "bytes",
        pat_str=tiktoken_ext.openai_public.r50k_pat_str,  # any split works without merges; words stay short
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={EOT: 256},
    )


def gpt2_encoding(rank_file: str) -> tiktoken.Encoding:
    """GPT-2 BPE from a local rank file; the hash check rejects a file that is not GPT-2's ranks."""
    ranks = tiktoken.load.load_tiktoken_bpe(rank_file, expected_hash=GPT2_RANKS_SHA256)
    return tiktoken.Encoding("gpt2", pat_str=tiktoken_ext.openai_public.r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={EOT: 50256})


def get_tokenizer(cfg: TokenizerConfig) -> tiktoken.Encoding:
    if cfg.name == "bytes":
        return byte_encoding()
    if cfg.rank_file is not None:
        return gpt2_encoding(cfg.rank_file)
    return tiktoken.get_encoding("gpt2")


def token_dtype(n_vocab: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id: uint16 halves the disk and page cache of GPT-2 shards."""
    return np.dtype(np.uint16 if n_vocab <= 2**16 else np.uint32)
