"""The fuzz judge's rules: how crossent's outcome of a case must compare with
torch's (tests/_fuzz.py runs both sides).

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
     may be finite, since it never computes those rows' logits (README 7);
     so does linear_log_probs (its docstring).
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
     (spec "tiles", or compact's budget in spec "options"): the matmul rounds each logit by how many rows one call
     gets (BLAS kernels sum the D products in another order for 1, 2 or 5
     rows), an ulp of the logits that large offsets make the loss's and
     gradients' error (seed 237521495: fp64, logits ~3e4, crossent's 2-row
     chunks 4.7e-12 off torch's one call; in fp32 against float64 over 40
     draws crossent's mean error 1.2x torch's).  torch's own error is at
     least that of its same ops with the logits computed one row per call.
     Likewise for a 1-D input, which torch's F.linear multiplies by its
     vector kernel (addmv) and crossent's heads as a one-row matrix (addmm):
     seed 561376160, fp32 logits ~-1e4 with a bias, 1.1e-3 and 4.8e-4 off
     float64; the smoothed loss 1.5e-4 off, torch's (by luck) 6e-6.
  14. cross_entropy(inplace_backward=True) with a non-finite upstream: the
     logits are gone, so crossent rescales its gradient buffer (that of a
     unit upstream) where torch scales term by term (its inf/NaN pattern);
     torch's side takes a unit upstream and multiplies (README); so does a
     reduced loss under torch.compile, where reading the upstream would be a
     host sync (README 9; grad mode "compile": 'mean'/'sum' cross-entropy;
     torch's own pattern is accepted too, where crossent's path recomputes);
     so does linear_cross_entropy with allow_inplace (the input gradient has
     overwritten the hidden states), or torch's pattern where it does not apply.
  15. vocab_parallel_linear_log_probs takes the target's logit from a dot
     product of its own (the target's owner is known only after the first
     all_reduce), rounded apart from the logit row: where the target is the
     row's max, its log-prob can be an ulp of the scaled logits above 0 (seed
     717185034: fp32, logits up to 101 / T = 0.05, +1.5e-5 where torch's is 0).
     torch's own error there is at least one ulp of the largest scaled logit
     (the largest finite one: masked -inf classes, seed 13757555).
  16. under torch.compile an out-of-range class target gives a NaN loss where
     torch raises "Target N is out of bounds." (reading the target would be
     a host sync; README 3): grad mode "compile" accepts a NaN in the loss.
  17. log_probs at T != 1 scales the logits by 1/T (one multiply, within an
     ulp of z / T: crossent._logprobs_ops.scaled) where torch divides; at
     large scaled logits that ulp is the float64 entropy's error (seed
     2116862314: fp64, logits ~-1e4 / 0.7, 1.7e-13 where torch's was 1.3e-14).
     torch's own error is at least that of its same ops on z * (1/T).
  18. an infinite upstream times a gradient factor (the softmax p, in a
     cross-entropy's gradient) that float64 puts below fp32's normal range:
     crossent and torch form p in fp32 by different roundings, a subnormal on
     one side and 0 on the other (underflow, or a device that flushes
     subnormals), so the gradient is inf * p = inf on one and inf * 0 = NaN on
     the other (seed 2078842231: bf16 'sum', logits x30, float64 p = 9e-46).
     Where float64's gradient is +-inf and its gradient for the upstream with
     that inf replaced by 1 is below twice fp32's smallest normal, each side
     may give NaN or float64's inf; first-order gradients, not fp64 ones.
  19. a reduced cross-entropy whose float64 value fits where torch's sum
     overflows (rule 5): every algorithm rounds each class term
     w_c t'_c (lse - z_c) to the dtype (torch does, before its sum overflows),
     and with signed targets or weights the terms cancel (seed 1662753290: fp32
     logits ~1e38, terms ~1e38 summing to -2.8e36, crossent 3.8e-5 off float64).
     torch's own error there is at least half an ulp of the sum of the terms'
     magnitudes: the float64 loss of |t| and |w| (smoothing kept).
  20. linear_cross_entropy's acc_policy 'compact' below the whole pass's
     budget (spec "options") recomputes dW's logits by another GEMM blocking
     than the token pass whose lse they are divided by, a few ulps of
     sum_d |h_d W_cd| apart (seed 993670698: fp32, dW 1.5e-5 off, torch
     1.0e-6).  torch's own error in dW and db is at least that perturbation of
     p carried through (tests/_fuzz.py, _recomputed_logits_error).
  21. a float64 'mean' / 'sum' loss is its own reference: torch's own error
     there is estimated from float32 draws of the case (tests/_fuzz.py), whose
     sums can cancel by luck (seed 145925957: nll_loss 'sum' of 90 signed
     terms, torch 6.0e-15 off the exact sum and crossent 6.4e-15, so 1.2e-14
     apart, where both draws' estimates were 1.0e-15).  Whatever order a sum
     takes, it is exact only to a rounding at its terms' magnitude: torch's
     own error is at least half an ulp of the sum of the terms' magnitudes,
     as in rule 19 (nll_loss's terms -w x: |input| too).
Everything else, messages included, must be torch's.  Under torch.func
transforms (grad, vmap, jvp) a case torch cannot transform falls back to a
plain backward, and where torch's batching rules skip an eager check,
crossent may raise eager torch's error.
"""
from __future__ import annotations

