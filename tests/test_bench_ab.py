"""bench/ab.py's version handling (the timing itself needs a GPU). Each check runs in a process of its own:
loading a second copy of fox_kernels registers its torch.library operators over this process's."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
AB = REPO / "bench" / "ab.py"
LOAD_AB = f"""
import importlib, importlib.util, sys, torch
sys.path.insert(0, {str(REPO / "bench")!r})
spec = importlib.util.spec_from_file_location("bench_ab", {str(AB)!r})
ab = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ab)
repo = ab.Path({str(REPO)!r})
"""
"""A subprocess's preamble: bench/ab.py as module `ab`, and this checkout's folder as `repo`."""


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LOAD_AB + code], capture_output=True, text=True, timeout=300)


def test_set_changes_one_versions_launch_setting():
    """`--against unfused=. --set unfused.GLUON_FUSED_BWD={}`: the same checkout loaded twice as packages of their
    own, one launch setting changed in one of them only, and the record's per-version settings (JSON) say so."""
    done = run_python("""
import json
versions = {name: ab.load_version(name, repo) for name in ("this_copy", "unfused")}
ab.apply_setting("unfused.GLUON_FUSED_BWD={}", versions)
unfused = importlib.import_module("fox_kernels_unfused.launch").GLUON_FUSED_BWD
this = importlib.import_module("fox_kernels_this_copy.launch").GLUON_FUSED_BWD
settings = json.loads(json.dumps(ab.version_settings(versions)))
print(unfused, bool(this), settings["unfused"]["GLUON_FUSED_BWD"], bool(settings["this_copy"]["GLUON_FUSED_BWD"]),
      "GLUON_FWD_PERSISTENT" in settings["this_copy"])
""")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[-2] == "{} True {} True True"


def test_each_version_runs_its_own_operators():
    """Two copies of fox_kernels in one process (bench/ab.py's versions) register operators of their own, and
    each copy's operator reaches that copy's launch module. Before the operators took the package's name, the
    copy loaded last replaced the other's, and an A/B timed one version against itself."""
    done = run_python("""
versions = {name: ab.load_version(name, repo) for name in ("first", "second")}
ab.check_own_operators(versions)
for name in versions:
    launch = importlib.import_module(f"fox_kernels_{name}.launch")
    def reached(*args, name=name, **kwargs):
        raise RuntimeError("reached " + name)
    launch.gate_cumsum = reached
x = torch.zeros(1, 4, 1, 8, dtype=torch.bfloat16)
for name in versions:
    try:
        getattr(torch.ops, f"fox_kernels_{name}").attention_forward(x, x, x, torch.zeros(1, 4, 1), 1.0, None, None, 0)
    except RuntimeError as error:
        print(name, str(error).splitlines()[0])
""")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[-3:-1] == ["first reached first", "second reached second"], done.stdout


@pytest.mark.parametrize("spec, message", [("nobody.GLUON_FUSED_BWD={}", "NAME one of"),
                                           ("fused.NO_SUCH_SETTING=1", "an attribute of its launch"),
                                           ("fused.GLUON_FUSED_BWD=not python", "not a Python literal")])
def test_set_names_what_is_wrong(spec, message):
    """A bad --set stops bench/ab.py before anything is timed, naming what is wrong."""
    done = subprocess.run([sys.executable, str(AB), "--against", f"fused={REPO}", "--set", spec],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and message in done.stderr, done.stderr


def test_check_reports_each_versions_differences_from_the_first():
    """--check's output_differences: a faithful copy of this checkout differs from it by nothing, in the output and
    every gradient, dense and with ACP; a version whose output is off by half shows it in o and in the
    gradients (CPU inputs: the reference path)."""
    done = run_python("""
versions = {name: ab.load_version(name, repo) for name in ("base", "copy", "off")}
scaled = versions["off"].forgetting_attention
versions["off"].forgetting_attention = lambda *args, **kwargs: 1.5 * scaled(*args, **kwargs)
gen = torch.Generator().manual_seed(0)
q, k, v, do = (torch.randn(1, 32, 2, 16, generator=gen) for _ in range(4))
q, k, v = (x.requires_grad_() for x in (q, k, v))
log_f = (-torch.rand(1, 32, 2, generator=gen)).requires_grad_()
differences = ab.output_differences(versions, q, k, v, log_f, do, torch.full((1, 2), -1.0))
print(sorted(differences))
print(max(max(parts.values()) for (name, _), parts in differences.items() if name == "copy"))
print(min(differences[("off", impl)][part] for impl in ("dense", "acp") for part in ab.PARTS) > 0)
""")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[-4:-1] == ["[('copy', 'acp'), ('copy', 'dense'), ('off', 'acp'), ('off', 'dense')]",
                                              "0.0", "True"], done.stdout
