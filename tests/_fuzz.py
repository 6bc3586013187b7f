"""Run one fuzz case on crossent and on torch, and judge the difference.

``check(spec)`` returns None when crossent matches torch 2.13, else a
message.  Matching means: the same exception type and message when torch
raises; otherwise the same output types, dtypes, shapes and requires_grad,
the same warnings (text, and whether they are attributed to the library or to
the caller), and values and gradients within the project's tolerance rule
(tests/_tol.py) against a float64 run of torch, with the README's deliberate
differences as narrow rules (tests/_fuzz_rules.py, numbered there).  Running one
side (the call, its gradients, warnings and exceptions): tests/_fuzz_run.py; torch's
side: tests/_fuzz_torch.py; crossent's backend and chunk sizes: tests/_fuzz_config.py.

Reproduce a case from its printed line:
    PYTHONPATH=src TRITON_INTERPRET=1 python tests/_fuzz.py '<spec json>'
"""
from __future__ import annotations

import contextlib
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _tol  # noqa: E402
from _fuzz_cases import materialize  # noqa: E402
from _fuzz_config import backend, tiles  # noqa: E402
from _fuzz_rules import (TORCH_FAILURES, cancelling_terms_error, compare, float64_reduction,  # noqa: E402
                         linear_family, overflowed_reduction, rescaled_under_compile, smoothing_wraps_uint8, tensors)
from _fuzz_run import FUNC_MODES, _rounded_logits, _upstream, run  # noqa: E402,F401 (FUNC_MODES, run: the API)
from _fuzz_torch import torch_ce  # noqa: E402




def _fp64_own_errors(s: dict, theirs: dict, fixes) -> dict:
    """Where torch's result is float64 it is its own reference.  Its error is
    estimated as that of the same case in float32 (against float64), scaled by
    the ratio of the two unit roundoffs: same algorithm, same conditioning.
    One draw of rounding errors can cancel by luck (an fp64 sum of 400 rows:
    torch's true error 5x its one-draw estimate), so the estimate is the
    larger of two draws of the case's values."""
    if not any(t.dtype == torch.float64 for t in tensors(theirs).values() if t is not None):
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
        for k, t in tensors(t32).items():
            r = tensors(r32).get(k)
            if t is not None and r is not None and t.shape == r.shape:
                # over the elements finite in both: where fp32 overflows (or an inf
                # upstream meets a 0) the fp64 run need not, and its error there
                # says nothing of the rounding of the finite ones
                both = torch.isfinite(t) & torch.isfinite(r.to(t.dtype))
                est[k] = max(est.get(k, 0.0), _tol._err(t[both], r[both]) * scale)
    return est


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
    if not linear_family(s) or s["dtype"] not in ("float16", "bfloat16") or \
            s["grad"] in ("vmap", "autocast"):
        return {}
    r = run(s, "logits", fixes)
    if r["error"]:  # a mutation torch's F.linear rejects
        return {}
    errs = {f"output {i}": _tol._err(o, ro) for i, (o, ro) in enumerate(zip(r["outs"], ref["outs"]))}
    return {k: e for k, e in errs.items() if e < float("inf")}


def _errors(alt: dict, ref: dict) -> dict:
    """The errors of another torch run ``alt`` of a case against its float64
    run, per output and gradient (none where it raised)."""
    if alt["error"]:
        return {}
    r_all = tensors(ref)
    return {k: _tol._err(t, r_all[k]) for k, t in tensors(alt).items()
            if t is not None and r_all.get(k) is not None and t.shape == r_all[k].shape}


def _reciprocal_temperature_error(s: dict, ref: dict, fixes) -> dict:
    """Rule 17: torch's error with its logits scaled by 1/T, per output and gradient."""
    if s["fn"] != "log_probs" or s["temperature"] == 1.0:
        return {}
    return _errors(run({**s, "reciprocal": True}, "torch", fixes), ref)


