"""The spec in code: plain eager math for everything crossent computes.

These functions define what the fused kernels must produce.  They are built
from torch's own differentiable ops (so autograd, double backward and
probability-target gradients all work here) and are used
  * by the tests, as the oracle for crossent's extras (z_loss, softcap, lse),
    whose plain-PyTorch part is torch.nn.functional itself;
  * by ``crossent.functional`` as the fallback for the rare calls that need a
    gradient the fused path does not produce (w.r.t. probability targets or
    class weights), and by ``crossent.log_probs`` under vmap and forward-mode AD.
Low-precision inputs are computed in fp32 and the result rounded once: that
is crossent's documented behaviour (PyTorch rounds log_softmax to bf16/fp16
first and accumulates fp16 means in fp16).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def apply_softcap(x: Tensor, cap: float | None) -> Tensor:
    """cap * tanh(x / cap), Gemma-2 style; identity when cap is None/0."""
    return x if not cap else cap * torch.tanh(x / cap)


def _upcast(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _shifted_logsumexp(x: Tensor, dim: int, keepdim: bool = False) -> Tensor:
    """torch.logsumexp (the same value), formed relative to the detached row max
    so that its backward, exp(x - lse), sees x - max and lse - max: a common
    offset of the logits then costs no digits (at |x| ~ 300 fp32's x - lse
    loses |x| * eps, a relative error of 2e-5 in the z-loss gradient)."""
    if not x.shape[dim]:  # no classes: nothing to shift by
        return torch.logsumexp(x, dim, keepdim)
    m = x.detach().amax(dim, keepdim=True)
    m = torch.where(m.isfinite(), m, 0.0)  # +-inf or NaN rows: torch.logsumexp's own result
    out = torch.logsumexp(x - m, dim, keepdim=True) + m
    return out if keepdim else out.squeeze(dim)


def logsumexp(input: Tensor, class_dim: int, softcap_: float | None = None) -> Tensor:
    """Per-position lse of (softcapped) logits, fp32 for low precision."""
    return torch.logsumexp(apply_softcap(_upcast(input), softcap_), class_dim)


def cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None = None,
                  ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                  softcap: float | None = None) -> Tensor:
    """F.cross_entropy on softcap(input), plus z_loss * lse**2 per counted position.

    The z-loss term is not multiplied by class weights; it is reduced like the
    loss (under 'mean', divided by the same denominator: the weighted count of
    non-ignored positions for class targets, the number of positions for
    probability targets).  Shapes and dtypes as in F.cross_entropy.
    """
    # promote_types: result_type's answer for two tensors of one shape; Dynamo cannot trace
    # result_type (fullgraph=True fails on a probability target that requires grad)
    dtype = input.dtype if input.shape != target.shape else torch.promote_types(input.dtype, target.dtype)
    x = apply_softcap(_upcast(input), softcap)
    # integer input (only empty here: the checks reject others) keeps torch's own promotion
    cast = x.is_floating_point()
    w = weight.to(x.dtype) if cast and weight is not None and weight.dtype != x.dtype else weight
    prob = input.shape == target.shape
    red = "sum" if z_loss and reduction == "mean" else reduction  # with z_loss: one denominator, below
    if prob:
        t = target if target.dtype == torch.float64 or not cast else target.to(x.dtype)
        ce = F.cross_entropy(x, t, w, reduction=red, label_smoothing=label_smoothing)
        dtype = torch.promote_types(dtype, weight.dtype) if weight is not None else dtype
    else:
        ce = F.cross_entropy(x, target.long(), w, ignore_index=ignore_index,
                             reduction=red, label_smoothing=label_smoothing)
    if z_loss:
        class_dim = 0 if input.dim() == 1 else 1
        lse = _shifted_logsumexp(x, class_dim)
        # z_loss as a tensor of lse's dtype: torch 2.13's forward AD gives a 0-d
        # fp32 tensor times a Python float an fp64 tangent (1-D input's 0-d lse)
        zt = lse * lse * lse.new_tensor(z_loss)
        if prob:  # torch's numel / C: NaN without classes
            denom = lse.new_tensor(float(lse.numel()) if x.shape[class_dim] else float("nan"))
        else:
            valid = target.long() != ignore_index  # exact: never in a narrower dtype
            zt = torch.where(valid, zt, torch.zeros_like(lse))
            if weight is not None:
                wy = w.reshape(-1)[torch.where(valid, target.long(), 0)]
                denom = torch.where(valid, wy, torch.zeros_like(wy)).sum()
            else:
                denom = valid.sum().to(lse.dtype)
        if reduction == "none":
            ce = ce + zt
        elif reduction == "sum":
            ce = ce + zt.sum()
        else:
            # (sum of losses + sum of z terms) / W, as the fused path: at W == 0 +-inf,
            # where the two means apart would be NaN + inf; torch's smoothed mean is NaN
            # there (each of its parts is 0 / 0)
            if label_smoothing > 0 and not prob:
                denom = torch.where(denom == 0, float("nan"), denom)
            ce = (ce + zt.sum()) / denom
    return ce.to(dtype)


def cross_entropy_grad(x: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int,
                       label_smoothing: float, z_loss: float, softcap: float | None,
                       scale: Tensor) -> Tensor:
    """d(sum(scale * loss rows))/dx for the backend layouts (class dim 1),
    the formula of backends/base.py in torch's differentiable ops: what
    backward(create_graph=True) returns, so the gradient itself has a
    gradient (and a jvp) without a nested autograd call.  scale: 0-d or one
    value per row.

    The terms are formed and summed as torch's chain rule through its
    composition forms them (log_softmax, then nll_loss plus the smoothing
    term -sum_c w_c log p_c, then z_loss * lse**2): the upstream scale
    multiplies each class's term before the terms meet, and log_softmax's
    backward sums them (g - p * sum(g)).  An infinite or NaN upstream then
    gives torch's inf/NaN pattern exactly, e.g. NaN in a whole row where the
    weighted terms have mixed signs or label_smoothing is 1 (0 * inf)."""
    from ._validate import target_masks

    if x.numel() == 0:  # no classes or no rows; x * 0 keeps the graph (and the grad) of x
        return x * 0
    xu = _upcast(x)
    th = torch.tanh(xu / softcap) if softcap else None
    z = xu if th is None else softcap * th
    C = z.shape[1]
    p = torch.softmax(z, 1)  # relative to the row max: a common offset costs no digits
    sc = scale.unsqueeze(1) if scale.dim() else scale
    w = None if weight is None else weight.to(z.dtype).view(1, -1, *([1] * (z.dim() - 2)))
    if target.is_floating_point():
        t = target.to(z.dtype)
        if label_smoothing > 0:
            t = t * (1 - label_smoothing) + label_smoothing / C
        gl = -(sc * (t if w is None else t * w))  # d/dlog p of -sum_c t'_c w_c log p_c
        row_scale = sc
    else:
        counted, ok = target_masks(target, ignore_index, C)
        y = torch.where(ok, target, 0).long().unsqueeze(1)
        # 0 in an ignored row (not w[0]: a non-finite w[0] times its 0 is NaN; nll_loss writes nothing)
        wy = 1.0 if w is None else torch.where(counted.unsqueeze(1), w.reshape(-1)[y], 0.0)
        # 1 counted, 0 ignored, NaN out of range (backends/base.py)
        m = counted.unsqueeze(1).to(z.dtype).masked_fill((counted ^ ok).unsqueeze(1), float("nan"))
        # where(), not sc * m alone: a non-finite scale times an ignored row's 0
        # would be NaN there, in the gradient and the second-order one (torch: 0)
        row_scale = torch.where(m != 0, sc * m, 0.0)
        # nll_loss's backward writes only at the target: a scatter, not a one-hot product
        # (inf * 0 would be NaN in the other classes).
        nll = (-(1 - label_smoothing) * row_scale * wy).to(z.dtype)
        gl = torch.zeros_like(z).scatter(1, y, nll.expand(y.shape))
        if label_smoothing > 0:
            gl = gl - row_scale * (label_smoothing / C) * (1.0 if w is None else w)
    dz = gl - p * gl.sum(1, keepdim=True)  # log_softmax's backward
    # no where() on dz: an ignored row's 0 * p is NaN where its logits are not
    # finite, as torch's log_softmax backward gives there
    if z_loss:  # d(z_loss * lse**2) = 2 z_loss lse p, added last (its own branch of the graph)
        dz = dz + row_scale * (2 * z_loss * _shifted_logsumexp(z, 1, keepdim=True)) * p
    if softcap:  # d(cap * tanh(x / cap))/dx = 1 - tanh**2
        dz = dz * (1 - th * th)
    return dz.to(x.dtype)


def nll_loss(input: Tensor, target: Tensor, weight: Tensor | None = None,
             ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """F.nll_loss with fp32 accumulation for fp16/bf16 (crossent's behaviour)."""
    w = weight.float() if weight is not None and input.dtype in (torch.float16, torch.bfloat16) else weight
    out = F.nll_loss(_upcast(input), target.long(), w, ignore_index=ignore_index, reduction=reduction)
    return out.to(input.dtype)


def softmax(input: Tensor, dim: int) -> Tensor:
    return torch.softmax(_upcast(input), dim).to(input.dtype)


def log_softmax(input: Tensor, dim: int) -> Tensor:
    return torch.log_softmax(_upcast(input), dim).to(input.dtype)


def log_probs(logits: Tensor, target: Tensor, temperature: float = 1.0, ignore_index: int = -100,
              entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """crossent.log_probs's (log p[target], entropy or None) per position, in fp32 for
    fp16/bf16 logits; 0 at ignored positions (targets already checked in range)."""
    logp = torch.log_softmax(_upcast(logits) / temperature, -1)
    t = target.long()
    keep = t != ignore_index
    lp = torch.where(keep, logp.gather(-1, torch.where(keep, t, 0).unsqueeze(-1)).squeeze(-1), 0.0)
    if not entropy:
        return lp, None
    p = logp.exp()
    return lp, torch.where(keep, -(p * torch.where(p > 0, logp, 0.0)).sum(-1), 0.0)
