"""Evaluation: the lm-eval adapter against direct forward passes, the offline tasks through lm-eval itself,
averaging of real DeepSpeed checkpoints, the full `evaluate` stage with its MLflow record, and NIAH parts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from lm_eval.api.instance import Instance

from fox import config as fox_config
from fox.data import TokenizerConfig, get_tokenizer
from fox.eval import average_checkpoints, evaluate, lm_eval_adapter, load_model
from fox.eval.generation import first_line
from fox.eval.lm_eval_adapter import FoxLM, run_lm_eval, truncate_middle
from fox.eval.local_tasks import LOCAL_TASKS, write_local_tasks
from fox.eval.longbench import LOCAL_TASK, longbench, write_local_task
from fox.eval.niah import NEEDLE, QUESTION, exact_match, haystack_prompt
from fox.eval.perplexity import validation_metrics
from fox.model import LanguageModel, model_config
from fox.train import fp32_state_dict, read_manifest
from tests.conftest import tiny_experiment, train_first_run

MAX_LENGTH = 32
LOCAL_CFG = {"docs": 8, "ppl_tokens": 80, "mc_context_tokens": 40, "mc_continuation_tokens": 12, "mc_choices": 4,
             "seed": 0}
EVAL_JSON_KEYS = {"run", "grid", "params", "tokens", "train_ctx", "acp", "train_tokens_per_s", "mfu", "val_loss",
                  "val_ppl_at_train_ctx", "val_ppl_at_4x_ctx", "loss_by_position", "ppl_by_length", "lm_eval",
                  "niah", "acp_stats", "val_sequences", "val_sequence_tokens"}


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer(TokenizerConfig(name="bytes"))


@pytest.fixture(scope="module", params=[("fox", "pro"), ("transformer", "llama")], ids=lambda p: "-".join(p))
def model(request) -> LanguageModel:
    """A random tiny model whose greedy choices are ASCII bytes: LM-head rows of the other ids are zeroed, so
    generated text decodes cleanly and never hits end-of-text."""
    torch.manual_seed(0)
    arch, block = request.param
    model = LanguageModel(model_config(arch, block, "tiny", vocab_size=257)).eval()
    with torch.no_grad():
        model.lm_head.weight[128:] = 0
    return model


def requests(kind: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=args, idx=0) for args in arguments]


def direct_logprobs(model: LanguageModel, tokens: list[int]) -> torch.Tensor:
    """log p(tokens[t + 1] | tokens[:t + 1]) for every t, from one full forward pass."""
    with torch.no_grad():
        logprobs_TV = model(torch.tensor([tokens[:-1]]))[0].log_softmax(dim=-1)
    return logprobs_TV.gather(1, torch.tensor(tokens[1:])[:, None])[:, 0]


@pytest.mark.parametrize("batch_size, max_batch_tokens", [(2, 2**15), (16, 40)])
def test_loglikelihood_equals_direct_forward(model, tokenizer, batch_size, max_batch_tokens, monkeypatch):
    monkeypatch.setattr(lm_eval_adapter, "MAX_BATCH_TOKENS", max_batch_tokens)
    lm = FoxLM(model, tokenizer, MAX_LENGTH, batch_size=batch_size)
    pairs = [("def f(x):", " return x"), ("", "import os"), ("a" * 50, "bcd"), ("class A:\n", "    pass\n")]
    results = lm.loglikelihood(requests("loglikelihood", pairs))
    for (context, continuation), (logprob, greedy) in zip(pairs, results, strict=True):
        # as lm-eval's HF model: the context's trailing whitespace is scored with the continuation
        context, continuation = context.rstrip(), context[len(context.rstrip()):] + continuation
        context_ids = tokenizer.encode_ordinary(context) or [tokenizer.eot_token]
        continuation_ids = tokenizer.encode_ordinary(continuation)
        tokens = (context_ids + continuation_ids)[-(MAX_LENGTH + 1):]
        expected = direct_logprobs(model, tokens)[-len(continuation_ids):]
        assert logprob == pytest.approx(expected.sum().item(), abs=1e-4)
        assert greedy is False  # a random model does not continue real text


def test_is_greedy_exactly_for_the_greedy_continuation(model, tokenizer):
    lm = FoxLM(model, tokenizer, MAX_LENGTH)
    context = tokenizer.encode_ordinary("for i in range(")
    greedy = []
    for _ in range(4):
        with torch.no_grad():
            greedy.append(int(model(torch.tensor([context + greedy]))[0, -1].argmax()))
    wrong = greedy[:2] + [(greedy[2] + 1) % 128] + greedy[3:]
    (_, is_greedy), (_, is_wrong_greedy) = lm.score_pairs([(context, greedy), (context, wrong)])
    assert is_greedy is True and is_wrong_greedy is False


def test_rolling_loglikelihood_equals_sum_over_windows(model, tokenizer):
    lm = FoxLM(model, tokenizer, MAX_LENGTH, batch_size=3)
    short, long = "x = 1\n", "".join(f"value_{i} = {i * i}\n" for i in range(12))
    short_ll, long_ll = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(short,), (long,)]))

    eot = tokenizer.eot_token
    assert short_ll == pytest.approx(direct_logprobs(model, [eot] + tokenizer.encode_ordinary(short)).sum().item(),
                                     abs=1e-4)
    tokens = tokenizer.encode_ordinary(long)
    assert len(tokens) > 3 * MAX_LENGTH
    expected = direct_logprobs(model, [eot] + tokens[:MAX_LENGTH]).sum().item()
    for start in range(MAX_LENGTH, len(tokens), MAX_LENGTH):  # full windows; only the new tokens are scored
        end = min(start + MAX_LENGTH, len(tokens))
        expected += direct_logprobs(model, tokens[end - MAX_LENGTH - 1:end])[-(end - start):].sum().item()
    assert long_ll == pytest.approx(expected, abs=1e-3)


def test_generate_until_is_greedy_and_stops_at_until(model, tokenizer):
    lm = FoxLM(model, tokenizer, MAX_LENGTH)
    context, n_new = "def main():\n    ", 12
    tokens = tokenizer.encode_ordinary(context)
    for _ in range(n_new):  # greedy decoding through the full forward, no cache
        with torch.no_grad():
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    reference = tokenizer.decode(tokens[-n_new:])
    stop = reference[5:7]
    free, stopped = lm.generate_until(requests("generate_until", [
        (context, {"until": [], "max_gen_toks": n_new}), (context, {"until": [stop], "max_gen_toks": n_new})]))
    assert free == reference
    assert stopped == reference[: reference.index(stop)]


def test_truncate_middle_keeps_both_ends():
    tokens = list(range(10))
    assert truncate_middle(tokens, 10) == tokens and truncate_middle(tokens, 20) == tokens
    assert truncate_middle(tokens, 5) == [0, 1, 7, 8, 9] and truncate_middle(tokens, 4) == [0, 1, 8, 9]


def test_first_line_generation_is_the_first_line_of_the_full_one(model, tokenizer):
    """only_first_line stops at the end of the first line, drops leading newlines and ignores `until`: the
    answer is the first line of the unstopped generation (the official FoX LongBench scorer's prediction)."""
    full, short = FoxLM(model, tokenizer, MAX_LENGTH), FoxLM(model, tokenizer, MAX_LENGTH, only_first_line=True)
    contexts = ["def main():\n    ", "\n\n", "x = 1\n"]
    args = [(context, {"until": ["e"], "max_gen_toks": 24}) for context in contexts]
    free = full.generate_until(requests("generate_until", [(c, {"until": [], "max_gen_toks": 24}) for c in contexts]))
    assert short.generate_until(requests("generate_until", args)) == [first_line(text) for text in free]
    assert first_line("\n\n a\nb") == " a" and first_line("") == ""


class PromptRecordingLM(FoxLM):
    """FoxLM that keeps the prompt tokens of every generation."""

    def generation_prompt(self, context, max_new):
        prompt = super().generation_prompt(context, max_new)
        self.prompts = getattr(self, "prompts", []) + [(self._context(context), prompt)]
        return prompt


def test_longbench_shaped_task_runs_through_lm_eval(model, tokenizer, byte_corpus, tmp_path):
    """The offline LongBench task through lm-eval's own longbench_2wikimqa machinery: prompts start with BOS
    and lose their middle to max_prompt_tokens, the question at the end kept; the QA-F1 score comes back."""
    cfg = {"docs": 3, "context_tokens": 300, "seed": 0}
    tasks_dir = write_local_task(byte_corpus, tokenizer, tmp_path / "tasks", cfg)
    docs = [json.loads(line) for line in (tasks_dir / f"{LOCAL_TASK}.jsonl").read_text().splitlines()]
    assert len(docs) == 3 and all(doc["answers"][0] in doc["context"] for doc in docs)
    lm = PromptRecordingLM(model, tokenizer, MAX_LENGTH, bos=True, max_prompt_tokens=200, only_first_line=True)
    results = run_lm_eval(lm, [LOCAL_TASK], tasks_dir, limit=None)
    assert set(results[LOCAL_TASK]) == {"score", "qa_f1_score"} and 0.0 <= results[LOCAL_TASK]["score"] <= 1.0
    assert len(lm.prompts) == 3
    for whole, prompt in lm.prompts:
        assert len(whole) > 300 and len(prompt) == 200 and prompt[0] == tokenizer.eot_token
        assert prompt == whole[:100] + whole[-100:]
        assert tokenizer.decode(prompt[-40:]).endswith("Answer:")


def test_local_tasks_run_through_lm_eval(model, tokenizer, byte_corpus, tmp_path):
    tasks_dir = write_local_tasks(byte_corpus, tokenizer, tmp_path / "tasks", LOCAL_CFG)
    for name in LOCAL_TASKS:
        data_file = Path(yaml.safe_load((tasks_dir / f"{name}.yaml").read_text())
                         ["dataset_kwargs"]["data_files"]["test"])
        assert data_file.is_absolute() and data_file.is_file()
    questions = [json.loads(line) for line in (tasks_dir / "fox_heldout_mc.jsonl").read_text().splitlines()]
    assert len(questions) == LOCAL_CFG["docs"]
    assert all(len(q["choices"]) == LOCAL_CFG["mc_choices"] and 0 <= q["label"] < len(q["choices"]) for q in questions)

    scores = run_lm_eval(FoxLM(model, tokenizer, MAX_LENGTH), LOCAL_TASKS, tasks_dir, limit=None)
    assert 0.0 <= scores["fox_heldout_mc"]["acc"] <= 1.0
    assert 1.0 < scores["fox_heldout_ppl"]["word_perplexity"] < math.inf
    assert 1.0 < scores["fox_heldout_ppl"]["byte_perplexity"] < 257.0 * 1.5  # a near-uniform random model


class RecordingLM(FoxLM):
    """FoxLM that keeps the context tokens of every loglikelihood request lm-eval sends it."""

    def score_pairs(self, pairs):
        self.seen = getattr(self, "seen", []) + [list(context) for context, _ in pairs]
        return super().score_pairs(pairs)


def test_lm_eval_requests_of_a_task_start_with_bos(model, tokenizer, byte_corpus, tmp_path):
    """Through lm-eval itself on a local task: with bos (the papers' add_bos_token=True) every context starts
    with BOS, followed by the same tokens as without it."""
    tasks_dir = write_local_tasks(byte_corpus, tokenizer, tmp_path / "tasks", LOCAL_CFG)
    with_bos, without = RecordingLM(model, tokenizer, 256, bos=True), RecordingLM(model, tokenizer, 256)
    for lm in (with_bos, without):
        assert 0 <= run_lm_eval(lm, ["fox_heldout_mc"], tasks_dir, limit=None)["fox_heldout_mc"]["acc"] <= 1
    assert len(with_bos.seen) == LOCAL_CFG["docs"] * LOCAL_CFG["mc_choices"]
    assert all(row[0] == tokenizer.eot_token for row in with_bos.seen)
    assert not any(row[0] == tokenizer.eot_token for row in without.seen)
    assert [row[1:] for row in with_bos.seen] == without.seen


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, byte_corpus) -> dict:
    """A tiny FoX (Pro) with ACP trained for 3 steps through `fox train`, a checkpoint after each step."""
    root = tmp_path_factory.mktemp("trained")
    step = 32 * 4
    config = tiny_experiment(root / "results", tokens=3 * step, tokens_per_step=step, micro_batch_size=4,
                             warmup_tokens=step, checkpoint_every_tokens=step, keep_checkpoints=3)
    config["grid"] = [{"model": ["fox"], "block": ["pro"], "size": ["tiny"], "context": [32], "acp": [True]}]
    config["evaluate"] = {"val_tokens": 4 * 128, "val_windows": 4, "batch_size": 4, "length_multipliers": [0.5, 1, 4],
                          "lm_eval": {"local_tasks": LOCAL_CFG},
                          "niah": {"length_multipliers": [3, 4], "depths": [0.0, 1.0], "samples": 1}}
    return train_first_run(root, config, byte_corpus)[0]


