"""The recurrent baselines (Mamba-2, HGRN2, DeltaNet) on CPU: the chunked recurrences against their token-by-token
definition in fp64, decoding against the full forward, the paper's sizes, init and weight decay, the grid's run
ids and checks, and a tiny one of each through `fox train`, `fox average` and `fox evaluate`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fox import cli
from fox import config as fox_config
from fox.model import LanguageModel, model_config, peak_lr
from fox.model import recurrences as rec
from fox.model.baselines import Mamba2Mixer
from tests.conftest import tiny_experiment, train_first_run

BASELINES = ["mamba2", "hgrn2", "deltanet"]
VOCAB = 97


def recurrence_inputs(kind: str, T: int, dtype=torch.float64, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(q, k, v, gate) as each recurrence gets them in its model: decays from sigmoids, unit keys for DeltaNet."""
    gen = torch.Generator().manual_seed(seed)
    B, H, K, V = 2, 3, 8, 5
    q, k = (torch.randn(B, T, H, K, generator=gen, dtype=dtype) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen, dtype=dtype)
    if kind == "delta_rule":
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        return q, k, v, torch.rand(B, T, H, generator=gen, dtype=dtype)
    shape = (B, T, H) if kind == "simple_gla" else (B, T, H, K)
    return q, k, v, F.logsigmoid(2 * torch.randn(shape, generator=gen, dtype=dtype))


RECURRENCES = {"simple_gla": (rec.simple_gla_step, rec.simple_gla_chunked, rec.simple_gla),
               "gla": (rec.gla_step, rec.gla_chunked, rec.gla),
               "delta_rule": (rec.delta_rule_step, rec.delta_rule_chunked, rec.delta_rule)}


