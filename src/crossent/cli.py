"""The ``crossent`` command (also ``python -m crossent``).

  crossent explain   the tutorial's cross-entropy example, step by step, with
                     crossent's functions checked against torch at every step
  crossent check     a quick parity table of crossent vs the installed torch
  crossent bench     the CPU benchmark (crossent._bench, imported only here)
  crossent --version

Nothing heavy is paid at start-up: torch, crossent's kernels, the benchmark
module and numpy load inside the subcommand that needs them, so ``crossent
--help`` answers at once.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__

if TYPE_CHECKING:   # annotations only: the CLI imports torch where a command needs it
    import torch

# The tutorial prints its random 3x4 input rounded to 4 decimals; we start from those
# printed numbers, so the loss is 1.412474..., not the tutorial's exact 1.412470...
TUTORIAL_LOGITS = [[0.0054, -0.8030, -0.5758, -0.6518],
                   [-0.5518, 0.3904, 0.5296, 0.4973],
                   [0.1608, 0.5822, 0.9536, -0.3173]]
TUTORIAL_TARGET = [0, 2, 3]
BACKEND_VAR = "CROSSENT_BACKEND"


class InputError(ValueError):
    """Bad user input: reported as one line, exit code 2."""


@contextmanager
def _own_kernels():
    """Name the torch backend while explain / check run, unless $CROSSENT_BACKEND is set.

    With the backend automatic, the small CPU inputs these commands use take the
    shortcut to torch's own kernels, and comparing torch with itself would prove
    nothing; a named backend always runs crossent's.  Yields a label for the header.
    """
    from . import backends
    saved = os.environ.get(BACKEND_VAR)
    if saved is None:
        os.environ[BACKEND_VAR] = "torch"
    try:
        try:
            name = backends.select("cpu").name
        except (ValueError, RuntimeError) as e:   # a bad $CROSSENT_BACKEND: one line, exit 2
            raise InputError(str(e) if BACKEND_VAR in str(e) else f"{BACKEND_VAR}={saved}: {e}") from None
        auto = (saved or "").strip().lower() == "auto"
        yield "auto backend: small inputs run torch's own kernels" if auto else f"{name} backend"
    finally:
        if saved is None:
            os.environ.pop(BACKEND_VAR, None)


# ----------------------------------------------------------------------------- formatting

def _num(v: float) -> str:
    return f"{v:.4f}"


SHOW = 10  # rows / columns printed; bigger inputs are computed in full but shown in part


def _table(x: torch.Tensor, extra: tuple[str, list[str]] | None = None, indent: str = "  ") -> str:
    """A 2-D tensor as aligned rows/columns of 4-decimal numbers, plus an optional extra column."""
    note = "" if x.shape[0] <= SHOW and x.shape[1] <= SHOW else \
        f"\n{indent}(showing {min(x.shape[0], SHOW)} of {x.shape[0]} rows, {min(x.shape[1], SHOW)} of {x.shape[1]} classes)"
    x = x[:SHOW, :SHOW]
    cols = [f"class {j}" for j in range(x.shape[1])]
    cells = [[_num(v) for v in row] for row in x.tolist()]
    if extra:
        cols.append(extra[0])
        for row, e in zip(cells, extra[1]):
            row.append(e)
    labels = [f"row {i}" for i in range(x.shape[0])]
    lw = max(len(s) for s in labels)
    w = [max(len(c), *(len(r[j]) for r in cells)) for j, c in enumerate(cols)]
    lines = [indent + " " * lw + "  " + "  ".join(c.rjust(wj) for c, wj in zip(cols, w))]
    lines += [indent + lab.ljust(lw) + "  " + "  ".join(c.rjust(wj) for c, wj in zip(r, w))
              for lab, r in zip(labels, cells)]
    return "\n".join(lines) + note


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max |a - b| in fp64; equal NaNs count as equal, a NaN against a number as inf."""
    import torch
    a, b = a.detach().double(), b.detach().double()
    na, nb = a.isnan(), b.isnan()
    if not torch.equal(na, nb):
        return float("inf")
    d = torch.where(a == b, 0.0, (a - b).abs())[~na]  # a == b also covers equal infinities
    return d.max().item() if d.numel() else 0.0


# ----------------------------------------------------------------------------- explain

