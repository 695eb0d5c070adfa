"""fox.report: table1.csv columns and values, table1.md, and the four plots, from evaluation JSONs built here."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import mlflow
import pytest

from fox import config as fox_config
from fox.report import PLOTS, columns, plot, table

PAPER = ["run", "model", "block", "size", "params", "tokens", "train_ctx", "acp", "wikitext_word_ppl", "lambada_ppl",
         "lambada_acc", "piqa_acc", "hellaswag_acc_norm", "winogrande_acc", "arc_easy_acc",
         "arc_challenge_acc_norm", "copa_acc", "openbookqa_acc_norm", "sciq_acc", "boolq_acc", "avg_acc"]
OURS = ["val_loss", "val_ppl_at_train_ctx", "val_ppl_at_4x_ctx", "niah_acc", "attn_flops_pruned",
        "train_tokens_per_s", "mfu"]


def make_eval(run: str, lm_eval: dict, *, acp_stats: dict | None = None, val_loss: float = 2.5) -> dict:
    cell = fox_config.parse_run_id(run)
    ctx = cell["context"]
    positions = list(range(1, 4 * ctx + 1))
    return {
        "run": run, "grid": cell, "params": {"paper": 1234567, "total": 2000000}, "tokens": 1048576,
        "train_ctx": ctx, "acp": cell["acp"], "train_tokens_per_s": 5000.0, "mfu": None, "val_loss": val_loss,
        "val_ppl_at_train_ctx": math.exp(val_loss), "val_ppl_at_4x_ctx": math.exp(val_loss + 0.3),
        "loss_by_position": {"positions": positions, "loss": [3.0 / math.log(p + 2) + val_loss - 1 for p in positions]},
        "ppl_by_length": {"lengths": [ctx // 2, ctx, 2 * ctx, 4 * ctx], "ppl": [14.0, 12.0, 13.0, 15.0]},
        "lm_eval": lm_eval,
        "niah": {"lengths": [ctx // 2, ctx], "depths": [0.0, 0.5, 1.0], "acc": [[1, 1, 0.5], [1, 0.5, 0]],
                 "mean_acc": 4 / 6},
        "acp_stats": acp_stats,
    }


CONFIG = fox_config.validate({"grid": [{"model": ["fox", "transformer"], "block": ["pro"], "size": ["tiny"],
                                        "context": [64]},
                                       {"model": ["fox"], "block": ["pro"], "size": ["tiny"], "context": [64],
                                        "acp": [True]}]})


@pytest.fixture
def evals(tmp_path: Path) -> list[Path]:
    local = {"fox_heldout_ppl": {"word_perplexity,none": 40.5, "word_perplexity_stderr,none": "N/A"},
             "fox_heldout_mc": {"acc,none": 0.5, "acc_stderr,none": 0.01, "acc_norm,none": 0.25}}
    docs = [
        # the ACP run first on disk: the table orders rows by the config's grid, not by input order
        make_eval("fox-pro-tiny-ctx64-acp", local, acp_stats={"pruned_fraction": 0.7,
                                                              "per_layer_head": [[0.6, 0.8], [0.7, 0.7]]}),
        make_eval("fox-pro-tiny-ctx64-dense", {**local, "piqa": {"acc": 0.6}, "hellaswag": {"acc_norm": 0.3,
                                                                                          "acc": 0.29}}),
        make_eval("transformer-pro-tiny-ctx64-dense", local, val_loss=2.75),
    ]
    paths = []
    for doc in docs:
        path = tmp_path / "eval" / f"{doc['run']}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(doc))
        paths.append(path)
    return paths


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_columns_in_design_order(evals):
    names = columns([json.loads(p.read_text()) for p in evals])
    assert names == PAPER + ["fox_heldout_mc_acc", "fox_heldout_mc_acc_norm", "fox_heldout_ppl_word_perplexity"] + OURS


def test_table_3_variants_get_the_papers_row_names(tmp_path):
    """A `variant` column appears once a run is a Table 3 variant, and names each row as the paper does."""
    paths = []
    for run in ("fox-pro-tiny-ctx64-dense", "fox-pro-tiny-ctx64-dense-no_fgate-with_rope"):
        paths.append(tmp_path / f"{run}.json")
        paths[-1].write_text(json.dumps(make_eval(run, {})))
    rows = table(CONFIG, paths, tmp_path / "table1.csv")
    assert columns([json.loads(p.read_text()) for p in paths])[:5] == ["run", "model", "block", "variant", "size"]
    assert [row["variant"] for row in read_csv(tmp_path / "table1.csv")] == [
        "FoX (Pro)", "FoX (Pro) - forget gate + RoPE"]
    assert len(rows) == 2 and "variant" not in columns([make_eval("fox-pro-tiny-ctx64-dense", {})])


def test_table_rows_values_and_empty_cells(evals, tmp_path):
    out = tmp_path / "table1.csv"
    table(CONFIG, evals, out)
    rows = read_csv(out)
    assert [r["model"] + "-" + r["acp"] for r in rows] == ["fox-false", "transformer-false", "fox-true"]
    fox, transformer, acp = rows
    assert fox["params"] == "1234567" and fox["train_ctx"] == "64" and fox["tokens"] == "1048576"
    assert float(fox["piqa_acc"]) == 0.6 and float(fox["hellaswag_acc_norm"]) == 0.3
    # the average is over the accuracies measured for that row: piqa, hellaswag, fox_heldout_mc (its acc)
    assert float(fox["avg_acc"]) == pytest.approx((0.6 + 0.3 + 0.5) / 3)
    assert float(transformer["avg_acc"]) == 0.5
    assert float(transformer["val_loss"]) == 2.75
    assert float(fox["fox_heldout_ppl_word_perplexity"]) == 40.5
    for column in ("wikitext_word_ppl", "lambada_acc", "boolq_acc", "mfu"):
        assert all(r[column] == "" for r in rows), column
    assert fox["attn_flops_pruned"] == "" and float(acp["attn_flops_pruned"]) == 0.7
    assert float(fox["niah_acc"]) == pytest.approx(4 / 6)


def test_table_floats_round_trip_exactly(evals, tmp_path):
    table(CONFIG, evals, tmp_path / "table1.csv")
    rows = read_csv(tmp_path / "table1.csv")
    assert float(rows[0]["val_ppl_at_train_ctx"]) == math.exp(2.5)


def test_markdown_leaves_out_unmeasured_columns(evals, tmp_path):
    table(CONFIG, evals, tmp_path / "table1.csv")
    md = (tmp_path / "table1.md").read_text()
    header = md.splitlines()[0]
    assert "val_loss" in header and "piqa_acc" in header and "boolq_acc" not in header
    assert "Not measured in this grid:" in md and "boolq_acc" in md.split("Not measured")[1]
    assert len([line for line in md.splitlines() if line.startswith("| fox") or line.startswith("| transformer")]) == 3


def test_table_with_no_lm_eval_keeps_paper_columns(tmp_path):
    path = tmp_path / "e.json"
    path.write_text(json.dumps(make_eval("fox-pro-tiny-ctx64-dense", {})))
    table(CONFIG, [path], tmp_path / "t.csv")
    with (tmp_path / "t.csv").open() as f:
        header = next(csv.reader(f))
    assert header == PAPER + OURS
    assert read_csv(tmp_path / "t.csv")[0]["avg_acc"] == ""


def test_plots_written_and_attached_to_every_mlflow_run(evals, tmp_path):
    from fox.tracking import Tracker, tracking_uri

    config = {**CONFIG, "results_dir": str(tmp_path / "results"), "experiment": "report-test"}
    run_ids = {}
    for run in fox_config.run_ids(config):
        resolved = fox_config.resolve_run(config, run)
        run_ids[run] = Tracker(resolved).start()
    paths = plot(config, evals, tmp_path / "results" / "plots")
    assert [p.name for p in paths] == [f"{name}.png" for name in PLOTS]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    client = mlflow.MlflowClient(tracking_uri(config))
    runs = client.search_runs([client.get_experiment_by_name("report-test").experiment_id])
    assert {r.info.run_name: r.info.run_id for r in runs} == run_ids  # no extra "summary" run
    for run in runs:
        # the local store keeps artifacts where `mlflow ui --artifacts-destination results/mlartifacts` serves them
        stored = tmp_path / "results" / "mlartifacts" / run.info.artifact_uri.removeprefix("mlflow-artifacts:/")
        assert sorted(p.name for p in (stored / "plots").iterdir()) == sorted(p.name for p in paths)
        # an evaluation that never reached MLflow is logged with the plots
        assert run.data.metrics["eval/val_loss"] in (2.5, 2.75)


def test_markdown_spells_params_and_acp_readably(evals, tmp_path):
    table(CONFIG, evals, tmp_path / "table1.csv")
    rows = [line.split(" | ") for line in (tmp_path / "table1.md").read_text().splitlines()[2:5]]
    header = (tmp_path / "table1.md").read_text().splitlines()[0].strip("| ").split(" | ")
    cells = [dict(zip(header, [c.strip("| ") for c in row], strict=True)) for row in rows]
    assert [c["run"] for c in cells] == ["fox-pro-tiny-ctx64-dense", "transformer-pro-tiny-ctx64-dense",
                                         "fox-pro-tiny-ctx64-acp"]
    assert [c["params"] for c in cells] == ["1.235M"] * 3
    assert [c["acp"] for c in cells] == ["false", "false", "true"]  # as in the config, the CSV and MLflow
    assert cells[2]["attn_flops_pruned"] == "70.0"


def test_plots_without_niah_or_acp_still_written(tmp_path):
    doc = make_eval("fox-pro-tiny-ctx64-dense", {})
    doc["niah"], doc["loss_by_position"] = None, None
    path = tmp_path / "e.json"
    path.write_text(json.dumps(doc))
    config = {**CONFIG, "results_dir": str(tmp_path / "results")}
    assert all(p.is_file() for p in plot(config, [path], tmp_path / "plots"))


def test_a_damaged_evaluation_is_named_in_one_line(evals, tmp_path, capsys):
    from fox.cli import main

    evals[1].write_text(evals[1].read_text()[:100])
    config = tmp_path / "config.yaml"
    config.write_text("grid: [{model: [fox], block: [pro], size: [tiny], context: [64]}]\n")
    with pytest.raises(SystemExit) as stopped:
        main(["table", "--config", str(config), "--in", *map(str, evals), "--out", str(tmp_path / "table1.csv")])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"fox table: error: {evals[1]}: not valid JSON")
    assert not (tmp_path / "table1.csv").exists()
