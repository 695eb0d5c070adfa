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


def test_table_3_grid_runs_resolve_and_round_trip():
    """configs/fox-ablations.yaml: Table 3's 15 rows, in order, at 360M, 7 x 2^30 tokens and lr 2e-3; the variant
    reaches the resolved config only where there is one, so the four architectures' records stay as they were."""
    config = fox_config.load_config(REPO / "config.yaml", REPO / "configs/fox-ablations.yaml")
    runs = fox_config.run_ids(config)
    assert runs == ["transformer-llama-360m-ctx16384-dense-no_rope", "transformer-llama-360m-ctx16384-dense",
                    "transformer-llama-360m-ctx16384-dense-with_fgate", "fox-llama-360m-ctx16384-dense",
                    "fox-llama-360m-ctx16384-dense-with_qknorm", "fox-llama-360m-ctx16384-dense-with_qknorm-with_ogate",
                    "fox-llama-360m-ctx16384-dense-with_qknorm-with_ogate-with_onorm", "fox-pro-360m-ctx16384-dense",
                    "fox-pro-360m-ctx16384-dense-no_qknorm", "fox-pro-360m-ctx16384-dense-no_ogate",
                    "fox-pro-360m-ctx16384-dense-no_onorm", "fox-pro-360m-ctx16384-dense-no_kvshift",
                    "fox-pro-360m-ctx16384-dense-with_rope", "transformer-pro-360m-ctx16384-dense",
                    "fox-pro-360m-ctx16384-dense-no_fgate"]
    for run in runs:
        resolved = fox_config.resolve_run(config, run)
        assert resolved["train"]["tokens"] == 7 * 2**30 and resolved["train"]["lr"] == 2e-3
        assert fox_config.run_id(resolved["grid"]) == run and fox_config.parse_run_id(run) == resolved["grid"]
    assert "variant" not in fox_config.resolve_run(config, "fox-pro-360m-ctx16384-dense")["grid"]
    assert fox_config.resolve_run(config, runs[-1])["grid"]["variant"] == "-fgate"


def test_variant_edits_have_one_spelling():
    config = base()
    config["grid"] = [{"model": ["fox"], "block": ["llama"], "size": ["tiny"], "context": [64],
                       "variant": ["+ogate+qknorm", "+qknorm+ogate", ""]}]
    assert fox_config.run_ids(fox_config.validate(config)) == ["fox-llama-tiny-ctx64-dense-with_qknorm-with_ogate",
                                                               "fox-llama-tiny-ctx64-dense"]


def test_tagged_blocks_tell_apart_runs_of_one_architecture():
    """The FoX paper's 760M models on 45 and 15 x 2^30 tokens in one config: the tag suffixes the second block's
    run ids; without it, two blocks giving one run id are an error naming both."""
    config = base()
    config["grid"] = [{"model": ["fox"], "block": ["pro"], "size": ["tiny"], "context": [256]},
                      {"model": ["fox"], "block": ["pro"], "size": ["tiny"], "context": [256], "tag": "16b",
                       "train": {"tokens": 2**19}}]
    config = fox_config.validate(config)
    assert fox_config.run_ids(config) == ["fox-pro-tiny-ctx256-dense", "fox-pro-tiny-ctx256-dense-16b"]
    tagged = fox_config.resolve_run(config, "fox-pro-tiny-ctx256-dense-16b")
    assert tagged["grid"]["tag"] == "16b" and tagged["train"]["tokens"] == 2**19
    assert "tag" not in fox_config.resolve_run(config, "fox-pro-tiny-ctx256-dense")["grid"]
    cell = {"model": "fox", "block": "pro", "size": "360m", "context": 16384, "acp": False, "variant": "-qknorm",
            "tag": "7b"}
    assert fox_config.parse_run_id(fox_config.run_id(cell)) == cell
    del config["grid"][1]["tag"]
    with pytest.raises(fox_config.ConfigError, match=r"grid\[0\] and grid\[1\] both give run fox-pro-tiny-ctx256"):
        fox_config.validate(config)


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
    ("configs/fox-paper.yaml", {**{f"{arch}-760m-ctx16384-dense": lr
                                   for arch, lr in (TABLE_5 | TABLE_5_BASELINES).items()},
                                **{f"{arch}-125m-ctx16384-dense-2b": 2e-3 for arch in TABLE_5},
                                **{f"{arch}-360m-ctx16384-dense-7b": 2e-3 for arch in TABLE_5},
                                **{f"{arch}-760m-ctx16384-dense-16b": 1e-3 for arch in TABLE_5}}),
])
def test_paper_grids_resolve_the_papers_learning_rates(configfile, expected):
    config = fox_config.load_config(REPO / "config.yaml", REPO / configfile)
    resolved = {run: fox_config.resolve_run(config, run)["train"] for run in fox_config.run_ids(config)}
    assert {run: train["lr"] for run, train in resolved.items()} == expected
    assert {train["tokens"] for train in resolved.values()} <= {45 * 2**30, 15 * 2**30, 7 * 2**30, 2.5 * 2**30}
    two = {run for run, train in resolved.items() if train["micro_batch_size"] == 2}   # 760M attention models
    assert two == {run for run in resolved if "-760m-" in run and run.split("-")[0] in ("fox", "transformer")}
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
    (lambda c: c.update(model={"vocab_size": 100}), "model.vocab_size=100: must be >= 257, the ids of tokenizer"),
    (lambda c: c["train"].update(data_order="random"), "train.data_order='random': allowed are shuffled, sequential"),
    (lambda c: c["train"].update(max_epochs=0), "train.max_epochs=0: must be >= 1"),
    (lambda c: c.update(colour="red"), "unknown key colour"),
    (lambda c: c["grid"][0].update(model=["transformer"], acp=[True]), "grid[0].acp=true with model=transformer"),
    (lambda c: c["grid"][1].update(variant=["-fgate"]), "grid[1].acp=true with model=fox and variant '-fgate'"),
    (lambda c: c["grid"][0].update(variant=["+qk"]), "grid[0].variant[0]='+qk': must match"),
    (lambda c: c["grid"][0].update(model=["fox"], variant=["+fgate"]),
     "grid[0].variant='+fgate': fox llama has fgate already; allowed edits are +rope, -fgate, +qknorm"),
    (lambda c: c["average"].update(last_k=9), "average.last_k=9: must be <= train.keep_checkpoints"),
    (lambda c: c["train"].update(tokens_per_step=1000), "train.tokens_per_step=1000: must be a multiple of"),
    (lambda c: c["train"].update(compile="yes"), "train.compile='yes': allowed are auto, True, False"),
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


