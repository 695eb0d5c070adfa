"""LongCrawl64-layout zarr corpora read in place, document windows with BOS, and the data checks that run before
training: corrupt or missing data, a manifest of another tokenizer, a token budget beyond the split."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from numcodecs import Blosc

from fox import config as fox_config
from fox.data import (
    CorpusConfig,
    TokenizerConfig,
    TokenStream,
    TrainWindows,
    get_tokenizer,
    iter_documents,
    tokenize_corpus,
    training_data,
    validation_windows,
)
from fox.data.loader import open_split
from fox.data.sources import stdlib_files
from tests.conftest import tiny_experiment

DOC = 65536
BYTES = TokenizerConfig(name="bytes")
BOS = 256  # the byte tokenizer's end-of-text


def write_longcrawl(root: Path, train_docs: int = 64, heldout_docs: int = 8) -> Path:
    """train.zarr and heldout.zarr as LongCrawl64 distributes them (zarr v2, uint16, chunks 2048 x 2048, blosc
    lz4), holding the bytes of standard-library sources as ids of the byte tokenizer: real text, no download."""
    text = np.frombuffer(b"".join(p.read_bytes() for p in stdlib_files()[:700]), dtype=np.uint8)
    assert len(text) >= (train_docs + heldout_docs) * DOC
    offset = 0
    for name, rows in (("train.zarr", train_docs), ("heldout.zarr", heldout_docs)):
        array = zarr.create_array(store=str(root / name), shape=(rows, DOC), chunks=(2048, 2048), dtype="<u2",
                                  zarr_format=2, fill_value=0,
                                  compressors=Blosc(cname="lz4", clevel=5, shuffle=Blosc.SHUFFLE))
        array[:] = text[offset:offset + rows * DOC].reshape(rows, DOC)
        offset += rows * DOC
    return root


@pytest.fixture(scope="module")
def longcrawl(tmp_path_factory) -> Path:
    return write_longcrawl(tmp_path_factory.mktemp("longcrawl64"))


@pytest.fixture(scope="module")
def zarr_data(longcrawl, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "lc64" / "bytes"
    tokenize_corpus(CorpusConfig(name="lc64", source="zarr", path=str(longcrawl), windows="documents"), BYTES, out)
    return out


def test_zarr_manifest_describes_the_arrays_in_place(zarr_data, longcrawl):
    manifest = json.loads((zarr_data / "manifest.json").read_text())
    assert manifest["windows"] == "documents" and manifest["tokenizer"]["eot"] == BOS
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert (train["documents"], train["document_tokens"], train["chunks"]) == (64, DOC, [2048, 2048])
    assert val["array"] == str(longcrawl.resolve() / "heldout.zarr") and val["tokens"] == 8 * DOC
    assert train["sampled_chunks"]["0"]  # checksums of the chunks read to check the arrays
    assert not list(zarr_data.glob("*.bin"))  # nothing copied


def test_windows_start_with_bos_and_never_cross_a_document(zarr_data, longcrawl):
    array = zarr.open_array(str(longcrawl / "train.zarr"), mode="r")[:]
    seq_len = 5000  # 13 windows per document, the last 536 tokens of each unused
    loader = TrainWindows(zarr_data, seq_len, 8, seed=1)
    assert loader.n_windows == 64 * 13
    where = {array[d, s:s + seq_len].tobytes(): (d, s) for d in range(64) for s in range(0, DOC - seq_len + 1, seq_len)}
    assert len(where) == loader.n_windows
    seen = []
    for _ in range(-(-loader.n_windows // 8)):
        inputs, targets = loader.next_batch()
        assert (inputs[:, 0] == BOS).all() and torch.equal(inputs[:, 1:], targets[:, :-1])
        # the targets are one document's tokens [k L, k L + L)
        seen += [where[row.astype(np.uint16).tobytes()] for row in targets.numpy()]
    assert sorted(seen[:loader.n_windows]) == sorted(where.values())  # an epoch is every window once


def test_sequential_order_is_the_papers_position_first_order_and_resumes(zarr_data, longcrawl):
    array = zarr.open_array(str(longcrawl / "train.zarr"), mode="r")
    loader = TrainWindows(zarr_data, 16384, 32, order="sequential", rank=1, world_size=2)
    _, targets = loader.next_batch()  # rank 1 of 2: documents 32..63 at window 0
    assert np.array_equal(targets.numpy(), array[32:64, :16384])
    _, targets = loader.next_batch()  # then window 1 of documents 32..63
    assert np.array_equal(targets.numpy(), array[32:64, 16384:32768])
    resumed = TrainWindows(zarr_data, 16384, 32, order="sequential", rank=1, world_size=2)
    resumed.load_state_dict(json.loads(json.dumps(loader.state_dict())))
    assert torch.equal(resumed.next_batch()[1], loader.next_batch()[1])
    with pytest.raises(ValueError, match="order=sequential but this loader has shuffled"):
        TrainWindows(zarr_data, 16384, 32).load_state_dict(loader.state_dict())


def test_validation_windows_are_whole_documents_with_bos(zarr_data, longcrawl):
    heldout = zarr.open_array(str(longcrawl / "heldout.zarr"), mode="r")[:]
    batches = list(validation_windows(zarr_data, DOC, 3))
    assert [len(x) for x, _ in batches] == [3, 3, 2]
    targets = torch.cat([y for _, y in batches])
    assert np.array_equal(targets.numpy(), heldout) and (torch.cat([x for x, _ in batches])[:, 0] == BOS).all()
    with pytest.raises(ValueError, match="corpus.windows=documents needs val documents of at least 131072"):
        validation_windows(zarr_data, 2 * DOC, 1)


def copy_of(zarr_data: Path, longcrawl: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the corpus and its data folder (manifest pointing at the copy)."""
    corpus = Path(shutil.copytree(longcrawl, tmp_path / "corpus"))
    out = tmp_path / "data"
    tokenize_corpus(CorpusConfig(source="zarr", path=str(corpus), windows="documents"), BYTES, out)
    return corpus, out


