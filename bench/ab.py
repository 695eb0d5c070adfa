"""A/B of kernel versions: this checkout's fox_kernels against others, side by side on the same inputs.

    git archive <rev> kernels | tar -x -C /tmp/ab/<name>          # a version to compare against
    python bench/ab.py --against name=/tmp/ab/name [...] [--shapes ...] [--gates sharp none] [--check] [--out FILE]
    python bench/ab.py --against unfused=. --set unfused.GLUON_FUSED_BWD="{}"   # this checkout, one launch
                                                                                # setting changed, against itself

Each version's dense, ACP and ACP-with-threshold--inf fwd+bwd are timed round-robin with every other
version's (bench/attention.py's time_interleaved), so clock drift between them does not read as a change.
Gate "none" is mild gates with the threshold at -inf (nothing pruned). Prints, per shape and gate, each
version's time and its ratio to this checkout's, and writes JSON (bench/results/ab_<date>.json by default).
--check first compares each version's output and gradients with this checkout's on the inputs it is timed on
(the largest differences go into each row as max_abs_diff).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import json
import math
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import SHAPES, acp_threshold, environment, make_inputs, shape_arg, time_interleaved  # noqa: E402
from provenance import launch_settings, record_path, write_record  # noqa: E402


def load_version(name: str, folder: Path):
    """fox_kernels from folder/kernels/fox_kernels (or folder/fox_kernels) as a package of its own name."""
    package = next((p for p in (folder / "kernels" / "fox_kernels", folder / "fox_kernels") if p.is_dir()), None)
    if package is None:
        raise FileNotFoundError(f"--against {name}={folder}: no kernels/fox_kernels or fox_kernels in it")
    module_name = f"fox_kernels_{name}"
    spec = importlib.util.spec_from_file_location(module_name, package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def check_own_operators(versions: dict) -> None:
    """Each version's forgetting_attention must reach its own kernels. PyTorch operators are global by name, and
    a version whose operators are named like another's replaces them: the later one then runs for both (as
    fox_kernels did before its operators took the package's name, 2026-12-02)."""
    owners = {}
    for name, module in versions.items():
        api = importlib.import_module(f"{module.__name__}.api")
        operator = api.attention_forward_op._qualname
        if operator in owners:
            raise SystemExit(f"versions {owners[operator]!r} and {name!r} both register {operator}: the one loaded "
                             f"last would run for both. Compare at most one version from before fox_kernels named "
                             f"its operators after the package, or put such versions in separate runs")
        owners[operator] = name


def apply_setting(spec: str, versions: dict) -> None:
    """--set NAME.ATTR=LITERAL: version NAME's launch.ATTR, an existing attribute, becomes the Python literal."""
    target, _, text = spec.partition("=")
    name, _, attr = target.partition(".")
    launch = importlib.import_module(f"{versions[name].__name__}.launch") if name in versions else None
    if launch is None or not hasattr(launch, attr) or not text:
        raise SystemExit(f"--set {spec!r}: want NAME.ATTR=LITERAL with NAME one of {', '.join(versions)} and ATTR "
                         f"an attribute of its launch module")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError) as error:
        raise SystemExit(f"--set {spec!r}: {text!r} is not a Python literal ({error})") from error
    setattr(launch, attr, value)


def version_settings(versions: dict) -> dict:
    """Each version's Gluon launch settings after --set (provenance.launch_settings): a patched version's defaults
    are in the record, not only in its name."""
    return {name: launch_settings(importlib.import_module(f"{module.__name__}.launch"))
            for name, module in versions.items()}


PARTS = ("o", "dq", "dk", "dv", "dlog_fgate")


