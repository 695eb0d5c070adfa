"""fox.data: tokenizers, sources, shards and manifest, train/val split, loaders. Real tiktoken, no mocks."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fox.data import (
    CorpusConfig,
    TokenizerConfig,
    TrainWindows,
    get_tokenizer,
    iter_documents,
    load_manifest,
    tokenize_corpus,
    validation_windows,
    verify_shards,
)
from fox.data.shards import is_val
from fox.data.sources import stdlib_files

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GPT2_RANKS = SHARED_DATA / "gpt2.tiktoken"
needs_gpt2_ranks = pytest.mark.skipif(
    not GPT2_RANKS.is_file(), reason=f"GPT-2 rank file {GPT2_RANKS} absent (shared/ is not beside the repo)")
BYTES = TokenizerConfig(name="bytes")
EOT = 256  # the byte tokenizer's end-of-text


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: text, "id": i}) + "\n" for i, text in enumerate(texts)))
    return path


def split_stream(out_dir: Path, split: str) -> np.ndarray:
    """A split's shards concatenated, read back independently of fox.data.loader."""
    manifest = load_manifest(out_dir)
    shards = manifest["splits"][split]["shards"]
    return np.concatenate([np.fromfile(out_dir / s["file"], dtype=manifest["dtype"]) for s in shards])


def decoded_documents(out_dir: Path, split: str) -> list[str]:
    stream = split_stream(out_dir, split)
    assert stream[-1] == EOT
    ends = np.flatnonzero(stream == EOT)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [bytes(stream[a:b].astype(np.uint8)).decode() for a, b in zip(starts, ends, strict=True)]


# ---- tokenizers


@pytest.mark.parametrize("name", ["bytes", pytest.param("gpt2", marks=needs_gpt2_ranks)])
def test_tokenizer_round_trip(name):
    enc = get_tokenizer(TokenizerConfig(name=name, rank_file=str(GPT2_RANKS) if name == "gpt2" else None))
    text = "def f(x):\n    return x ** 2  # ünïcödé, 中文, emoji 🦊\n<|endoftext|> stays text"
    ids = enc.encode_ordinary(text)
    assert enc.decode(ids) == text
    assert enc.eot_token not in ids


def test_bytes_tokenizer():
    enc = get_tokenizer(BYTES)
    assert (enc.n_vocab, enc.eot_token) == (257, EOT)
    assert enc.encode_ordinary("aé") == list("aé".encode())


@needs_gpt2_ranks
def test_gpt2_ids():
    enc = get_tokenizer(TokenizerConfig(name="gpt2", rank_file=str(GPT2_RANKS)))
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert (enc.n_vocab, enc.eot_token) == (50257, 50256)


# ---- sources


def test_stdlib_order_is_deterministic_and_skips_non_utf8_and_empty_files():
    files = stdlib_files()
    assert files == stdlib_files()
    assert not any("site-packages" in p.parts for p in files)
    expected = []
    for path in files:
        try:
            expected += [path.read_bytes().decode("utf-8")]
        except UnicodeDecodeError:
            continue
    docs = list(iter_documents(CorpusConfig()))
    assert docs == [text for text in expected if text] and len(expected) < len(files)
    assert docs[:5] == list(iter_documents(CorpusConfig(max_documents=5)))


