"""One side of a fuzz case: the call (crossent or torch), its gradients under the case's
grad mode, warnings and exceptions, as a dict ``run`` returns for tests/_fuzz.py to judge."""
from __future__ import annotations

import contextlib
import os
import sys
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _fuzz_cases import materialize  # noqa: E402
from _fuzz_rules import rescaled_under_compile  # noqa: E402
from _fuzz_torch import flat_batch, torch_ce, torch_linear, torch_log_probs  # noqa: E402

import crossent  # noqa: E402

FUNC_MODES = ("func_grad", "vmap", "jvp")  # torch.func transforms of the input


# ---------------------------------------------------------------------------
# The call of a case, for one side
# ---------------------------------------------------------------------------
def _loss_args(kw):
    """(size_average, reduce, reduction) from the case's kwargs."""
    sa, rd = kw.get("legacy") or (None, None)
    return sa, rd, kw["reduction"]


def _call(s, ours: bool, a: dict, kw: dict):
    """The function call of case ``s`` on views ``a`` (name -> tensor)."""
    fn = s["fn"]
    if fn == "log_probs":
        return _log_probs_call(s, ours, a, kw)
    x, t, w = a["input"], a.get("target"), a.get("weight")
    if fn in ("softmax", "log_softmax") or s.get("module") in ("Softmax", "LogSoftmax"):
        log = fn == "log_softmax" or s.get("module") == "LogSoftmax"
        extra = {"dtype": kw["dtype"]} if "dtype" in kw else {}
        if fn == "module":
            m = getattr(crossent.nn if ours else torch.nn, s["module"])(kw["dim"])
            return m(x)
        f = (crossent.log_softmax if log else crossent.softmax) if ours else (F.log_softmax if log else F.softmax)
        return f(x) if kw["dim"] is None and not extra else f(x, kw["dim"], **extra)
    ii, ls = kw["ignore_index"], kw.get("label_smoothing", 0.0)
    sa, rd, red = _loss_args(kw)
    extras = {k: kw[k] for k in ("z_loss", "softcap") if k in kw}
    own = {"inplace_backward": True} if ours and kw.get("inplace_backward") else {}  # torch's side: no such option
    if fn == "module":
        mod = crossent.nn if ours else torch.nn
        if s["module"] == "LinearCrossEntropyLoss":
            W, b = a["linear_weight"], a.get("linear_bias")
            mine = {}   # torch's module has no z_loss, softcap or crossent options
            if ours:
                mine = {**extras, **({"options": crossent.LinearCrossEntropyOptions(**s["options"])}
                                     if "options" in s else {})}
            # torch's module is built either way: its constructor's checks, warnings and random init
            m = mod.LinearCrossEntropyLoss(W.shape[1], W.shape[0], bias=b is not None, reduction=red, weight=w,
                                           ignore_index=ii, label_smoothing=ls, **mine)
            if not ours and extras:  # crossent's z_loss / softcap: torch's ops composed
                return torch_linear(x, W, t, linear_bias=b, weight=w, reduction=red, ignore_index=ii,
                                    label_smoothing=ls, **extras)
            params = {"linear.weight": W, **({"linear.bias": b} if b is not None else {})}
            return torch.func.functional_call(m, params, (x, t))
        if s["module"] == "NLLLoss":
            return mod.NLLLoss(w, sa, ii, rd, red)(x, t)
        if not ours and extras:
            return torch_ce(x, t, w, sa, ii, rd, red, ls, **extras)
        return mod.CrossEntropyLoss(w, sa, ii, rd, red, ls, **extras)(x, t)
    if fn == "nll_loss":
        return (crossent.nll_loss if ours else F.nll_loss)(x, t, w, sa, ii, rd, red)
    if fn == "cross_entropy":
        if ours:
            return crossent.cross_entropy(x, t, w, sa, ii, rd, red, ls, **extras, **own)
        return torch_ce(x, t, w, sa, ii, rd, red, ls, **extras)
    if fn == "stats":
        if ours:
            return tuple(crossent.cross_entropy_with_stats(x, t, w, ii, red, ls, **extras, **own))
        return torch_ce(x, t, w, None, ii, None, red, ls, stats=True, **extras)
    if fn == "linear":
        own = {**extras, **({"shift": True} if s.get("shift") else {})}
        if not ours:
            return torch_linear(x, a["linear_weight"], t, linear_bias=a.get("linear_bias"), weight=w,
                                reduction=red, ignore_index=ii, label_smoothing=ls, stats=s.get("with_stats", False),
                                **own)
        # spec "options": crossent's own (policies, chunks, small budgets); torch has none
        opts = crossent.LinearCrossEntropyOptions(**s["options"]) if "options" in s else None
        f = crossent.linear_cross_entropy_with_stats if s.get("with_stats") else crossent.linear_cross_entropy
        out = f(x, a["linear_weight"], t, linear_bias=a.get("linear_bias"), weight=w, reduction=red,
                ignore_index=ii, label_smoothing=ls, options=opts, **own)
        return tuple(out) if s.get("with_stats") else out
    # vocab_parallel, one rank holding every class: equal to the plain functions
    from crossent import distributed as D
    if s.get("linear"):
        W, b = a["linear_weight"], a.get("linear_bias")
        if ours:
            return D.vocab_parallel_linear_cross_entropy(x, W, t, linear_bias_shard=b, weight=w, ignore_index=ii,
                                                         reduction=red, label_smoothing=ls, **extras)
        # its arguments are cross_entropy's: torch's cross_entropy of the logits
        return flat_batch(x, t, lambda h2, t2: torch_ce(F.linear(h2, W, b), t2, w, None, ii, None, red, ls,
                                                         **extras), red)
    if ours:
        return D.vocab_parallel_cross_entropy(x, t, weight=w, ignore_index=ii, reduction=red,
                                              label_smoothing=ls, **extras)
    return torch_ce(x, t, w, None, ii, None, red, ls, **extras)


