"""Unit tests of the benchmark helpers (crossent._bench, re-exported by benchmarks/harness.py)."""
import importlib.util
import json
import math
from pathlib import Path

import pytest

from crossent import _bench as B
from crossent import _bench_worker as W

ROOT = Path(__file__).resolve().parents[1]


def test_quantile_matches_linear_interpolation():
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]  # unsorted on purpose
    assert W.median(xs) == 3.0
    assert W.quantile(xs, 0.0) == 1.0 and W.quantile(xs, 1.0) == 5.0
    assert W.quantile(xs, 0.1) == pytest.approx(1.4)  # pos 0.4 between 1 and 2
    assert W.quantile(xs, 0.9) == pytest.approx(4.6)
    assert W.median([1.0, 2.0, 3.0, 10.0]) == 2.5
    assert W.median([7.0]) == 7.0
    with pytest.raises(ValueError):
        W.quantile([], 0.5)


def test_summarize_reports_milliseconds():
    s = W.summarize([0.001, 0.002, 0.003])
    assert s == pytest.approx({"median_ms": 2.0, "p10_ms": 1.2, "p90_ms": 2.8})


def test_gbps():
    assert W.gbps(2e9, 0.5) == pytest.approx(4.0)
    assert math.isnan(W.gbps(1.0, 0.0))


@pytest.mark.parametrize("name,op,shape", [
    ("ce-4096x32000", "cross_entropy", (4096, 32000)),
    ("ce-8x21x256x256", "cross_entropy", (8, 21, 256, 256)),
    ("nll-16x10", "nll_loss", (16, 10)),
    ("log_softmax-4x5", "log_softmax", (4, 5)),
])
def test_parse_case(name, op, shape):
    assert W.parse_case(name) == {"case": name, "op": op, "shape": shape}


@pytest.mark.parametrize("bad", ["ce", "ce-", "foo-4x5", "ce-4", "ce-4xa", "ce-0x5"])
def test_parse_case_rejects(bad):
    with pytest.raises(ValueError):
        W.parse_case(bad)


def test_select_cases():
    assert B.select_cases(None, quick=True) == B.QUICK_CASES
    assert B.select_cases(None, quick=False) == B.FULL_CASES
    assert B.select_cases("ce-*", quick=False) == [c for c in B.FULL_CASES + B.QUICK_CASES if c.startswith("ce-")]
    assert B.select_cases("ce-64x1000, softmax-8x8,ce-64x1000", quick=True) == ["ce-64x1000", "softmax-8x8"]
    with pytest.raises(ValueError):
        B.select_cases("zzz-*", quick=False)


def test_add_ratios():
    rows = [{"case": "a", "provider": "crossent", "median_ms": 1.0},
            {"case": "a", "provider": "torch", "median_ms": 4.0},
            {"case": "a", "provider": "compile", "median_ms": 2.0},
            {"case": "b", "provider": "crossent", "median_ms": 3.0},
            {"case": "b", "provider": "torch", "error": "boom"}]
    B.add_ratios(rows)
    assert rows[0]["ratio_vs_torch"] == 0.25 and rows[0]["ratio_vs_compile"] == 0.5
    assert rows[1]["ratio_vs_torch"] == 1.0
    assert rows[3]["ratio_vs_torch"] is None and rows[3]["ratio_vs_compile"] is None


def _row(provider, case, med):
    return {"provider": provider, "case": case, "median_ms": med, "p10_ms": med * 0.9, "p90_ms": med * 1.1,
            "extra_peak_mib": 12.5, "peak_over_logits": 1.0, "gbps": 3.25, "pct_of_copy": 40.0,
            "ratio_vs_torch": 0.5, "ratio_vs_compile": None}


def test_format_table_is_aligned():
    rows = [_row("crossent", "ce-4096x32000", 123.456), _row("torch", "ce-4096x32000", 1.5),
            {"provider": "compile", "case": "ce-4096x32000", "error": "RuntimeError: no compiler"}]
    lines = B.format_table(rows).splitlines()
    assert len(lines) == 4
    assert lines[0].split()[:3] == ["provider", "case", "median"]
    assert len({len(line) for line in lines[:3]}) == 1  # header and data rows line up
    assert "0.50" in lines[1] and "123.46" in lines[1] and "111.11-135.80" in lines[1]  # 2 decimals throughout
    assert "error: RuntimeError: no compiler" in lines[3]


def test_write_json_roundtrip(tmp_path):
    rows = [_row("crossent", "ce-1x2", 1.0)]
    path = tmp_path / "sub" / "rows.json"
    B.write_json(path, rows)
    assert json.loads(path.read_text()) == rows


def test_env_stamp_keys():
    stamp = B.env_stamp()
    for key in ("date", "hostname", "cpu", "cores", "torch", "crossent", "python", "git_commit", "backend"):
        assert key in stamp
    assert stamp["date"].endswith("+00:00")


