"""Random cases for the differential fuzz (tests/test_fuzz.py).

A case is a small JSON-able dict ("spec"); every tensor of a case is rebuilt
from it deterministically (its "seed"), so a failing case is reproduced from
its one-line spec alone.  ``draw`` picks a spec, ``materialize`` turns one
into tensors for one side of the comparison: crossent ("ours"), torch in the
same dtypes ("torch"), or torch in float64 ("ref").
"""
from __future__ import annotations

import random

import torch

DTYPES = ("float32", "float64", "float16", "bfloat16")
PRIMES = (2, 3, 5, 7, 11, 13, 17, 31, 97, 157, 211, 257)
# Functions under test, with their share of the cases.
FAMILIES = {"cross_entropy": 6, "nll_loss": 3, "softmax": 2, "log_softmax": 2, "stats": 2,
            "module": 2, "linear": 2, "vocab_parallel": 1, "log_probs": 2}
# Share of the cases whose crossent call runs under torch.compile (grad mode "compile").
COMPILE_SHARE = 0.01
# Bad arguments; one or two per invalid case, so torch's check order is exercised too.
MUTATIONS = ("oob_target", "neg_target", "weight_numel", "weight_dtype", "weight_2d", "weight_grad",
             "target_int16", "target_float", "target_batch", "target_spatial", "ls_gt1",
             "bad_reduction", "prob_ignore", "int_input", "prob_int")


def _pick(rng: random.Random, weighted: dict):
    return rng.choices(list(weighted), weights=list(weighted.values()))[0]


def _shape(rng: random.Random, ndim: int, small: bool) -> list[int]:
    """Class dim (1, or 0 for 1-D) odd/prime/1/0; other dims include zeros."""
    hi = 4 if small else 6
    shape = [rng.choice([0, 1, 2, 3, hi, 5]) if rng.random() < 0.15 else rng.randint(1, hi)
             for _ in range(ndim)]
    if ndim:
        cdim = 0 if ndim == 1 else 1
        cs = [1, 2, 3, 5, 7, 11, 13] if small else list(PRIMES) + [1, 4, 8, 9, 64, 200]
        shape[cdim] = 0 if rng.random() < 0.03 else rng.choice(cs)
    if ndim == 2 and not small and rng.random() < 0.3:
        shape[0] = rng.randint(7, 40)
    return shape


def draw(rng: random.Random, backend: str) -> dict:
    """One random case for ``backend`` ('torch' or 'triton')."""
    small = backend == "triton"  # the interpreter is slow: keep its tensors tiny
    fam = _pick(rng, FAMILIES)
    s = {"fn": fam, "backend": backend, "seed": rng.randrange(2**31), "dtype": rng.choice(DTYPES)}
    if fam == "log_probs":
        return _draw_log_probs(rng, s, small)
    if fam == "module":
        s["module"] = rng.choice(["CrossEntropyLoss", "NLLLoss", "Softmax", "LogSoftmax",
                                  "LinearCrossEntropyLoss"])
    kind = {"CrossEntropyLoss": "cross_entropy", "NLLLoss": "nll_loss", "Softmax": "softmax",
            "LogSoftmax": "log_softmax", "LinearCrossEntropyLoss": "linear"}.get(s.get("module"), fam)
    if fam == "vocab_parallel" and rng.random() < 0.5:
        s["linear"] = True  # vocab_parallel_linear_cross_entropy
    lin = kind == "linear" or s.get("linear", False)
    # hidden states (N, D), (D) or, for the function, with batch dims (B, T, D); else logits
    ndim = rng.choices([1, 2, 3], weights=[1, 6, 1 if fam == "linear" else 0])[0] if lin else \
        rng.choices([0, 1, 2, 3, 4, 5], weights=[1, 3, 8, 4, 4, 2])[0]
    s["shape"] = _shape(rng, ndim, small)
    if lin:
        s["classes"] = rng.choice([1, 3, 7, 13, 31, 97] if small else [1, 3, 7, 13, 31, 97, 211])
        s["bias"] = rng.random() < 0.5
    s["layout"] = rng.choice(["contig"] * 4 + ["transposed", "strided", "channels_last", "expanded"])
    s["values"] = rng.choice(["normal"] * 5 + ["offset1e3", "offset1e4", "nonfinite", "huge", "wide"])
    s["grad"] = rng.choice(["backward"] * 6 + ["no_grad", "inference", "no_input_grad", "double", "autocast"] +
                           ([] if fam == "vocab_parallel" else ["func_grad", "vmap", "jvp"]))
    s["upstream"] = rng.choice(["randn"] * 8 + ["nan", "inf"])
    if s["values"] == "huge" and s["grad"] == "double":
        # second-order terms of logits near 1e30 cancel far below any scale the judge sees
        s["grad"] = "backward"
    if kind in ("softmax", "log_softmax"):
        nd = max(ndim, 1)
        s["dim"] = rng.randint(-nd, nd - 1) if rng.random() > 0.05 else None
        if rng.random() < 0.15:
            s["dtype_arg"] = rng.choice(DTYPES)
    else:
        _draw_loss(rng, s, kind)
    if rng.random() < 0.3:  # crossent's chunks and tiles shrunk (tests/_fuzz_config.py)
        s["tiles"] = rng.choice(["looped", "multirow", "split"]) if backend == "triton" else "small"
    if lin and fam != "vocab_parallel":
        _draw_linear(rng, s)
    if rng.random() < 0.08:
        s["mutations"] = rng.sample(MUTATIONS, rng.choice([1, 1, 2]))
        # torch's side composes z_loss, softcap, the statistics and the shift from other ops, whose checks differ
        for k in ("z_loss", "softcap", "inplace_backward", "with_stats", "shift"):
            s.pop(k, None)
    else:
        _maybe_compile(rng, s)
    return s