import re

import torch

import _tol
from _fuzz_cases import class_dim, materialize

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


def tensors(res: dict) -> dict:
    """name -> tensor for every output and gradient of an outcome."""
    named = {f"output {i}": o for i, o in enumerate(res["outs"])}
    named.update({f"grad of {n}": g for n, g in res.get("grads", {}).items()})
    if "grad2" in res:
        named["second-order grad of input"] = res["grad2"]
    return named


def linear_family(s: dict) -> bool:
    return s["fn"] == "linear" or s.get("module") == "LinearCrossEntropyLoss" or bool(s.get("linear"))


def _rounded_to(s: dict, t: torch.Tensor) -> torch.dtype | None:
    """Rule 11: the narrower dtype that result ``t``'s values went through.
    Under autocast(bf16) a linear loss's matmuls run in bf16, so its fp32/fp16
    loss and gradients are bf16-rounded values (gradients rounded twice where
    crossent precomputes them for a unit upstream and rescales); softmax's
    dtype argument computes in that dtype, gradients too.  torch's one-draw
    error there can be a fraction of an ulp of it (seed 1228529905: 0.18 ulp),
    below what four times it allows."""
    if s["grad"] == "autocast" and linear_family(s) and t.dtype in (torch.float32, torch.float16):
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
    linear = s["fn"] == "linear" or s.get("module") == "LinearCrossEntropyLoss" or \
        (s["fn"] == "log_probs" and s["linear"] and not s["vp"])  # linear_log_probs skips ignored rows too
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


def _reduced(s: dict) -> bool:
    """Case ``s``'s loss is 'mean' or 'sum' (legacy arguments included)."""
    sa, rd = s.get("legacy") or (None, None)
    if sa is not None or rd is not None:
        return rd is not False
    return s.get("reduction") in ("mean", "sum", "elementwise_mean")


def rescaled_under_compile(s: dict) -> bool:
    """Rule 14 under compile: case ``s`` is a 'mean' or 'sum' cross-entropy
    (nll_loss's gradient is the upstream times -w at the targets, as torch's)."""
    return not (s["fn"] == "nll_loss" or s.get("module") == "NLLLoss") and _reduced(s)


def _compiled_out_of_range_target(s: dict, ours: dict, theirs: dict) -> bool:
    """Rule 16."""
    return s["grad"] == "compile" and not ours["error"] and bool(theirs["error"]) and \
        theirs["error"][:2] == ("forward", "IndexError") and bool(_OUT_OF_BOUNDS.match(theirs["error"][2])) and \
        bool(ours["outs"][0].isnan().any())


_TINY32 = torch.finfo(torch.float32).tiny


