"""Training on a CUDA device: the compiled model around the Triton kernels against eager, through `fox train`.

Run on the device machine: pytest -m gpu tests/test_train_gpu.py (needs DeepSpeed and MLflow there: see
bench/device_wheels.sh). Skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch
from fox_kernels import forgetting_attention

from fox.model import LanguageModel, model_config
from tests.test_train import fox_train, make_run, train_log

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


@pytest.mark.parametrize("case", ["dense", "acp", "varlen", "tq<tk"])
def test_compiled_attention_matches_eager(case):
    """fullgraph compile through the custom operators (no graph break) gives eager's output and gradients."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    batch, t_q, t_k = (1, 1000, 1000) if case == "varlen" else (2, 300 if case == "tq<tk" else 1000, 1000)
    q = torch.randn(batch, t_q, 4, 64, device="cuda", generator=gen).bfloat16()
    k, v = (torch.randn(batch, t_k, 2, 64, device="cuda", generator=gen).bfloat16() for _ in range(2))
    log_f = -torch.rand(batch, t_k, 4, device="cuda", generator=gen) * 0.2
    kwargs = {"acp_threshold": "auto" if case != "dense" else None}       # auto with varlen: no host sync either
    if case == "varlen":
        kwargs |= {"cu_seqlens": torch.tensor([0, 17, 600, 1000], device="cuda", dtype=torch.int32),
                   "max_seqlen": 583}
    results = []
    for fn in (forgetting_attention, torch.compile(forgetting_attention, fullgraph=True)):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, log_f)]
        out = fn(*leaves, **kwargs)
        out.float().square().sum().backward()
        results.append([out.detach()] + [x.grad for x in leaves])
    for eager, compiled in zip(*results, strict=True):   # "auto" thresholds: inductor's reductions may round apart
        torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-3)


def test_compiled_fox_pro_has_no_graph_break():
    import torch._dynamo

    from fox.train.compile import compile_model

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LanguageModel(model_config("fox", "pro", "small", vocab_size=300, acp=True)).bfloat16()
    compile_model(model)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    ids = torch.randint(0, 300, (2, 1025), device="cuda")
    model(ids[:, :-1], ids[:, 1:]).backward()
    assert not torch._dynamo.utils.counters["graph_break"]
    assert model.pruned_fraction() > 0


def test_compiled_training_matches_eager_step_for_step(tmp_path, byte_corpus):
    """A tiny FoX (Pro) trained in bf16 by `fox train`, eager and compiled: the same losses within bf16 rounding
    (the same data, init and schedule)."""
    logs = []
    for compiled in (False, True):
        (tmp_path / str(compiled)).mkdir()
        path, run = make_run(tmp_path / str(compiled), byte_corpus, compile=compiled, tokens=512 * 12,
                             precision="bf16")
        assert f"compile {'on' if compiled else 'off'}" in fox_train(path).stdout
        logs.append([entry["loss"] for entry in train_log(run)])
    assert len(logs[0]) == 12
    for eager, compiled in zip(*logs, strict=True):
        assert compiled == pytest.approx(eager, rel=2e-2)
    assert logs[1][-1] < logs[1][0] - 0.5