def _maybe_compile(rng: random.Random, s: dict) -> None:
    """Grad mode "compile" for COMPILE_SHARE of the cases: aot_eager (Dynamo and
    AOT autograd), a tenth of them inductor (a C++ build per case: seconds)."""
    if rng.random() < COMPILE_SHARE:
        s["grad"] = "compile"
        if rng.random() < 0.1:
            s["compile_backend"] = "inductor"


def _draw_linear(rng: random.Random, s: dict) -> None:
    """A K-dim linear loss (spec "out_features": weight (C, d1..dk, D)), and
    linear_cross_entropy's own extensions: ``shift`` (next-token targets, 2+-D input),
    linear_cross_entropy_with_stats (spec "with_stats"), and crossent's options:
    acc_policy 'compact' or the token pass's chunks (chunk_size, chunk_bytes) under
    the other policies, with allow_inplace (the input gradient into the hidden
    states' storage) in plain backward."""
    fn = s["fn"] == "linear"   # crossent.nn.LinearCrossEntropyLoss: options, z_loss and softcap only
    if fn and len(s["shape"]) <= 2 and rng.random() < 0.12:
        s["out_features"] = rng.choice([[2], [3], [2, 2]])  # (a 1-D input: torch's error)
    elif fn and len(s["shape"]) >= 2 and rng.random() < 0.15:
        s["shift"] = True
    if fn and rng.random() < 0.15:
        s["with_stats"] = True
    if rng.random() >= 0.4:
        return
    if rng.random() < 0.7:
        _draw_compact(rng, s)
        return
    s["options"] = {"acc_policy": rng.choice(["accurate", "balanced", "auto"])}
    if rng.random() < 0.6:
        s["options"]["chunk_size"] = rng.choice([1, 2, 3])
    elif rng.random() < 0.6:
        s["options"]["chunk_bytes"] = rng.choice([64, 4 * s["classes"] + 1, 12 * s["classes"] + 1])
    if s["grad"] == "backward" and rng.random() < 0.5:
        s["options"]["allow_inplace"] = True


