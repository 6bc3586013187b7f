"""Unit tests of the benchmark helpers (crossent._bench, re-exported by benchmarks/harness.py)."""
import importlib
import importlib.util
import json
import math
import os
import time
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


# ----------------------------------------------------------------------------- the GPU window (no GPU)

def _bench_module(name):
    """benchmarks/<name>.py as a module (benchmarks/ is no package)."""
    import sys
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def _stage(name, code, cap=30, min_s=1, **kw):
    """A window stage running ``python -c code``."""
    import sys
    G = _bench_module("gpu_window")
    return G.Stage(name, cap, min_s, lambda c, b: [sys.executable, "-c", code.format(out=c.out, budget=b,
                                                                                      knobs=c.knobs)],
                   G.DRY_RUN, **kw)


def test_window_stage_past_its_limit_is_stopped_and_the_next_one_runs(tmp_path):
    """A hanging stage (and the child it started) ends at its limit; what it printed
    before is in the log, its row says timeout, and the later stages still run."""
    G = _bench_module("gpu_window")
    hang = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
            "print('before the hang', flush=True); time.sleep(60)")
    stages = [_stage("hang", hang, cap=2), _stage("after", "print('after ran')"),
              _stage("fails", "raise SystemExit(3)")]
    ctx = G.Ctx(out=tmp_path, python="unused")
    t0 = time.time()
    rows = G.run_plan(stages, ctx, budget_s=60)
    assert time.time() - t0 < 30   # the sleeping child did not hold the stage (or the pipe) open
    assert [(r["stage"], r["status"]) for r in rows] == [("hang", "timeout"), ("after", "ok"), ("fails", "failed")]
    assert rows[2]["rc"] == 3
    log = (tmp_path / "window.log").read_text()
    assert "before the hang" in log and "after ran" in log
    assert json.loads((tmp_path / "window.json").read_text())["stages"] == json.loads(json.dumps(rows))


def test_window_limits_adapt_to_what_is_left(tmp_path):
    G = _bench_module("gpu_window")
    st = [G.Stage(n, cap, mn, None, []) for n, cap, mn in [("a", 100, 30), ("b", 200, 60), ("c", 50, 40)]]
    assert G.limit(st, 0, 1000) == 100                   # plenty: the cap
    assert G.limit(st, 0, 150) == 50                     # the later stages' minimums kept back
    assert G.limit(st, 0, 60) == 30                      # an earlier stage keeps its own minimum first
    assert G.limit(st, 0, 20) == 0                       # below its minimum: skipped
    assert G.limit(st, 2, 45) == 45 and G.limit(st, 2, 39) == 0
    stages = [_stage("first", "print(1)", min_s=5), _stage("second", "print(2)", min_s=1000)]
    rows = G.run_plan(stages, G.Ctx(out=tmp_path, python="unused"), budget_s=60)
    assert [r["status"] for r in rows] == ["ok", "skipped"]


def test_window_smoke_fallback_reaches_the_later_stages(tmp_path):
    """The split path wrong in the smoke stage: the later benchmarks get the two-pass knobs."""
    G = _bench_module("gpu_window")
    smoke = ("import json, pathlib; pathlib.Path(r'{out}/gpu_smoke.json').write_text(json.dumps(dict(rows=["
             "dict(check='ce split mean', path='split', ok=False, error='wrong'),"
             "dict(check='ce twopass mean', path='twopass', ok=True)])))")
    stages = [_stage("smoke", smoke), _stage("bench", "print('knobs=' + '{knobs}')")]
    ctx = G.Ctx(out=tmp_path, python="unused")
    G.run_plan(stages, ctx, budget_s=60)
    assert ctx.knobs == G.FALLBACK_KNOBS
    assert f"knobs={G.FALLBACK_KNOBS}" in (tmp_path / "window.log").read_text()
    assert "ce split mean: wrong" in ctx.notes[0]


def test_window_dry_run_parses_every_stage(tmp_path):
    """bash benchmarks/gpu_check.sh --dry-run: every stage's real command line with its dry-run
    flag (benchmarks print their plans, pytest collects the GPU tiers), no GPU needed."""
    import subprocess
    import sys
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    G = _bench_module("gpu_window")
    doc = json.loads((tmp_path / "window.json").read_text())
    assert [r["stage"] for r in doc["stages"]] == [s.name for s in G.STAGES]
    assert all(r["status"] == "ok" for r in doc["stages"]), doc["stages"]
    argv = {r["stage"]: r["argv"] for r in doc["stages"]}
    assert "--tuning" in argv["ce"] and "--dry-run" in argv["ce"]
    for name in ("sweep", "ce", "linear"):   # each told how long it may plan for, inside its limit
        row = next(r for r in doc["stages"] if r["stage"] == name)
        assert 0 < int(argv[name][argv[name].index("--budget-s") + 1]) < row["limit_s"]
    assert json.loads((tmp_path / "gpu_bench.json").read_text()) == []
    assert json.loads((tmp_path / "gpu_sweep.json").read_text())["meta"]["dry_run"] is True
    assert "sweep plan:" in res.stdout and "pass 2: compile" in res.stdout and "window summary" in res.stdout