@pytest.mark.parametrize("provider", ["crossent", "torch"])
@pytest.mark.parametrize("case", ["ce-16x100", "ce-2x5x3x4", "nll-8x10", "softmax-8x10", "log_softmax-8x10"])
def test_measure_worker_in_process(provider, case):
    # the worker normally runs in a subprocess; in-process is enough to check what it reports
    res = W._measure_worker({"case": case, "provider": provider, "iters": 3})
    assert res["iters"] == 3 and 0 < res["p10_ms"] <= res["median_ms"] <= res["p90_ms"]
    c = W.parse_case(case)
    numel = math.prod(c["shape"])
    assert res["bytes_moved"] == W.BYTES_FACTOR[c["op"]] * numel * 4
    assert res["gbps"] == pytest.approx(res["bytes_moved"] / res["median_ms"] / 1e6)
    assert res["extra_peak_mib"] >= 0 and res["rss_method"] in ("hwm", "ru_maxrss")


def test_harness_reexports_the_one_implementation():
    spec = importlib.util.spec_from_file_location("bench_harness", ROOT / "benchmarks" / "harness.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for name in mod.__all__:
        assert getattr(mod, name) is getattr(B if hasattr(B, name) else W, name)


def test_ratios_pair_rows_of_the_same_round_and_median_rows():
    from crossent import _bench as B
    rows = [{"case": "ce-2x3", "provider": "crossent", "repeat": 0, "median_ms": 1.0},
            {"case": "ce-2x3", "provider": "torch", "repeat": 0, "median_ms": 4.0},
            {"case": "ce-2x3", "provider": "crossent", "repeat": 1, "median_ms": 3.0},
            {"case": "ce-2x3", "provider": "torch", "repeat": 1, "median_ms": 4.0}]
    B.add_ratios(rows)
    assert [r["ratio_vs_torch"] for r in rows] == [0.25, 1.0, 0.75, 1.0]
    med = {r["provider"]: r for r in B.median_rows(rows)}
    assert med["crossent"]["median_ms"] == 2.0 and med["crossent"]["ratio_vs_torch"] == 0.5


def test_small_set_rows_and_table():
    """The interleaved small-size worker (in-process, one tiny case) and its table."""
    from crossent import _bench_small as S
    rows = S.measure(ops=("cross_entropy", "NLLLoss"), sizes=[(4, 3)], rounds=3, batch_s=0.001)
    assert {(r["op"], r["mode"], r["provider"]) for r in rows} == {
        (op, m, p) for op in ("cross_entropy", "NLLLoss") for m in S.MODES for p in ("crossent", "torch")}
    for r in rows:
        assert r["median_us"] > 0 and r["rounds"] == 3
        if r["provider"] == "crossent":
            assert r["ratio_min"] <= r["ratio_q1"] <= r["ratio_vs_torch"] <= r["ratio_q3"] <= r["ratio_max"]
            torch_us = next(o["median_us"] for o in rows if o["provider"] == "torch"
                            and (o["case"], o["mode"]) == (r["case"], r["mode"]))
            assert r["ratio_of_medians"] == pytest.approx(r["median_us"] / torch_us)
    table = S.format_small(rows, noisy=False).splitlines()
    assert len(table) == 1 + 4 and "crossent/torch" in table[0]


@pytest.mark.parametrize("ratio,lo,hi,noisy,word", [
    (0.95, 0.9, 1.0, False, "within"), (1.3, 1.2, 1.4, False, "SLOWER"),
    (1.05, 0.8, 1.4, True, "undecided"), (1.05, 0.8, 1.4, False, "within"), (1.3, 1.2, 1.4, True, "SLOWER")])
def test_small_verdict_never_contradicts_the_median(ratio, lo, hi, noisy, word):
    from crossent._bench_small import verdict
    assert word in verdict(ratio, lo, hi, noisy)
    assert word in verdict(ratio, lo, hi, noisy, of_medians=ratio)


@pytest.mark.parametrize("ratio,of_medians", [(1.05, 1.12), (1.12, 1.05)])
def test_small_verdict_withheld_when_medians_disagree(ratio, of_medians):
    """The median round ratio and the ratio of the printed medians on either
    side of the bound: no verdict (either would contradict a printed number)."""
    from crossent._bench_small import verdict
    assert "undecided" in verdict(ratio, ratio, ratio, noisy=False, of_medians=of_medians)


def test_round_verdicts_follow_the_median():
    rows = [{"case": "ce-2x3", "provider": "crossent", "ratio_vs_torch": r} for r in (0.8, 1.2, 0.9)]
    (line,) = B._round_verdicts(rows, noisy=False)
    assert "= 0.90 (rounds 0.80-1.20): crossent faster" in line
    (line,) = B._round_verdicts(rows, noisy=True)
    assert "undecided" in line


def test_busy_loops_are_cpu_bound_processes():
    procs = B._busy_loops(1)
    try:
        assert procs[0].poll() is None  # running
    finally:
        procs[0].kill()
        procs[0].wait()