def test_missing_chunk_is_caught_before_and_while_reading(zarr_data, longcrawl, tmp_path):
    corpus, out = copy_of(zarr_data, longcrawl, tmp_path)
    (corpus / "train.zarr" / "0.9").unlink()  # zarr would read it as zeros, silently
    split = open_split(out, "train")
    with pytest.raises(ValueError, match=r"train.zarr: chunk 0.9 is missing .*re-download it"):
        split.read_document(5, 9 * 2048, 10)
    with pytest.raises(ValueError, match="1 of its 32 chunks are missing"):
        tokenize_corpus(CorpusConfig(source="zarr", path=str(corpus), windows="documents"), BYTES, tmp_path / "x")


def test_changed_chunk_is_caught_where_first_read_again(zarr_data, longcrawl, tmp_path):
    corpus, out = copy_of(zarr_data, longcrawl, tmp_path)
    open_split(out, "train").read_document(3, 4 * 2048, 100)  # first read: checksum recorded
    array = zarr.open_array(str(corpus / "train.zarr"), mode="r+")
    array[3, 4 * 2048] = (int(array[3, 4 * 2048]) ^ 1)  # one flipped bit
    with pytest.raises(ValueError, match=r"chunk 0.4 changed since fox first read it"):
        open_split(out, "train").read_document(3, 4 * 2048, 100)


def run_config(root: Path, data_dir: Path, **changes) -> dict:
    config = tiny_experiment(root, **changes.pop("train", {}))
    for section, values in changes.items():
        config[section] = {**config.get(section, {}), **values}
    config = fox_config.validate(config)
    return fox_config.resolve_run(config, fox_config.run_ids(config)[0]) | {"data_dir": str(data_dir)}


def test_training_data_checks_tokenizer_windows_and_token_budget(zarr_data, byte_corpus, tmp_path):
    lc64 = {"corpus": {"source": "zarr", "path": "unused", "windows": "documents"}}
    assert training_data(run_config(tmp_path, zarr_data, **lc64))["windows"] == "documents"
    with pytest.raises(ValueError, match=r"manifest.json: made with tokenizer.name='bytes' but the config says 'gpt2'"):
        training_data(run_config(tmp_path, zarr_data, tokenizer={"name": "gpt2"}, **lc64))
    with pytest.raises(ValueError, match=r"made with corpus.windows='packed' but the config says 'documents'"):
        training_data(run_config(tmp_path, byte_corpus, corpus={"windows": "documents"}))
    windows = 64 * DOC // 64  # context 64
    too_many = {"tokens": 2 * windows * 64, "tokens_per_step": 64 * 8, "micro_batch_size": 8}
    with pytest.raises(ValueError, match=r"train.tokens=8388608: .* \(2.00 passes\); raise train.max_epochs"):
        training_data(run_config(tmp_path, zarr_data, train=too_many, **lc64))
    training_data(run_config(tmp_path, zarr_data, train={**too_many, "max_epochs": 2}, **lc64))