@pytest.mark.parametrize("T", [1, 17, 150])
@pytest.mark.parametrize("kind", list(RECURRENCES))
def test_chunked_recurrence_is_the_token_by_token_one(kind, T):
    """Outputs and final states, from a given initial state, across chunk boundaries and a partial last chunk."""
    step, chunked, public = RECURRENCES[kind]
    q, k, v, gate = recurrence_inputs(kind, T)
    state = torch.randn(2, 3, 8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    o_ref, state_ref = rec.run_steps(step, q, k, v, gate, 0.7, state)
    o, final = chunked(q, k, v, gate, 0.7, state, output_final_state=True)
    torch.testing.assert_close(o, o_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(final, state_ref, rtol=0, atol=1e-12)
    o_public, none = public(q, k, v, gate, scale=0.7, initial_state=state)        # CPU: the PyTorch forms
    assert none is None
    torch.testing.assert_close(o_public, o_ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", list(RECURRENCES))
def test_chunked_recurrence_gradients(kind):
    """Gradients of the chunked form (the CPU training path) are the definition's, initial state included."""
    step, chunked, _ = RECURRENCES[kind]
    inputs = [x.requires_grad_() for x in (*recurrence_inputs(kind, 40),
                                           torch.randn(2, 3, 8, 5, dtype=torch.float64))]
    weights = torch.randn(2, 40, 3, 5, dtype=torch.float64)
    grads = []
    for form in (lambda *a: rec.run_steps(step, *a[:4], 0.7, a[4]), lambda *a: chunked(*a[:4], 0.7, a[4], True)):
        o, final = form(*inputs)
        grads.append(torch.autograd.grad((o * weights).sum() + final.square().sum(), inputs))
    for by_steps, by_chunks in zip(*grads, strict=True):
        torch.testing.assert_close(by_chunks, by_steps, rtol=0, atol=1e-10)


def tiny(arch: str, dtype=torch.float64) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(model_config(arch, None, "tiny", vocab_size=VOCAB)).to(dtype).eval()


@pytest.mark.parametrize("arch", BASELINES)
def test_decode_with_the_state_cache_matches_forward(arch):
    """Prefill (chunked, 70 tokens: a partial chunk), one token at a time (steps), then several at once from the
    cached state and convolution inputs: the full forward's logits."""
    model = tiny(arch)
    ids = torch.randint(0, VOCAB, (2, 110), generator=torch.Generator().manual_seed(1))
    full = model(ids)
    cache = model.new_cache(2)
    pieces = [model.decode(ids[:, :70], cache)] + [model.decode(ids[:, t:t + 1], cache) for t in range(70, 80)]
    pieces.append(model.decode(ids[:, 80:], cache))
    assert cache.length == 110 and all(layer.state_BHKV.dtype == torch.float64 for layer in cache.layers)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-12)
    generated = model.generate(ids[:, :20], max_new_tokens=5)
    assert generated.shape == (2, 5)
    torch.testing.assert_close(generated[:, 0], full[:, 19].argmax(dim=-1))


# Paper counts (non-embedding + LM head), FoX paper Table 6: Mamba-2 780M, HGRN2 756M, DeltaNet 757M at 760M.
# 125M and 360M are our counts of the official configs' shapes, frozen here.
PAPER_PARAMS = {
    ("125m", "mamba2"): 128_965_824, ("125m", "hgrn2"): 123_560_448, ("125m", "deltanet"): 123_718_656,
    ("360m", "mamba2"): 368_314_880, ("360m", "hgrn2"): 359_819_264, ("360m", "deltanet"): 360_289_280,
    ("760m", "mamba2"): 780_113_664, ("760m", "hgrn2"): 756_784_128, ("760m", "deltanet"): 757_635_072,
}


@pytest.mark.parametrize(("size", "arch"), list(PAPER_PARAMS))
def test_param_counts_match_paper(size, arch):
    with torch.device("meta"):
        model = LanguageModel(model_config(arch, None, size))
    assert model.param_counts()["paper"] == PAPER_PARAMS[size, arch]
    if size == "760m":
        assert int(PAPER_PARAMS[size, arch] / 1e6) == {"mamba2": 780, "hgrn2": 756, "deltanet": 757}[arch]


def test_flops_per_token_count_the_recurrent_state():
    """2 per weight plus the state products: Mamba-2 4 H N P per layer, HGRN2 4 H K V, DeltaNet 6 H K V; the
    context does not enter."""
    for arch, per_layer in [("mamba2", 4 * 4 * 16 * 32), ("hgrn2", 4 * 2 * 32 * 32), ("deltanet", 6 * 2 * 32 * 32)]:
        model = tiny(arch)
        expected = 2 * model.param_counts()["paper"] + model.cfg.n_layer * per_layer
        assert model.forward_flops_per_token(256) == model.forward_flops_per_token(4096) == expected
        assert model.train_flops_per_token(256) == 3 * expected


def test_official_init_and_weight_decay_groups():
    torch.manual_seed(0)
    model = LanguageModel(model_config("mamba2", None, "125m", vocab_size=VOCAB))
    mixer = model.blocks[0].mixer
    assert isinstance(mixer, Mamba2Mixer)
    torch.testing.assert_close(mixer.A_log.exp(), torch.arange(1.0, 25.0))
    assert bool((mixer.D == 1).all())
    dt = F.softplus(mixer.dt_bias)
    assert dt.min() >= 0.999e-3 and dt.max() <= 0.1001
    bound = 1 / math.sqrt(mixer.out_proj.in_features) / math.sqrt(24)      # PyTorch's default over sqrt(n_layer)
    assert mixer.out_proj.weight.abs().max() <= bound < 2 * mixer.out_proj.weight.abs().max()
    no_decay = {id(p) for p in model.optimizer_groups(0.1)[1]["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in no_decay}
    assert {"blocks.0.mixer.A_log", "blocks.0.mixer.D", "blocks.0.mixer.dt_bias", "blocks.0.mixer.conv1d.bias",
            "blocks.0.mixer.norm.weight", "blocks.0.mixer_norm.weight"} <= names
    assert "blocks.0.mixer.conv1d.weight" not in names and "blocks.0.mixer.in_proj.weight" not in names

    model = LanguageModel(model_config("deltanet", None, "125m", vocab_size=VOCAB))
    q_proj, down = model.blocks[0].mixer.q_proj.weight, model.blocks[0].mlp.down_proj.weight
    assert q_proj.abs().max() <= 2**-2.5 * math.sqrt(6 / (768 + 768))            # xavier_uniform, gain 2^-2.5
    assert down.std().item() == pytest.approx(0.02 / math.sqrt(2 * 12), rel=0.05)


def test_model_config_rejects_a_block_or_acp_for_a_baseline():
    with pytest.raises(ValueError, match="model.block='pro' with arch mamba2"):
        model_config("mamba2", "pro", "tiny")
    with pytest.raises(ValueError, match="model.acp=True: ACP prunes by the forget gate"):
        model_config("hgrn2", None, "tiny", acp=True)
    with pytest.raises(ValueError, match=r"n_head x head_dim = 3 x 32 with arch deltanet: must be 64"):
        model_config("deltanet", None, "tiny", n_head=3)


def test_grid_run_ids_and_checks():
    config = tiny_experiment(Path("results"))
    config["grid"] = [{"model": ["fox"], "block": ["pro"], "size": ["tiny"], "context": [64]},
                      {"model": BASELINES, "size": ["tiny", "760m"], "context": [64]}]
    config = fox_config.validate(config)
    runs = fox_config.run_ids(config)
    assert runs == ["fox-pro-tiny-ctx64-dense", "mamba2-tiny-ctx64-dense", "mamba2-760m-ctx64-dense",
                    "hgrn2-tiny-ctx64-dense", "hgrn2-760m-ctx64-dense", "deltanet-tiny-ctx64-dense",
                    "deltanet-760m-ctx64-dense"]
    for run in runs:
        assert fox_config.run_id(fox_config.parse_run_id(run)) == run
    assert fox_config.parse_run_id("hgrn2-760m-ctx64-dense")["block"] is None
    for bad in ("mamba2-pro-760m-ctx64-dense", "fox-760m-ctx64-dense"):
        with pytest.raises(fox_config.ConfigError, match="expected"):
            fox_config.parse_run_id(bad)
    resolved = fox_config.resolve_run(config, "mamba2-tiny-ctx64-dense")
    assert resolved["grid"] == {"model": "mamba2", "block": None, "size": "tiny", "context": 64, "acp": False}
    for entry, named in [({"model": ["mamba2", "fox"], "block": ["pro"]}, "grid[0].block=['pro'] with model=mamba2"),
                         ({"model": ["fox"]}, "grid[0].block is required for model=fox"),
                         ({"model": ["deltanet"], "acp": [True]}, "grid[0].acp=true with model=deltanet")]:
        bad = tiny_experiment(Path("results"))
        bad["grid"] = [{"size": ["tiny"], "context": [64], **entry}]
        with pytest.raises(fox_config.ConfigError, match=named.replace("[", r"\[")) as error:
            fox_config.validate(bad)
        assert "\n" not in str(error.value)


def test_table_5_learning_rates():
    assert [peak_lr(arch, None, "760m", 45 * 2**30) for arch in BASELINES] == [2e-3, 2e-3, 1e-3]
    assert [peak_lr(arch, None, "760m", 15 * 2**30) for arch in BASELINES] == [1e-3] * 3
    assert [peak_lr(arch, None, size) for arch in BASELINES for size in ("125m", "360m")] == [2e-3] * 6


@pytest.fixture(scope="module", params=BASELINES)
def trained_baseline(request, tmp_path_factory, byte_corpus) -> dict:
    """A tiny baseline trained for 16 steps by `fox train` (DeepSpeed, one CPU process)."""
    root = tmp_path_factory.mktemp(request.param)
    config = tiny_experiment(root / "results", tokens=64 * 8 * 16, checkpoint_every_tokens=64 * 8 * 16,
                             keep_checkpoints=1, lr=1e-2)
    config["grid"] = [{"model": [request.param], "size": ["tiny"], "context": [64]}]
    config["evaluate"] = {"val_tokens": 2 * 256, "batch_size": 4, "length_multipliers": [1, 4],
                          "lm_eval": {"local_tasks": {"docs": 4, "ppl_tokens": 80, "mc_context_tokens": 40,
                                                      "mc_continuation_tokens": 8}},
                          "niah": {"length_multipliers": [4], "depths": [0.5], "samples": 1}}
    run, path, _ = train_first_run(root, config, byte_corpus)
    return run | {"config_path": str(path)}


def test_tiny_baseline_trains_and_evaluates(trained_baseline, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = Path(trained_baseline["run_dir"])
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 16 and log[0]["loss"] > 5.0                                # ln(257) = 5.55 at init
    assert sum(entry["loss"] for entry in log[-4:]) / 4 < log[0]["loss"] - 1.0
    assert log[-1]["attn_pruned_fraction"] is None

    averaged, out = run_dir / "averaged.pt", run_dir.parent.parent / "eval" / f"{trained_baseline['run']}.json"
    cli.main(["average", "--config", trained_baseline["config_path"], "--out", str(averaged)])
    cli.main(["evaluate", "--config", trained_baseline["config_path"], "--in", str(averaged), "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["grid"]["block"] is None and result["acp_stats"] is None
    assert result["val_loss"] < log[0]["loss"] - 1.0
    assert len(result["ppl_by_length"]["ppl"]) == 2 and result["val_ppl_at_4x_ctx"] is not None
    assert set(result["lm_eval"]) == {"fox_heldout_ppl", "fox_heldout_mc"}
    assert result["niah"]["lengths"] == [256] and len(result["niah"]["acc"]) == 1


@pytest.mark.parametrize("arch", BASELINES)
def test_compiled_baseline_matches_eager(arch):
    """Per-block compilation of the PyTorch path (aot_eager): no graph break, eager's loss and gradients."""
    import torch._dynamo

    from fox.train.compile import compile_model

    eager, compiled = tiny(arch, torch.float32).train(), tiny(arch, torch.float32).train()
    compile_model(compiled, backend="aot_eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    ids = torch.randint(0, VOCAB, (2, 100), generator=torch.Generator().manual_seed(1))
    losses = [model(ids[:, :-1], ids[:, 1:]) for model in (eager, compiled)]
    for loss in losses:
        loss.backward()
    assert not torch._dynamo.utils.counters["graph_break"]
    torch.testing.assert_close(losses[1], losses[0])
    for plain, traced in zip(eager.parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(traced.grad, plain.grad, rtol=1e-5, atol=1e-7)