def _log_probs_call(s, ours: bool, a: dict, kw: dict) -> tuple:
    """crossent.log_probs and kin (spec "linear", "vp": vocab-parallel on one
    rank), or torch's composition; (log_probs, entropy) or (log_probs,)."""
    x, t, W, b = a["input"], a["target"], a.get("linear_weight"), a.get("linear_bias")
    opts = {k: kw[k] for k in ("ignore_index", "temperature", "entropy")}
    if not ours:
        return torch_log_probs(x, t, W, b, **opts, reciprocal=s.get("reciprocal", False))
    from crossent import distributed as D
    if W is None:
        out = (D.vocab_parallel_log_probs if s["vp"] else crossent.log_probs)(x, t, **opts)
    elif s["vp"]:
        out = D.vocab_parallel_linear_log_probs(x, W, t, linear_bias_shard=b, **opts)
    else:
        out = crossent.linear_log_probs(x, W, t, linear_bias=b, **opts)
    return tuple(o for o in out if o is not None)


def _compiled_call(s, a: dict, kw: dict):
    """Grad mode "compile": crossent's call of case ``s`` under torch.compile,
    graph breaks allowed (AOT autograd's traced forward and backward, without
    code generation; spec "compile_backend" may name inductor)."""
    names = list(a)

    def f(*tensors):
        return _call(s, True, dict(zip(names, tensors)), kw)
    torch._dynamo.reset()
    backend = s.get("compile_backend", "aot_eager")
    return torch.compile(f, backend=backend, fullgraph=False, dynamic=False)(*a.values())


def _grad_names(s, leaves) -> list[str]:
    names = ["input", "linear_weight", "linear_bias"]
    if s.get("grad_target"):
        names += ["target", "weight"]
    return [n for n in names if n in leaves and leaves[n].is_floating_point()]


def _upstream(s, out: torch.Tensor, i: int = 0) -> torch.Tensor:
    """The upstream gradient of output ``i``."""
    g = torch.Generator().manual_seed(s["seed"] + 1 + 100 * i)
    u = torch.randn(out.shape, generator=g, dtype=torch.float64).to(getattr(torch, s["dtype"]))
    if u.numel() and s["upstream"] != "randn":
        u.view(-1)[0] = float(s["upstream"])
    return u.to(out.dtype)


def _in_library(filename: str) -> bool:
    parts = filename.replace("\\", "/").split("/")
    return "torch" in parts or "crossent" in parts