def _load_tensor(text: str, what: str) -> torch.Tensor:
    """Inline JSON/Python list, or a .pt / .npy file."""
    import torch
    path = Path(text)
    if text.endswith((".pt", ".pth", ".npy")):
        if not path.is_file():
            raise InputError(f"{what} file {text!r} not found")
        try:
            if text.endswith(".npy"):
                import numpy as np  # optional: only .npy input needs it
                return torch.from_numpy(np.load(path, allow_pickle=False))
            t = torch.load(path, map_location="cpu", weights_only=True)
        except ImportError:
            raise InputError("reading .npy files needs numpy (pip install numpy)") from None
        except Exception as e:
            raise InputError(f"cannot read {what} file {text!r}: {e}") from None
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{what} file {text!r} holds a {type(t).__name__}, not a tensor")
        return t
    try:
        value = json.loads(text)
    except ValueError:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise InputError(f"{what} must be a list like [[1.0, 2.0], [0.5, 0.1]] or a .pt/.npy file; "
                             f"got {text!r}") from None
    try:
        return torch.tensor(value)
    except (TypeError, ValueError, RuntimeError) as e:
        raise InputError(f"{what} is not a rectangular list of numbers: {e}") from None


def _explain_inputs(args):
    """(logits (N, C) float, targets (N,) int64) from the arguments or the tutorial."""
    import torch
    if (args.logits is None) != (args.target is None):
        raise InputError("give both --logits and --target, or neither (for the tutorial's example)")
    if args.logits is None:
        return torch.tensor(TUTORIAL_LOGITS), torch.tensor(TUTORIAL_TARGET)
    x, t = _load_tensor(args.logits, "--logits"), _load_tensor(args.target, "--target")
    if x.dtype == torch.bool or x.is_complex():
        raise InputError(f"--logits must be real numbers, got {x.dtype}")
    if not x.is_floating_point():
        x = x.float()
    if x.dim() == 1:  # one row of logits: a single prediction
        x, t = x.unsqueeze(0), t.reshape(1)
    if x.dim() != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise InputError(f"--logits must be a non-empty 2-D (N, C) table, got shape {tuple(x.shape)}")
    if t.is_floating_point() or t.dtype == torch.bool or t.dim() != 1:
        raise InputError(f"--target must be N class indices (integers), got {t.dtype} of shape {tuple(t.shape)}")
    if t.shape[0] != x.shape[0]:
        raise InputError(f"--target has {t.shape[0]} entries but --logits has {x.shape[0]} rows")
    bad = [(i, v) for i, v in enumerate(t.tolist()) if not 0 <= v < x.shape[1] and v != args.ignore_index]
    if bad:
        raise InputError(f"--target[{bad[0][0]}] = {bad[0][1]} is not a class index in [0, {x.shape[1]}) "
                         f"nor the ignore index {args.ignore_index}")
    return x, t.long()


def explain(args) -> int:
    x, t = _explain_inputs(args)
    with _own_kernels() as backend:
        return _explain(args, x, t, backend)


