"""bench/attention.py's record bookkeeping (the timing itself needs a GPU): SDPA in fox's alternation, repeats over
fresh copies of the inputs, and each ratio the median of the repeats' ratios, not the ratio of the medians.
bench/attention.py is imported by the fixture, not at collection: imported first, fox_kernels' launch module would
be the compiled one when tests/test_kernels.py imports its interpreted copy."""

import importlib
import statistics
from pathlib import Path

import pytest
import torch

BENCH = str(Path(__file__).resolve().parents[1] / "bench")

PRUNED = 0.5
TIMES = [  # per repeat: name -> (fwd ms, fwd+bwd ms); the medians of these ratios differ from the medians' ratios
    {"fox_dense": (2.0, 10.0), "fox_acp": (1.0, 5.6), "fox_acp_nothing_pruned": (2.0, 9.9),
     "sdpa_fa2": (3.0, 12.0), "sdpa_cudnn": (1.8, 8.0)},
    {"fox_dense": (2.2, 11.0), "fox_acp": (1.1, 5.7), "fox_acp_nothing_pruned": (2.1, 11.2),
     "sdpa_fa2": (3.1, 12.5), "sdpa_cudnn": (1.9, 8.5)},
    {"fox_dense": (2.1, 10.4), "fox_acp": (1.2, 5.5), "fox_acp_nothing_pruned": (2.3, 10.3),
     "sdpa_fa2": (3.2, 12.2), "sdpa_cudnn": (2.0, 8.1)},
]


def _inputs(batch, time, heads, dim, gate=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(batch, time, heads, dim, generator=gen) for _ in range(4))
    log_f = torch.full((batch, time, heads), -0.01)
    return [x.requires_grad_() for x in (q, k, v, log_f)] + [do]


@pytest.fixture
def record(monkeypatch):
    """bench_shape's rows with TIMES for its alternations, and what each alternation was given."""
    monkeypatch.syspath_prepend(BENCH)
    attention = importlib.import_module("attention")
    given = []
    originals = {}

    def acp_case(batch, time, heads, dim, gate):
        inputs = _inputs(batch, time, heads, dim, seed=1)
        originals["q"] = inputs[0]
        return (*inputs, torch.zeros(batch, heads), PRUNED)

    def time_interleaved(candidates, do, seconds=6.0, seed=0):
        given.append((seed, sorted(candidates), candidates["fox_dense"][1][0]))
        return {name: TIMES[seed][name] for name in candidates}

    monkeypatch.setattr(attention, "make_inputs", _inputs)
    monkeypatch.setattr(attention, "acp_case", acp_case)
    monkeypatch.setattr(attention, "time_interleaved", time_interleaved)
    monkeypatch.setattr(attention, "SDPA_BACKENDS", {"sdpa_fa2": None, "sdpa_cudnn": None})  # CPU: math backend
    rows = attention.bench_shape("1x64x2x16", ["sharp"], with_others=False, repeats=len(TIMES))
    return {row["impl"]: row for row in rows}, given, originals["q"]


def test_sdpa_alternates_with_fox_in_each_repeat_over_fresh_inputs(record):
    rows, given, original_q = record
    assert [seed for seed, _, _ in given] == [0, 1, 2]
    assert all(names == ["fox_acp", "fox_acp_nothing_pruned", "fox_dense", "sdpa_cudnn", "sdpa_fa2"]
               for _, names, _ in given)
    queries = [q for _, _, q in given]
    assert all(torch.equal(q, original_q) and q.data_ptr() != original_q.data_ptr() for q in queries)
    assert len({q.data_ptr() for q in queries}) == len(queries)                 # a copy of its own per repeat
    assert set(rows) == {"sdpa_fa2", "sdpa_cudnn", "fox_dense", "fox_acp", "fox_acp_nothing_pruned"}


def test_times_are_medians_and_ratios_medians_of_each_repeats_ratio(record):
    rows, _, _ = record
    for name, row in rows.items():
        assert row["repeats"] == [list(times[name]) for times in TIMES]
        assert row["fwd_bwd_ms"] == statistics.median(times[name][1] for times in TIMES)
    ideal = [t["fox_acp"][1] / (t["fox_dense"][1] * (1 - PRUNED)) for t in TIMES]
    assert rows["fox_acp"]["acp_time_over_ideal"] == pytest.approx(statistics.median(ideal))
    assert rows["fox_acp"]["acp_time_over_ideal_range"] == pytest.approx([min(ideal), max(ideal)])
    ratio_of_medians = rows["fox_acp"]["fwd_bwd_ms"] / (rows["fox_dense"]["fwd_bwd_ms"] * (1 - PRUNED))
    assert rows["fox_acp"]["acp_time_over_ideal"] != pytest.approx(ratio_of_medians)
    over_dense = [t["fox_acp_nothing_pruned"][1] / t["fox_dense"][1] for t in TIMES]
    assert rows["fox_acp_nothing_pruned"]["acp_time_over_ideal"] == pytest.approx(statistics.median(over_dense))
    speed = [t["sdpa_cudnn"][1] / t["fox_dense"][1] for t in TIMES]
    assert rows["fox_dense"]["fwd_bwd_speed_x_sdpa_cudnn"] == pytest.approx(statistics.median(speed))
    assert rows["fox_dense"]["fwd_speed_x_sdpa_cudnn"] == pytest.approx(
        statistics.median(t["sdpa_cudnn"][0] / t["fox_dense"][0] for t in TIMES))
