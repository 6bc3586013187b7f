"""Run one fuzz case on crossent and on torch, and judge the difference.

``check(spec)`` returns None when crossent matches torch 2.13, else a
message.  Matching means: the same exception type and message when torch
raises; otherwise the same output types, dtypes, shapes and requires_grad,
the same warnings (text, and whether they are attributed to the library or to
the caller), and values and gradients within the project's tolerance rule
(tests/_tol.py) against a float64 run of torch.

The README's deliberate differences ("Deliberate differences from PyTorch",
numbered there) are encoded here, each as a narrow rule.  Where torch 2.13
raises one of these errors, torch's side reruns the same case with one
workaround, and that result is what crossent must match:
  1. int32 class targets rejected for their dtype: run as int64 (README 1;
     any other error torch raises for them stands); under vmap, which accepts
     them but wraps ignore_index in int32, run as int64 from the start.
  2. uint8 targets where torch fails internally (its gather's index dtype
     check; the backward of an empty K-dim loss) or prints an out-of-range
     target as a raw byte (UnicodeDecodeError for >= 128, "Target A is out of
     bounds." for 65): run as int64 (README 4, 8).
  3. the backward rejecting a channels_last input of nll_loss ("grad_input
     must be contiguous"), or a (1,)-shaped target of a (C,) input ("size
     mismatch"; with label smoothing already the forward): run on the
     contiguous input, or with a 0-d target (README 8).
  4. a (1, C) class weight with label smoothing on 3+-D input, which torch's
     smoothing term fails to reshape or gather from: run with the (C,) weight
     (README 8).
And for values:
  5. where torch's same-dtype result is not finite but the float64 one is
     (or the reverse), torch's own error there is unbounded; ours must equal
     torch's or be within a few ulps (of rule 11's dtype where the values went
     through a narrower one) of the float64 value, plus four times
     torch's known own error (rule 10) (README 2: fp16/bf16 accumulate in fp32
     and so stay finite where torch overflows).
  6. linear_cross_entropy's leading batch dims: torch runs the flattened call
     (a target that does not fit them: crossent's own ValueError message)
     (README 7).
  8. linear_cross_entropy with non-finite hidden states: where torch's
     gradient is NaN (an ignored or out-of-range row's 0 * exp(NaN)), crossent's
     may be finite, since it never computes those rows' logits (README 7).
  7. the vocab-parallel losses are not differentiable with respect to
     probability targets or class weights: crossent raises its own
     NotImplementedError there (README, crossent.distributed).
  9. a uint8 class target with label smoothing and an ignore_index outside
     0..255 that some target equals after wrapping to uint8, where torch
     computes: its smoothing term compares in uint8 and drops that target;
     torch's side reruns with int64 targets, which compare exactly (README 11).
  10. a linear loss of fp16/bf16 operands: torch rounds its logits to that
     dtype before the loss, as crossent does; torch's own error in the loss is
     at least that of the float64 loss of its rounded logits (its later
     roundings can cancel that one by luck in a single draw); also the loss
     under jvp and torch.func.grad, the same forward.
  11. a linear loss under autocast(bf16), or softmax with a narrower dtype
     argument: its values are rounded to that dtype, so the floor's few ulps
     are that dtype's, as for operands of it.
  12. a second-order gradient is formed from terms of the first-order
     gradient's size, which cancel where the softmax saturates: the floor's
     few ulps are at the larger of the two magnitudes.  (Seed 1782320472:
     fp64, p_max = 1 - 2.8e-15, a result of 6e-13; against a 60-digit value
     torch's error is 2.7e-14 and crossent's 2.0e-14, but the float32 run
     that estimates torch's own fp64 error loses every digit there, so its
     scaled error, 9e-22, said nothing.)
  13. a linear loss whose hidden states crossent splits into row chunks
     (spec "tiles"): the matmul rounds each logit by how many rows one call
     gets (BLAS kernels sum the D products in another order for 1, 2 or 5
     rows), an ulp of the logits that large offsets make the loss's and
     gradients' error (seed 237521495: fp64, logits ~3e4, crossent's 2-row
     chunks 4.7e-12 off torch's one call; in fp32 against float64 over 40
     draws crossent's mean error 1.2x torch's).  torch's own error is at
     least that of its same ops with the logits computed one row per call.
  14. cross_entropy(inplace_backward=True) with a non-finite upstream: the
     logits are gone, so crossent rescales its gradient buffer (that of a
     unit upstream) where torch scales term by term (its inf/NaN pattern);
     torch's side takes a unit upstream and multiplies (README).
Everything else, messages included, must be torch's.  Under torch.func
transforms (grad, vmap, jvp) a case torch cannot transform falls back to a
plain backward, and where torch's batching rules skip an eager check,
crossent may raise eager torch's error.

Reproduce a case from its printed line:
    PYTHONPATH=src TRITON_INTERPRET=1 python tests/_fuzz.py '<spec json>'
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import sys
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _tol  # noqa: E402
from _fuzz_cases import class_dim, materialize  # noqa: E402

import crossent  # noqa: E402

FUNC_MODES = ("func_grad", "vmap", "jvp")  # torch.func transforms of the input
# torch's error -> the workaround its side reruns with (rules 1-4 above)
# (matched against "forward|backward ExceptionType: message")
TORCH_FAILURES = [
    (re.compile(r"^forward RuntimeError: expected target dtype to be Long or Byte, but got Int$"), "long_targets"),
    (re.compile(r"^forward RuntimeError: gather\(\): Expected dtype int32/int64 for index$"), "long_targets"),
    (re.compile(r"^forward UnicodeDecodeError: 'utf-8' codec can't decode byte"), "long_targets"),
    (re.compile(r"^forward IndexError: Target (?!-?\d+ is out of bounds\.$)"), "long_targets"),  # the raw byte
    (re.compile(r"^backward RuntimeError: expected scalar type Long but found Byte$"), "long_targets"),
    (re.compile(r"^backward RuntimeError: grad_input must be contiguous$"), "contiguous_input"),
    (re.compile(r"^backward RuntimeError: size mismatch \(got input: \[\d+\], target: \[1\]\)$"), "scalar_target"),
    (re.compile(r"^forward RuntimeError: output with shape \[\] doesn't match the broadcast shape \[1\]$"),
     "scalar_target"),  # the same target with label smoothing
    (re.compile(r"^forward RuntimeError: shape '\[1(, 1)*\]' is invalid for input of size \d+$"), "flat_weight"),
    (re.compile(r"^forward RuntimeError: Index tensor must have the same number of dimensions as input tensor$"),
     "flat_weight"),
]


# ---------------------------------------------------------------------------
# torch's side: F's functions, composed where crossent has extras
# ---------------------------------------------------------------------------
def torch_ce(x, t, w=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean",
             label_smoothing=0.0, z_loss=0.0, softcap=None, stats=False):
    """F.cross_entropy on softcap*tanh(x/softcap), plus z_loss * lse**2 over
    the non-ignored positions reduced like the loss (crossent's definition)."""
    xc = softcap * torch.tanh(x / softcap) if softcap else x
    loss = F.cross_entropy(xc, t, w, size_average, ignore_index, reduce, reduction, label_smoothing)
    if not (z_loss or stats):
        return loss
    cd = class_dim(x.dim())
    # fp64 where the loss is (fp64 input, or fp64 probability targets / weights): the docstring's dtype
    xl = xc.to(torch.float64 if torch.float64 in (x.dtype, loss.dtype) else torch.float32)
    # shifted by the (constant) row max: logsumexp's backward, exp(x - lse), loses
    # |x| * eps of relative precision at large offsets, which in float64 (the
    # reference) exceeds crossent's own error; non-finite rows unshifted
    m = xl.detach().amax(cd, keepdim=True) if xl.numel() else xl.detach().sum(cd, keepdim=True)
    m = torch.where(m.isfinite(), m, 0.0)
    lse = torch.logsumexp(xl - m, cd) + m.squeeze(cd)
    prob = t.shape == x.shape
    valid = torch.ones_like(lse, dtype=torch.bool) if prob else (t.long() != ignore_index).reshape(lse.shape)
    # zeros when z_loss == 0 (crossent's docstring), even where lse is not finite
    # z_loss as a tensor of lse's dtype: torch 2.13's forward AD gives a 0-d
    # fp32 tensor times a Python float an fp64 tangent (1-D input's 0-d lse)
    z = torch.where(valid, lse * lse * lse.new_tensor(z_loss), 0.0) if z_loss else torch.zeros_like(lse)
    if size_average is not None or reduce is not None:
        reduction = "none" if reduce is False else ("sum" if size_average is False else "mean")
    zr = z if reduction == "none" else z.sum()
    total = loss + zr.to(loss.dtype) if z_loss else loss
    if reduction in ("mean", "elementwise_mean"):
        if prob or w is None:
            denom = valid.sum()
        else:
            safe = torch.where(valid, t.long().reshape(lse.shape), 0).clamp(0, max(w.numel() - 1, 0))
            wv = w.reshape(-1).to(lse.dtype)  # C == 0: no weight to gather (every row is ignored or NaN)
            denom = torch.where(valid, wv[safe] if wv.numel() else torch.zeros_like(lse), 0.0).sum()
            if label_smoothing > 0:  # torch's smoothed mean is NaN at W == 0 (nll's 0/0): so is the total
                denom = torch.where(denom == 0, float("nan"), denom)
        if z_loss:  # one denominator for both terms: (sum of losses + sum of z terms) / W
            loss_sum = F.cross_entropy(xc, t, w, None, ignore_index, None, "sum", label_smoothing)
            total = ((loss_sum.to(lse.dtype) + zr) / denom).to(loss.dtype)
        zr = zr / denom if z_loss else zr  # zeros when z_loss == 0, whatever the denominator
    return (total, lse.detach(), zr.detach().to(loss.dtype)) if stats else total


def _flat_batch(h, t, loss_fn, reduction):
    """loss_fn on (N, D) hidden states and their targets, from (*B, D) ones
    (rule 6); a 'none' loss gets its (*B) shape back."""
    if h.dim() <= 2:
        return loss_fn(h, t)
    prob = t.dim() == h.dim()
    # flatten, not reshape(-1, D): that is ambiguous for D == 0 (in_features 0)
    out = loss_fn(h.flatten(0, -2), t.flatten(0, -2) if prob else t.reshape(-1))
    return out.reshape(h.shape[:-1]) if reduction == "none" else out


def torch_linear(h, W, t, linear_bias=None, weight=None, reduction="mean", ignore_index=None,
                 label_smoothing=0.0):
    """F.linear_cross_entropy, batch dims flattened."""
    return _flat_batch(h, t, lambda h2, t2: F.linear_cross_entropy(
        h2, W, t2, linear_bias=linear_bias, weight=weight, reduction=reduction, ignore_index=ignore_index,
        label_smoothing=label_smoothing), reduction)


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
            m = mod.LinearCrossEntropyLoss(W.shape[1], W.shape[0], bias=b is not None, reduction=red, weight=w,
                                           ignore_index=ii, label_smoothing=ls)
            params = {"linear.weight": W, **({"linear.bias": b} if b is not None else {})}
            return torch.func.functional_call(m, params, (x, t))
        if s["module"] == "NLLLoss":
            return mod.NLLLoss(w, sa, ii, rd, red)(x, t)
        return mod.CrossEntropyLoss(w, sa, ii, rd, red, ls)(x, t)
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
        f = crossent.linear_cross_entropy if ours else torch_linear
        return f(x, a["linear_weight"], t, linear_bias=a.get("linear_bias"), weight=w, reduction=red,
                 ignore_index=ii, label_smoothing=ls)
    # vocab_parallel, one rank holding every class: equal to the plain functions
    from crossent import distributed as D
    if s.get("linear"):
        W, b = a["linear_weight"], a.get("linear_bias")
        if ours:
            return D.vocab_parallel_linear_cross_entropy(x, W, t, linear_bias_shard=b, weight=w, ignore_index=ii,
                                                         reduction=red, label_smoothing=ls, **extras)
        # its arguments are cross_entropy's: torch's cross_entropy of the logits
        return _flat_batch(x, t, lambda h2, t2: torch_ce(F.linear(h2, W, b), t2, w, None, ii, None, red, ls,
                                                         **extras), red)
    if ours:
        return D.vocab_parallel_cross_entropy(x, t, weight=w, ignore_index=ii, reduction=red,
                                              label_smoothing=ls, **extras)
    return torch_ce(x, t, w, None, ii, None, red, ls, **extras)


def _grad_names(s, leaves) -> list[str]:
    names = ["input", "linear_weight", "linear_bias"]
    if s.get("grad_target"):
        names += ["target", "weight"]
    return [n for n in names if n in leaves and leaves[n].is_floating_point()]


def _upstream(s, out: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(s["seed"] + 1)
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
    mode = s["grad"] if side != "logits" else "no_grad"
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
                    out = _rounded_logits_call(s, a, kw) if side == "logits" else _call(s, side == "ours", a, kw)
            outs = out if isinstance(out, tuple) else (out,)
            res["outs"] = [o.detach() for o in outs]
            res["requires_grad"] = [o.requires_grad for o in outs]
            if mode in ("backward", "double", "autocast") and outs[0].requires_grad:
                _backward(s, res, outs[0], [(n, leaves[n]) for n in names], mode == "double",
                          rescaled=side != "ours" and s.get("inplace_backward") and s["upstream"] != "randn")
        except Exception as e:  # noqa: BLE001 - whatever torch raises, crossent must raise too
            res["error"] = ("backward" if "outs" in res else "forward", type(e).__name__, str(e))
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


def _backward(s, res, out, named, double: bool, rescaled: bool = False) -> None:
    """Gradients of sum(out * upstream); ``rescaled`` (rule 14): those of a
    unit upstream, times the (0-d) upstream."""
    u = _upstream(s, out)
    grads = torch.autograd.grad(out, [leaf for _, leaf in named], torch.ones_like(u) if rescaled else u,
                                allow_unused=True, create_graph=double)
    if rescaled:
        grads = [None if g is None else g * u for g in grads]
    res["grads"] = {n: None if g is None else g.detach() for (n, _), g in zip(named, grads)}
    if double:
        g, x = grads[0], named[0][1]
        res["grad_requires_grad"] = g is not None and g.requires_grad
        if res["grad_requires_grad"]:
            v = torch.randn(g.shape, generator=torch.Generator().manual_seed(s["seed"] + 2),
                            dtype=torch.float64).to(getattr(torch, s["dtype"])).to(g.dtype)
            (g2,) = torch.autograd.grad(g, x, v, allow_unused=True)
            res["grad2"] = torch.zeros_like(x) if g2 is None else g2.detach()


# ---------------------------------------------------------------------------
# Judging
# ---------------------------------------------------------------------------
def _first_order(k: str, ref: dict) -> torch.Tensor | None:
    """Rule 12: the first-order reference gradient a second-order one is formed from."""
    return ref.get("grad of input") if k == "second-order grad of input" else None


def _close(ours: torch.Tensor, theirs: torch.Tensor, ref: torch.Tensor, what: str,
           own_error: float = 0.0, terms: int = 1, rounded_to: torch.dtype | None = None,
           formed_from: torch.Tensor | None = None) -> str | None:
    """tests/_tol.py's rule, except at elements where torch's own result and
    the float64 one disagree on being finite (rule 5).  ``own_error``: an
    estimate of torch's error where its result is float64 (then it is its own
    reference and measures 0).  ``terms``: how many rounded terms each element
    sums (the gradient of an expanded leaf), which scales the floor's few ulps.
    ``rounded_to``: the narrower dtype the values went through (autocast), whose
    ulps the floor counts.  ``formed_from``: the reference of the terms the
    result is formed from (rule 12), whose magnitude the floor's ulps may take."""
    if ours.dtype != theirs.dtype or ours.shape != theirs.shape:
        return f"{what}: {ours.dtype}{tuple(ours.shape)} vs torch {theirs.dtype}{tuple(theirs.shape)}"
    if not theirs.dtype.is_floating_point:  # integer softmax of an empty tensor, say
        return None if torch.equal(ours, theirs) else f"{what}: ours {ours} vs torch {theirs}"
    o, t, r = ours.double(), theirs.double(), ref.double()
    nan_o, nan_t, nan_r = torch.isnan(o), torch.isnan(t), torch.isnan(r)
    off = ~((torch.isfinite(t) & torch.isfinite(r)) | (t == r) | (nan_t & nan_r))
    if off.any():
        # the ulps of the narrower dtype the values went through (rule 11: under autocast
        # a linear loss's logits are bf16, so its fp32 result is that far from float64)
        eps = torch.finfo(rounded_to or theirs.dtype).eps
        # within a few ulps of float64, or of torch's own error where it is known (rule 10: the
        # loss of its rounded logits, which crossent shares)
        ok = (o == t) | (nan_o & (nan_t | nan_r)) | (o == r.to(theirs.dtype).double()) | \
            ((o - r).abs() <= 8 * eps * r.abs() + _tol.FACTOR * own_error)
        bad = off & ~ok
        if bad.any():
            return f"{what}: where torch and float64 disagree on finiteness: ours {o[bad][:4].tolist()}, " \
                f"torch {t[bad][:4].tolist()}, float64 {r[bad][:4].tolist()}"
        o, t, r, nan_o, nan_r = o[~off], t[~off], r[~off], nan_o[~off], nan_r[~off]
    if not torch.equal(nan_o, nan_r):
        return f"{what}: NaN pattern differs"
    e_ours, e_theirs = _tol._err(o, r), max(_tol._err(t, r), own_error)
    at = r if formed_from is None else torch.cat([r.flatten(), formed_from.double().flatten()])
    bound = _tol.FACTOR * e_theirs + terms * _tol.floor(at, rounded_to or theirs.dtype)
    if e_ours > bound:
        return f"{what}: error {e_ours:.3g} > {bound:.3g} (torch's own error {e_theirs:.3g})"
    return None


def _tensors(res: dict) -> dict:
    """name -> tensor for every output and gradient of an outcome."""
    named = {f"output {i}": o for i, o in enumerate(res["outs"])}
    named.update({f"grad of {n}": g for n, g in res.get("grads", {}).items()})
    if "grad2" in res:
        named["second-order grad of input"] = res["grad2"]
    return named


def _fp64_own_errors(s: dict, theirs: dict, fixes) -> dict:
    """Where torch's result is float64 it is its own reference.  Its error is
    estimated as that of the same case in float32 (against float64), scaled by
    the ratio of the two unit roundoffs: same algorithm, same conditioning.
    One draw of rounding errors can cancel by luck (an fp64 sum of 400 rows:
    torch's true error 5x its one-draw estimate), so the estimate is the
    larger of two draws of the case's values."""
    if not any(t.dtype == torch.float64 for t in _tensors(theirs).values() if t is not None):
        return {}
    s32 = {**s, "dtype": "float32"}
    for k in ("target_dtype", "dtype_arg"):
        if s.get(k) == "float64":
            s32[k] = "float32"
    scale = torch.finfo(torch.float64).eps / torch.finfo(torch.float32).eps
    est = {}
    for seed in (s["seed"], s["seed"] + 7919):
        t32, r32 = run({**s32, "seed": seed}, "torch", fixes), run({**s32, "seed": seed}, "ref", fixes)
        if t32["error"] or r32["error"]:
            continue
        for k, t in _tensors(t32).items():
            r = _tensors(r32).get(k)
            if t is not None and r is not None and t.shape == r.shape:
                # over the elements finite in both: where fp32 overflows (or an inf
                # upstream meets a 0) the fp64 run need not, and its error there
                # says nothing of the rounding of the finite ones
                both = torch.isfinite(t) & torch.isfinite(r.to(t.dtype))
                est[k] = max(est.get(k, 0.0), _tol._err(t[both], r[both]) * scale)
    return est


def _linear_family(s: dict) -> bool:
    return s["fn"] == "linear" or s.get("module") == "LinearCrossEntropyLoss" or bool(s.get("linear"))


def _rounded_logits(s: dict, a: dict) -> dict:
    """The float64 call arguments ``a`` of a linear loss, with the logits torch
    computes in the case's dtype (upcast) as hidden states and an identity
    projection: the exact loss of torch's rounded logits."""
    m = materialize(s, "torch")
    h, W = (m["views"][n](m["leaves"][n]) for n in ("input", "linear_weight"))
    b = m["views"]["linear_bias"](m["leaves"]["linear_bias"]) if "linear_bias" in m["leaves"] else None
    z = F.linear(h, W, b).double()
    rest = {n: v for n, v in a.items() if n != "linear_bias"}
    return {**rest, "input": z, "linear_weight": torch.eye(W.shape[0], dtype=torch.float64)}


def _rounded_logits_call(s: dict, a: dict, kw: dict):
    """The call of case ``s`` on _rounded_logits; under jvp with torch's
    rounded logit tangent too: its forward AD of the linear layer is the
    hidden states' tangent times W, rounded in the case's dtype."""
    a = _rounded_logits(s, a)
    if s["grad"] != "jvp":
        return _call(s, False, a, kw)
    m = materialize(s, "torch")
    W = m["views"]["linear_weight"](m["leaves"]["linear_weight"])
    dz = F.linear(m["views"]["input"](_tangent(s, m["leaves"]["input"])), W).double()

    def f(z):
        out = _call(s, False, {**a, "input": z}, kw)
        return out[0] if isinstance(out, tuple) else out
    return torch.func.jvp(f, (a["input"],), (dz,))


def _logit_rounding_error(s: dict, ref: dict, fixes) -> dict:
    """A linear loss of fp16/bf16 operands: torch rounds its logits to that
    dtype before the loss, an error crossent shares (it computes the loss of
    the same rounded logits).  Torch's later roundings can cancel it by luck in
    one draw (seed 87616038, bf16 with fp32 targets: torch 0.0029, the loss of
    its rounded logits 0.0385; over 300 draws crossent's median error 0.022,
    torch's 0.026), so torch's own error in the loss is at least this one:
    the float64 loss of torch's rounded logits against the reference.
    Under jvp and torch.func.grad output 0 is that same loss (seed 785132279:
    jvp, crossent 5.05e-4 off, the loss of torch's rounded logits 5.04e-4,
    torch 3.4e-5), and jvp's output 1 the float64 tangent at those logits along
    torch's rounded logit tangent (seed 528118298: bf16, crossent 0.031 off,
    torch 3.7e-4; over 40 draws crossent's median error 0.0096, torch's
    0.015); vmap's stacks two inputs' losses, autocast has rule 11."""
    if not _linear_family(s) or s["dtype"] not in ("float16", "bfloat16") or \
            s["grad"] in ("vmap", "autocast"):
        return {}
    r = run(s, "logits", fixes)
    if r["error"]:  # a mutation torch's F.linear rejects
        return {}
    errs = {f"output {i}": _tol._err(o, ro) for i, (o, ro) in enumerate(zip(r["outs"], ref["outs"]))}
    return {k: e for k, e in errs.items() if e < float("inf")}


@contextlib.contextmanager
def _logits_row_by_row():
    """torch.nn.functional.linear one row per call, for torch's side (rule 13):
    F.linear_cross_entropy (no options) and torch_ce's compositions look it up
    in that module at call time."""
    linear = F.linear

    def rows(h, W, b=None):
        if h.dim() != 2 or h.shape[0] < 2:
            return linear(h, W, b)
        return torch.cat([linear(h[i:i + 1], W, b) for i in range(h.shape[0])])

    F.linear = rows
    try:
        yield
    finally:
        F.linear = linear


def _logit_blocking_error(s: dict, ref: dict, fixes) -> dict:
    """Rule 13: torch's error with its logits computed one row per call, per
    output and gradient (where crossent chunks the rows of a linear loss)."""
    if not (s.get("tiles") and _linear_family(s)):
        return {}
    with _logits_row_by_row():
        alt = run(s, "torch", fixes)
    if alt["error"]:
        return {}
    r_all = _tensors(ref)
    return {k: _tol._err(t, r_all[k]) for k, t in _tensors(alt).items()
            if t is not None and r_all.get(k) is not None and t.shape == r_all[k].shape}


def _rounded_to(s: dict, t: torch.Tensor) -> torch.dtype | None:
    """Rule 11: the narrower dtype that result ``t``'s values went through.
    Under autocast(bf16) a linear loss's matmuls run in bf16, so its fp32/fp16
    loss and gradients are bf16-rounded values (gradients rounded twice where
    crossent precomputes them for a unit upstream and rescales); softmax's
    dtype argument computes in that dtype, gradients too.  torch's one-draw
    error there can be a fraction of an ulp of it (seed 1228529905: 0.18 ulp),
    below what four times it allows."""
    if s["grad"] == "autocast" and _linear_family(s) and t.dtype in (torch.float32, torch.float16):
        return torch.bfloat16
    narrow = getattr(torch, s.get("dtype_arg") or s["dtype"])
    if s["fn"] in ("softmax", "log_softmax") and t.dtype.is_floating_point and \
            torch.finfo(narrow).eps > torch.finfo(t.dtype).eps:  # integer input: an empty integer result
        return narrow
    return None


def _batch_dims_shape_error(s: dict, ours: dict, theirs: dict) -> bool:
    """Rule 6 for errors: a target that does not fit hidden states with batch
    dims gets crossent's own message where torch's flattened call fails (its
    batch sizes differ, or a flattened class target has 2 dims), or computes
    on a target that fits neither (*B) nor (*B, C) (as many elements: none)."""
    if not (s["fn"] == "linear" and len(s["shape"]) == 3 and ours["error"] and
            ours["error"][:2] == ("forward", "ValueError") and ours["error"][2].startswith("Expected target of shape")):
        return False
    if theirs["error"]:
        return theirs["error"][0] == "forward"
    m = materialize(s, "torch")
    batch = list(s["shape"][:-1])
    return list(m["views"]["target"](m["leaves"]["target"]).shape) not in (batch, batch + [s["classes"]])


def _vocab_parallel_grad_limit(s: dict, ours: dict, theirs: dict) -> bool:
    """Rule 7: the documented NotImplementedError, only where torch computes."""
    return s["fn"] == "vocab_parallel" and not theirs["error"] and bool(ours["error"]) and \
        ours["error"][:2] == ("forward", "NotImplementedError") and \
        ours["error"][2].startswith("vocab-parallel cross-entropy is not differentiable with respect to")


def _linear_skipped_rows(s: dict, key: str) -> bool:
    """Rule 8 applies to this case's gradient ``key``."""
    linear = s["fn"] == "linear" or s.get("module") == "LinearCrossEntropyLoss"
    return linear and s.get("values") == "nonfinite" and key.startswith("grad")


_OUT_OF_BOUNDS = re.compile(r"^Target (-?\d+) is out of bounds\.$")


def _other_out_of_bounds_target(s: dict, ours: dict, theirs: dict) -> bool:
    """torch's CPU nll_loss checks rows inside parallel_for, so which of several
    out-of-range targets it names depends on its threads: ours may name
    another one (as long as it is out of range)."""
    if not (ours["error"] and theirs["error"]) or ours["error"][:2] != theirs["error"][:2]:
        return False
    mo, mt = _OUT_OF_BOUNDS.match(ours["error"][2]), _OUT_OF_BOUNDS.match(theirs["error"][2])
    if not (mo and mt):
        return False
    C = s["classes"] if "classes" in s else s["shape"][class_dim(len(s["shape"]))] if s["shape"] else 1
    return not 0 <= int(mo.group(1)) < C


def compare(s: dict, ours: dict, theirs: dict, ref: dict, own_errors: dict) -> str | None:
    if _batch_dims_shape_error(s, ours, theirs) or _vocab_parallel_grad_limit(s, ours, theirs) or \
            _other_out_of_bounds_target(s, ours, theirs):
        return None
    if ours["error"] != theirs["error"]:
        return f"error: ours {ours['error']} vs torch {theirs['error']}"
    if theirs["error"]:
        return None
    if ours["warnings"] != theirs["warnings"]:
        return f"warnings: ours {ours['warnings']} vs torch {theirs['warnings']}"
    if len(ours["outs"]) != len(theirs["outs"]):
        return f"{len(ours['outs'])} outputs vs torch {len(theirs['outs'])}"
    if ours["requires_grad"] != theirs["requires_grad"]:
        return f"requires_grad: ours {ours['requires_grad']} vs torch {theirs['requires_grad']}"
    if ours.get("grad_requires_grad") != theirs.get("grad_requires_grad"):
        return f"double backward: the gradient requires grad: ours {ours.get('grad_requires_grad')} " \
               f"vs torch {theirs.get('grad_requires_grad')}"
    t_all, o_all, r_all = _tensors(theirs), _tensors(ours), _tensors(ref)
    for k, t in t_all.items():
        o = o_all.get(k)
        if (o is None) != (t is None):
            return f"{k}: ours {'None' if o is None else 'a tensor'} vs torch {'None' if t is None else 'a tensor'}"
        if t is not None and _linear_skipped_rows(s, k):
            r = r_all[k]
            keep = torch.isnan(t) & torch.isfinite(o)  # rule 8
            t, r_all[k] = torch.where(keep, o, t), torch.where(keep, o.to(r.dtype), r)
        msg = t is not None and _close(o, t, r_all[k], k, own_errors.get(k, 0.0), theirs["terms"].get(k, 1),
                                       _rounded_to(s, t), _first_order(k, r_all))
        if msg:
            return msg
    return None


def _backend(name: str):
    """CROSSENT_BACKEND set for the crossent call (it is read per call)."""
    @contextlib.contextmanager
    def ctx():
        old = os.environ.get("CROSSENT_BACKEND")
        os.environ["CROSSENT_BACKEND"] = name
        try:
            yield
        finally:
            if old is None:
                del os.environ["CROSSENT_BACKEND"]
            else:
                os.environ["CROSSENT_BACKEND"] = old
    return ctx()


# Spec "tiles": crossent's chunk and tile sizes shrunk, so that the fuzz's small
# tensors cross chunk boundaries (the torch backend's row, K-dim and worker-pool
# chunks, the linear heads' row chunks, the vocab-parallel linear head's) and,
# on the triton backend, take the looped and split launch paths as wide
# vocabularies do.  Only crossent's side runs with them; results must not change.
_SMALL_CHUNKS = {
    "crossent.backends.torch_chunked": dict(_CHUNK_BYTES=256, _MIN_CHUNK_BYTES=256, _KDIM_TILE_BYTES=64),
    "crossent.linear": dict(_CPU_CHUNK_BYTES=512, _CPU_MIN_CHUNK_BYTES=512, _TILE_ROWS={"cpu": 2, "cuda": 256}),
    "crossent._linear_ops": dict(_UPCAST_BYTES=256),
    "crossent._autograd.vocab_parallel": dict(_CPU_CHUNK_BYTES=256),
}
TRITON_PATHS = {  # classes in tiles of 2-4
    "looped": dict(_SINGLE_MAX=4, _LOOP_BLOCK=4, _TILE_ELEMS=4, _ROW_PATH="twopass"),
    "multirow": dict(_SINGLE_MAX=4, _LOOP_BLOCK=2, _TILE_ELEMS=8, _ROW_PATH="twopass"),
    "split": dict(_SINGLE_MAX=4, _SPLIT_BLOCK=4),
}


@contextlib.contextmanager
def _tiles(name: str | None):
    """crossent's chunk sizes (and triton launch path ``name``) for spec "tiles"."""
    if not name:
        yield
        return
    mods = {m: importlib.import_module(m) for m in _SMALL_CHUNKS}
    old = {(m, k): getattr(mods[m], k) for m, kv in _SMALL_CHUNKS.items() for k in kv}
    ce = defaults = None
    try:
        for m, kv in _SMALL_CHUNKS.items():
            for k, v in kv.items():
                setattr(mods[m], k, v)
        if name in TRITON_PATHS:
            from crossent.backends.triton import ce
            defaults = {k: getattr(ce.split if hasattr(ce.split, k) else ce, k) for k in TRITON_PATHS[name]}
            ce.configure(**TRITON_PATHS[name])
        yield
    finally:
        for (m, k), v in old.items():
            setattr(mods[m], k, v)
        if defaults is not None:
            ce.configure(**defaults)


def _smoothing_wraps_uint8(s: dict) -> bool:
    """Rule 9 applies to case ``s``: torch's label-smoothing mask would drop a
    uint8 target equal to ignore_index only after wrapping."""
    if s.get("target") != "index" or s.get("target_dtype") != "uint8":
        return False
    m = materialize(s, "torch")
    t, ii, ls = m["leaves"]["target"], m["kw"]["ignore_index"], m["kw"].get("label_smoothing", 0.0)
    return t.dtype == torch.uint8 and isinstance(ls, float) and ls > 0 and isinstance(ii, int) and \
        not 0 <= ii < 256 and bool((t == ii % 256).any())


def check(s: dict) -> str | None:
    """None if crossent matches torch on case ``s``, else what differs."""
    # vmap's batching rule for nll_loss skips eager torch's int32-target check and
    # compares ignore_index in int32 (wrapping it): rule 1's int64 run is the expectation
    fixes = frozenset({"long_targets"} if s["grad"] == "vmap" and s.get("target_dtype") == "int32" else ())
    theirs = run(s, "torch", fixes)
    if theirs["error"] and s["grad"] in FUNC_MODES:
        # a transform torch cannot do is not asked of crossent; the arguments still are
        return check({**s, "grad": "backward"})
    while theirs["error"]:
        err = "{} {}: {}".format(*theirs["error"])
        fix = next((f for pat, f in TORCH_FAILURES if pat.search(err)), None)
        if fix is None or fix in fixes:
            break
        fixes |= {fix}
        theirs = run(s, "torch", fixes)
    # after rules 1-4: torch may compute with the uint8 target only once they apply
    # (a (1,) target of a (C,) input: rule 3's 0-d target)
    if not theirs["error"] and "long_targets" not in fixes and _smoothing_wraps_uint8(s):
        fixes |= {"long_targets"}  # rule 9, where torch computes with the uint8 target
        theirs = run(s, "torch", fixes)
    with _backend(s["backend"]), _tiles(s.get("tiles")):
        ours = run(s, "ours")
    if ours["error"] and not theirs["error"] and s["grad"] in FUNC_MODES:
        # torch's batching rules skip some eager checks (vmap of fp16 logits with an fp32 weight
        # runs); crossent may keep eager torch's error there.  A weight that requires grad is
        # differentiated under the transforms by both (eager torch's first error there, "not
        # differentiable", is not theirs): the eager error is then that of the weight without it.
        muts = s.get("mutations", [])
        for case in ({**s, "grad": "backward"},
                     *([{**s, "grad": "backward", "mutations": [m for m in muts if m != "weight_grad"]}]
                       if "weight_grad" in muts else [])):
            eager = run(case, "torch", fixes)
            if eager["error"] and eager["error"][1:] == ours["error"][1:]:
                return None
    ref = run(s, "ref", fixes) if not theirs["error"] else None
    if ref is not None and ref["error"]:
        return f"fuzz harness: the float64 torch run failed: {ref['error']}"
    own_errors = _fp64_own_errors(s, theirs, fixes) if ref is not None else {}
    if ref is not None:
        for rule in (_logit_rounding_error, _logit_blocking_error):
            for k, e in rule(s, ref, fixes).items():
                own_errors[k] = max(own_errors.get(k, 0.0), e)
    return compare(s, ours, theirs, ref, own_errors)


def init_single_process() -> None:
    """A one-rank gloo group (an in-memory store, no sockets) for the
    vocab-parallel losses: with every class on one rank they must equal the
    plain functions."""
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def reproducer(s: dict) -> str:
    env = "TRITON_INTERPRET=1 " if s["backend"] == "triton" else ""
    return f"{env}PYTHONPATH=src python tests/_fuzz.py '{json.dumps(s, separators=(',', ':'))}'"


if __name__ == "__main__":
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    spec = json.loads(sys.argv[1])
    if spec["fn"] == "vocab_parallel":
        init_single_process()
    print(check(spec) or "ok: crossent matches torch")