def _target_logit_error(s: dict, ref: dict, fixes) -> dict:
    """Rule 15: vocab_parallel_linear_log_probs' log-prob within an ulp of its
    largest scaled logit (its target logit is a dot product of its own)."""
    if not (s["fn"] == "log_probs" and s["linear"] and s["vp"]) or s["grad"] in ("vmap", "autocast"):
        return {}
    z = _rounded_logits(s, {})["input"]
    z = z[z.isfinite()]   # masked (-inf) classes: the finite logits' ulps (seed 13757555)
    return {"output 0": torch.finfo(getattr(torch, s["dtype"])).eps * z.abs().max().item() / s["temperature"]} \
        if z.numel() else {}


def _recomputed_logits_error(s: dict, ref: dict, fixes) -> dict:
    """Rule 20: acc_policy 'compact' with a budget below the whole pass (spec
    "options") recomputes dW's logits z' by another GEMM blocking than the token
    pass's z, whose lse the vocab pass divides by: its p is exp(z' - lse), off by
    z' - z, up to 2 eps (sum_d |h_d W_cd| + |b_c|) (seed 993670698: fp32, 4-token
    tiles of 128-class blocks, 4 ulps of z; dW 1.5e-5 off, torch 1.0e-6).  Torch's
    own error is then at least that perturbation carried into dW and db:
    sum_n |P_nc| (z' - z)_nc |h_nd|, P = scale * A * p the p part of the float64
    logits' gradient (backends/base.py), found as G(z) - G(z with one class far
    above the rest), whose p is one-hot."""
    o = s.get("options", {})
    if not (s["fn"] == "linear" or s.get("module") == "LinearCrossEntropyLoss") or \
            o.get("acc_policy") != "compact" or len(o) == 1 or \
            s["grad"] not in ("backward", "double", "compile") or ref["error"]:
        return {}
    m = materialize(s, "ref")
    a = {n: m["views"][n](leaf) for n, leaf in m["leaves"].items()}
    h, W, b, t, kw = a["input"], a["linear_weight"], a.get("linear_bias"), a["target"], m["kw"]
    prob = t.is_floating_point()
    if s.get("shift"):
        h, t = h[..., :-1, :], t[..., 1:, :] if prob else t[..., 1:]
    h2 = h.flatten(0, -2) if h.dim() > 1 else h[None]   # not reshape(-1, D): ambiguous for D == 0
    t2 = (t.flatten(0, -2) if t.dim() > 1 else t[None]) if prob else t.reshape(-1).long()
    if W.dim() > 2:   # a K-dim loss: materialised logits, no vocabulary pass
        return {}
    z = F.linear(h2, W, b)
    if z.shape[1] < 2 or not z.isfinite().all() or s["upstream"] != "randn":
        return {}
    out_shape = t.shape[:-1] if prob else t.shape
    u = _upstream(s, torch.empty(out_shape if kw["reduction"] == "none" else (), dtype=torch.float64))

    def grad(zz):
        zz = zz.detach().requires_grad_()
        loss = torch_ce(zz, t2, a.get("weight"), None, -100 if kw["ignore_index"] is None else kw["ignore_index"],
                        None, kw["reduction"], kw.get("label_smoothing", 0.0), kw.get("z_loss", 0.0))
        return torch.autograd.grad(loss, zz, u.reshape(loss.shape))[0]

    def one_hot_p(k):   # G with p one-hot at class k (exp(-1e3) is 0 in float64)
        zk = z.clone()
        zk[:, k] = z.max(1).values + 1e3
        return grad(zk)
    try:
        g = grad(z)
        P = g - one_hot_p(0)
        P[:, 0] = (g - one_hot_p(1))[:, 0]
    except RuntimeError:   # targets torch rejects: torch's own error there is its exception
        return {}
    shift = 2 * torch.finfo(getattr(torch, s["dtype"])).eps * (h2.abs() @ W.abs().t() + (0 if b is None else b.abs()))
    dz = P.abs() * shift
    errs = {"grad of linear_weight": dz.t() @ h2.abs(), "grad of linear_bias": dz.sum(0) if b is not None else None}
    return {k: e.max().item() for k, e in errs.items() if e is not None and e.numel() and e.max() < float("inf")}