def test_average_is_the_mean_of_the_last_k_checkpoints(trained_run, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = Path(trained_run["run_dir"]) / "checkpoints"
    tags = [entry["tag"] for entry in read_manifest(root)]
    assert len(tags) == 3
    weights = [fp32_state_dict(root, tag) for tag in tags[-2:]]

    saved = average_checkpoints(trained_run | {"average": {"last_k": 2}}, tmp_path / "avg2.pt")
    assert saved["checkpoints"] == tags[-2:]
    for name, tensor in saved["state_dict"].items():
        torch.testing.assert_close(tensor, (weights[0][name] + weights[1][name]) / 2, rtol=0, atol=1e-7)
    assert not torch.equal(saved["state_dict"]["embed.weight"], weights[1]["embed.weight"])

    average_checkpoints(trained_run | {"average": {"last_k": 1}}, tmp_path / "avg1.pt")
    model = load_model(tmp_path / "avg1.pt")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, weights[1][name]), name

    mlflow.set_tracking_uri(f"sqlite:///{Path(trained_run['results_dir']).resolve() / 'mlflow.db'}")
    mlflow_id = (Path(trained_run["run_dir"]) / "mlflow_run_id").read_text().strip()
    assert mlflow.get_run(mlflow_id).data.params["average.checkpoints"] == ",".join(tags[-2:])


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_average_of_bf16_training_is_the_mean_of_the_fp32_masters(zero_stage, byte_corpus, tmp_path, monkeypatch):
    """Real DeepSpeed bf16 checkpoints (asked for ZeRO 0, run at ZeRO 1 by the bf16 optimizer; and ZeRO 2): the
    average is the mean of the optimizer's fp32 master weights, not of the bf16 module copies saved beside them."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    step = 32 * 4
    config = tiny_experiment(tmp_path / "results", tokens=2 * step, tokens_per_step=step, micro_batch_size=4,
                             warmup_tokens=step, checkpoint_every_tokens=step, keep_checkpoints=2,
                             precision="bf16", zero_stage=zero_stage, lr=3e-2)
    config["grid"][0]["context"] = [32]
    run, _, _ = train_first_run(tmp_path, config, byte_corpus)
    root = Path(run["run_dir"]) / "checkpoints"
    tags = [entry["tag"] for entry in read_manifest(root)]
    saved = average_checkpoints(run | {"average": {"last_k": 2}}, tmp_path / "avg.pt")

    modules = [torch.load(root / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"] for tag in tags]
    if zero_stage == 0:  # the bf16 optimizer's flat fp32 groups, cut in the model states' parameter order
        masters = []
        for tag in tags:
            shapes = torch.load(root / tag / "mp_rank_00_model_states.pt", weights_only=False)["param_shapes"]
            (optim,) = (root / tag).glob("bf16_zero_pp_rank_0_*optim_states.pt")
            flats = torch.load(optim, weights_only=False)["optimizer_state_dict"]["single_partition_of_fp32_groups"]
            state = {}
            for group, flat in zip(shapes, flats, strict=True):
                offsets = torch.tensor([0] + [shape.numel() for shape in group.values()]).cumsum(0).tolist()
                for (name, shape), start in zip(group.items(), offsets, strict=False):
                    state[name] = flat[start:start + shape.numel()].view(shape)
            masters.append(state)
    else:  # DeepSpeed's own reader of ZeRO 2 checkpoints as the reference
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        masters = [get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag) for tag in tags]
    for name, tensor in saved["state_dict"].items():
        assert modules[0][name].dtype == torch.bfloat16 and tensor.dtype == torch.float32
        assert torch.equal(tensor, (masters[0][name] + masters[1][name]) / 2), name
    bf16_mean = {n: (modules[0][n].float() + modules[1][n].float()) / 2 for n in modules[0]}
    differs = [n for n in bf16_mean if not torch.equal(bf16_mean[n], saved["state_dict"][n])]
    assert len(differs) == len(bf16_mean)  # every tensor: the masters carry more than bf16's 8 bits


def test_evaluate_writes_the_results_and_logs_them(trained_run, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    model_path, out = tmp_path / "averaged.pt", tmp_path / "eval" / "run.json"
    average_checkpoints(trained_run, model_path)
    result = evaluate(trained_run, model_path, out)

    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert set(result) == EVAL_JSON_KEYS
    assert result["train_ctx"] == 32 and result["tokens"] == 3 * 32 * 4 and result["acp"] is True
    assert result["val_ppl_at_train_ctx"] == pytest.approx(math.exp(result["val_loss"]))
    assert result["ppl_by_length"]["lengths"] == [16, 32, 128]
    assert result["val_ppl_at_4x_ctx"] == result["ppl_by_length"]["ppl"][-1]
    assert len(result["loss_by_position"]["positions"]) == len(result["loss_by_position"]["loss"]) == 128
    assert set(result["lm_eval"]) == set(LOCAL_TASKS)
    niah = result["niah"]
    assert niah["lengths"] == [96, 128] and len(niah["acc"]) == 2 and all(len(row) == 2 for row in niah["acc"])
    per_layer_head = result["acp_stats"]["per_layer_head"]
    assert len(per_layer_head) == 2 and all(len(row) == 2 for row in per_layer_head)  # tiny: 2 layers x 2 heads
    assert 0.0 <= result["acp_stats"]["pruned_fraction"] <= 1.0

    results = Path(trained_run["results_dir"]).resolve()
    mlflow.set_tracking_uri(f"sqlite:///{results / 'mlflow.db'}")
    mlflow_id = (Path(trained_run["run_dir"]) / "mlflow_run_id").read_text().strip()
    run = mlflow.get_run(mlflow_id)
    assert run.data.metrics["eval/val_loss"] == pytest.approx(result["val_loss"])
    assert run.data.metrics["eval/fox_heldout_mc/acc"] == pytest.approx(result["lm_eval"]["fox_heldout_mc"]["acc"])
    # the same artifact name in every run (fox.tracking); stored where `mlflow ui --artifacts-destination` serves it
    stored = results / "mlartifacts" / run.info.artifact_uri.removeprefix("mlflow-artifacts:/") / "eval"
    assert [p.name for p in stored.iterdir()] == ["results.json"]


def test_longbench_stage_writes_scores_and_the_table(trained_run, tmp_path, monkeypatch):
    """`fox longbench` on the offline task, then results/longbench.csv: a row per model, Table 2's 14 columns."""
    from fox.report.longbench import TABLE_2_TASKS, longbench_table

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    model_path, out = tmp_path / "averaged.pt", tmp_path / "eval" / "longbench" / "run.json"
    average_checkpoints(trained_run, model_path)
    run_cfg = trained_run | {"longbench": {"tasks": [LOCAL_TASK], "max_prompt_tokens": 96, "first_line": True,
                                           "limit": None, "local_task": {"docs": 2, "context_tokens": 160, "seed": 0}}}
    result = longbench(run_cfg, model_path, out)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert set(result["scores"]) == {LOCAL_TASK} and 0.0 <= result["scores"][LOCAL_TASK] <= 100.0
    assert result["scores"][LOCAL_TASK] == pytest.approx(100 * result["lm_eval"][LOCAL_TASK]["score"])

    other = result | {"run": "transformer-llama-tiny-ctx32-dense", "acp": False, "scores": {"qasper": 12.5},
                      "grid": {"model": "transformer", "block": "llama", "size": "tiny", "context": 32, "acp": False}}
    (tmp_path / "other.json").write_text(json.dumps(other))
    csv_path, plot_path = tmp_path / "longbench.csv", tmp_path / "plots" / "longbench.png"
    longbench_table(fox_config.validate(tiny_experiment(tmp_path)), [out, tmp_path / "other.json"], csv_path,
                    plot_path)
    header, *rows = [line.split(",") for line in csv_path.read_text().splitlines()]
    assert header == ["run", "model", "params", "tokens", "train_ctx", "acp", *TABLE_2_TASKS, LOCAL_TASK]
    assert [row[:2] for row in rows] == [[trained_run["run"], "FoX (Pro)"],
                                         ["transformer-llama-tiny-ctx32-dense", "Transformer (LLaMA)"]]
    assert float(rows[0][-1]) == result["scores"][LOCAL_TASK] and rows[0][header.index("qasper")] == ""
    assert rows[1][header.index("qasper")] == "12.5" and rows[1][-1] == ""
    assert "| Model | Qasper | fox_heldout_longbench |" in csv_path.with_suffix(".md").read_text()
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    mlflow.set_tracking_uri(f"sqlite:///{Path(trained_run['results_dir']).resolve() / 'mlflow.db'}")
    mlflow_id = (Path(trained_run["run_dir"]) / "mlflow_run_id").read_text().strip()
    metrics = mlflow.get_run(mlflow_id).data.metrics
    assert metrics[f"eval.longbench.{LOCAL_TASK}"] == pytest.approx(result["scores"][LOCAL_TASK])


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_haystack_puts_the_needle_at_the_depth(tokenizer, depth):
    filler = tokenizer.encode_ordinary("spam and eggs " * 40)
    prompt, at = haystack_prompt(filler, tokenizer, 300, depth, "73915")
    needle = tokenizer.encode_ordinary(NEEDLE.format(code="73915"))
    question = tokenizer.encode_ordinary(QUESTION)
    n_filler = 300 - len(needle) - len(question)
    assert len(prompt) == 300
    assert at == round(depth * n_filler)
    assert prompt[at:at + len(needle)] == needle
    assert prompt[:at] + prompt[at + len(needle):-len(question)] == filler[:n_filler]
    assert prompt[-len(question):] == question


