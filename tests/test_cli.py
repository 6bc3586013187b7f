"""The crossent command: explain, check, bench, --version, and input errors.

A few tests run ``python -m crossent`` in a subprocess (the real entry point);
the rest call ``crossent.cli.main`` in-process, which is the same code and
much faster than paying torch's import each time.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from crossent.cli import main

SRC = str(Path(__file__).resolve().parents[1] / "src")
CE_LINE = re.compile(r"cross_entropy\(x, t\)\s+= (-?\d+\.\d{4})")


def run_cli(*args, timeout=120):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "crossent", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def explain(capsys, *args):
    rc = main(["explain", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_explain_tutorial_example():
    r = run_cli("explain")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "= 1.4125" in out  # step 6, the hand computation
    m = CE_LINE.search(out)
    assert m and m.group(1) == "1.4125"
    assert re.search(r"nll_loss\(log_softmax\(x\), t\) = 1\.4125\s+matches torch", out)
    assert "nll_loss(log_softmax) and cross_entropy agree" in out
    assert "All steps agree with torch." in out
    assert out.count("1.0000") >= 3  # every softmax row sums to 1
    assert "-0.8030" in out and "t = [0, 2, 3]" in out


def _expected(x, t):
    return f"{F.cross_entropy(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(t)).item():.4f}"


def test_explain_inline_lists(capsys):
    x, t = [[1.0, 2.0, 0.5, -1.0], [0.1, 0.2, 3.0, 0.0]], [1, 3]
    rc, out, _ = explain(capsys, "--logits", json.dumps(x), "--target", json.dumps(t))
    assert rc == 0
    assert CE_LINE.search(out).group(1) == _expected(x, t)
    assert "All steps agree with torch." in out


def test_explain_python_literal_and_single_row(capsys):
    rc, out, _ = explain(capsys, "--logits", "(3, 1, 2)", "--target", "0")  # tuple syntax, one row
    assert rc == 0
    assert CE_LINE.search(out).group(1) == _expected([[3.0, 1.0, 2.0]], [0])


def test_explain_pt_files(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(5, 7, generator=g), torch.randint(0, 7, (5,), generator=g)
    torch.save(x, tmp_path / "x.pt")
    torch.save(t, tmp_path / "t.pt")
    rc, out, _ = explain(capsys, "--logits", str(tmp_path / "x.pt"), "--target", str(tmp_path / "t.pt"))
    assert rc == 0
    assert CE_LINE.search(out).group(1) == f"{F.cross_entropy(x, t).item():.4f}"


def test_explain_npy_files(tmp_path, capsys):
    np = pytest.importorskip("numpy")
    rng = np.random.default_rng(0)
    x, t = rng.standard_normal((4, 6)).astype(np.float32), np.array([5, 0, 2, 2])
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "t.npy", t)
    rc, out, _ = explain(capsys, "--logits", str(tmp_path / "x.npy"), "--target", str(tmp_path / "t.npy"))
    assert rc == 0
    assert CE_LINE.search(out).group(1) == f"{F.cross_entropy(torch.from_numpy(x), torch.from_numpy(t)).item():.4f}"


def test_bad_input_exits_2_subprocess():
    r = run_cli("explain", "--logits", "[[1, 2], [3]]", "--target", "[0, 1]")
    assert r.returncode == 2
    assert "error" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args,msg", [
    (["--logits", "[[1, 2], [3]]", "--target", "[0, 1]"], "rectangular"),
    (["--logits", "not a list", "--target", "[0]"], "must be a list"),
    (["--logits", "[[1, 2], [3, 4]]", "--target", "[0, 2]"], "not a class index"),
    (["--logits", "[[1, 2], [3, 4]]", "--target", "[0]"], "entries"),
    (["--logits", "[[1, 2], [3, 4]]", "--target", "[0.5, 1.0]"], "class indices"),
    (["--logits", "[[[1, 2]]]", "--target", "[[0]]"], "2-D"),
    (["--logits", "missing.pt", "--target", "[0]"], "not found"),
    (["--logits", "[[1, 2]]"], "both"),
])
def test_bad_input_exits_2(capsys, args, msg):
    rc, _, err = explain(capsys, *args)
    assert rc == 2
    assert err.startswith("crossent explain: error:") and msg in err


def test_check_passes():
    r = run_cli("check")
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"(\d+)/\1 cases pass", r.stdout)
    assert "FAIL" not in r.stdout


def test_version():
    import crossent
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith(f"crossent {crossent.__version__}")


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "explain" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_quick_writes_json_rows(tmp_path, capsys):
    # in-process parent (saves one torch import); the two measurements still run in subprocesses
    path = tmp_path / "rows.json"
    rc = main(["bench", "--quick", "--cases", "ce-64x1000", "--providers", "crossent,torch",
               "--iters", "3", "--json", str(path)])
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    assert "[2/2] torch cross_entropy 64x1000" in err  # progress goes to stderr
    rows = json.loads(path.read_text())
    assert [row["provider"] for row in rows] == ["crossent", "torch"]
    keys = {"date", "hostname", "cpu", "cores", "torch", "crossent", "python", "git_commit", "backend",
            "case", "op", "provider", "dtype", "shape", "iters", "median_ms", "p10_ms", "p90_ms",
            "extra_peak_mib", "peak_over_logits", "gbps", "copy_gbps", "pct_of_copy",
            "ratio_vs_torch", "ratio_vs_compile"}
    for row in rows:
        assert keys <= row.keys(), keys - row.keys()
        assert "error" not in row
        assert row["iters"] == 3 and row["shape"] == [64, 1000] and row["dtype"] == "float32"
    assert rows[1]["ratio_vs_torch"] == 1.0
    assert rows[0]["ratio_vs_torch"] == pytest.approx(rows[0]["median_ms"] / rows[1]["median_ms"])
    assert "ce-64x1000" in out and "vs torch" in out


def test_bench_bad_case_exits_2():
    assert main(["bench", "--cases", "nope-1x2"]) == 2


@pytest.mark.parametrize("args", [["--help"], ["explain", "--help"], ["--version"]])
def test_help_does_not_import_torch(args):
    """--help and --version answer without importing torch (it takes seconds)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p))
    code = ("import sys, runpy\nsys.argv = ['crossent'] + sys.argv[1:]\n"
            "try:\n    runpy.run_module('crossent', run_name='__main__')\n"
            "except SystemExit:\n    pass\nprint('TORCH' if 'torch' in sys.modules else 'LEAN')")
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=60)
    assert r.stdout.rstrip().endswith("LEAN"), r.stdout + r.stderr