def test_documents_mode_refuses_documents_shorter_than_the_context(tmp_path):
    texts = ["x" * (500 if i % 2 else 100) for i in range(20)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    corpus = CorpusConfig(source="files", files=[str(tmp_path / "c.jsonl")], windows="documents", val_fraction=0.3)
    tokenize_corpus(corpus, BYTES, tmp_path / "out", workers=1)
    assert TrainWindows(tmp_path / "out", 100, 1).n_windows > 0  # every document holds a 100-token window
    for make in (lambda: TrainWindows(tmp_path / "out", 200, 1), lambda: validation_windows(tmp_path / "out", 200, 1)):
        with pytest.raises(ValueError, match=r"corpus.windows=documents needs \w+ documents of at least 200 "
                                             r"tokens; \d+ of \d+ are shorter \(the shortest 100\): use corpus"):
            make()


def test_flipped_bit_in_a_shard_is_caught_where_first_read(tmp_path):
    tokenize_corpus(CorpusConfig(max_documents=20, val_fraction=0.2), BYTES, tmp_path, workers=1, shard_tokens=50_000)
    TokenStream(tmp_path, "train")  # verified once, remembered by a stamp
    assert (tmp_path / ".verified" / "train_0001.bin.json").is_file()
    shard = tmp_path / "train_0001.bin"
    data = bytearray(shard.read_bytes())
    data[777] ^= 4
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"train shard \S+train_0001.bin is corrupt: sha256 .* delete "
                                         r"\S+manifest.json and rerun fox tokenize"):
        TrainWindows(tmp_path, 64, 2)


def test_pre_tokenized_sources_npy_and_token_field(tmp_path):
    docs = [np.arange(i, i + 300 + 10 * i) % 256 for i in range(12)]
    np.save(tmp_path / "a.npy", docs[0])
    np.save(tmp_path / "b.npy", np.stack([d[:300] for d in docs[1:]]))
    npy = CorpusConfig(source="npy", files=[str(tmp_path / "*.npy")], val_fraction=0.3)
    got = list(iter_documents(npy))
    assert len(got) == 12 and np.array_equal(got[0], docs[0]) and np.array_equal(got[5], docs[5][:300])
    records = "".join(json.dumps({"ids": d.tolist()}) + "\n" for d in docs)
    (tmp_path / "ids.jsonl").write_text(records)
    hf = CorpusConfig(source="hf", hf_dataset="json", data_files=[str(tmp_path / "ids.jsonl")], token_field="ids",
                      val_fraction=0.3)
    manifest = tokenize_corpus(hf, BYTES, tmp_path / "hf", workers=1)
    stream = TokenStream(tmp_path / "hf", "train")
    lengths = stream.lengths()
    assert len(lengths) == manifest["splits"]["train"]["documents"] and manifest["splits"]["train"]["tokens"] == (
        lengths + 1).sum()
    first = next(i for i in range(12) if len(docs[i]) == lengths[0])
    assert np.array_equal(stream.read_document(0, 0, int(lengths[0])), docs[first])
    (tmp_path / "bad.jsonl").write_text(json.dumps({"ids": [1, 2, 300]}) + "\n")
    bad = CorpusConfig(source="files", files=[str(tmp_path / "bad.jsonl")], token_field="ids", val_fraction=0.5)
    with pytest.raises(ValueError, match=r"token id 300 is outside the tokenizer's vocabulary \[0, 257\)"):
        tokenize_corpus(bad, BYTES, tmp_path / "bad", workers=1)


def test_json_escaping_tokenizer():
    plain, escaped = get_tokenizer(BYTES), get_tokenizer(TokenizerConfig(name="bytes", json_escape=True))
    text = 'say "hi"\n\tünï — end'
    assert escaped.encode_ordinary(text) == plain.encode_ordinary(json.dumps(text)[1:-1])
    assert escaped.decode(escaped.encode_ordinary(text)) == text
    assert escaped.decode(plain.encode_ordinary("cut \\u00")) == "cut "  # a cut escape decodes best effort
    assert (escaped.eot_token, escaped.n_vocab) == (plain.eot_token, plain.n_vocab)


def test_json_escape_is_applied_when_tokenizing_and_recorded(tmp_path):
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": 'a "quoted"\nline'}) + "\n" for _ in range(20)))
    corpus = CorpusConfig(source="files", files=[str(tmp_path / "c.jsonl")], val_fraction=0.3)
    manifest = tokenize_corpus(corpus, TokenizerConfig(name="bytes", json_escape=True), tmp_path / "out", workers=1)
    assert manifest["tokenizer"]["json_escape"] is True
    stream = TokenStream(tmp_path / "out", "train")
    assert bytes(stream.read_document(0, 0, int(stream.lengths()[0])).astype(np.uint8)) == b'a \\"quoted\\"\\nline'