def run(s: dict, side: str, fixes: frozenset = frozenset()) -> dict:
    """Outcome of case ``s`` on one side: error, outputs, gradients, warnings.
    ``fixes``: the workarounds torch's side runs with (TORCH_FAILURES)."""
    m = materialize(s, "ref" if side == "logits" else side)
    leaves, views, kw = m["leaves"], m["views"], m["kw"]
    t = leaves.get("target")
    if "long_targets" in fixes and t is not None and t.dtype in (torch.int32, torch.uint8):
        leaves["target"] = t.long()
    if "contiguous_input" in fixes:
        views["input"] = lambda x, v=views["input"]: v(x).contiguous()
    if "scalar_target" in fixes:
        views["target"] = lambda x, v=views["target"]: v(x).reshape(())
    if "flat_weight" in fixes and "weight" in views:
        views["weight"] = lambda w, v=views["weight"]: v(w).reshape(-1)
    # rules 19 and 21: the terms' magnitudes (nll_loss's terms -w x take the input's sign too)
    nll = s["fn"] == "nll_loss" or s.get("module") == "NLLLoss"
    for n in ("target", "weight", *(("input",) if nll else ())) if "abs_terms" in fixes else ():
        if n in leaves and leaves[n].is_floating_point():
            leaves[n] = leaves[n].abs()
    mode = s["grad"] if side != "logits" else "no_grad"
    if mode == "compile" and side != "ours":
        mode = "backward"  # crossent compiled against eager torch
    names = [] if mode in ("no_input_grad", *FUNC_MODES) else _grad_names(s, leaves)
    for n in names:
        leaves[n].requires_grad_(True)
    # how many elements of its view each leaf element feeds (expanded layouts: > 1):
    # its gradient sums that many terms, each rounded
    terms = {f"grad of {n}": max(1, views[n](leaves[n]).numel() // max(leaves[n].numel(), 1)) for n in names}
    ctx = {"no_grad": torch.no_grad, "inference": torch.inference_mode,
           "autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}.get(mode, contextlib.nullcontext)
    res = {"error": None, "warnings": [], "terms": terms}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if mode in FUNC_MODES:
                out = _func(s, side == "ours", leaves, views, kw, res)
            else:
                with ctx():
                    a = {n: views[n](leaf) for n, leaf in leaves.items()}
                    out = _rounded_logits_call(s, a, kw) if side == "logits" else \
                        _compiled_call(s, a, kw) if mode == "compile" else _call(s, side == "ours", a, kw)
            outs = out if isinstance(out, tuple) else (out,)
            res["outs"] = [o.detach() for o in outs]
            res["requires_grad"] = [o.requires_grad for o in outs]
            if mode in ("backward", "double", "autocast", "compile") and outs[0].requires_grad:
                # log_probs: an upstream for each output (log-probs and entropy)
                _backward(s, res, outs if s["fn"] == "log_probs" else outs[:1],
                          [(n, leaves[n], views[n]) for n in names], mode == "double",
                          rescaled=side != "ours" and s["upstream"] != "randn" and
                          (s.get("inplace_backward") or s.get("rescaled") or
                           (s["grad"] == "compile" and rescaled_under_compile(s))))
        except Exception as e:  # noqa: BLE001 - whatever torch raises, crossent must raise too
            res["error"] = ("backward" if "outs" in res else "forward", type(e).__name__, str(e))
        finally:
            if mode == "compile":
                torch._dynamo.reset()  # no compiled code or guards carried into the next case
    res["warnings"] = sorted({(w.category.__name__, str(w.message), _in_library(w.filename))
                              for w in caught if issubclass(w.category, (UserWarning, FutureWarning))})
    return res


def _func(s, ours: bool, leaves, views, kw, res):
    """The torch.func transform of the case's first output w.r.t. the input:
    the output (vmap: over a batch of two inputs; jvp: and its tangent), and
    for func_grad the gradient of sum(output * upstream) into res."""
    x = leaves["input"]

    def f(xi):
        out = _call(s, ours, {n: views[n](xi if n == "input" else leaf) for n, leaf in leaves.items()}, kw)
        return out[0] if isinstance(out, tuple) else out

    mode = s["grad"]
    if mode == "vmap":
        return torch.func.vmap(f)(torch.stack([x, -x]))
    if mode == "jvp":
        return torch.func.jvp(f, (x,), (_tangent(s, x),))
    out = f(x)
    u = _upstream(s, out)
    res["grads"] = {"input": torch.func.grad(lambda xi: (f(xi) * u).sum())(x)}
    return out


def _tangent(s: dict, x: torch.Tensor) -> torch.Tensor:
    """The jvp mode's tangent of input leaf ``x``."""
    g = torch.Generator().manual_seed(s["seed"] + 3)
    return torch.randn(x.shape, generator=g, dtype=torch.float64).to(getattr(torch, s["dtype"])).to(x.dtype)


def _backward(s, res, outs, named, double: bool, rescaled: bool = False) -> None:
    """Gradients of the sum of outs[i] * upstream i w.r.t. the (name, leaf,
    view) ``named``; ``rescaled`` (rule 14): those of a unit upstream, times the
    (0-d) upstream where the leaf feeds its view (crossent scales the view's
    gradient: a strided view's gaps stay 0)."""
    us = [_upstream(s, o, i) for i, o in enumerate(outs)]
    u = us[0]
    grads = torch.autograd.grad(outs, [leaf for _, leaf, _ in named], [torch.ones_like(u)] if rescaled else us,
                                allow_unused=True, create_graph=double)
    if rescaled:
        grads = [None if g is None else torch.where(_fed(view, leaf), g * u, g)
                 for g, (_, leaf, view) in zip(grads, named)]
    res["grads"] = {n: None if g is None else g.detach() for (n, _, _), g in zip(named, grads)}
    if double:
        g, x = grads[0], named[0][1]
        res["grad_requires_grad"] = g is not None and g.requires_grad
        if res["grad_requires_grad"]:
            v = torch.randn(g.shape, generator=torch.Generator().manual_seed(s["seed"] + 2),
                            dtype=torch.float64).to(getattr(torch, s["dtype"])).to(g.dtype)
            (g2,) = torch.autograd.grad(g, x, v, allow_unused=True)
            res["grad2"] = torch.zeros_like(x) if g2 is None else g2.detach()


def _fed(view, leaf: torch.Tensor) -> torch.Tensor:
    """The elements of ``leaf`` that ``view`` reads."""
    one = torch.ones_like(leaf, requires_grad=True)
    (c,) = torch.autograd.grad(view(one).sum(), one, allow_unused=True)
    return torch.zeros_like(leaf, dtype=torch.bool) if c is None else c != 0


def _rounded_logits(s: dict, a: dict) -> dict:
    """The float64 call arguments ``a`` of a linear loss, with the logits torch
    computes in the case's dtype (upcast) as hidden states and an identity
    projection: the exact loss of torch's rounded logits."""
    m = materialize(s, "torch")
    h, W = (m["views"][n](m["leaves"][n]) for n in ("input", "linear_weight"))
    b = m["views"]["linear_bias"](m["leaves"]["linear_bias"]) if "linear_bias" in m["leaves"] else None
    # a K-dim weight (C, d1..dk, D): torch's logits are those of its rows, flattened
    z = F.linear(h, W.flatten(0, -2), None if b is None else b.flatten()).double()
    rest = {n: v for n, v in a.items() if n != "linear_bias"}
    eye = torch.eye(z.shape[-1], dtype=torch.float64).reshape(*W.shape[:-1], z.shape[-1])
    return {**rest, "input": z, "linear_weight": eye}


def _rounded_logits_call(s: dict, a: dict, kw: dict):
    """The call of case ``s`` on _rounded_logits; under jvp with torch's
    rounded logit tangent too: its forward AD of the linear layer is the
    hidden states' tangent times W, rounded in the case's dtype."""
    a = _rounded_logits(s, a)
    if s["grad"] != "jvp":
        return _call(s, False, a, kw)
    m = materialize(s, "torch")
    W = m["views"]["linear_weight"](m["leaves"]["linear_weight"])
    dz = F.linear(m["views"]["input"](_tangent(s, m["leaves"]["input"])), W.flatten(0, -2)).double()

    def f(z):
        out = _call(s, False, {**a, "input": z}, kw)
        return out[0] if isinstance(out, tuple) else out
    return torch.func.jvp(f, (a["input"],), (dz,))
