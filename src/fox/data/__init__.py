"""Corpus -> token shards (`fox tokenize`), zarr corpora read in place, and the readers that feed training and
evaluation."""

from fox.data.checks import training_data
from fox.data.loader import TokenStream, TrainWindows, open_split, validation_windows
from fox.data.shards import check_manifest, load_manifest, tokenize_corpus, verify_shards
from fox.data.sources import CorpusConfig, iter_documents
from fox.data.tokenizers import TokenizerConfig, get_tokenizer

__all__ = [
    "CorpusConfig",
    "TokenStream",
    "TokenizerConfig",
    "TrainWindows",
    "check_manifest",
    "get_tokenizer",
    "iter_documents",
    "load_manifest",
    "open_split",
    "tokenize_corpus",
    "training_data",
    "validation_windows",
    "verify_shards",
]