def _explain(args, x: torch.Tensor, t: torch.Tensor, backend: str) -> int:
    import torch
    import torch.nn.functional as F

    import crossent
    ig = args.ignore_index
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(x.dtype, 1e-2)
    checks: list[bool] = []

    def vs_torch(ours: torch.Tensor, theirs: torch.Tensor) -> str:
        d = _maxdiff(ours, theirs)
        ok = d <= tol * max(1.0, theirs.detach().double().abs().nan_to_num(0).max().item())
        checks.append(ok)
        return f"{'matches' if ok else 'DIFFERS FROM'} torch (max |diff| = {d:.1e})"

    N, C = x.shape
    default = args.logits is None
    print(f"Cross-entropy step by step with crossent {__version__} ({backend}; torch {torch.__version__})\n")
    print(f"Step 1. The input: logits x of shape ({N}, {C}), {str(x.dtype).replace('torch.', '')}: "
          f"one row of {C} class scores per sample,\n        and each row's target class t = {t.tolist()}")
    if (t == ig).any():
        print(f"        (a target equal to ignore_index = {ig} marks a row that does not count)")
    print(_table(x))

    p = crossent.softmax(x, dim=1)
    print("\nStep 2. softmax(x, dim=1) = exp(x) / sum(exp(x)) along each row: probabilities, each row sums to 1")
    print(_table(p, ("row sum", [_num(s) for s in p.double().sum(1).tolist()])))
    print("  " + vs_torch(p, F.softmax(x, dim=1)))

    lp = crossent.log_softmax(x, dim=1)
    print("\nStep 3. log_softmax(x, dim=1) = x - logsumexp(x) along each row, computed directly (stable)")
    print(_table(lp))
    print("  " + vs_torch(lp, F.log_softmax(x, dim=1)))

    d = _maxdiff(torch.log(p), lp)
    if d <= max(tol, 1e-5):
        print(f"\nStep 4. log(softmax(x)) gives the same numbers: max |log(softmax(x)) - log_softmax(x)| = {d:.1e}")
        print("  (log_softmax never forms the probabilities, so it cannot underflow to log(0) = -inf)")
    else:  # not a failure: it is the reason log_softmax exists
        print(f"\nStep 4. log(softmax(x)) does NOT match here: max |log(softmax(x)) - log_softmax(x)| = {d:.1e}")
        print("  some probabilities underflowed (log(0) = -inf) or lost precision; log_softmax computes\n"
              "  x - logsumexp(x) directly and stays exact, which is why losses use it")

    counted = t != ig
    picked = lp[torch.arange(N), torch.where(counted, t, 0)]
    print("\nStep 5. Pick each row's log-probability at its target class: log_softmax(x)[i, t[i]]")
    for i in range(min(N, SHOW)):
        if counted[i]:
            print(f"  row {i}, target {t[i].item()}: {_num(picked[i].item())}")
        else:
            print(f"  row {i}, target {ig} = ignore_index: ignored, contributes nothing and is not counted")
    if N > SHOW:
        print(f"  ... ({N - SHOW} more rows)")

    kept = picked[counted]
    n = int(counted.sum())
    manual = -kept.double().mean().item() if n else float("nan")
    terms = " + ".join(f"({_num(v)})" for v in kept.tolist()) if n <= SHOW else "sum of the picked values"
    dropped = "the ignored row drops" if N - n == 1 else f"the {N - n} ignored rows drop"
    over = f"{n}" + (f" ({dropped} out of the mean)" if n < N else "")
    print(f"\nStep 6. The loss is their negated mean: -[{terms}] / {over} = {_num(manual)}")
    if default:
        print("  (the tutorial printed its input rounded to 4 decimals; its exact loss, 1.412470..., "
              "agrees with this to ~1e-4)")

    nll = crossent.nll_loss(lp, t, ignore_index=ig)
    ce = crossent.cross_entropy(x, t, ignore_index=ig)
    ref = F.cross_entropy(x, t, ignore_index=ig)
    print("\nStep 7. The library calls give the same loss:")
    print(f"  nll_loss(log_softmax(x), t) = {_num(nll.item())}   "
          f"{vs_torch(nll, F.nll_loss(F.log_softmax(x, 1), t, ignore_index=ig))}")
    print(f"  cross_entropy(x, t)         = {_num(ce.item())}   {vs_torch(ce, ref)}")
    agree = _maxdiff(nll, ce) <= tol * max(1.0, abs(ce.item())) \
        and _maxdiff(torch.tensor(manual), ce) <= tol * max(1.0, abs(manual))
    checks.append(agree)
    print(f"  nll_loss(log_softmax) and cross_entropy {'agree' if agree else 'DISAGREE'} "
          f"(|diff| = {abs(nll.item() - ce.item()):.1e}), and agree with steps 5-6 "
          f"(|diff| = {abs(manual - ce.item()):.1e})")
    print("  cross_entropy fuses steps 3, 5 and 6 into one pass over x")
    ok = all(checks)
    print(f"\n{'All steps agree with torch.' if ok else 'Some steps DISAGREE with torch: see above.'}")
    return 0 if ok else 1


# ----------------------------------------------------------------------------- check

