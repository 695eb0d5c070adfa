"""The Snakemake workflow: structure of every rule, lint, dry runs of every config and profile, bad configs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from snakemake.api import SnakemakeApi
from snakemake.settings.types import OutputSettings, ResourceSettings

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile")]
RULES = ["tokenize", "resolve", "train", "average", "evaluate", "plot", "table", "longbench", "longbench_table"]


RANK_FILE = ROOT.parent / "shared" / "data" / "gpt2.tiktoken"


def snakemake(*args: str, cwd: Path = ROOT, **env: str | None) -> subprocess.CompletedProcess:
    """Snakemake in a subprocess; env sets variables (None: unset)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **env}
    env = {key: value for key, value in env.items() if value is not None}
    return subprocess.run([*SNAKEMAKE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def offline_gpt2(tmp_path_factory) -> str:
    """A config file pointing the paper grids' gpt2 tokenizer at the local rank file: this machine is offline,
    which the parse-time check would report."""
    path = tmp_path_factory.mktemp("offline") / "offline.yaml"
    path.write_text(f"tokenizer: {{rank_file: {RANK_FILE}}}\n")
    return str(path)


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run: {rule: count}."""
    stats = output.split("Job stats:")[1]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.MULTILINE) if m[1] != "total"}


@pytest.fixture(scope="module")
def rules():
    with SnakemakeApi(OutputSettings(quiet={"all"})) as api:
        workflow = api.workflow(resource_settings=ResourceSettings(), snakefile=ROOT / "Snakefile", workdir=ROOT)
        yield {rule.name: rule for rule in workflow._workflow.rules}


def rule_sources() -> dict[str, str]:
    """Each rule's text in workflow/rules/*.smk."""
    blocks = {}
    for path in sorted((ROOT / "workflow" / "rules").glob("*.smk")):
        for match in re.finditer(r"^rule (\w+):\n(.*?)(?=^\S|\Z)", path.read_text(), re.MULTILINE | re.DOTALL):
            blocks[match[1]] = match[2]
    return blocks


def test_every_stage_has_a_rule(rules):
    assert set(RULES) <= set(rules)
    assert (ROOT / "workflow" / "schemas" / "config.schema.yaml").resolve() == (
        ROOT / "src" / "fox" / "config.schema.yaml").resolve()


@pytest.mark.parametrize("name", RULES)
def test_rule_has_log_benchmark_conda_threads_resources(rules, name):
    rule, source = rules[name], rule_sources()[name]
    assert str(rule.log[0]).startswith(f"results/logs/{name}/") and str(rule.log[0]).endswith(".log")
    assert str(rule.benchmark).startswith(f"results/benchmarks/{name}/") and str(rule.benchmark).endswith(".tsv")
    assert (ROOT / "workflow" / "rules" / str(rule.conda_env)).resolve().is_file()
    assert re.search(r"^    threads: \d+$", source, re.MULTILINE)
    assert {"mem_mb", "runtime"} <= set(rule.resources)
    if name == "train":
        assert "gpu" in rule.resources
    assert rule.shellcmd and rule.shellcmd.endswith(" > {log} 2>&1")
    assert "{params.launcher} train" in rule.shellcmd or rule.shellcmd.startswith(f"fox {name.replace('_', '-')} ")
    assert "run:" not in source and "lambda" not in source


def test_no_python_logic_in_rule_modules():
    for path in (ROOT / "workflow" / "rules").glob("*.smk"):
        assert "lambda" not in path.read_text() and "\n    run:" not in path.read_text(), path
    assert len((ROOT / "workflow" / "rules" / "common.smk").read_text().splitlines()) <= 150


def test_envs_are_pinned():
    for path in (ROOT / "envs").glob("*.yaml"):
        deps = [line.strip()[2:] for line in path.read_text().splitlines() if line.strip().startswith("- ")]
        packages = [d for d in deps if d not in ("conda-forge", "nodefaults", "pip:", "..")]
        assert packages and all(re.search(r"[=<>]=?", d) for d in packages), path


def test_lint_is_clean():
    result = snakemake("--lint")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Congratulations, your workflow is in a good condition!" in result.stdout + result.stderr


def test_default_dry_run():
    result = snakemake("-n", "--cores", "2")
    assert result.returncode == 0, result.stderr
    assert job_counts(result.stdout) == {"tokenize": 1, "resolve": 5, "train": 5, "average": 5, "evaluate": 5,
                                         "plot": 1, "table": 1, "all": 1}


def test_readme_target_builds_the_whole_pipeline():
    """`snakemake --cores all results/table1.csv`, the README's command, trains, evaluates and plots too."""
    result = snakemake("-n", "--cores", "2", "results/table1.csv")
    assert result.returncode == 0, result.stderr
    assert job_counts(result.stdout) == {"tokenize": 1, "resolve": 5, "train": 5, "average": 5, "evaluate": 5,
                                         "plot": 1, "table": 1}  # resolve: the config.json `fox train` takes


@pytest.mark.parametrize("configfile, runs", [("configs/fox-paper.yaml", 19),
                                              ("configs/acp-paper.yaml", 18), ("configs/single-gpu.yaml", 2),
                                              ("configs/fox-ablations.yaml", 15)])
def test_paper_grids_dry_run(configfile, runs, offline_gpt2):
    result = snakemake("-n", "--cores", "2", "--configfile", configfile, offline_gpt2)
    assert result.returncode == 0, result.stderr
    counts = job_counts(result.stdout)
    assert counts["train"] == counts["evaluate"] == counts["resolve"] == runs and counts["table"] == 1
    longbench = configfile == "configs/fox-paper.yaml"  # LongBench (Table 2) runs with the main grid only
    assert counts.get("longbench", 0) == (runs if longbench else 0)
    assert counts.get("longbench_table", 0) == int(longbench)


def test_slurm_profile_renders_multi_gpu_submissions(offline_gpt2):
    pytest.importorskip("snakemake_executor_plugin_slurm", reason="pip install snakemake-executor-plugin-slurm")
    args = ("--profile", "profiles/slurm", "-n", "-p", "--configfile", "configs/fox-paper.yaml", offline_gpt2)
    # every job logs to one tracking server: the profile refuses to start without its address
    refused = snakemake(*args, MLFLOW_TRACKING_URI=None)
    assert refused.returncode != 0 and "MLFLOW_TRACKING_URI" in refused.stdout + refused.stderr
    result = snakemake(*args, MLFLOW_TRACKING_URI="http://login-node:5000")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "slurm_partition=gpu" in out and "gpu=8" in out
    assert re.search(r"deepspeed --num_gpus 8 --module fox\.cli train --config \S+/config\.yaml "
                     r"\S+/configs/fox-paper\.yaml \S+/offline\.yaml --run \S+-ctx16384-dense > "
                     r"results/fox-paper/logs/train/", out)
    assert "fox resolve --config" in out


def test_local_profile_runs_plain_fox_train():
    result = snakemake("--profile", "profiles/local", "-n", "-p")
    assert result.returncode == 0, result.stderr
    assert re.search(r"Shell command: fox train --config \S+/config\.yaml --run fox-pro-tiny-ctx256-acp ",
                     result.stdout)


@pytest.mark.parametrize("override, message", [
    ("grid: [{model: [mamba], block: [pro], size: [tiny], context: [64]}]", "grid[0].model[0]='mamba'"),
    ("grid: [{model: [fox], block: [pro], size: [tiny], context: [-64]}]", "grid[0].context[0]=-64"),
    ("grid: [{model: [transformer], block: [pro], size: [tiny], context: [64], acp: [true]}]", "grid[0].acp"),
    ("corpus: {source: files, files: [nowhere/*.txt]}", "corpus.files: 'nowhere/*.txt' matches no file"),
    ("tokenizer: {name: gpt2, rank_file: nowhere/gpt2.tiktoken}", "tokenizer.rank_file"),
    ("tokenizer: {name: gpt2}", "tokenizer.name='gpt2': tiktoken cannot download its BPE here"),
    ("model: {vocab_size: 200}", "model.vocab_size=200: must be >= 257"),
    ("evaluate: {lm_eval: {tasks: [fox_heldout_mc, hellaswagg]}}", "lm-eval has no task 'hellaswagg' (did you mean"),
])
def test_bad_config_fails_before_any_job(tmp_path, override, message):
    (tmp_path / "bad.yaml").write_text(override + "\n")
    offline = {"TIKTOKEN_CACHE_DIR": str(tmp_path / "empty-cache"), "HTTPS_PROXY": "http://127.0.0.1:9"}
    result = snakemake("-n", "--cores", "1", "--configfile", "bad.yaml", "--directory", str(tmp_path),
                       cwd=tmp_path, **offline)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert "Job stats" not in result.stdout and not (tmp_path / "results").exists()


def test_inline_config_override_is_refused(tmp_path):
    result = snakemake("-n", "--cores", "1", "--config", "results_dir=elsewhere", "--directory", str(tmp_path))
    assert result.returncode != 0 and "--configfile" in result.stdout + result.stderr


def test_snakefmt_clean():
    pytest.importorskip("snakefmt")
    files = [str(ROOT / "Snakefile"), *map(str, sorted((ROOT / "workflow" / "rules").glob("*.smk")))]
    result = subprocess.run([sys.executable, "-m", "snakefmt", "--check", *files], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