def test_bench_knobs_and_passes():
    common = _bench_module("_gpu_common")
    assert common.parse_knobs("_ROW_PATH=twopass, _SPLIT_WARPS=8,_KEEP_L2=False") == dict(
        _ROW_PATH="twopass", _SPLIT_WARPS=8, _KEEP_L2=False)
    assert common.parse_knobs("") == {}
    with pytest.raises(ValueError):
        common.parse_knobs("_ROW_PATH")
    first, second = common.passes({"liger"}, ["crossent", "torch", "compile", "liger"], ("compile",))
    assert first == {"liger", "compile"} and second == {"liger", "crossent", "torch"}
    assert common.passes({"compile"}, ["crossent", "compile"], ("compile",)) == [{"compile"}]   # nothing for pass 2


def test_bench_rows_survive_a_failing_shape(tmp_path, monkeypatch, capsys):
    """guarded(): an error of the shape itself is a "(shape)" row, printed in the calling
    benchmark's columns and written to the JSON with the run's stamp; failed(): a Skip is
    its message alone, any other error its type and message."""
    common = _bench_module("_gpu_common")
    out = tmp_path / "rows.json"
    monkeypatch.setattr(common, "OUT_PATH", [str(out)])
    monkeypatch.setattr(common, "META", {"device": "card"})
    rows = []

    def run(n):
        raise MemoryError(f"{n} bytes")
    common.guarded(run, "cross_entropy", "4x5", rows, 7, fmt=lambda r: f"ROW {r['provider']} {r['error']}")
    assert rows == [dict(op="cross_entropy", provider="(shape)", shape="4x5", dtype="bfloat16",
                         error="MemoryError: 7 bytes")]
    assert "ROW (shape) MemoryError: 7 bytes" in capsys.readouterr().out
    assert json.loads(out.read_text()) == [{**rows[0], "device": "card"}]
    for exc, error in ((common.Skip("skipped: time budget"), "skipped: time budget"),
                       (RuntimeError("boom"), "RuntimeError: boom")):
        row = {}
        common.failed(row, exc, "where")
        assert row == {"error": error} and f"[where] {error}" in capsys.readouterr().err


def test_sweep_plan_and_compile_count():
    """The sweep's kernels: one per distinct (slice width, slices, warps, prefetch) or two-pass
    tile; the resident-CTA knob only sizes the grid.  A forced row path keeps its configurations."""
    pytest.importorskip("triton")
    sw = _bench_module("gpu_sweep")
    todo = dict(sw.plan({}, cluster_ok=False))
    work = [("cross_entropy", (8192, 32000)), ("cross_entropy", (8192, 128256))]
    split4k = sw.kernel_keys([("s", todo["split b4096 w4 pf0 c8"])], work)
    assert len(split4k) == 2                             # one kernel per class count (slices per row)
    assert sw.kernel_keys([("c2", todo["split b4096 w4 pf0 c2"])], work) == split4k   # but 2 CTAs/SM
    assert len(sw.kernel_keys([("s", todo["split b4096 w4 pf0 c8"]), ("pf", todo["split b4096 w4 pf1 c8"])],
                              work)) == 4
    # cross-entropy's default is the two-pass kernel: one tile for both class counts
    assert len(sw.kernel_keys([("default", todo["default"])], work)) == 1
    tp = [(k, v) for k, v in todo.items() if v.get("_ROW_PATH") == "twopass"]
    assert len(sw.kernel_keys(tp[:1], work)) == 1         # the two-pass tile does not depend on C
    forced = sw.plan({"_ROW_PATH": "twopass"}, cluster_ok=True)
    assert forced and all(kn.get("_ROW_PATH", "twopass") == "twopass" for _, kn in forced)


def test_profile_idle_gaps_and_host_attribution():
    """The device timeline: busy time counts overlapping kernels once, gaps are the holes
    between them (longest first, with their neighbours), and a gap's host op is the innermost
    host event at its middle."""
    prof = _bench_module("_gpu_profile")
    dev = [(0.0, 10.0, "gemm"), (5.0, 12.0, "copy"), (40.0, 50.0, "ce"), (52.0, 60.0, "gemm"),
           (200.0, 210.0, "gemm")]
    span, busy, gaps = prof.idle_gaps(dev, min_us=5.0)
    assert span == 210.0 and busy == 12.0 + 10.0 + 8.0 + 10.0
    assert gaps == [(140.0, 60.0, "gemm", "gemm"), (28.0, 12.0, "copy", "ce")]   # the 2 us gap is under min_us
    assert prof.idle_gaps([]) == (0.0, 0.0, [])
    host = [(0.0, 300.0, "step"), (100.0, 180.0, "aten::empty"), (120.0, 125.0, "cudaMalloc"),
            (20.0, 25.0, "aten::mm")]
    assert prof.host_op_at(host, 130.0) == "aten::empty"      # innermost containing the time
    assert prof.host_op_at(host, 122.0) == "cudaMalloc"
    assert prof.host_op_at(host[1:], 50.0) == "(between host ops, after aten::mm)"
    assert prof.host_op_at(host[1:], 10.0) == "(before the first host op)"
    assert prof.kernel_table(dev, top=2) == [(28.0, 3, "gemm"), (10.0, 1, "ce")]
    lines = prof.summarize(dev, host, host_call_ms=0.05, steps=2)
    assert "idle 0.170 ms over 2 step(s)" in lines[0] and "per step 0.105 ms" in lines[0]
    assert any("0.140 ms after 'gemm' before 'gemm'; host in 'aten::empty'" in ln for ln in lines)