def _check_cases():
    """(function, description, builder) with builder(gen) -> (x, args, kwargs); x gets the gradient."""
    import torch
    def r(*shape, dtype=torch.float32):
        return lambda g: torch.randn(shape, generator=g).to(dtype)

    def cls(C, *shape, ignore=None):
        def f(g):
            t = torch.randint(0, C, shape, generator=g)
            if ignore is not None:
                t[::3] = ignore  # every third position ignored
            return t
        return f

    def prob(*shape):
        return lambda g: torch.randn(shape, generator=g).softmax(1)

    def w(C):
        return lambda g: torch.rand(C, generator=g) + 0.5

    h, b, d = torch.float16, torch.bfloat16, torch.float64
    sm = [("dim=1", r(4, 7), {"dim": 1}), ("dim=0", r(4, 7), {"dim": 0}),
          ("3-D dim=-1", r(2, 3, 5), {"dim": -1}), ("3-D dim=1", r(2, 3, 5), {"dim": 1}),
          ("1-D dim=0", r(9), {"dim": 0}), ("8x5000 dim=1", r(8, 5000), {"dim": 1}),
          ("dtype=float64", r(4, 7), {"dim": 1, "dtype": d}), ("float64", r(4, 7, dtype=d), {"dim": 1}),
          ("float16", r(4, 7, dtype=h), {"dim": 1}), ("bfloat16", r(4, 7, dtype=b), {"dim": 1})]
    cases = [(fn, desc, x, [], kw) for fn in ("softmax", "log_softmax") for desc, x, kw in sm]
    cases.append(("softmax", "non-contiguous x.T", lambda g: r(7, 4)(g).t(), [], {"dim": 1}))
    lsm = lambda mk: (lambda g: mk(g).log_softmax(1))  # nll_loss takes log-probabilities
    cases += [
        ("nll_loss", "mean", lsm(r(6, 5)), [cls(5, 6)], {}),
        ("nll_loss", "sum", lsm(r(6, 5)), [cls(5, 6)], {"reduction": "sum"}),
        ("nll_loss", "none", lsm(r(6, 5)), [cls(5, 6)], {"reduction": "none"}),
        ("nll_loss", "weight", lsm(r(6, 5)), [cls(5, 6)], {"weight": w(5)}),
        ("nll_loss", "weight, ignore_index=2", lsm(r(6, 5)), [cls(5, 6, ignore=2)], {"weight": w(5), "ignore_index": 2}),
        ("nll_loss", "K-dim (2,5,3,4)", lsm(r(2, 5, 3, 4)), [cls(5, 2, 3, 4)], {}),
        ("nll_loss", "1-D input, 0-D target", lambda g: r(5)(g).log_softmax(0), [lambda g: torch.tensor(3)], {}),
        ("nll_loss", "all ignored, mean (nan)", lsm(r(3, 5)), [lambda g: torch.full((3,), -100)], {}),
        ("cross_entropy", "mean", r(6, 5), [cls(5, 6)], {}),
        ("cross_entropy", "sum", r(6, 5), [cls(5, 6)], {"reduction": "sum"}),
        ("cross_entropy", "none", r(6, 5), [cls(5, 6)], {"reduction": "none"}),
        ("cross_entropy", "weight", r(6, 5), [cls(5, 6)], {"weight": w(5)}),
        ("cross_entropy", "ignore_index=-100", r(6, 5), [cls(5, 6, ignore=-100)], {}),
        ("cross_entropy", "weight, ignore_index=1", r(6, 5), [cls(5, 6, ignore=1)], {"weight": w(5), "ignore_index": 1}),
        ("cross_entropy", "label_smoothing=0.1", r(6, 5), [cls(5, 6)], {"label_smoothing": 0.1}),
        ("cross_entropy", "smoothing, weight, ignore", r(6, 5), [cls(5, 6, ignore=-100)],
         {"label_smoothing": 0.2, "weight": w(5), "reduction": "sum"}),
        ("cross_entropy", "probability targets", r(6, 5), [prob(6, 5)], {}),
        ("cross_entropy", "prob targets, smoothing, weight", r(6, 5), [prob(6, 5)],
         {"label_smoothing": 0.1, "weight": w(5)}),
        ("cross_entropy", "K-dim (2,5,3,4)", r(2, 5, 3, 4), [cls(5, 2, 3, 4)], {}),
        ("cross_entropy", "K-dim, weight, ignore, none", r(2, 5, 3, 4), [cls(5, 2, 3, 4, ignore=-100)],
         {"weight": w(5), "reduction": "none"}),
        ("cross_entropy", "16x50257", r(16, 50257), [cls(50257, 16)], {}),
        ("cross_entropy", "float64", r(6, 5, dtype=d), [cls(5, 6)], {}),
        ("cross_entropy", "float16", r(6, 5, dtype=h), [cls(5, 6)], {}),
        ("cross_entropy", "bfloat16", r(6, 5, dtype=b), [cls(5, 6)], {}),
        ("cross_entropy", "bfloat16, 8x5000, smoothing", r(8, 5000, dtype=b), [cls(5000, 8)], {"label_smoothing": 0.1}),
        ("cross_entropy", "empty batch (0,5), mean", r(0, 5), [cls(5, 0)], {}),
        ("cross_entropy", "target out of range", r(3, 5), [lambda g: torch.tensor([0, 7, 1])], {}),
        ("cross_entropy", "target shape mismatch", r(3, 5), [cls(5, 4)], {}),
        # x is the hidden states (N, D); args are the classifier weight (C, D) and the targets
        ("linear_cross_entropy", "mean", r(6, 4), [r(7, 4), cls(7, 6)], {}),
        ("linear_cross_entropy", "bias, ignore_index=-100, none", r(6, 4), [r(7, 4), cls(7, 6, ignore=-100)],
         {"linear_bias": r(7), "reduction": "none", "ignore_index": -100}),
        ("linear_cross_entropy", "weight, smoothing, sum", r(6, 4), [r(7, 4), cls(7, 6)],
         {"weight": w(7), "label_smoothing": 0.1, "reduction": "sum"}),
        ("linear_cross_entropy", "probability targets", r(6, 4), [r(7, 4), prob(6, 7)], {}),
        ("linear_cross_entropy", "bfloat16", r(6, 4, dtype=b), [r(7, 4, dtype=b), cls(7, 6)], {}),
        ("linear_cross_entropy", "in_features mismatch", r(6, 4), [r(7, 5), cls(7, 6)], {}),
    ]
    return cases


