"""bench/stalls.py's readers of Nsight Compute's CSV exports (the profiling itself needs a GPU and ncu)."""

import importlib.util
from pathlib import Path

import pytest

STALLS = Path(__file__).resolve().parents[1] / "bench" / "stalls.py"


@pytest.fixture(scope="module")
def stalls():
    spec = importlib.util.spec_from_file_location("bench_stalls", STALLS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parse_raw_reads_each_kernel_in_milliseconds_with_stalls_largest_first(stalls):
    stall = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"
    header = ["ID", "Kernel Name", "gpu__time_duration.sum", stalls.ISSUE, stalls.PIPES["tensor"],
              stalls.PIPES["xu"], stall.format("wait"), stall.format("long_scoreboard"), "other_metric"]
    units = ["", "", "usecond", "inst/cycle", "%", "%", "inst", "inst", ""]
    raw = "\n".join(",".join(f'"{cell}"' for cell in row) for row in [
        header, units,
        ["0", "_attn_fwd_hopper", "2,387.52", "2.15", "40.7", "40.8", "1.39", "0.78", "x"],
        ["1", "_attn_bwd_dkdv_hopper", "3,745.31", "1.58", "45.6", "23.0", "1.31", "1.12", "y"]])
    kernels = stalls.parse_raw(raw)
    assert list(kernels) == ["_attn_fwd_hopper", "_attn_bwd_dkdv_hopper"]
    fwd, dkdv = kernels.values()
    assert fwd["duration_ms"] == pytest.approx(2.38752)
    assert fwd["issued_ipc"] == 2.15
    assert fwd["pipes_pct"] == {"tensor": 40.7, "xu": 40.8}
    assert list(fwd["stalls"]) == ["wait", "long_scoreboard"]
    assert list(dkdv["stalls"]) == ["wait", "long_scoreboard"] and dkdv["stalls"]["long_scoreboard"] == 1.12
    assert dkdv["duration_ms"] == pytest.approx(3.74531)


def test_parse_source_ranks_lines_and_names_what_the_view_leaves_out(stalls):
    columns = ["Address", "Source", "Warp Stall Sampling (All Samples)", "stall_long_sb", "stall_mio",
               "stall_wait", "stall_long_sb (Not Issued)"]
    rows = [["0x10", "FFMA R21, R22, -1.44, R5", "450", "423", "0", "27", "400"],
            ["0x20", "HGMMA.64x64x16.F32.BF16 R56", "500", "0", "90", "0", "0"],
            ["0x30", "MUFU.EX2 R27, R27", "50", "0", "25", "25", "0"]]
    text = '"Kernel Name","_attn_fwd_hopper",\n' + "\n".join(
        ",".join(f'"{cell}"' for cell in row) for row in [columns, *rows])
    hot = stalls.parse_source(text, top=2)
    assert [line["sass"] for line in hot] == ["HGMMA.64x64x16.F32.BF16 R56", "FFMA R21, R22, -1.44, R5"]
    assert hot[0]["share"] == 0.5 and hot[1]["share"] == 0.45
    # the wgmma line's samples are mostly of a reason the source view has no column for
    assert hot[0]["reasons"] == {"other": 0.82, "mio": 0.18}
    assert hot[1]["reasons"] == {"long_sb": 0.94}


def test_summarise_names_what_does_not_fit(stalls):
    raw = "\n".join(['"Kernel Name","gpu__time_duration.sum"', '"","ms"', '"_attn_fwd_hopper","2.0"'])
    with pytest.raises(ValueError, match=r"source pages for \['bogus'\].*\['_attn_fwd_hopper'\]"):
        stalls.summarise(raw, {"bogus": ""})
    with pytest.raises(ValueError, match="not an ncu source page"):
        stalls.summarise(raw, {"_attn_fwd_hopper": raw})
    with pytest.raises(ValueError, match="'furlongs'"):
        stalls.parse_raw(raw.replace('"ms"', '"furlongs"'))