def _draw_compact(rng: random.Random, s: dict) -> None:
    """linear_cross_entropy's acc_policy 'compact' (spec "options"): the token pass,
    then dW by blocks of classes from the saved lse (backends' block_grad_).  The
    budget decides the vocabulary pass's tiling (crossent._linear_ops.vocab_tiles):
    all tokens in one tile with blocks of >= 32 classes, or 128-class blocks in
    token tiles; several blocks need more than 32 / 128 classes, so such a case may
    widen its classes.  Below the whole pass's budget the logits are recomputed by
    another GEMM blocking (judge rule 20); one class never reaches the vocabulary
    pass (its exact zero gradient: fuzz F9c).  Rule 20 perturbs p, not a softcap's
    derivative: a budget drops the softcap."""
    if rng.random() < 0.5:
        s["classes"] = rng.choice([33, 129, 211])
    s["options"] = {"acc_policy": "compact"}
    if rng.random() < 0.4:
        return
    n = 1
    for d in s["shape"][:-1]:
        n *= d
    logits = max(1, n) * s["classes"] * 4
    s["options"]["chunk_bytes"] = rng.choice([64, logits // 3 + 1, logits // 2 + 1, 4 * logits])
    s.pop("softcap", None)
    if rng.random() < 0.3:
        s["options"]["chunk_size"] = rng.choice([1, 2, 3])


def _draw_log_probs(rng: random.Random, s: dict, small: bool) -> dict:
    """crossent.log_probs / linear_log_probs and their vocab-parallel forms (one
    rank): classes last, class targets (no out-of-range ones: crossent raises
    where torch's gather has no check), temperature, entropy."""
    s["linear"], s["vp"] = rng.random() < 0.4, rng.random() < 0.25
    lead = [rng.choice([0, 1, 2, 3]) if rng.random() < 0.15 else rng.randint(1, 4 if small else 9)
            for _ in range(rng.choice([0, 1, 1, 1, 2, 2, 3]))]
    if s["linear"]:
        s["shape"] = lead + [rng.choice([1, 2, 5, 8, 16])]
        s["classes"] = rng.choice([1, 3, 7, 13, 31, 97] if small else [1, 3, 7, 13, 31, 97, 211])
        s["bias"] = rng.random() < 0.5
    else:
        s["shape"] = lead + [rng.choice([1, 2, 3, 5, 7, 13] if small else [1, 2, 3, 5, 7, 13, 31, 97, 257])]
    s["layout"] = rng.choice(["contig"] * 4 + ["transposed", "strided", "expanded"])
    s["values"] = rng.choice(["normal"] * 5 + ["offset1e3", "offset1e4", "masked", "nonfinite", "huge", "wide"])
    # (the vocab-parallel Functions are once-differentiable, with no functorch rules)
    s["grad"] = rng.choice(["backward"] * 6 + ["no_grad", "inference", "no_input_grad"] +
                           ([] if s["vp"] else ["double", "func_grad", "vmap", "jvp", "autocast"]))
    s["upstream"] = rng.choice(["randn"] * 8 + ["nan", "inf"])
    s["target"], s["target_dtype"] = "index", rng.choice(["int64"] * 4 + ["int32", "uint8"])
    s["ignore"] = rng.choice(["default", "none_present", "some", "class", "all"])
    s["target_layout"] = rng.choice(["contig"] * 5 + ["strided", "expanded"])
    s["temperature"] = rng.choice([1.0, 1.0, 0.7, 2.0, 0.05])
    s["entropy"] = rng.random() < 0.6
    if rng.random() < 0.3:
        s["tiles"] = "small"  # the torch kernels' row blocks and the fused head's chunks (and triton's)
    _maybe_compile(rng, s)
    return s


def _draw_loss(rng: random.Random, s: dict, kind: str) -> None:
    prob_ok = kind in ("cross_entropy", "stats", "vocab_parallel", "linear")
    s["target"] = "prob" if prob_ok and rng.random() < 0.25 else "index"
    if s["target"] == "prob":
        s["target_dtype"] = s["dtype"] if rng.random() < 0.8 else rng.choice(DTYPES)
        s["prob_values"] = rng.choice(["softmax", "softmax", "rand", "signed"])
        s["ignore_index"] = rng.choice([-100, -100, -1, -7] if kind != "linear" else [None, None, None, -100])
    else:
        s["target_dtype"] = rng.choice(["int64"] * 5 + ["int32", "int32", "uint8"])
        s["ignore"] = rng.choice(["default", "none_present", "some", "class", "wrap", "big", "out_of_range", "all"])
        if len(s["shape"]) == 1 and "classes" not in s and rng.random() < 0.3:
            s["target_shape_1"] = True  # (C,) input with a (1,) target instead of a 0-d one
    s["target_layout"] = rng.choice(["contig"] * 5 + ["strided", "expanded"])
    s["weight"] = rng.choice([None, None, "pos", "zero_some", "all_zero", "negative"])
    if s["weight"]:
        s["weight_layout"] = rng.choice(["contig"] * 3 + ["strided", "row", "expanded"])
    s["reduction"] = rng.choice(["mean", "sum", "none", "mean", "elementwise_mean"]
                                if rng.random() < 0.1 else ["mean", "sum", "none"])
    if kind in ("cross_entropy", "nll_loss") and rng.random() < 0.1:
        s["legacy"] = [rng.choice([None, True, False]), rng.choice([None, True, False])]
    if kind != "nll_loss" and rng.random() < 0.5:
        s["label_smoothing"] = rng.choice([0.1, 0.3, 1.0, -0.2, 0.05])
    # z_loss/softcap are crossent's own (README 6), judged against torch ops composed the same way;
    # not where the z term has no defined value (a zero denominator, no classes)
    shape = s["shape"]
    classes = s.get("classes", shape[class_dim(len(shape))] if shape else 1)
    degenerate = s["weight"] == "all_zero" or classes == 0
    extras = kind in ("cross_entropy", "stats", "vocab_parallel", "linear") and not degenerate
    if extras and rng.random() < 0.15:
        s["z_loss"] = rng.choice([1e-4, 0.1])
    if extras and rng.random() < 0.15:
        s["softcap"] = rng.choice([5.0, 30.0])
    if kind in ("cross_entropy", "stats") and s["fn"] != "module" and s["grad"] == "backward" and \
            s["layout"] == "contig" and s["reduction"] in ("mean", "sum") and "legacy" not in s and \
            rng.random() < 0.3:
        s["inplace_backward"] = True  # crossent's opt-in: the gradient in the logits' storage
    if s["target"] == "prob" and kind != "vocab_parallel" and "inplace_backward" not in s and rng.random() < 0.2:
        s["grad_target"] = True  # target (and weight) differentiable: crossent's reference path


# ---------------------------------------------------------------------------
# Building tensors
# ---------------------------------------------------------------------------
def _dt(name: str) -> torch.dtype:
    return getattr(torch, name)


def class_dim(ndim: int) -> int:
    return 0 if ndim <= 1 else 1


def _values(g: torch.Generator, shape, dtype: torch.dtype, kind: str) -> torch.Tensor:
    """Logits in ``dtype`` (generated in fp64, rounded once)."""
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    if kind == "offset1e3":
        x += 1e3
    elif kind == "offset1e4":
        x -= 1e4
    elif kind == "wide":
        x *= 30
    elif kind == "masked" and x.numel():  # masked classes (-inf), the last one of each row kept
        x[..., :-1].masked_fill_(torch.rand(x[..., :-1].shape, generator=g) < 0.4, -float("inf"))
    elif kind in ("nonfinite", "huge") and x.numel():
        flat = x.view(-1)
        idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 7),), generator=g)
        if kind == "huge":
            # near the top of the low-precision ranges; for float64 within float32's, where
            # the judge estimates torch's own float64 error from a float32 run (tests/_fuzz.py)
            big = 1e30 if dtype == torch.float64 else torch.finfo(dtype).max / 4
            # random magnitudes: exact cancellations of +-big would make the float64
            # reference meaningless (its rounding then depends on summation order)
            _put_last(flat, idx, big * torch.randn(idx.shape, generator=g, dtype=torch.float64).clamp(-3, 3) / 3)
        else:
            pool = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=torch.float64)
            _put_last(flat, idx, pool[torch.randint(0, 3, idx.shape, generator=g)])
    return x.to(dtype)