BAD_CONFIGS = [  # (the file's text, over config.yaml; what the one line must say)
    ("grid: [{model: [mamba], block: [pro], size: [tiny], context: [64]}]", "grid[0].model[0]='mamba': allowed are"),
    ("grid: [{model: [fox], block: [pro], size: [tiny], context: [-64]}]", "grid[0].context[0]=-64: must be >= 8"),
    ("grid: [{model: [transformer], block: [pro], size: [tiny], context: [64], acp: [true]}]",
     "grid[0].acp=true with model=transformer"),
    ("grid: [{model: [fox], block: [pro], size: [tiny], context: [64], train: {lr: fast}}]",
     "grid[0].train.lr='fast': must be of type number or null"),
    ("grid: [{model: [fox], block: [pro], size: [tiny], context: [64], train: {lrate: 0.1}}]",
     "grid[0].train: unknown key lrate"),
    ("train: {lr: -1}", "train.lr=-1: must be > 0"),
    ("train: {precision: fp8}", "train.precision='fp8': allowed are auto, bf16, fp32"),
    ("train: {tokens_per_step: 1000}", "train.tokens_per_step=1000: must be a multiple of"),
    ("colour: red", "unknown key colour"),
    ("average: {last_k: 9}", "average.last_k=9: must be <= train.keep_checkpoints"),
    ("average: {last_k: 2}\ntrain: {checkpoint_every_tokens: 100000000}", "saves 1 checkpoint(s)"),
    ("model: {vocab_size: 200}", "model.vocab_size=200: must be >= 257, the ids of tokenizer 'bytes'"),
    ("tracking_uri: mlflow.db", "tracking_uri='mlflow.db': allowed are sqlite:///<path>"),
    ("corpus: {source: files, files: [nowhere/*.txt]}", "corpus.files: 'nowhere/*.txt' matches no file"),
    ("corpus: {source: hf}", "corpus.hf_dataset=None: a name is required for source=hf"),
    ("tokenizer: {rank_file: gpt2.tiktoken}", "tokenizer.rank_file='gpt2.tiktoken': allowed only with"),
    ("tokenizer: {name: gpt2, rank_file: nowhere/gpt2.tiktoken}", "tokenizer.rank_file='nowhere/gpt2.tiktoken': no "),
    ("tokenizer: {name: gpt2, rank_file: " + str(REPO / "config.yaml") + "}", "not GPT-2's BPE ranks"),
    ("tokenizer: {name: gpt2}", "tokenizer.name='gpt2': tiktoken cannot download its BPE here"),
    ("evaluate: {lm_eval: {tasks: [fox_heldout_mc, hellaswagg]}}", "lm-eval has no task 'hellaswagg' (did you mean"),
    ("evaluate: {lm_eval: {local_tasks: {mc_continuation_tokens: 300}}}",
     "mc_continuation_tokens=300: must be <= the shortest context, 256"),
    ("evaluate: {niah: {length_multipliers: [0.25]}}", "0.25 x context 256 = 64 tokens, no room for a haystack"),
    ("train:\n  tokens: [1, 2\n  lr: 3\n", "bad.yaml:3:5: YAML syntax error: expected ',' or ']', but got ':'"),
    ("- just\n- a list\n", "bad.yaml: must be a mapping of keys"),
]


@pytest.mark.parametrize("text, message", BAD_CONFIGS, ids=[m.split(":")[0][:40] for _, m in BAD_CONFIGS])
def test_bad_config_is_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys, text, message):
    """`fox validate` (the Snakefile runs the same checks at parse time): exit 2, one line naming the value."""
    from fox.cli import main

    monkeypatch.chdir(tmp_path)
    # an offline machine's first run: nothing cached, no way out (also where the internet is reachable)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    (tmp_path / "bad.yaml").write_text(text + "\n")
    with pytest.raises(SystemExit) as stopped:
        main(["validate", "--config", str(REPO / "config.yaml"), "bad.yaml"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_constants_mirror_the_modules_they_describe():
    """fox.config and fox.preflight restate a few facts so as not to import heavy modules at parse time."""
    from fox import preflight
    from fox.data import TokenizerConfig, get_tokenizer
    from fox.eval.local_tasks import LOCAL_TASKS
    from fox.eval.niah import NEEDLE, QUESTION

    assert fox_config.TOKENIZER_VOCAB["bytes"] == get_tokenizer(TokenizerConfig(name="bytes")).n_vocab
    rank_file = REPO.parent / "shared" / "data" / "gpt2.tiktoken"
    if rank_file.is_file():
        gpt2 = get_tokenizer(TokenizerConfig(name="gpt2", rank_file=str(rank_file)))
        assert fox_config.TOKENIZER_VOCAB["gpt2"] == gpt2.n_vocab
    assert preflight.LOCAL_TASKS == LOCAL_TASKS
    assert (NEEDLE.format(code="00000"), QUESTION) == preflight.NIAH_TEXT