def inf_times_subnormal(o: torch.Tensor, t: torch.Tensor, r: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """Rule 18: the elements where ours ``o`` and torch's ``t`` may each be NaN
    or float64's +-inf ``r``, ``unit`` being float64's gradient for the upstream
    with its inf replaced by 1.  Twice the smallest normal: p's fp32 roundings
    are far below a factor of 2, and a flushing device drops everything below it."""
    return torch.isinf(r) & (unit.abs() < 2 * _TINY32) & \
        (torch.isnan(o) | (o.double() == r)) & (torch.isnan(t) | (t.double() == r))


def overflowed_reduction(s: dict, theirs: dict) -> bool:
    """Rule 19 may apply: a 'mean' / 'sum' cross-entropy whose torch loss is not finite."""
    ce = s["fn"] in ("cross_entropy", "stats", "linear") or s.get("module") in ("CrossEntropyLoss",
                                                                               "LinearCrossEntropyLoss")
    return ce and s.get("reduction") in ("mean", "sum") and "legacy" not in s and not theirs["error"] and \
        not bool(torch.isfinite(theirs["outs"][0]).all())


def float64_reduction(s: dict, theirs: dict) -> bool:
    """Rule 21 applies: torch's loss is a float64 'mean' or 'sum'."""
    return "reduction" in s and _reduced(s) and not theirs["error"] and theirs["outs"][0].dtype == torch.float64


def cancelling_terms_error(theirs: dict, magnitudes: dict) -> dict:
    """Rules 19 and 21: torch's own error in the loss, from ``magnitudes``, the
    float64 run with |t| and |w| (and nll_loss's |input|: the fix "abs_terms")."""
    if magnitudes["error"]:
        return {}
    eps = torch.finfo(theirs["outs"][0].dtype).eps
    return {"output 0": 0.5 * eps * float(magnitudes["outs"][0].double().abs().max())}


def compare(s: dict, ours: dict, theirs: dict, ref: dict, own_errors: dict) -> str | None:
    if _batch_dims_shape_error(s, ours, theirs) or _vocab_parallel_grad_limit(s, ours, theirs) or \
            _other_out_of_bounds_target(s, ours, theirs) or _compiled_out_of_range_target(s, ours, theirs):
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
    t_all, o_all, r_all = tensors(theirs), tensors(ours), tensors(ref)
    for k, t in t_all.items():
        o = o_all.get(k)
        if (o is None) != (t is None):
            return f"{k}: ours {'None' if o is None else 'a tensor'} vs torch {'None' if t is None else 'a tensor'}"
        if t is not None and _linear_skipped_rows(s, k):
            r = r_all[k]
            keep = torch.isnan(t) & torch.isfinite(o)  # rule 8
            t, r_all[k] = torch.where(keep, o, t), torch.where(keep, o.to(r.dtype), r)
        unit = ref.get("unit_grads", {}).get(k.removeprefix("grad of ")) if k.startswith("grad of ") else None
        if t is not None and o is not None and unit is not None and t.dtype != torch.float64:
            r = r_all[k]
            keep = inf_times_subnormal(o, t, r, unit)  # rule 18
            t, r_all[k] = torch.where(keep, o, t), torch.where(keep, o.to(r.dtype), r)
        msg = t is not None and _close(o, t, r_all[k], k, own_errors.get(k, 0.0), theirs["terms"].get(k, 1),
                                       _rounded_to(s, t), _first_order(k, r_all))
        if msg:
            return msg
    return None


def smoothing_wraps_uint8(s: dict) -> bool:
    """Rule 9 applies to case ``s``: torch's label-smoothing mask would drop a
    uint8 target equal to ignore_index only after wrapping."""
    if s.get("target") != "index" or s.get("target_dtype") != "uint8":
        return False
    m = materialize(s, "torch")
    t, ii, ls = m["leaves"]["target"], m["kw"]["ignore_index"], m["kw"].get("label_smoothing", 0.0)
    return t.dtype == torch.uint8 and isinstance(ls, float) and ls > 0 and isinstance(ii, int) and \
        not 0 <= ii < 256 and bool((t == ii % 256).any())