def _put_last(flat: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor) -> None:
    """flat[idx] = vals where a repeated index keeps its last value.  A plain
    index_put_ keeps an arbitrary one (threads race), and each side of a case
    materializes its own input: ours, torch's and the float64 one would differ."""
    order = torch.arange(idx.numel())
    last = torch.zeros(flat.numel(), dtype=torch.long).scatter_reduce_(0, idx, order, "amax", include_self=False)
    keep = last[idx] == order
    flat[idx[keep]] = vals[keep]


def _layout(leaf_fn, shape: list[int], layout: str, g: torch.Generator):
    """(leaf, view): ``view`` has ``shape`` and the requested memory layout and
    is a differentiable function of ``leaf`` (gradients land in leaf.grad)."""
    nd = len(shape)
    if layout == "transposed" and nd >= 2:
        a, b = sorted(torch.randperm(nd, generator=g)[:2].tolist())
        sw = list(shape)
        sw[a], sw[b] = sw[b], sw[a]
        leaf = leaf_fn(sw)
        return leaf, lambda t: t.transpose(a, b)
    if layout == "strided" and nd >= 1:
        leaf = leaf_fn(shape[:-1] + [shape[-1] * 2])
        return leaf, lambda t: t[..., ::2]
    if layout == "channels_last" and nd in (4, 5):
        fmt = torch.channels_last if nd == 4 else torch.channels_last_3d
        leaf = leaf_fn(shape).contiguous(memory_format=fmt)
        return leaf, lambda t: t
    if layout == "expanded" and nd >= 1:
        d = int(torch.randint(0, nd, (), generator=g))
        sq = list(shape)
        sq[d] = 1
        leaf = leaf_fn(sq)
        return leaf, lambda t: t.expand(shape)
    return leaf_fn(shape), lambda t: t