@contextlib.contextmanager
def _logits_row_by_row():
    """torch.nn.functional.linear one row per call, for torch's side (rule 13):
    F.linear_cross_entropy (no options) and torch_ce's compositions look it up
    in that module at call time.  A 1-D input as a one-row matrix, as
    crossent's heads take it (torch's vector path is another kernel)."""
    linear = F.linear

    def rows(h, W, b=None):
        if h.dim() == 1:
            return linear(h[None], W, b)[0]
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
    output and gradient (where crossent chunks the rows of a linear loss: spec
    "tiles", or a budget in spec "options"; or takes a 1-D input as one row)."""
    o = s.get("options", {})
    if not (linear_family(s) and (s.get("tiles") or o.get("chunk_bytes") or o.get("chunk_size") or
                                  len(s["shape"]) == 1)):
        return {}
    with _logits_row_by_row():
        return _errors(run(s, "torch", fixes), ref)


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
    if not theirs["error"] and "long_targets" not in fixes and smoothing_wraps_uint8(s):
        fixes |= {"long_targets"}  # rule 9, where torch computes with the uint8 target
        theirs = run(s, "torch", fixes)
    with backend(s["backend"]), tiles(s.get("tiles")):
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
    if ref is not None and s["upstream"] == "inf":
        # rule 18: the float64 gradients of a unit upstream, the factors that the inf multiplies
        ref["unit_grads"] = run({**s, "upstream": "1.0"}, "ref", fixes).get("grads", {})
    own_errors = _fp64_own_errors(s, theirs, fixes) if ref is not None else {}
    if ref is not None:
        for rule in (_logit_rounding_error, _logit_blocking_error, _target_logit_error,
                     _reciprocal_temperature_error, _recomputed_logits_error):
            for k, e in rule(s, ref, fixes).items():
                own_errors[k] = max(own_errors.get(k, 0.0), e)
        if overflowed_reduction(s, theirs) or float64_reduction(s, theirs):   # rules 19, 21
            for k, e in cancelling_terms_error(theirs, run(s, "ref", fixes | {"abs_terms"})).items():
                own_errors[k] = max(own_errors.get(k, 0.0), e)
    msg = compare(s, ours, theirs, ref, own_errors)
    if msg and s["grad"] == "compile" and s["upstream"] != "randn" and rescaled_under_compile(s):
        # rule 14 under compile: where crossent's path recomputes (probability targets on the
        # reference path, say), torch's own term-by-term pattern, as in eager mode
        eager = {**s, "grad": "backward"}
        if not compare(s, ours, run(eager, "torch", fixes), run(eager, "ref", fixes), own_errors):
            return None
    if msg and s["upstream"] != "randn" and s.get("options", {}).get("allow_inplace"):
        # rule 14 for linear_cross_entropy's allow_inplace, where it applies (a 'mean'/'sum' of a
        # contiguous input, not compact): dx has overwritten the hidden states, so it is rescaled
        if not compare(s, ours, run({**s, "rescaled": True}, "torch", fixes), ref, own_errors):
            return None
    # compiled vs eager crossent, too; not for a non-finite upstream, where eager crossent
    # recomputes term by term and compiled rescales (rule 14)
    if msg or s["grad"] != "compile" or theirs["error"] or s["upstream"] != "randn":
        return msg
    with backend(s["backend"]), tiles(s.get("tiles")):
        eager = run({**s, "grad": "backward"}, "ours")
    msg = compare(s, ours, eager, ref, own_errors)
    return msg and f"compiled vs eager crossent: {msg}"


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
    if spec["fn"] == "vocab_parallel" or spec.get("vp"):
        init_single_process()
    print(check(spec) or "ok: crossent matches torch")

