"""torch's side of the fuzz cases: F's functions, composed where crossent
has extras (z_loss, softcap, statistics, batch dims of a linear loss)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from _fuzz_cases import class_dim


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


def flat_batch(h, t, loss_fn, reduction):
    """loss_fn on (N, D) hidden states and their targets, from (*B, D) ones
    (rule 6); a 'none' loss (and statistics' lse) gets its (*B) shape back."""
    if h.dim() <= 2:
        return loss_fn(h, t)
    prob = t.dim() == h.dim()
    # flatten, not reshape(-1, D): that is ambiguous for D == 0 (in_features 0)
    out = loss_fn(h.flatten(0, -2), t.flatten(0, -2) if prob else t.reshape(-1))
    if isinstance(out, tuple):  # (loss, lse, z term): lse per position whatever the reduction
        return tuple(o.reshape(h.shape[:-1]) if o.dim() == 1 else o for o in out)
    return out.reshape(h.shape[:-1]) if reduction == "none" else out


def torch_linear(h, W, t, linear_bias=None, weight=None, reduction="mean", ignore_index=None,
                 label_smoothing=0.0, z_loss=0.0, softcap=None, stats=False, shift=False):
    """F.linear_cross_entropy, batch dims flattened.  crossent's extensions:
    ``shift``, the call on input[..., :-1, :] with the targets from position 1;
    z_loss, softcap and the statistics, torch_ce of F.linear's logits, after
    F.linear_cross_entropy's own checks (its exceptions, in its order)."""
    if shift:
        h, t = h[..., :-1, :], t[..., 1:, :] if t.dim() == h.dim() else t[..., 1:]

    def plain(h2, t2):
        return F.linear_cross_entropy(h2, W, t2, linear_bias=linear_bias, weight=weight, reduction=reduction,
                                      ignore_index=ignore_index, label_smoothing=label_smoothing)
    if not (z_loss or softcap or stats):
        return flat_batch(h, t, plain, reduction)
    with torch.no_grad():
        flat_batch(h, t, plain, reduction)
    ii = -100 if ignore_index is None else ignore_index

    def logits(h2):  # (N, C, d1..dk) for a K-dim weight (C, d1..dk, D), as torch's
        b = None if linear_bias is None else linear_bias.flatten()
        return F.linear(h2, W.flatten(0, -2), b).unflatten(-1, W.shape[:-1])
    return flat_batch(h, t, lambda h2, t2: torch_ce(logits(h2), t2, weight, None, ii, None,
                                                    reduction, label_smoothing, z_loss, softcap, stats), reduction)


def torch_log_probs(x, t, linear_weight=None, linear_bias=None, ignore_index=-100, temperature=1.0,
                    entropy=False, reciprocal=False):
    """crossent.log_probs' documented definition in torch's ops: the target's
    log_softmax(logits.float() / T) and -(p * log p).sum(-1), 0 at ignored
    positions, with 0 log 0 = 0 (a -inf logit adds nothing to the entropy, where
    the eager formula gives NaN); from hidden states, the logits of F.linear in
    their dtype first.  ``reciprocal``: z * (1/T) instead of z / T (rule 17).
    Returns (log_probs, entropy) or (log_probs,)."""
    z = x if linear_weight is None else F.linear(x, linear_weight, linear_bias)
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    logp = torch.log_softmax(z * (1.0 / temperature) if reciprocal else z / temperature, -1)
    keep = t.long() != ignore_index
    lp = logp.gather(-1, torch.where(keep, t.long(), 0).unsqueeze(-1)).squeeze(-1)
    lp = torch.where(keep, lp, 0.0)
    if not entropy:
        return (lp,)
    p = logp.exp()
    # log p taken as 0 where p is: p * log p's gradient (log p) would be -inf * 0 there
    ent = -(p * torch.where(p > 0, logp, 0.0)).sum(-1)
    return lp, torch.where(keep, ent, 0.0)