def _index_target(r: random.Random, g: torch.Generator, s: dict, tshape: list[int], C: int):
    """Class indices and the ignore_index that goes with them."""
    dtype = _dt(s["target_dtype"])
    t = torch.randint(0, max(C, 1), tshape, generator=g)
    hi = 255 if dtype == torch.uint8 else 2**31 - 1
    mode, ii, mark = s["ignore"], -100, None
    if mode == "none_present":
        ii = r.choice([-1, 3, 255])
    elif mode == "some":
        ii = r.choice([-100, -1]) if dtype != torch.uint8 else r.choice([255, max(C - 1, 0)])
        mark = ii
    elif mode == "class":
        ii = mark = r.randrange(max(C, 1))
    elif mode == "wrap":  # equal to a stored value only after wrapping to the target's dtype
        v = r.randrange(max(C, 1)) if dtype != torch.uint8 or r.random() < 0.5 else 156
        ii, mark = (v - 256, v) if dtype == torch.uint8 else (v + r.choice([2**32, -2**32]), v)
    elif mode == "big":
        ii = r.choice([2**40, -2**40, 2**31])
    elif mode == "out_of_range":
        ii = mark = min(C + 3, hi)
    elif mode == "all":  # every target ignored: a 'mean' of no terms
        ii = r.choice([-100, max(C - 1, 0)]) if dtype != torch.uint8 else 255
        t.fill_(ii)
    if mark is not None and t.numel():
        t.view(-1)[torch.rand(t.numel(), generator=g) < 0.35] = mark
    return t.to(dtype), ii


def _prob_target(g: torch.Generator, s: dict, shape: list[int]) -> torch.Tensor:
    t = torch.randn(shape, generator=g, dtype=torch.float64)
    if s["prob_values"] == "softmax" and t.dim():
        t = torch.softmax(t, class_dim(t.dim()))
    elif s["prob_values"] == "rand":
        t = t.abs()
    return t


def _weight(g: torch.Generator, kind: str, C: int) -> torch.Tensor:
    w = torch.rand(C, generator=g, dtype=torch.float64) + 0.25
    if kind == "zero_some":
        w[torch.rand(C, generator=g) < 0.4] = 0
    elif kind == "all_zero":
        w.zero_()
    elif kind == "negative":
        w -= 0.75
    return w


def _weight_view(w: torch.Tensor, layout: str, g: torch.Generator):
    """(leaf, view) for a class weight of the requested layout."""
    if layout == "strided":
        leaf = torch.stack([w, torch.rand(w.shape, generator=g, dtype=w.dtype)], 1).reshape(-1)
        return leaf, lambda t: t[::2]
    if layout == "row":
        return w.reshape(1, -1), lambda t: t
    if layout == "expanded" and w.numel():
        return w[:1].clone(), lambda t: t.expand(w.numel())
    return w, lambda t: t


