"""One optimizer step under torch.profiler (`train.profile_step`): where a step's time goes, by kernel family.

Writes, in the run folder's profile/, step{N}.json (time per kernel family and the longest kernels) and
step{N}.trace.json.gz (the Chrome trace: ui.perfetto.dev opens it), with a .rank{R} suffix on multi-GPU runs.
On CUDA the times are the kernels' device times; on CPU, the operators' own CPU times.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fox.files import atomic_path, write_atomic

KERNEL_FAMILIES = (
    ("fox attention", ("_attn_fwd", "_attn_bwd", "_gate_cumsum", "_acp_map", "_heavy_first", "_hopper",
                       "fox_kernels::")),
    ("inductor fused", ("triton_",)),
    ("SDPA attention", ("flash", "fmha", "cudnn", "attention")),
    ("GEMM", ("gemm", "cutlass", "nvjet", "xmma", "sm90_", "sm80_", "ampere_", "cublas", "aten::mm", "aten::addmm",
              "aten::bmm")),
    ("optimizer", ("multi_tensor", "fused_adam", "_fused_adamw", "foreach", "optimizer.step")),
)
"""Kernel-name fragments per family, matched in this order; other kernels go to "the rest". Inductor's kernels
come before SDPA's: they are named after the ops they fuse, and a FoX block's fused ones say `attention_backward`."""
TOP_KERNELS = 20


def kernel_family(name: str) -> str:
    lowered = name.lower()
    for family, fragments in KERNEL_FAMILIES:
        if any(fragment.lower() in lowered for fragment in fragments):
            return family
    return "the rest"


def summarize(prof: torch.profiler.profile, on_cuda: bool) -> dict:
    """Milliseconds per kernel family and the TOP_KERNELS longest kernels (name, ms, calls), longest first. On
    CUDA only the device's own kernels count: an operator's self device time repeats its kernels' times, and a
    user annotation's span on the GPU timeline (`Optimizer.step#AdamW.step`) covers kernels counted already."""
    if on_cuda:
        events = [(e.key, e.device_time_total / 1e3, e.count) for e in prof.key_averages()
                  if e.device_type != torch.autograd.DeviceType.CPU and not e.is_user_annotation]
    else:
        events = [(e.key, e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()]
    kernels = sorted(events, key=lambda kernel: -kernel[1])
    kernels = [kernel for kernel in kernels if kernel[1] > 0 and not kernel[0].startswith("ProfilerStep")]
    families: dict[str, float] = {}
    for name, ms, _ in kernels:
        family = kernel_family(name)
        families[family] = families.get(family, 0.0) + ms
    return {"time": "device" if on_cuda else "cpu",
            "families_ms": dict(sorted(families.items(), key=lambda item: -item[1])),
            "total_ms": sum(families.values()),
            "top_kernels": [{"name": n, "ms": ms, "calls": c} for n, ms, c in kernels[:TOP_KERNELS]]}


def format_summary(summary: dict) -> str:
    total = summary["total_ms"] or 1.0
    lines = [f"  {family:<16} {ms:9.1f} ms  {ms / total:6.1%}" for family, ms in summary["families_ms"].items()]
    lines += [f"      {k['ms']:8.1f} ms  x{k['calls']:<5} {k['name'][:100]}" for k in summary["top_kernels"]]
    return "\n".join(lines)


class StepProfile:
    """Context manager around one optimizer step: profiles it, then writes and prints the summary."""

    def __init__(self, out_dir: Path, step: int, device: torch.device, rank: int = 0, world_size: int = 1):
        self.on_cuda = device.type == "cuda"
        suffix = f".rank{rank}" if world_size > 1 else ""
        self.summary_path = Path(out_dir) / f"step{step}{suffix}.json"
        self.trace_path = Path(out_dir) / f"step{step}{suffix}.trace.json.gz"
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.on_cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(activities=activities)
        self.summary: dict | None = None

    def __enter__(self) -> StepProfile:
        if self.on_cuda:
            torch.cuda.synchronize()
        self.profiler.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.on_cuda:
            torch.cuda.synchronize()
        self.profiler.__exit__(*exc)
        if exc[0] is not None:
            return
        self.summary = summarize(self.profiler, self.on_cuda)
        self.summary_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.summary_path, json.dumps(self.summary, indent=1) + "\n")
        with atomic_path(self.trace_path) as partial:        # keeps the .gz suffix: torch compresses by it
            self.profiler.export_chrome_trace(str(partial))
        print(f"[fox] profile of one step ({self.summary['time']} time), in {self.summary_path.parent}:\n"
              + format_summary(self.summary), flush=True)
