"""The recurrent baselines on a CUDA device: fox's PyTorch path (the CPU path) against flash-linear-attention's
kernels and layers, forward and gradients; decoding, the compiled model and `fox train` on the GPU.

Run on the device machine, with fla, DeepSpeed and MLflow carried as wheels (bench/device_wheels.sh):
    pytest -m gpu tests/test_baselines_gpu.py
Skipped without CUDA; with CUDA and no flash-linear-attention the tests fail. References are the PyTorch path in
fp64 on the bf16-rounded inputs and weights. A candidate may be off by twice what the PyTorch path makes of the
same inputs at the candidate's precision (its activations rounded the same way), or by a small fraction of the
reference's scale, whichever is larger; a wrong convention (scale, gate, layout) is off by O(1).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fox.model import LanguageModel, model_config
from fox.model import recurrences as rec
from fox.model.baselines import MIXERS
from fox.train.compile import compile_model
from tests.conftest import fla_with_few_configs, tiny_experiment, train_first_run

pytestmark = pytest.mark.gpu
BASELINES = ["mamba2", "hgrn2", "deltanet"]
FLA_LAYER_DTYPE = {"mamba2": torch.float32, "hgrn2": torch.float32, "deltanet": torch.bfloat16}
"""fla's layers at their most precise: its Mamba2 without mamba_ssm and its HGRN2 run fp32, its DeltaNet
kernels take 16-bit only."""


@pytest.fixture(autouse=True)
def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    fla_with_few_configs()       # minutes of autotuning on a fresh machine otherwise; the results do not depend on it


def assert_relatively_close(actual: torch.Tensor, reference: torch.Tensor, bound: float, name: str,
                            same_precision: torch.Tensor | None = None) -> None:
    """max |actual - reference| <= bound * max |reference|, or twice same_precision's error where larger."""
    error = (actual.double() - reference).abs().max().item()
    allowed = bound * reference.abs().max().item()
    if same_precision is not None:
        allowed = max(allowed, 2 * (same_precision.double() - reference).abs().max().item())
    assert error <= allowed, f"{name}: max error {error:.3g} > allowed {allowed:.3g}"


@pytest.fixture
def pytorch_path(monkeypatch):
    """Within the `with`, the recurrences take their PyTorch forms whatever the dtype and device."""

    @contextlib.contextmanager
    def forced():
        with monkeypatch.context() as patch:
            patch.setattr(rec, "_use_fla", lambda q: False)
            yield

    return forced


def recurrence_inputs(kind: str, T: int = 999) -> list[torch.Tensor]:
    """q, k, v, gate and an initial state as the models produce them (bf16 activations, fp32 gates and state)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    B, H, K, V = 2, 4, 128, 64
    q, k = (torch.randn(B, T, H, K, device="cuda", generator=gen) for _ in range(2))
    v = torch.randn(B, T, H, V, device="cuda", generator=gen)
    if kind == "delta_rule":
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        gate = torch.rand(B, T, H, device="cuda", generator=gen).bfloat16()
    else:
        shape = (B, T, H) if kind == "simple_gla" else (B, T, H, K)
        gate = F.logsigmoid(2 + torch.randn(shape, device="cuda", generator=gen))
    state = 0.1 * torch.randn(B, H, K, V, device="cuda", generator=gen)
    return [q.bfloat16(), k.bfloat16(), v.bfloat16(), gate, state]


@pytest.mark.parametrize("kind", ["simple_gla", "simple_gla via gla", "gla", "delta_rule"])
def test_fla_kernels_match_the_pytorch_path(kind, monkeypatch):
    """fox's public entry on bf16 CUDA tensors (fla's chunk kernels) against the chunked PyTorch form in fp64:
    outputs, final states and the gradients of q, k, v, the gate and the initial state, over 999 tokens.
    "simple_gla via gla": the route taken where fla refuses simple GLA's backward, taken here on any GPU."""
    if kind == "simple_gla via gla":
        monkeypatch.setattr(rec, "fla_refuses_simple_gla_backward", lambda: True)
        kind = "simple_gla"
    public = {"simple_gla": rec.simple_gla, "gla": rec.gla, "delta_rule": rec.delta_rule}[kind]
    chunked = {"simple_gla": rec.simple_gla_chunked, "gla": rec.gla_chunked, "delta_rule": rec.delta_rule_chunked}
    inputs = recurrence_inputs(kind)
    assert rec._use_fla(inputs[0])
    scale = 1.0 if kind == "simple_gla" else 128**-0.5
    gen = torch.Generator(device="cuda").manual_seed(1)
    weight_o = torch.randn(*inputs[2].shape, device="cuda", generator=gen, dtype=torch.float64)
    weight_s = torch.randn(*inputs[4].shape, device="cuda", generator=gen, dtype=torch.float64)

    def run(form, tensors):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        o, final = form(leaves)
        ((o.double() * weight_o).sum() + (final.double() * weight_s).sum()).backward()
        return [o.detach(), final.detach()] + [leaf.grad for leaf in leaves]

    ref = run(lambda t: chunked[kind](*t[:4], scale, t[4], True), [t.double() for t in inputs])
    fla = run(lambda t: public(*t[:4], scale=scale, initial_state=t[4], output_final_state=True), inputs)
    names = ["o", "final state", "dq", "dk", "dv", "dgate", "dstate"]
    for name, actual, reference in zip(names, fla, ref, strict=True):
        assert_relatively_close(actual, reference, 2e-2 if name in ("o", "final state") else 5e-2, f"{kind} {name}")