def test_linear_bench_peer_rows_and_profile_rows(capsys):
    """The linear benchmark's peer target takes CCE's faster row (its speed depends on the
    values: cce-std1), and its profile rows print as one line each, not as timing rows."""
    lb = _bench_module("_linear_report")
    big = lb.BIG_VOCAB
    rows = [dict(op="linear_cross_entropy", provider=p, shape=big, median_ms=ms, p10_ms=ms, p90_ms=ms)
            for p, ms in (("crossent-accurate", 90.0), ("liger-flce", 150.0), ("cce", 340.0), ("cce-std1", 80.0))]
    got = {t["what"]: (t["limit"], t["passed"]) for t in lb.targets(rows) if "ms <" in t["what"]}
    assert got == {"accurate ms < liger-flce ms (this run)": (150.0, True),
                   "accurate ms < cce ms (this run)": (80.0, False)}
    compact = [dict(r, provider="crossent-compact", median_ms=120.0, x3mm=1.5, shape=s)
               for r, s in ((rows[0], big), (rows[0], "8192x4096x128256"))]
    timed = {t["shape"] for t in lb.targets(compact) if t["what"].startswith("compact time")}
    assert timed == {"8192x4096x128256"}   # the issue sets compact's time target at D = 4096 only
    no_std1 = {t["what"]: t["limit"] for t in lb.targets(rows[:3]) if "ms <" in t["what"]}
    assert no_std1["accurate ms < cce ms (this run)"] == 340.0
    anchor = {t["what"]: t["limit"] for t in lb.targets(rows[:1]) if "ms <" in t["what"]}
    assert anchor["accurate ms < cce ms (H200 anchor)"] == lb.PEER_ANCHOR_MS["cce"]
    prof = dict(op="profile", provider="crossent-compact", shape=big, steps=3, span_ms=150.0, busy_ms=140.0,
                idle_ms=10.0, host_call_ms=2.0, gaps=7, host_sync="")
    synced = dict(prof, provider="crossent-accurate", host_sync="linear.py:149 in _free_bytes: called a sync")
    lb.print_table(rows + [prof, synced])
    out = capsys.readouterr().out
    assert "PROFILE crossent-compact" in out and "idle 10.00 (7 gaps)" in out
    assert "host sync: none" in out and "host sync: linear.py:149 in _free_bytes" in out
    assert "cce-std1" in out


def test_profile_names_the_line_that_synced():
    """--profile's sync check reports where a refused sync was made: the innermost frame
    in the library's source, else the innermost frame of the traceback."""
    prof = _bench_module("_gpu_profile")

    def synchronising_call():
        raise RuntimeError("called a synchronizing CUDA operation")
    try:
        synchronising_call()
    except RuntimeError as e:
        tb = e.__traceback__
    here = Path(__file__).name
    assert prof.raise_site(tb, package="tests").startswith(f"{here}:")
    assert prof.raise_site(tb, package="tests").endswith(" in synchronising_call")
    assert prof.raise_site(tb, package="no_such_package").endswith(" in synchronising_call")
    assert prof.raise_site(None) == "(no traceback)"


def test_linear_reference_is_float64_autograd_in_chunks():
    """The linear benchmark's accuracy reference: float64 autograd of mean cross-entropy over
    h @ W.T, here in 3 row chunks (the last partial), kept in fp32."""
    import torch
    import torch.nn.functional as F
    common = _bench_module("_gpu_common")
    g = torch.Generator().manual_seed(0)
    h = torch.randn(10, 8, generator=g).bfloat16()
    W = torch.randn(37, 8, generator=g).bfloat16()
    t = torch.randint(0, 37, (10,), generator=g)
    loss, dh, dW = common.linear_ce_reference(h, W, t, chunk_bytes=4 * 37 * 8)
    hd, Wd = h.double().requires_grad_(), W.double().requires_grad_()
    want = F.cross_entropy(hd @ Wd.T, t)
    want.backward()
    assert loss.dtype == dh.dtype == dW.dtype == torch.float32
    for got, ref in ((loss, want.detach()), (dh, hd.grad), (dW, Wd.grad)):
        torch.testing.assert_close(got.double(), ref, rtol=2 ** -23, atol=0)


def test_cce_filter_check_tells_the_two_input_spreads_apart():
    """What the linear benchmark's cce-std1 row rests on: at the inputs' logit spread (std 2)
    CCE's gradient filter skips no tile, at half of it (W / 2) a large share."""
    lb = _bench_module("gpu_linear_bench")
    assert lb.cce_filtered(128, 64, 128256, 1.0) == 0.0
    assert lb.cce_filtered(128, 64, 128256, 0.5) > 0.2
