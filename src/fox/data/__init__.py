"""Corpus -> token shards (`fox tokenize`) and the readers that feed training and evaluation."""

from fox.data.loader import TokenStream, TrainWindows, validation_windows
from fox.data.shards import load_manifest, tokenize_corpus, verify_shards
from fox.data.sources import CorpusConfig, iter_documents
from fox.data.tokenizers import TokenizerConfig, get_tokenizer

__all__ = [
    "CorpusConfig",
    "TokenStream",
    "TokenizerConfig",
    "TrainWindows",
    "get_tokenizer",
    "iter_documents",
    "load_manifest",
    "tokenize_corpus",
    "validation_windows",
    "verify_shards",
]