def materialize(s: dict, side: str) -> dict:
    """The tensors of case ``s`` for one side: 'ours', 'torch' or 'ref' (float
    tensors in fp64; every side sees the same values).  Returns a dict:
    leaves (name -> leaf tensor), views (name -> function of the leaf), and
    kw (the remaining call arguments)."""
    r, g = random.Random(s["seed"]), torch.Generator().manual_seed(s["seed"])
    dtype = _dt(s["dtype"])
    cast = (lambda t: t.to(torch.float64)) if side == "ref" else (lambda t: t)
    leaves, views = {}, {}
    shape = list(s["shape"])
    lin = "classes" in s

    def float_leaf(name, shp, dt, kind="normal", layout="contig"):
        leaf, view = _layout(lambda sh: cast(_values(g, sh, dt, kind)), shp, layout, g)
        leaves[name], views[name] = leaf, view

    of = list(s.get("out_features", []))  # a K-dim linear loss: weight (C, d1..dk, D), target (N, d1..dk)
    if lin:
        D, C = shape[-1], s["classes"]
        float_leaf("input", shape, dtype, "normal", s["layout"] if len(shape) != 3 else "contig")
        float_leaf("linear_weight", [C, *of, D], dtype, "normal", r.choice(["contig", "contig", "transposed"]))
        if s["bias"]:
            float_leaf("linear_bias", [C, *of], dtype, s["values"])
        bshape = shape[:-1] + of
    else:
        float_leaf("input", shape, dtype, s["values"], s["layout"])
        if s["fn"] == "log_probs":  # classes last
            C, bshape = shape[-1], shape[:-1]
        else:
            C = shape[class_dim(len(shape))] if shape else 1
            bshape = [1] if s.get("target_shape_1") else [] if len(shape) <= 1 else [shape[0]] + shape[2:]
    kw = {}
    if "target" in s:
        if s["target"] == "prob":
            tshape = shape[:-1] + [C] + of if lin else shape
            tdt = _dt(s["target_dtype"])
            leaf, view = _layout(lambda sh: cast(_prob_target(g, s, sh).to(tdt)), tshape, s["target_layout"], g)
            kw["ignore_index"] = s["ignore_index"]
        else:
            t, kw["ignore_index"] = _index_target(r, g, s, bshape, C)
            leaf, view = (t[:1].clone(), lambda x: x.expand(bshape)) if s["target_layout"] == "expanded" and bshape \
                else _layout(lambda sh: t if sh == bshape else torch.cat([t, t], -1), bshape,
                             "strided" if s["target_layout"] == "strided" else "contig", g)
        leaves["target"], views["target"] = leaf, view
        if s.get("weight"):
            leaves["weight"], views["weight"] = _weight_view(cast(_weight(g, s["weight"], C).to(dtype)),
                                                             s["weight_layout"], g)
        for k in ("reduction", "label_smoothing", "z_loss", "softcap", "legacy", "inplace_backward",
                  "temperature", "entropy"):
            if k in s:
                kw[k] = s[k]
    else:
        kw["dim"] = s["dim"]
        if "dtype_arg" in s:
            kw["dtype"] = torch.float64 if side == "ref" else _dt(s["dtype_arg"])
    for m in s.get("mutations", ()):
        _mutate(m, leaves, views, kw, C, dtype, side, g)
    return {"leaves": leaves, "views": views, "kw": kw}


def _mutate(m, leaves, views, kw, C, dtype, side, g) -> None:
    t = leaves.get("target")
    index = t is not None and not t.is_floating_point()
    if m in ("oob_target", "neg_target") and index and t.numel():
        t.view(-1)[0] = (min(C, 255) if t.dtype == torch.uint8 else C) if m == "oob_target" else -3
    elif m == "weight_numel":
        leaves["weight"], views["weight"] = torch.rand(C + 1, generator=g).to(leaves["input"].dtype), lambda w: w
    elif m == "weight_dtype" and "weight" in leaves:
        other = torch.float32 if dtype != torch.float32 else torch.float64
        leaves["weight"] = leaves["weight"].to(other if side != "ref" else torch.float64)
    elif m == "weight_2d" and "weight" in leaves:
        views["weight"] = lambda w, v=views["weight"]: v(w).reshape(1, -1)
    elif m == "weight_grad" and "weight" in leaves:
        leaves["weight"].requires_grad_(True)
    elif m == "target_int16" and index:
        leaves["target"] = t.to(torch.int16)
    elif m == "target_float" and index:
        # float64 on the reference side, as every float tensor there (after prob_int it is a valid
        # probability target, whose smoothed form torch rounds to the target's dtype)
        leaves["target"] = t.to(torch.float32 if side != "ref" else torch.float64)
    elif m in ("target_batch", "target_spatial") and t is not None and t.dim():
        d = t.dim() - 1 if m == "target_spatial" else 0
        leaves["target"] = torch.cat([t, t.narrow(d, 0, min(1, t.shape[d]))], d) if t.shape[d] else \
            torch.zeros([*t.shape[:d], 1, *t.shape[d + 1:]], dtype=t.dtype)
        views["target"] = lambda x: x
    elif m == "ls_gt1" and "reduction" in kw:
        kw["label_smoothing"] = 1.5
    elif m == "bad_reduction" and "reduction" in kw:
        kw["reduction"] = "avg"
    elif m == "prob_ignore" and t is not None and t.is_floating_point():
        kw["ignore_index"] = 0
    elif m == "int_input":
        leaves["input"] = leaves["input"].nan_to_num(0, 0, 0).round().clamp(-50, 50).long()
    elif m == "prob_int" and t is not None and t.is_floating_point():
        leaves["target"] = t.nan_to_num(0, 0, 0).round().clamp(0, 50).to(torch.int64)
