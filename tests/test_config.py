"""The config schema: defaults, grid expansion, run ids, and one-line errors naming the bad key."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import yaml

from fox import config as fox_config
from tests.conftest import REPO


def base() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text())


def test_embedded_default_is_valid_and_filled():
    config = fox_config.load_config(REPO / "config.yaml")
    assert config["train"]["betas"] == [0.9, 0.95]
    assert config["tokenizer"]["name"] == "bytes"
    runs = fox_config.run_ids(config)
    assert len(runs) == len(set(runs)) >= 5
    assert {fox_config.parse_run_id(run)["model"] for run in runs} == {"fox", "transformer"}


def test_run_id_round_trip():
    cell = {"model": "fox", "block": "pro", "size": "760m", "context": 16384, "acp": True}
    assert fox_config.run_id(cell) == "fox-pro-760m-ctx16384-acp"
    assert fox_config.parse_run_id(fox_config.run_id(cell)) == cell
    with pytest.raises(fox_config.ConfigError, match="gpt-pro"):
        fox_config.parse_run_id("gpt-pro-125m-ctx1-acp")


def test_resolved_run_takes_block_overrides():
    config = base()
    config["grid"] = [{"model": ["fox"], "block": ["pro"], "size": ["125m"], "context": [4096],
                       "train": {"lr": 1e-4, "micro_batch_size": 2}}]
    resolved = fox_config.resolve_run(fox_config.validate(config), "fox-pro-125m-ctx4096-dense")
    assert resolved["train"]["lr"] == 1e-4 and resolved["train"]["context"] == 4096
    assert resolved["data_dir"].endswith("data/stdlib/bytes")


TABLE_5 = {"fox-pro": 2e-3, "transformer-pro": 1e-3, "fox-llama": 1e-3, "transformer-llama": 5e-4}
TABLE_5_BASELINES = {"mamba2": 2e-3, "hgrn2": 2e-3, "deltanet": 1e-3}


@pytest.mark.parametrize("configfile, expected", [
    ("configs/fox-paper.yaml", {f"{arch}-760m-ctx16384-dense": lr
                                for arch, lr in (TABLE_5 | TABLE_5_BASELINES).items()}),
    ("configs/fox-paper-scaling.yaml", {**{f"{arch}-125m-ctx16384-dense": 2e-3 for arch in TABLE_5},
                                        **{f"{arch}-360m-ctx16384-dense": 2e-3 for arch in TABLE_5},
                                        **{f"{arch}-760m-ctx16384-dense": 1e-3 for arch in TABLE_5}}),
])
def test_paper_grids_resolve_the_papers_learning_rates(configfile, expected):
    config = fox_config.load_config(REPO / "config.yaml", REPO / configfile)
    resolved = {run: fox_config.resolve_run(config, run)["train"] for run in fox_config.run_ids(config)}
    assert {run: train["lr"] for run, train in resolved.items()} == expected
    assert {train["tokens"] for train in resolved.values()} <= {45 * 2**30, 15 * 2**30, 7 * 2**30, 2.5 * 2**30}
    config["train"]["lr"] = 3e-4  # train.lr overrides the table
    assert fox_config.resolve_run(config, next(iter(expected)))["train"]["lr"] == 3e-4


def test_average_memory_is_declared_by_model_size():
    config = fox_config.load_config(REPO / "config.yaml", REPO / "configs/fox-paper.yaml")
    mem_mb = fox_config.average_mem_mb(config)
    # 760M: ~0.83 G parameters x 8 bytes (the fp32 sum and one checkpoint's masters) + 2 GB
    assert 8000 < mem_mb(SimpleNamespace(run="fox-pro-760m-ctx16384-dense")) < 9000
    assert mem_mb(SimpleNamespace(run="fox-pro-125m-ctx16384-dense")) < 4000


@pytest.mark.parametrize("edit, named", [
    (lambda c: c["grid"][0].update(model=["gpt"]), "grid[0].model[0]='gpt': allowed are fox, transformer"),
    (lambda c: c["grid"][0].update(context=[-256]), "grid[0].context[0]=-256: must be >= 8"),
    (lambda c: c["train"].update(lr=-1.0), "train.lr=-1.0: must be > 0"),
    (lambda c: c["train"].update(precision="fp8"), "train.precision='fp8': allowed are auto, bf16, fp32"),
    (lambda c: c["corpus"].update(source="ftp"), "corpus.source='ftp': allowed are stdlib, files, hf, npy, zarr"),
    (lambda c: c["corpus"].update(windows="pages"), "corpus.windows='pages': allowed are packed, documents"),
    (lambda c: c["corpus"].update(source="zarr", path="lc64"), "corpus.windows='packed' with corpus.source='zarr'"),
    (lambda c: c.update(model={"vocab_size": 100}), "model.vocab_size=100: must be >= the bytes tokenizer's 257"),
    (lambda c: c["train"].update(data_order="random"), "train.data_order='random': allowed are shuffled, sequential"),
    (lambda c: c["train"].update(max_epochs=0), "train.max_epochs=0: must be >= 1"),
    (lambda c: c.update(colour="red"), "unknown key colour"),
    (lambda c: c["grid"][0].update(model=["transformer"], acp=[True]), "grid[0].acp=true with model=transformer"),
    (lambda c: c["average"].update(last_k=9), "average.last_k=9: must be <= train.keep_checkpoints"),
    (lambda c: c["train"].update(tokens_per_step=1000), "train.tokens_per_step=1000: must be a multiple of"),
    (lambda c: c["train"].update(compile="yes"), "train.compile='yes': allowed are auto, True, False"),
    (lambda c: c["train"].update(compile=True, zero_stage=3), "train.compile=true with train.zero_stage=3"),
])
def test_bad_values_are_named(edit, named):
    config = base()
    edit(config)
    with pytest.raises(fox_config.ConfigError) as error:
        fox_config.validate(config)
    assert named in str(error.value)
    assert "\n" not in str(error.value)


def test_cli_rejects_bad_config_before_writing(tmp_path):
    config = base()
    config["results_dir"] = str(tmp_path / "results")
    config["grid"][0]["size"] = ["huge"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    for stage in (["tokenize"], ["train", "--run", "fox-pro-huge-ctx256-dense"]):
        done = subprocess.run([sys.executable, "-m", "fox.cli", *stage, "--config", str(path)],
                              capture_output=True, text=True)
        assert done.returncode == 2
        assert "grid[0].size[0]='huge': allowed are tiny, small, 125m, 360m, 760m" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "results").exists()