def test_stdlib_shards_match_manifest_and_rerun_is_identical(tmp_path):
    corpus = CorpusConfig(max_documents=50, val_fraction=0.1)
    first = tokenize_corpus(corpus, BYTES, tmp_path / "a", workers=2, shard_tokens=100_000)
    second = tokenize_corpus(corpus, BYTES, tmp_path / "b", workers=1, shard_tokens=100_000)
    assert first == second == load_manifest(tmp_path / "a") == verify_shards(tmp_path / "a")
    assert (first["dtype"], first["tokenizer"]["n_vocab"], first["tokenizer"]["eot"]) == ("uint16", 257, EOT)
    splits = first["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == 50
    assert len(splits["train"]["shards"]) > 1
    for split, info in splits.items():
        stream = split_stream(tmp_path / "a", split)
        assert len(stream) == info["tokens"] == sum(s["tokens"] for s in info["shards"])
        assert (stream == EOT).sum() == info["documents"]
    names = sorted(p.name for p in (tmp_path / "a").iterdir() if p.name != ".verified")  # verify_shards' stamps
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_files_source_txt_and_jsonl(tmp_path):
    (tmp_path / "b.txt").write_text("second file\n")
    (tmp_path / "a.txt").write_text("first file\n")
    write_jsonl(tmp_path / "c.jsonl", ["record one", "", "record three"])
    corpus = CorpusConfig(source="files", files=[str(tmp_path / "*.txt"), str(tmp_path / "c.jsonl")],
                          val_fraction=0.5)
    assert corpus.files == (str(tmp_path / "*.txt"), str(tmp_path / "c.jsonl"))
    expected = ["first file\n", "second file\n", "record one", "record three"]  # empty documents are dropped
    assert list(iter_documents(corpus)) == expected
    tokenize_corpus(corpus, BYTES, tmp_path / "out", workers=1)
    written = decoded_documents(tmp_path / "out", "train") + decoded_documents(tmp_path / "out", "val")
    assert sorted(written) == sorted(expected)


def test_hf_json_source_matches_files_source(tmp_path):
    texts = [f"document {i}: " + "lorem ipsum " * (i % 7) for i in range(40)]
    path = write_jsonl(tmp_path / "corpus.jsonl", texts, field="content")
    hf = CorpusConfig(source="hf", hf_dataset="json", data_files=[str(path)], text_field="content",
                      val_fraction=0.2)
    assert list(iter_documents(hf)) == texts
    files = CorpusConfig(source="files", files=[str(path)], text_field="content", val_fraction=0.2)
    from_hf = tokenize_corpus(hf, BYTES, tmp_path / "hf", workers=2)
    from_files = tokenize_corpus(files, BYTES, tmp_path / "files", workers=2)
    assert from_hf["splits"] == from_files["splits"]
    with pytest.raises(ValueError, match="corpus.text_field='text'"):
        list(iter_documents(CorpusConfig(source="hf", hf_dataset="json", data_files=[str(path)])))


# ---- shards, manifest, split


def test_verify_names_corrupt_and_missing_shard(tmp_path):
    tokenize_corpus(CorpusConfig(max_documents=20, val_fraction=0.2), BYTES, tmp_path, workers=2,
                    shard_tokens=50_000)
    shard = tmp_path / "train_0001.bin"
    data = bytearray(shard.read_bytes())
    data[1234] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="train_0001.bin is corrupt: sha256"):
        verify_shards(tmp_path)
    (tmp_path / "val_0000.bin").unlink()
    shard.unlink()
    with pytest.raises(ValueError, match="train_0001.bin is missing"):
        verify_shards(tmp_path)


def test_interrupted_run_leaves_no_manifest_and_no_shard(tmp_path):
    out = tmp_path / "out"
    good = write_jsonl(tmp_path / "good.jsonl", [f"{i} " + "x" * 1000 for i in range(2000)])
    tokenize_corpus(CorpusConfig(source="files", files=[str(good)]), BYTES, out, workers=1,
                    shard_tokens=100_000)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text() + '{"no_text": 1}\n')  # the source raises after ~2 MB of documents
    with pytest.raises(ValueError, match="corpus.text_field='text'"):
        tokenize_corpus(CorpusConfig(source="files", files=[str(bad)]), BYTES, out, workers=1,
                        shard_tokens=100_000)
    assert not (out / "manifest.json").exists()  # the previous dataset went first; nothing looks complete
    with pytest.raises(FileNotFoundError, match="did not finish"):
        load_manifest(out)