@pytest.mark.parametrize("ignore", [None, 3])
def test_explain_ignored_rows_drop_out_of_the_mean(capsys, ignore):
    x = [[1.0, 2.0, 0.5], [0.1, 0.2, 3.0], [2.0, -1.0, 0.0]]
    ig = -100 if ignore is None else ignore
    t = [1, ig, 0]
    extra = [] if ignore is None else ["--ignore-index", str(ignore)]
    rc, out, _ = explain(capsys, "--logits", json.dumps(x), "--target", json.dumps(t), *extra)
    assert rc == 0, out
    want = F.cross_entropy(torch.tensor(x), torch.tensor(t), ignore_index=ig).item()
    assert CE_LINE.search(out).group(1) == f"{want:.4f}"
    assert f"row 1, target {ig} = ignore_index: ignored" in out
    assert "/ 2 (the ignored row drops out of the mean)" in out
    assert "All steps agree with torch." in out


def test_check_covers_linear_cross_entropy(capsys):
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert out.count("linear_cross_entropy") >= 5


@pytest.mark.parametrize("command", [["check"], ["explain"]])
def test_check_and_explain_run_crossents_own_kernels(monkeypatch, capsys, command):
    """With $CROSSENT_BACKEND unset, the small CPU inputs of check / explain would take the
    shortcut to torch's own C++ losses, and comparing torch with itself proves nothing:
    both commands name the torch backend while they run, and restore the environment."""
    import crossent
    from crossent import _fast
    calls = []
    for name in ("_cross_entropy_loss", "_nll_loss_nd"):
        real = getattr(_fast, name)
        monkeypatch.setattr(_fast, name, lambda *a, _real=real, **k: calls.append(a) or _real(*a, **k))
    monkeypatch.delenv("CROSSENT_BACKEND", raising=False)
    crossent.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]))
    assert len(calls) == 1   # the spy sees the shortcut when it is taken
    calls.clear()
    assert main(command) == 0
    out = capsys.readouterr().out
    assert "(torch backend" in out.splitlines()[0]
    assert calls == []
    assert "CROSSENT_BACKEND" not in os.environ


# triton on CPU without TRITON_INTERPRET: refused for that, for an old Triton's version, or as not installed
@pytest.mark.parametrize("value,msg", [("nope", "unknown crossent backend 'nope'"),
                                       ("triton", "CROSSENT_BACKEND=triton was requested but")])
def test_unusable_backend_env_exits_2(monkeypatch, capsys, value, msg):
    monkeypatch.setenv("CROSSENT_BACKEND", value)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["check"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("crossent check: error: CROSSENT_BACKEND=") and msg in err


def test_help_examples_run(capsys):
    """The examples in `crossent --help` are command lines that work (bench's only parses here:
    its quick run is test_bench_quick_writes_json_rows)."""
    import shlex

    from crossent.cli import build_parser
    p = build_parser()
    examples = [re.split(r"\s{2,}", line.strip())[0] for line in p.epilog.splitlines()
                if line.startswith("  crossent ") and "COMMAND" not in line]
    assert len(examples) == 4, examples
    for line in examples:
        argv = shlex.split(line)[1:]
        assert p.parse_args(argv).func is not None, line
        if argv[0] != "bench":
            assert main(argv) == 0, line
    assert "All steps agree with torch." in capsys.readouterr().out