# |err| <= atol + rtol * max|torch value|, per dtype (fp16/bf16: about 2 ulps)
_TOL = {"float64": (1e-10, 1e-10), "float32": (1e-5, 1e-5), "float16": (1e-3, 2e-3), "bfloat16": (1e-2, 1.6e-2)}


def _run_one(fn, x, args, kw, seed):
    """Value and input-gradient of fn, or the exception it raised."""
    import torch
    x = x.detach().clone().requires_grad_(True)
    try:
        y = fn(x, *args, **kw)
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.dtype)
        y.backward(gy)
    except Exception as e:
        return e
    return y.detach(), x.grad


def _torch_fn(name: str):
    """torch's function of that name (torch < 2.13 has no F.linear_cross_entropy:
    its definition, cross_entropy of the linear layer's logits, stands in)."""
    import torch.nn.functional as F

    if name == "linear_cross_entropy" and not hasattr(F, name):
        return lambda x, w, t, *, linear_bias=None, **kw: F.cross_entropy(F.linear(x, w, linear_bias), t, **kw)
    return getattr(F, name)


def check(args) -> int:
    with _own_kernels() as backend:
        return _check(backend)


def _check(backend: str) -> int:
    import torch

    import crossent
    rows, failed = [], 0
    for i, (fn, desc, mk_x, mk_args, mk_kw) in enumerate(_check_cases(), 1):
        g = torch.Generator().manual_seed(i)
        x = mk_x(g)
        a = [m(g) for m in mk_args]
        kw = {k: (v(g) if callable(v) else v) for k, v in mk_kw.items()}
        ours = _run_one(getattr(crossent, fn), x, a, kw, i)
        ref = _run_one(_torch_fn(fn), x, a, kw, i)
        dtype = kw.get("dtype", x.dtype)
        if isinstance(ours, Exception) or isinstance(ref, Exception):
            name = lambda r: type(r).__name__ if isinstance(r, Exception) else "no error"
            ok = type(ours) is type(ref)
            ev = eg = "raises"
            tol_s = f"same error: {name(ref)}" if ok else f"torch {name(ref)}, ours {name(ours)}"
        else:
            atol, rtol = _TOL.get(str(dtype).replace("torch.", ""), (1e-5, 1e-5))
            dv, dg = _maxdiff(ours[0], ref[0]), _maxdiff(ours[1], ref[1])
            sv = ref[0].detach().double().abs().nan_to_num(0).max().item() if ref[0].numel() else 0.0
            sg = ref[1].double().abs().nan_to_num(0).max().item() if ref[1].numel() else 0.0
            ok = dv <= atol + rtol * sv and dg <= atol + rtol * sg and ours[0].dtype == ref[0].dtype \
                and ours[0].shape == ref[0].shape
            ev, eg, tol_s = f"{dv:.2e}", f"{dg:.2e}", f"{atol:.0e}+{rtol:.0e}*|ref|"
        failed += not ok
        rows.append([str(i), fn, desc, str(dtype).replace("torch.", ""), ev, eg, tol_s, "ok" if ok else "FAIL"])
    head = ["#", "function", "arguments", "dtype", "|value err|", "|grad err|", "tolerance", ""]
    w = [max(len(h), *(len(r[j]) for r in rows)) for j, h in enumerate(head)]
    right = {0, 4, 5}
    fmt = lambda r: "  ".join(c.rjust(wj) if j in right else c.ljust(wj) for j, (c, wj) in enumerate(zip(r, w)))
    print(f"crossent {__version__} ({backend}) vs torch {torch.__version__}: value and input "
          "gradient (errors are max |crossent - torch|)")
    print(fmt(head).rstrip())
    for r in rows:
        print(fmt(r).rstrip())
    print(f"\n{len(rows) - failed}/{len(rows)} cases pass" + ("" if not failed else f", {failed} FAIL"))
    return 1 if failed else 0