def test_killed_tokenization_resumes_from_the_last_complete_shard(tmp_path):
    """SIGKILL once a shard is complete, rerun: it resumes (no document tokenized twice) and the dataset is
    byte for byte the uninterrupted one."""
    script = ("import sys; from fox.data import CorpusConfig, TokenizerConfig, tokenize_corpus; "
              "tokenize_corpus(CorpusConfig(max_tokens=3_000_000, val_fraction=0.1), TokenizerConfig(name='bytes'), "
              "sys.argv[1], workers=1, shard_tokens=20_000)")
    killed = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "killed")])
    deadline = time.monotonic() + 120
    while not (tmp_path / "killed" / "progress.json").exists():
        assert killed.poll() is None and time.monotonic() < deadline, "finished before a shard was recorded"
        time.sleep(0.01)
    killed.kill()
    killed.wait()
    progress = json.loads((tmp_path / "killed" / "progress.json").read_text())
    resumed = subprocess.run([sys.executable, "-c", script, str(tmp_path / "killed")], capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming at document {progress['next_document']}" in resumed.stdout
    straight = tokenize_corpus(CorpusConfig(max_tokens=3_000_000, val_fraction=0.1), BYTES, tmp_path / "straight",
                               workers=1, shard_tokens=20_000)
    assert load_manifest(tmp_path / "killed") == straight
    assert not (tmp_path / "killed" / "progress.json").exists()
    for name in sorted(p.name for p in (tmp_path / "straight").iterdir()):
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name


def test_split_is_deterministic_and_disjoint(tmp_path):
    flags = [is_val(i, 0, 0.1) for i in range(20_000)]
    assert flags == [is_val(i, 0, 0.1) for i in range(20_000)]
    assert flags != [is_val(i, 1, 0.1) for i in range(20_000)]
    assert abs(np.mean(flags) - 0.1) < 0.01
    texts = [f"doc {i}" for i in range(200)]
    files = [str(write_jsonl(tmp_path / "c.jsonl", texts))]
    corpus = CorpusConfig(source="files", files=files, val_fraction=0.1)
    manifest = tokenize_corpus(corpus, BYTES, tmp_path / "out", workers=2)
    train, val = decoded_documents(tmp_path / "out", "train"), decoded_documents(tmp_path / "out", "val")
    assert val == [t for i, t in enumerate(texts) if flags[i]]
    assert train == [t for i, t in enumerate(texts) if not flags[i]]
    assert manifest["splits"]["train"]["documents"] == len(train)
    assert manifest["splits"]["val"]["documents"] == len(val)


def test_max_tokens_stops_after_the_document_that_reaches_it_and_empty_split_raises(tmp_path):
    with pytest.raises(ValueError, match="the val split is empty after 13 documents"):
        tokenize_corpus(CorpusConfig(max_tokens=300_000), BYTES, tmp_path, workers=2)
    manifest = tokenize_corpus(CorpusConfig(max_tokens=300_000, val_fraction=0.2), BYTES, tmp_path, workers=2)
    train = split_stream(tmp_path, "train")
    ends = np.flatnonzero(train == EOT)
    assert manifest["splits"]["train"]["tokens"] - (ends[-1] - ends[-2]) < 300_000 <= len(train)


# ---- loaders


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """~20k train tokens in shards of 997, so windows cross shard and document boundaries."""
    root = tmp_path_factory.mktemp("loader")
    texts = [f"document {i} " + "abcdefghij"[: i % 10] * (i % 13) for i in range(400)]
    corpus = CorpusConfig(source="files", files=[str(write_jsonl(root / "c.jsonl", texts))], val_fraction=0.2)
    tokenize_corpus(corpus, BYTES, root / "data", workers=2, shard_tokens=997)
    return root / "data"


def draw(loader: TrainWindows, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [loader.next_batch() for _ in range(n)]


def same_batches(a: list, b: list) -> bool:
    pairs = zip(a, b, strict=True)  # raises on different lengths
    return all(torch.equal(x, y) for p, q in pairs for x, y in zip(p, q, strict=True))


def test_train_windows_cover_every_window_once_per_epoch(dataset):
    seq_len, batch = 64, 8
    stream = torch.from_numpy(split_stream(dataset, "train").astype(np.int64))
    n_windows = (len(stream) - 1) // seq_len
    windows = [tuple(stream[w * seq_len : w * seq_len + seq_len + 1].tolist()) for w in range(n_windows)]
    loader = TrainWindows(dataset, seq_len, batch, seed=3)
    rows = []
    for x, y in draw(loader, -(-n_windows // batch)):
        assert x.shape == y.shape == (batch, seq_len) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        rows += [tuple(r) + (t,) for r, t in zip(x.tolist(), y[:, -1].tolist(), strict=True)]
    assert sorted(rows[:n_windows]) == sorted(windows)  # an epoch is a permutation of all windows


def test_train_windows_seeded_and_resumable(dataset):
    same = draw(TrainWindows(dataset, 128, 4, seed=1), 60)  # > 1 epoch: the resume crosses the wrap
    assert same_batches(same, draw(TrainWindows(dataset, 128, 4, seed=1), 60))
    assert not same_batches(same[:1], draw(TrainWindows(dataset, 128, 4, seed=2), 1))
    loader = TrainWindows(dataset, 128, 4, seed=1)
    draw(loader, 25)
    state = json.loads(json.dumps(loader.state_dict()))  # survives a JSON round trip (checkpoint metadata)
    resumed = TrainWindows(dataset, 128, 4, seed=1)
    resumed.load_state_dict(state)
    assert same_batches(same[25:], draw(resumed, 35))
    with pytest.raises(ValueError, match="seq_len=128"):
        TrainWindows(dataset, 64, 4, seed=1).load_state_dict(state)


def test_train_windows_ranks_split_the_global_order(dataset):
    single = draw(TrainWindows(dataset, 32, 3, seed=5), 40)
    rank0 = draw(TrainWindows(dataset, 32, 3, rank=0, world_size=2, seed=5), 20)
    rank1 = draw(TrainWindows(dataset, 32, 3, rank=1, world_size=2, seed=5), 20)
    assert same_batches(rank0, single[0::2]) and same_batches(rank1, single[1::2])
    # a single-rank checkpoint resumes on two ranks at the same point of the global order
    loader = TrainWindows(dataset, 32, 3, seed=5)
    draw(loader, 10)
    resumed = [TrainWindows(dataset, 32, 3, rank=r, world_size=2, seed=5) for r in range(2)]
    for r in range(2):
        resumed[r].load_state_dict(loader.state_dict())
        assert same_batches(draw(resumed[r], 15), single[10 + r :: 2])


def test_validation_windows_are_sequential(dataset):
    stream = torch.from_numpy(split_stream(dataset, "val").astype(np.int64))
    seq_len = 100
    n_windows = (len(stream) - 1) // seq_len
    batches = list(validation_windows(dataset, seq_len, batch_size=4))
    assert [len(x) for x, _ in batches] == [4] * (n_windows // 4) + ([n_windows % 4] if n_windows % 4 else [])
    x = torch.cat([x for x, _ in batches]).flatten()
    y = torch.cat([y for _, y in batches]).flatten()
    assert torch.equal(x, stream[: n_windows * seq_len])
    assert torch.equal(y, stream[1 : n_windows * seq_len + 1])
    assert sum(len(x) for x, _ in validation_windows(dataset, seq_len, 4, max_windows=5)) == 5
    with pytest.raises(ValueError, match="fewer than seq_len"):
        validation_windows(dataset, len(stream), 1)


# ---- config validation


@pytest.mark.parametrize("make, message", [
    (lambda: CorpusConfig(source="ftp"), "corpus.source='ftp': allowed are stdlib, files, hf"),
    (lambda: CorpusConfig(source="files"), "corpus.files=.*required for source=files"),
    (lambda: CorpusConfig(source="hf"), "corpus.hf_dataset=None: .*required for source=hf"),
    (lambda: CorpusConfig(val_fraction=1.0), "corpus.val_fraction=1.0"),
    (lambda: CorpusConfig(max_tokens=0), "corpus.max_tokens=0"),
    (lambda: CorpusConfig(max_documents=-1), "corpus.max_documents=-1"),
    (lambda: TokenizerConfig(name="spm"), "tokenizer.name='spm': allowed are bytes, gpt2"),
    (lambda: TokenizerConfig(name="bytes", rank_file="r.tiktoken"), "tokenizer.rank_file='r.tiktoken'"),
])
def test_bad_config_raises_naming_the_key(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_bad_loader_arguments(dataset):
    with pytest.raises(ValueError, match="rank=2"):
        TrainWindows(dataset, 16, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        TrainWindows(dataset, 10**9, 2)