def fla_layer(arch: str, d_model: int):
    """fla's layer with the official FoX code's settings, and fox's config of the same shape."""
    from fla.layers import DeltaNet, HGRN2Attention, Mamba2

    if arch == "mamba2":
        cfg = model_config(arch, None, "125m", d_model=d_model, n_head=2 * d_model // 64, head_dim=64)
        layer = Mamba2(num_heads=cfg.n_head, head_dim=64, hidden_size=d_model, state_size=128, expand=2,
                       n_groups=1, conv_kernel=4, use_conv_bias=True, norm_eps=1e-5, chunk_size=256, layer_idx=0)
    elif arch == "hgrn2":
        cfg = model_config(arch, None, "125m", d_model=d_model, n_head=d_model // 128, head_dim=128)
        layer = HGRN2Attention(mode="chunk", hidden_size=d_model, expand_ratio=128, norm_eps=1e-6, layer_idx=0)
    else:
        cfg = model_config(arch, None, "125m", d_model=d_model, n_head=d_model // 128, head_dim=128)
        layer = DeltaNet(mode="chunk", hidden_size=d_model, num_heads=d_model // 128, use_beta=True,
                         use_short_conv=True, conv_size=4, conv_bias=False, qk_activation="silu", qk_norm="l2",
                         norm_eps=1e-6, layer_idx=0)
    return cfg, layer


@pytest.mark.parametrize("arch", BASELINES)
def test_mixer_is_fla_layer(arch, pytorch_path):
    """fox's mixer holds fla's layer's state dict as is, and both compute the same function: fla's layer, and
    fox's mixer in bf16 (fla's kernels), against fox's mixer in fp64 (the PyTorch path), outputs and the gradients
    of the input and of every parameter (weights and input rounded to bf16 for all)."""
    torch.manual_seed(0)
    cfg, layer = fla_layer(arch, d_model=256)
    layer = layer.cuda().bfloat16()
    mixer = MIXERS[arch](cfg).cuda()
    mixer.load_state_dict(layer.state_dict())            # strict: the same names and shapes
    if arch == "hgrn2":  # fla 0.6's HGRN2 norms its output with rms_norm_linear's default eps, not its norm_eps
        mixer.g_norm.eps = 1e-5
    x = torch.randn(2, 300, 256, device="cuda").bfloat16()

    def run(module, dtype, forward=lambda m, t: m(t)):
        module = module.to(dtype)
        inputs = x.to(dtype).clone().requires_grad_()   # a fresh leaf per run
        out = forward(module, inputs)
        out.double().square().sum().backward()
        grads = {name: p.grad.clone() for name, p in module.named_parameters()}
        module.zero_grad()
        return [out.detach(), inputs.grad] + [grads[name] for name in sorted(grads)]

    with pytorch_path():
        ref = run(mixer, torch.float64)
        torch_at = {dtype: run(mixer, dtype) for dtype in {torch.bfloat16, FLA_LAYER_DTYPE[arch]}}
    candidates = {"fla": (run(layer, FLA_LAYER_DTYPE[arch], lambda m, t: m(t)[0]), FLA_LAYER_DTYPE[arch]),
                  "fox": (run(mixer, torch.bfloat16), torch.bfloat16)}
    names = ["output", "d input"] + [f"d {name}" for name in sorted(dict(mixer.named_parameters()))]
    for candidate, (result, dtype) in candidates.items():
        for name, actual, reference, same in zip(names, result, ref, torch_at[dtype], strict=True):
            assert_relatively_close(actual, reference, 3e-2, f"{arch} {candidate} {name}", same)


@pytest.mark.parametrize("arch", BASELINES)
def test_decoding_on_gpu_matches_forward(arch, pytorch_path):
    """bf16 on CUDA: a prefill through fla's kernels, then single tokens through the PyTorch steps, and the full
    forward (fla), against the fp64 PyTorch path."""
    torch.manual_seed(0)
    model = LanguageModel(model_config(arch, None, "small", vocab_size=300)).cuda().eval()
    reference = LanguageModel(model.cfg).cuda().double().eval()
    model.bfloat16()
    reference.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    ids = torch.randint(0, 300, (2, 400), device="cuda")
    with torch.no_grad():
        exact, full = reference(ids), model(ids)
        cache = model.new_cache(2)
        decoded = torch.cat([model.decode(ids[:, :380], cache)]
                            + [model.decode(ids[:, t:t + 1], cache) for t in range(380, 400)], dim=1)
        with pytorch_path():
            same = model(ids)
    assert_relatively_close(full, exact, 3e-2, f"{arch} forward", same)
    assert_relatively_close(decoded, exact, 3e-2, f"{arch} decode", same)


@pytest.mark.parametrize("arch", BASELINES)
def test_compiled_baseline_matches_eager(arch):
    """torch.compile around fla's kernels (graph breaks at fla's compiler-disabled entries): eager's loss, and
    gradients as close to an fp32 model's as eager bf16's are (twice its error, or 5% of the largest element).
    Two bf16 evaluation orders differ by more than 5% in gradients summed over many tokens: Mamba-2's dt_bias,
    and DeltaNet's output-norm gains and short-convolution weights (6.9% on CPU, compiled against eager)."""
    import torch._dynamo

    torch.manual_seed(0)
    with torch.device("cuda"):
        eager = LanguageModel(model_config(arch, None, "small", vocab_size=300)).bfloat16()
        compiled = LanguageModel(eager.cfg).bfloat16()
    compiled.load_state_dict(eager.state_dict())
    compile_model(compiled)
    torch._dynamo.reset()
    ids = torch.randint(0, 300, (2, 1025), device="cuda")
    results = []
    for model in (eager, compiled):
        loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-2, atol=0)
    with torch.device("cuda"):
        fp32 = LanguageModel(eager.cfg)
    fp32.load_state_dict(eager.state_dict())
    fp32(ids[:, :-1], ids[:, 1:]).backward()
    for name, grad in results[0][1].items():
        assert_relatively_close(results[1][1][name], fp32.get_parameter(name).grad.double(), 5e-2,
                                f"{arch} compiled d {name}", same_precision=grad)


@pytest.mark.parametrize("arch", BASELINES)
def test_baseline_trains_through_fox_train_on_gpu(arch, tmp_path, byte_corpus):
    """`fox train` on the GPU: bf16, compiled blocks, fla's kernels; the loss falls and tokens/s is logged."""
    config = tiny_experiment(tmp_path / "results", tokens=512 * 8 * 12, tokens_per_step=512 * 8,
                             micro_batch_size=4, checkpoint_every_tokens=512 * 8 * 12, keep_checkpoints=1,
                             precision="bf16", lr=1e-2)
    config["grid"] = [{"model": [arch], "size": ["small"], "context": [512]}]
    run, _, stdout = train_first_run(tmp_path, config, byte_corpus, few_fla_configs=True)
    assert "compile on" in stdout
    log = [json.loads(line) for line in (Path(run["run_dir"]) / "train_log.jsonl").open()]
    assert len(log) == 12 and log[-1]["loss"] < log[0]["loss"] - 1.0
    assert all(entry["tokens_per_s"] > 0 for entry in log) and log[-1]["mfu"] is not None
