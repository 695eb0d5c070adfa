"""Tokenizers, all tiktoken Encodings: GPT-2 BPE (the papers') and a byte-level one that needs no download.

A corpus tokenized from JSON-escaped text (LongCrawl64: each document went through json.dumps before GPT-2 BPE)
teaches the model escaped text, so evaluation must escape prompts the same way and unescape what it generates:
`json_escape` wraps the Encoding so that every text-facing call does that.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
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
    json_escape: bool = False  # the training text was JSON-escaped before tokenization (LongCrawl64)

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


class JsonEscapedEncoding:
    """An Encoding for models trained on JSON-escaped text: text is escaped as json.dumps does (without the
    quotes) before BPE, and decoded text is unescaped; ids, end-of-text and the vocabulary are the inner ones."""

    def __init__(self, inner: tiktoken.Encoding):
        self.inner = inner
        self.name, self.n_vocab, self.eot_token = f"{inner.name}+json", inner.n_vocab, inner.eot_token

    def encode_ordinary(self, text: str) -> list[int]:
        return self.inner.encode_ordinary(json.dumps(text)[1:-1])

    def decode(self, tokens: Sequence[int], errors: str = "replace") -> str:
        escaped = self.inner.decode(list(tokens), errors=errors)
        try:
            return json.loads(f'"{escaped}"')
        except json.JSONDecodeError:
            # a cut escape sequence (a prefix of a generation) or a raw quote: unescape what parses
            return escaped.encode("utf-8", "backslashreplace").decode("unicode_escape", "ignore")


def get_tokenizer(cfg: TokenizerConfig) -> tiktoken.Encoding | JsonEscapedEncoding:
    if cfg.name == "bytes":
        encoding = byte_encoding()
    elif cfg.rank_file is not None:
        encoding = gpt2_encoding(cfg.rank_file)
    else:
        encoding = tiktoken.get_encoding("gpt2")
    return JsonEscapedEncoding(encoding) if cfg.json_escape else encoding


def token_dtype(n_vocab: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id: uint16 halves the disk and page cache of GPT-2 shards."""
    return np.dtype(np.uint16 if n_vocab <= 2**16 else np.uint32)