def test_haystack_too_short_for_needle_and_question(tokenizer):
    with pytest.raises(ValueError, match="needle"):
        haystack_prompt([0] * 100, tokenizer, 40, 0.5, "73915")


@pytest.mark.parametrize(("generated", "match"), [
    (" 73915", True), (" 73915.", True), ("73915\nmore", True), (" 73915. And", True),
    (" 7391", False), (" 73915abc", False), ("", False), (" code 73915", False), (" 739150", False)])
def test_exact_match(generated, match):
    assert exact_match(generated, "73915") is match


def test_perplexity_by_length_is_the_mean_over_the_same_sequences_prefixes(tokenizer, byte_corpus):
    """The paper's protocol: per-token loss of the longest sequences; ppl at length n from their first n
    positions, which is what windows of n tokens of the same text give (causal attention, a dense model)."""
    torch.manual_seed(0)
    model = LanguageModel(model_config("transformer", "llama", "tiny", vocab_size=257)).eval()
    cfg = {"length_multipliers": [0.5, 1, 4], "val_tokens": 3 * 128, "val_windows": 2, "batch_size": 4}
    metrics = validation_metrics(model, byte_corpus, 32, cfg)
    assert metrics["val_sequences"] == 3 and metrics["val_sequence_tokens"] == 128
    loss = torch.tensor(metrics["loss_by_position"]["loss"], dtype=torch.float64)
    assert metrics["ppl_by_length"]["ppl"] == pytest.approx([math.exp(loss[:n].mean()) for n in (16, 32, 128)])
    assert metrics["val_ppl_at_4x_ctx"] == pytest.approx(math.exp(loss.mean()))
    from fox.data import validation_windows
    inputs, targets = next(validation_windows(byte_corpus, 128, 3))
    with torch.no_grad():
        short = model.token_losses(inputs[:, :32], targets[:, :32]).double().mean()
    assert metrics["val_loss"] == pytest.approx(short.item(), rel=1e-5)
