"""bench/ab.py's version handling (the timing itself needs a GPU)."""

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ab():
    sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location("bench_ab", REPO / "bench" / "ab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path.remove(str(REPO / "bench"))


def test_set_changes_one_versions_launch_setting(ab):
    """`--against fused=. --set fused.GLUON_FUSED_DQ={64}`: the same checkout loaded twice as packages of their
    own, one launch setting changed in one of them only."""
    versions = {name: ab.load_version(name, REPO) for name in ("this_copy", "fused")}
    ab.apply_setting("fused.GLUON_FUSED_DQ={64}", versions)
    fused = importlib.import_module("fox_kernels_fused.launch")
    this = importlib.import_module("fox_kernels_this_copy.launch")
    assert isinstance(fused.GLUON_FUSED_DQ, frozenset) and set(fused.GLUON_FUSED_DQ) == {64}
    assert not this.GLUON_FUSED_DQ


@pytest.mark.parametrize("spec, message", [("nobody.GLUON_FUSED_DQ={64}", "NAME one of"),
                                           ("fused.NO_SUCH_SETTING=1", "an attribute of its launch"),
                                           ("fused.GLUON_FUSED_DQ=not python", "not a Python literal")])
def test_set_names_what_is_wrong(ab, spec, message):
    versions = {"fused": ab.load_version("fused", REPO)}
    with pytest.raises(SystemExit, match=message):
        ab.apply_setting(spec, versions)
