"""Shared pieces of the vocab-parallel losses: groups, collectives, shard math.

Notation as in ``crossent/backends/base.py``; each rank holds the columns
[start, start + C_l) of the (softcapped) logits z, C = sum of C_l over ranks.
Everything is computed relative to a row maximum, never from absolute
log-sum-exps (a common offset of 1e4 would otherwise cost 1e-3 in fp32,
issue 9 item 4).  A rank computes, per row, from its own columns only:

  m_r   = max_local(z)                  -> MAX all_reduce: m = max_r m_r (the
                                           slice sizes ride along when unknown)
  s_r   = sum_c exp(z_c - m_r)             local, shifted by the LOCAL max
  zy_r  = z[y] - m if y is a local class else 0
  class targets, smoothing:  D_r = sum_c w_c (z_c - m_r)
  probability targets:       A_r = sum_c w_c t_c (z_c - m_r),  T_r = sum_c w_c t_c,
                             t smoothed class by class (t (1 - eps) + eps / C)
  and, once m is known, each sum moved to the global shift: s_r exp(m_r - m),
  D_r + W_r (m_r - m) with W_r = sum of the local weights (or C_l), ...
                                        -> one SUM all_reduce of the stack

then log S = log(sum_r s_r exp(m_r - m)), lse = m + log S, and the loss is the
single-process formula written with (lse - m) and (z - m): e.g. lse - z[y] =
log S - zy.  The gradient of a shard needs only m, log S (saved) and local
data: exp((z - m) - log S), no communication in the backward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .._autograd.vocab_parallel import GlobalSoftmaxFunction
from ..backends.base import wide_dtype
from ..backends.torch_terms import _col, _wcol  # the same column helpers as the fused backend
from ..functional import _class_denominator, _weight_at
from ._checks import Layout, layout_from


@dataclass(frozen=True)
class VPOptions:
    """Everything about a vocab-parallel call that is not a tensor."""

    reduction: str = "mean"
    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float = 0.0  # 0 = off
    prob: bool = False
    out_dtype: torch.dtype = torch.float32
    reduce_input_grad: bool = True  # linear variant only


# ---------------------------------------------------------------------------
# Groups and collectives
# ---------------------------------------------------------------------------
def resolve_group(group):
    """ProcessGroup, 1-D DeviceMesh or None -> (group or None, rank, world).

    Without an initialised default group and group=None, this is a world of
    one (no collectives at all), which keeps single-process use and tests easy.
    """
    if group is not None and hasattr(group, "get_group") and hasattr(group, "ndim"):
        if group.ndim != 1:
            raise ValueError(f"vocab-parallel cross-entropy needs a 1-D DeviceMesh, got {group.ndim}-D; "
                             "pass mesh['tp'] (or mesh.get_group('tp'))")
        group = group.get_group()
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return None, 0, 1
    return group, dist.get_rank(group), dist.get_world_size(group)


def all_reduce_(buf: Tensor, op, group, world: int) -> Tensor:
    # Looked up as dist.all_reduce at call time so that benchmarks can count bytes.
    if world > 1:
        dist.all_reduce(buf, op=op, group=group)
    return buf


def sizes_onehot(c_local: int, rank: int, world: int, dtype, device, first: Tensor | None = None) -> Tensor:
    """This rank's slice size at position ``rank``, 0 elsewhere: a MAX
    all_reduce of these gives every rank's size (sizes are >= 0).  Exact in
    fp32 up to 2**24 classes per rank.

    first: 1-D values (the row maxima) to put before them, in one buffer for
    one all_reduce: padded and written, not torch.cat, as inductor (torch
    2.13) computes a cat's inputs inside the cat's buffer and then reduces
    that buffer in place while they are still to be read (a compiled rank
    then computed its loss from its own slice only)."""
    if c_local >= 2 ** 24 and dtype != torch.float64:
        raise ValueError("vocab shards of 2**24 classes or more are not supported")
    v = torch.zeros(world, dtype=dtype, device=device) if first is None else torch.nn.functional.pad(first, (0, world))
    v[v.numel() - world + rank] = c_local
    return v


def gather_sizes(c_local: int, rank: int, world: int, group, device, dtype=torch.float32) -> Tensor:
    """All slice sizes (world,) as a device tensor, from one small MAX all_reduce."""
    return all_reduce_(sizes_onehot(c_local, rank, world, dtype, device), dist.ReduceOp.MAX, group, world)


# ---------------------------------------------------------------------------
# The shard math
# ---------------------------------------------------------------------------
class ShardMath:
    """Per-call state for one rank: targets, weights and the O(N) buffers.

    z chunks have layout (r, C_l) or (b, C_l, s); ``ri`` indexes the row
    buffers (r,) or (b, s) and ``xi`` the logits/probability-target chunk.
    """

    def __init__(self, opts: VPOptions, target: Tensor, weight: Tensor | None, acc, rows_shape,
                 ndim: int, device):
        self.o, self.acc, self.ndim, self.device = opts, acc, ndim, device
        self.eps, self.zl, self.cap = opts.label_smoothing, opts.z_loss, opts.softcap
        # Class indices compared in int64: in a uint8 target ignore_index=-100
        # would wrap to 156 (issue 9 item 1).  One O(N) copy, reused below.
        self.target = target if opts.prob else target.long()
        self.weight = weight
        self.w = None if weight is None else weight.to(acc)
        self.m_r = torch.empty(rows_shape, dtype=acc, device=device)  # local max
        self.s_r = torch.empty(rows_shape, dtype=acc, device=device)  # local sum exp(z - m_r)
        self.lay: Layout | None = None
        self.w_l = None
        # Local sums over classes of z - m_r (with class weights or
        # probabilities), and the SUM all_reduce that carries them, in fp64 for
        # fp32 work: with logits near fp32's range a sum over C classes
        # overflows where the loss (about their mean) fits, as in the fused
        # backend's shifted_sum.  Without such sums the stack stays in acc.
        self.sdt = wide_dtype(device) if opts.prob or self.eps > 0 else acc
        if opts.prob:
            self.A = torch.empty(rows_shape, dtype=self.sdt, device=device)
            self.T = torch.empty(rows_shape, dtype=self.sdt, device=device)
        else:
            self.D = torch.empty(rows_shape, dtype=self.sdt, device=device) if self.eps > 0 else None

    # -- layout-dependent state ---------------------------------------------
    def needs_layout_early(self) -> bool:
        """Pass 1 needs this rank's weight slice (weighted smoothing or prob
        targets), or the global C (a probability target's smoothing, eps / C)."""
        return (self.o.prob and self.eps > 0) or (self.w is not None and (self.o.prob or self.eps > 0))

    def set_layout(self, lay: Layout) -> None:
        self.lay = lay
        dev, acc = self.device, self.acc
        if self.w is not None:
            cols = torch.arange(lay.c_local, device=dev) + lay.start
            self.w_l = self.w.index_select(0, cols.clamp_(0, max(self.w.numel() - 1, 0)))
            self.sum_w = self.w.sum()
            self.W_r = self.w_l.sum()
        else:
            self.sum_w = lay.C
            self.W_r = float(lay.c_local)
        self.eps_c = self.eps / lay.C  # eps / C with the GLOBAL C (0-d tensor)
        if self.o.prob:
            return
        t = self.target
        zero = torch.zeros((), dtype=acc, device=dev)
        valid = t != self.o.ignore_index
        inb = (t >= 0) & (t < lay.C.long())
        if self.w is not None:
            inb = inb & (t < self.w.numel())
        safe = torch.where(valid & inb, t, 0)
        # ignored rows: 0, not w[0] (a non-finite w[0] times their 0 would be NaN; torch writes nothing)
        self.wy = torch.where(valid, _weight_at(self.w, safe), zero) if self.w is not None \
            else torch.ones((), dtype=acc, device=dev)
        m = torch.where(valid, torch.ones((), dtype=acc, device=dev), zero)
        self.m = torch.where(valid & ~inb, torch.full((), float("nan"), dtype=acc, device=dev), m)
        self.valid = valid
        loc = t - lay.start
        self.owner = valid & inb & (loc >= 0) & (loc < lay.c_local)
        self.idx = torch.where(self.owner, loc, 0)

    def denominator(self, rows: int) -> Tensor:
        """The mean's denominator, local (target and weight are replicated)."""
        if self.o.prob:  # torch's numel / C: NaN without classes
            n = torch.full((), float(rows), dtype=self.acc, device=self.device)
            return torch.where(self.lay.C == 0, float("nan"), n)
        C = 0 if self.w is None else self.w.numel()  # only used with a weight, which has C elements
        return _class_denominator(self.target, self.w, self.o.ignore_index, C, self.acc, self.eps)

    # -- forward ---------------------------------------------------------------
    def z(self, xc: Tensor) -> Tensor:
        z = xc.to(self.acc)
        if self.cap:
            z = torch.tanh(z / self.cap).mul_(self.cap)
        return z

    def _wl(self) -> Tensor:
        return _wcol(self.w_l, self.ndim)

    def stats(self, z: Tensor, xi, ri) -> None:
        """Pass 1 on one chunk: local max, sum of exp and weighted sums, all
        relative to the local max."""
        if z.shape[1] == 0:
            self.m_r[ri] = float("-inf")
            self.s_r[ri] = 0.0
            zs = z
        else:
            m = z.amax(1)
            self.m_r[ri] = m
            # A row that is all -inf here shifts by 0: exp(-inf) = 0, not NaN.
            zs = z - _col(torch.where(m == float("-inf"), torch.zeros((), dtype=m.dtype, device=m.device), m))
            self.s_r[ri] = torch.exp(zs).sum(1)
        if self.o.prob:
            t = self.target[xi].to(self.acc)
            if self.eps > 0:
                # torch's smoothed target, class by class: a -inf logit then meets
                # its own t' (split as (1 - eps) sum t z + eps / C sum z, a negative
                # t there would give inf - inf); eps / C is why the layout comes early
                t = t * (1 - self.eps) + self.eps_c
            tw = t if self.w is None else t * self._wl()
            # The products in sdt too: t w (z - m_r) passes fp32's range for logits
            # near it (fuzz R1), as in the torch backend's sums over classes.
            self.A[ri] = (tw * zs.to(self.sdt)).sum(1)
            self.T[ri] = tw.sum(1, dtype=self.sdt)
        elif self.D is not None:
            self.D[ri] = (zs if self.w is None else zs.to(self.sdt) * self._wl()).sum(1, dtype=self.sdt)

    def target_logit(self, x: Tensor) -> Tensor:
        """z[y] on the owning rank, 0 elsewhere (a gather: O(N))."""
        if self.lay.c_local == 0:
            return torch.zeros(self.target.shape, dtype=self.acc, device=self.device)
        zy = self.z(x.gather(1, self.idx.unsqueeze(1)).squeeze(1))
        return torch.where(self.owner, zy, torch.zeros((), dtype=self.acc, device=self.device))

    def sum_stack(self, M: Tensor, zy: Tensor | None) -> Tensor:
        """The quantities of the SUM all_reduce, moved to the global max M, stacked (K, *rows)."""
        zero = torch.zeros((), dtype=self.acc, device=self.device)
        s = self.s_r * torch.exp(self.m_r - M)
        # The local sums were taken relative to m_r (0 for an all -inf slice);
        # the shift in sdt, as W_r * shift may pass fp32's range.
        shift = torch.where(self.m_r == float("-inf"), zero, self.m_r).to(self.sdt) - M.to(self.sdt)
        if self.o.prob:
            parts = [s, self.A + self.T * shift, self.T]
        else:
            parts = [s, torch.where(self.owner, zy - M, zero)]
            if self.D is not None:
                parts.append(self.D + self.W_r * shift)
        return torch.stack([p.to(self.sdt) for p in parts])

    def finish(self, M: Tensor, summed: Tensor) -> tuple[Tensor, Tensor]:
        """Global lse and per-row loss from the reduced stack; keeps M and log S
        for the backward, and the z-loss rows apart in ``zrows`` (None without
        z_loss; 0 in ignored rows).  The sums over classes stay in sdt; the loss
        rows are in the wide dtype up to the reduction (as the backends' rows,
        backends/base.py): one row can pass fp32's range where the mean fits."""
        logS = torch.log(summed[0]).to(self.acc)
        self.M, self.logS = M, logS
        lse = M + logS
        wide = wide_dtype(lse.device)
        zero = torch.zeros((), dtype=wide, device=lse.device)
        self.zrows = None
        if self.zl:
            lw = lse.to(wide)
            self.zrows = self.zl * lw * lw
            if not self.o.prob:
                self.zrows = torch.where(self.valid, self.zrows, zero)
        logSw = logS.to(wide)
        if self.o.prob:
            zdot, tw_sum = summed[1], summed[2]  # zdot relative to M
            self.tw_sum = tw_sum.to(self.acc)
            # No classes at all: torch's sums over an empty class dim are 0 (not -inf * 0).
            return lse, torch.where(self.lay.C == 0, zero, logSw * tw_sum.to(wide) - zdot.to(wide))
        out = (logSw - summed[1].to(wide)) * self.wy * (1 - self.eps)  # summed[1]: z[y] - M
        if self.eps > 0:
            out = out + self.eps_c * (self.sum_w * logSw - summed[2].to(wide))
        return lse, torch.where(self.valid, out * self.m, zero)

    # -- backward --------------------------------------------------------------
    def grad(self, z: Tensor, xi, ri, lse: Tensor, scale: Tensor) -> Tensor:
        """d(sum scale*loss)/dx for one chunk of this rank's columns (acc dtype)."""
        e = torch.exp((z - _col(self.M[ri])).sub_(_col(self.logS[ri])))  # p, from the GLOBAL max and sum
        sc = scale if scale.dim() == 0 else _col(scale[ri])
        zterm = 2 * self.zl * _col(lse[ri]) if self.zl else 0.0
        if self.o.prob:
            t = self.target[xi].to(self.acc)
            if self.eps > 0:
                t = t * (1 - self.eps) + self.eps_c
            tw = t if self.w is None else t * self._wl()
            e.mul_(sc * (_col(self.tw_sum[ri]) + zterm)).sub_((sc * tw).sub_(_nan_if_infinite(sc)))
        else:
            m = _col(self.m[ri])
            sm = torch.where(m != 0, sc * m, torch.zeros((), dtype=e.dtype, device=e.device))
            wy = _col(self.wy[ri]) if self.wy.dim() else self.wy
            # The z-loss term is added, not folded into the factor of p: an
            # infinite upstream then gives torch's NaN where the two meet.
            zt = e * (sm * zterm) if self.zl else None
            hot = (1 - self.eps) * sm * wy  # B's [c == y] term
            coef = hot
            if self.eps > 0:
                b = sm * self.eps_c  # B_c = b * w_c off the target class
                coef = hot + b * self.sum_w
            own, idx = _col(self.owner[ri]), _col(self.idx[ri])
            py = e.gather(1, idx) if self.eps > 0 and self.lay.c_local > 0 else None  # p_y
            e.mul_(coef)
            if zt is not None:
                e.add_(zt)
            if self.eps > 0:
                e.sub_(b * (1.0 if self.w is None else self._wl()))
            if py is not None:
                # The target entry as p_y*A - (b*w_y + hot), B_y summed first as A is
                # (torch's g - p*sum(g) likewise): exactly 0 for one class.
                gy = py * coef - (b * wy + hot)
                if zt is not None:
                    gy = gy + zt.gather(1, idx)
                e.scatter_(1, idx, torch.where(own, gy, e.gather(1, idx)).to(e.dtype))
            elif self.lay.c_local > 0:
                zero = torch.zeros((), dtype=e.dtype, device=e.device)
                e.scatter_add_(1, idx, torch.where(own, -hot, zero).expand(own.shape).to(e.dtype))
        if self.cap:
            e.mul_(1 - (z / self.cap).square_())
        return e

    def grad_graph(self, x: Tensor, scale: Tensor, group, world: int) -> Tensor:
        """The gradient of :meth:`grad` for backward(create_graph=True), in
        differentiable ops on this rank's (pre-softcap) logits x, so that it
        has a gradient itself.  The global log-sum-exp is recomputed from x
        through a differentiable all_reduce (its backward sums the ranks'
        parts), so second derivatives carry the other shards' terms.  Also the
        backward of a non-finite upstream on CPU (torch's inf/NaN pattern)."""
        z = x.to(self.acc)
        if self.cap:
            z = torch.tanh(z / self.cap) * self.cap
        M = _col(self.M)  # a constant shift: the global max of the forward
        s = torch.exp(z - M).sum(1)
        if world > 1:
            from torch.distributed.nn.functional import all_reduce
            s = all_reduce(s, group=group)
        logS = _col(torch.log(s))
        p = GlobalSoftmaxFunction.apply(z, M, _col(s), group, world)  # torch.softmax's backward
        sc = scale if scale.dim() == 0 else _col(scale)
        wl = None if self.w is None else self._wl()
        # d loss / d log p per class, scaled before the classes meet, then
        # log_softmax's backward gl - p * sum(gl) with the sum over every rank's
        # classes: torch's chain rule term by term (reference.cross_entropy_grad),
        # so an infinite upstream gives torch's inf/NaN pattern
        if self.o.prob:
            t = self.target.to(self.acc)
            if self.eps > 0:
                t = t * (1 - self.eps) + self.eps_c
            row_scale = sc
            gl = -(sc * (t if wl is None else t * wl))
        else:
            m = _col(self.m)  # 1 counted, 0 ignored, NaN out of range
            # 0, not NaN, in ignored rows even for a non-finite upstream, also
            # in the graph of this gradient (a second derivative of 0 there).
            row_scale = torch.where(m != 0, sc * m, 0.0)
            wy = _col(self.wy) if self.wy.dim() else self.wy
            gl = torch.zeros_like(z)
            if self.lay.c_local > 0:  # the target's term only where it is (torch's nll_loss writes only there)
                hot = torch.where(_col(self.owner), -(1 - self.eps) * row_scale * wy, 0.0)
                gl = gl.scatter(1, _col(self.idx), hot.expand(_col(self.owner).shape))
            if self.eps > 0:
                gl = gl - row_scale * self.eps_c * (1.0 if wl is None else wl)
        S = gl.sum(1, keepdim=True)
        if world > 1:
            S = all_reduce(S, group=group)
        dz = gl - p * S
        if self.zl:
            dz = dz + row_scale * (2 * self.zl * (M + logS)) * p
        if self.cap:
            dz = dz * (1 - (z / self.cap) ** 2)
        return dz


def _nan_if_infinite(v: Tensor) -> Tensor:
    """0 where v is finite, NaN where not.  With probability targets torch
    forms sum_c(scale * t_c * w_c) before it meets p, so an infinite upstream
    scale makes the whole gradient row NaN (inf * 0 or inf - inf); label
    smoothing with no classes multiplies even empty sums by eps / C = inf."""
    return v - v


def early_layout(sm: ShardMath, vocab_start_index, rank: int, world: int, group, c_local: int,
                 weight: Tensor | None, force: bool = False) -> None:
    """Set the layout before pass 1 when it is free (start given and C known
    from the weight) or needed (pass 1 uses the weight slice; ``force``)."""
    if vocab_start_index is not None and weight is not None:
        sm.set_layout(layout_from(None, vocab_start_index, rank, c_local, sm, weight))
    elif force or sm.needs_layout_early():
        sizes = gather_sizes(c_local, rank, world, group, sm.device, sm.acc)
        sm.set_layout(layout_from(sizes, vocab_start_index, rank, c_local, sm, weight))


def forward_reductions(sm: ShardMath, opts: VPOptions, zy_fn, vocab_start_index, rank: int,
                       world: int, group, c_local: int, weight: Tensor | None) -> tuple[Tensor, Tensor]:
    """After pass 1: the MAX and SUM collectives, then lse and the loss rows.

    zy_fn() returns the local target logits once the layout is known (class
    targets).  While the layout is unknown the slice sizes ride on the MAX
    all_reduce, so the whole forward is two collectives.
    """
    dev, acc = sm.device, sm.acc
    flat = sm.m_r.reshape(-1)
    need_sizes = sm.lay is None
    if need_sizes:
        buf = sizes_onehot(c_local, rank, world, acc, dev, first=flat)
    else:
        buf = flat.clone()
    all_reduce_(buf, dist.ReduceOp.MAX, group, world)
    M = buf[:flat.numel()].reshape(sm.m_r.shape)
    if need_sizes:
        sm.set_layout(layout_from(buf[flat.numel():], vocab_start_index, rank, c_local, sm, weight))
    zy = None if opts.prob else zy_fn()
    stack = sm.sum_stack(M, zy)
    all_reduce_(stack, dist.ReduceOp.SUM, group, world)
    return sm.finish(M, stack)