def output_differences(versions: dict, q, k, v, log_f, do, threshold) -> dict:
    """{(version, impl): {part: largest |difference|}} of each version's output and gradients (PARTS) from the
    first version's, dense and with ACP at `threshold`, on these inputs: a patched kernel that computes something
    else is caught before its time is read."""
    leaves = (q, k, v, log_f)

    def output_and_gradients(module, kwargs):
        for x in leaves:
            x.grad = None
        out = module.forgetting_attention(q, k, v, log_f, **kwargs)
        out.backward(do)
        return [out.detach().float()] + [x.grad.float() for x in leaves]

    base, *others = versions
    differences = {}
    for impl, kwargs in (("dense", {}), ("acp", {"acp_threshold": threshold})):
        reference = output_and_gradients(versions[base], kwargs)      # only the first version's results are kept
        for name in others:
            tensors = output_and_gradients(versions[name], kwargs)
            differences[(name, impl)] = {part: (ours - theirs).abs().max().item()
                                         for part, ours, theirs in zip(PARTS, tensors, reference, strict=True)}
    return differences


def compare_shape(shape: str, gates: list[str], versions: dict, check: bool = False) -> list[dict]:
    batch, time, heads, dim = (int(x) for x in shape.split("x"))
    rows = []
    for gate in gates:
        q, k, v, log_f, do = make_inputs(batch, time, heads, dim, "mild" if gate == "none" else gate, seed=1)
        leaves = [q, k, v, log_f]
        threshold = acp_threshold(batch, time, heads, dim)
        if gate == "none":
            threshold.fill_(-math.inf)
        differences = output_differences(versions, q, k, v, log_f, do, threshold) if check else {}
        for (name, impl), parts in differences.items():
            print(f"  {shape:>15} {gate:>5} {name:<14} {impl:<5} max |difference| from {next(iter(versions))}: "
                  + ", ".join(f"{part} {value:.3g}" for part, value in parts.items()), flush=True)
        candidates = {}
        for name, module in versions.items():
            attend = module.forgetting_attention
            candidates[(name, "dense")] = (partial(attend, q, k, v, log_f), leaves)
            candidates[(name, "acp")] = (partial(attend, q, k, v, log_f, acp_threshold=threshold), leaves)
        times = time_interleaved(candidates, do)
        base = next(iter(versions))
        for (name, impl), (fwd_ms, both_ms) in times.items():
            row = {"shape": shape, "gate": gate, "version": name, "impl": impl, "fwd_ms": fwd_ms,
                   "fwd_bwd_ms": both_ms, "over_base": both_ms / times[(base, impl)][1],
                   "over_own_dense": both_ms / times[(name, "dense")][1]}
            if (name, impl) in differences:
                row["max_abs_diff"] = differences[(name, impl)]
            rows.append(row)
            print(f"  {shape:>15} {gate:>5} {name:<14} {impl:<5} fwd {fwd_ms:7.3f} ms  fwd+bwd {both_ms:8.3f} ms"
                  f"  x {base} {row['over_base']:.3f}  x own dense {row['over_own_dense']:.3f}", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", nargs="+", required=True, metavar="NAME=DIR")
    parser.add_argument("--shapes", nargs="+", default=SHAPES, type=shape_arg)
    parser.add_argument("--gates", nargs="+", default=["sharp", "none"], choices=["sharp", "mild", "none"])
    parser.add_argument("--set", nargs="+", default=[], metavar="NAME.ATTR=LITERAL",
                        help="change a launch setting of one version (e.g. unfused.GLUON_FUSED_BWD={})")
    parser.add_argument("--check", action="store_true",
                        help="first compare each version's output and gradients with this checkout's")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    versions = {"this": load_version("this", Path(__file__).resolve().parents[1])}
    for spec in args.against:
        name, _, folder = spec.partition("=")
        if not name.isidentifier() or not folder or name in versions:
            raise SystemExit(f"--against {spec!r}: want NAME=DIR with a new identifier NAME")
        versions[name] = load_version(name, Path(folder))
    check_own_operators(versions)
    for spec in args.set:
        apply_setting(spec, versions)
    env = environment()
    print(json.dumps(env), flush=True)
    out = record_path("ab", args.out, env["date"])
    rows = []
    for shape in args.shapes:
        rows += compare_shape(shape, args.gates, versions, args.check)
        torch.cuda.empty_cache()
        write_record(out, {"env": env, "versions": list(versions), "against": args.against, "settings": args.set,
                           "version_settings": version_settings(versions), "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