# ----------------------------------------------------------------------------- main

def _bench(args) -> int:
    from . import _bench  # heavy-ish and only needed here
    return _bench.run(args)


def _torch_version() -> str:
    """The installed torch's version, read from its metadata (importing torch takes seconds)."""
    try:
        return version("torch")
    except PackageNotFoundError:
        return "not installed"


_OWN_KERNELS = ("Unless $CROSSENT_BACKEND is set, it runs with the torch backend named, so that these "
                "small CPU inputs go through crossent's own kernels rather than its shortcut to torch's.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="crossent", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="crossent: PyTorch-exact softmax, log_softmax, nll_loss and cross-entropy.\n"
                    "`python -m crossent` is the same command.",
        epilog="examples:\n"
               "  crossent explain                                      the tutorial's 3x4 example\n"
               "  crossent explain --logits '[[1, 2, 3], [0, 1, 0]]' --target '[2, -100]'\n"
               "  crossent check                                        parity with the installed torch\n"
               "  crossent bench --quick --small                        a CPU benchmark, a minute or two\n"
               "  crossent COMMAND --help                               a command's options")
    p.add_argument("--version", action="version", version=f"crossent {__version__} (torch {_torch_version()})")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    e = sub.add_parser("explain", help="the tutorial's cross-entropy example, step by step",
                       description="Walk through softmax -> log_softmax -> nll_loss -> cross_entropy on "
                                   "the tutorial's 3x4 example, or on your own logits and targets, checking "
                                   "each step against torch (exit 1 if one differs). " + _OWN_KERNELS)
    e.add_argument("--logits", help="(N, C) logits: an inline list like '[[1, 2, 3], [0, 1, 0]]' or a .pt/.npy file")
    e.add_argument("--target", help="N class indices: an inline list like '[2, 0]' or a .pt/.npy file; "
                                    "rows whose target is the ignore index (default -100) do not count")
    e.add_argument("--ignore-index", type=int, default=-100, metavar="N",
                   help="target value that marks a row to ignore, as cross_entropy's ignore_index (default -100)")
    e.set_defaults(func=explain)
    c = sub.add_parser("check", help="quick parity table vs the installed torch: softmax, log_softmax, "
                                     "nll_loss, cross_entropy, linear_cross_entropy (exit 1 on any failure)",
                       description="Run a fixed set of small seeded CPU cases (dims, dtypes, reductions, "
                                   "weights, ignore_index, label smoothing, probability targets, K-dim, "
                                   "bad input) through crossent and torch.nn.functional, and print the "
                                   "largest value and input-gradient differences, or the exception types "
                                   "where both must raise. Exit 1 if any case fails. " + _OWN_KERNELS)
    c.set_defaults(func=check)
    b = sub.add_parser("bench", help="CPU benchmark: crossent vs torch eager vs torch.compile",
                       description="Time forward+backward of crossent, torch eager and torch.compile on CPU, "
                                   "each (provider, case) in a fresh process (--small: one process, "
                                   "interleaved), and print times, ratios and the extra peak memory (RSS) "
                                   "against the logits' size. Without --quick, --cases or --small it runs the "
                                   "six default cases (several minutes); --seconds defaults to 1 with --quick, "
                                   "else 4.")
    # the benchmark's options are defined once, in _bench; importing it is cheap (stdlib only)
    from . import _bench as bench_mod
    bench_mod.add_arguments(b)
    b.set_defaults(func=_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if not getattr(args, "func", None):
        p.print_help()
        return 2
    try:
        return args.func(args)
    except InputError as e:
        print(f"crossent {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:   # `crossent check | head`: the reader left; no traceback
        sys.stdout = open(os.devnull, "w")   # Python's flush at exit would raise again
        return 0


if __name__ == "__main__":
    sys.exit(main())
