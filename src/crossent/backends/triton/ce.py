"""Cross-entropy for the triton backend (formulas: ``crossent/backends/base.py``).

Launch paths, and how often each reads the logits (the gradient is written once):
  single   the class range fits one tile (C <= _SINGLE_MAX, several rows per
           program when C is small): loss, lse and gradient from ONE read.
  cluster  (R, C) rows, C up to _CLUSTER_CTAS * _CLUSTER_BLOCK, CUDA, and only where the
           installed Triton compiles reductions across a thread-block cluster
           (probed): the single path with one row per cluster: ONE read.
  split    (R, C) rows with a large C (``split.py``): each row is cut into NSPLIT
           slices held in registers; on CUDA the slices' programs exchange
           (max, sumexp, ...) through a global handshake in one cooperative
           launch: ONE read.  Under the interpreter (which runs programs one
           after another) the exchange is a second launch that re-reads.
  twopass  any layout (K-dim (B, C, S) inputs use their own strides, no transpose
           copy), and the fallback: an online (max, sumexp) pass with L2 kept
           (evict_last), then the gradient pass (evict_first): TWO reads, the
           second mostly from L2.  Forward without gradient reads once.
The backward (reduction='none', or a second backward) reruns the forward kernel
with the per-row scale: the same path, so the same reads and bitwise the same math.

The logits are addressed as ``x[b, c, s] = x_ptr + b*sx_b + c*sx_c + s*sx_s``:
(R, C) is B=1, S=R; a K-dim (B, C, S) input uses its own strides.  The tile kernel's
body is ``ce_tile.py``.  On the host each launch is decided once per key (shapes,
strides, flags, device: ``_Plan``); later calls with the key only allocate and launch.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..._fast import _eager
from ..base import wide_dtype
from . import _device, _grid, _launch as _lean, split
from ._grid import _barrier, _claimed_denominator, _den_partial, _denominator, _finish, _inverse
from .ce_tile import _ce_tile

# Launch knobs: module globals so that tests (tiny shapes) and the GPU sweep can
# move them; change them through configure(), which drops the cached plans.
_SINGLE_MAX = 16384     # widest class tile kept in registers (elements)
_LOOP_BLOCK = 4096      # class tile of the two-pass path (H100 run 2: with _REVERSE, the fastest)
_TILE_ELEMS = 4096      # tile size when several positions share a program
_KDIM_BLOCK_S = 64      # positions per tile when positions are the contiguous axis
_CLUSTER_CTAS = 8       # widest cluster (8 is the portable maximum)
_CLUSTER_BLOCK = 8192   # classes per CTA of a cluster
_CLUSTER_WARPS = 8
_KEEP_L2 = True         # two-pass: first pass loads with evict_last (a sweep knob)
_REVERSE = True         # two-pass: the gradient pass walks the class tiles backwards (a sweep knob;
#                         H100 run 2: 5-8% faster with 4096-class tiles, neutral with 8192)
_PROGRAMS_PER_SM = 16   # persistent grid of a reduced loss without a barrier (the interpreter: 4 SMs)
_ROW_PATH = "auto"      # (R, C) rows with C > _SINGLE_MAX: auto | split | cluster | twopass
# The mean over W (class-index targets) on the tile paths: "cooperative" forms W behind a
# grid barrier in a cooperative launch (a persistent grid of what fits at once);
# "claim" lets one program form it while the others wait, over one program per tile
# (_grid.py).  H100 run 2: the cooperative mean ran 1.26x the time of the 'none' kernel,
# which has one tile per program and half the registers.  Compiled for sm_90 (bf16,
# 8192 x 128256, two-pass tiles of 4096): cooperative 64 registers, 4 CTAs of 8 warps
# per SM; "claim" 32 registers, 8 CTAs.  "claim" is the default once a GPU run confirms it.
_MEAN_LAUNCH = "cooperative"
# What "auto" picks per op when no cluster path is available.  Measured on an H100 (Triton
# 3.6, bf16, BENCHMARKS.md "GPU: H100 runs"): cross-entropy's two-pass kernel beat every split
# configuration by 23-29% at 32k-256k classes; softmax's split path beat two-pass by 7%.
_AUTO_PATH = {"ce": "twopass", "softmax": "split"}


def configure(**knobs) -> None:
    """Set launch knobs of this module and of ``split`` (tests, benchmarks/gpu_sweep.py)."""
    for k, v in knobs.items():
        if hasattr(split, k):
            setattr(split, k, v)
        elif k.startswith("_") and k in globals():
            globals()[k] = v
        else:
            raise KeyError(f"unknown launch knob {k!r}")
    _forget_plans()
    _RESCALE.clear()
    split.plan.cache_clear()
    split._CONFIGS.clear()
    _grid._RESIDENT.clear()
    _lean.clear()


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _ce_kernel(
    x_ptr, sx_b, sx_s, sx_c,            # logits x[b, c, s]
    t_ptr, st_b, st_s, st_c,            # class targets y[b, s] or probabilities t[b, c, s]
    w_ptr,                              # class weight (C,), contiguous
    scale_ptr, scale_stride,            # fp32, 0-d (stride 0) or one per position
    loss_ptr, lse_ptr,                  # (B*S,) in loss_ptr's dtype, fp32; position = b*S + s
    g_ptr, sg_b, sg_s, sg_c,            # gradient out (x.dtype)
    ws_ptr, part_ptr, out_ptr,          # REDUCE > 0: counters, partials (_grid.py); the reduced loss
    S, C, n_sblk, n_tiles,              # n_tiles = B * n_sblk tiles, over a persistent grid
    ignore_index, one_m_eps, eps_over_c, z_loss, cap,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, SINGLE: tl.constexpr,
    HAS_W: tl.constexpr, PROB: tl.constexpr, SMOOTH: tl.constexpr,
    HAS_ZL: tl.constexpr, HAS_CAP: tl.constexpr, NEED_GRAD: tl.constexpr,
    KEEP_L2: tl.constexpr, REVERSE: tl.constexpr, REDUCE: tl.constexpr, STAGE: tl.constexpr,
):
    # REDUCE: 0 = per-position losses into loss_ptr (loss_ptr's dtype), gradient scaled
    # by scale_ptr; 1 = sum, 2 = mean over positions, 3 = mean over W (class targets):
    # the reduced loss into out_ptr, the denominator into scale_ptr, the gradient of
    # loss * 1.  REDUCE 3 needs W first: STAGE 0 forms it behind a grid barrier
    # (cooperative launch), STAGE 3 has one program form it for all (any grid), or
    # STAGE 1 (W's partials only) and STAGE 2 (the rest) are two launches (see _grid.py).
    n_pos = (n_tiles // n_sblk) * S
    den = tl.cast(1.0, tl.float32)
    if REDUCE == 2:
        den = tl.cast(n_pos, tl.float32)
    if REDUCE == 3:
        if STAGE == 3:   # W from the program that claims it, no barrier (_grid.py)
            den = _claimed_denominator(ws_ptr, part_ptr, t_ptr, st_b, st_s, w_ptr, S, n_pos, C, ignore_index,
                                       HAS_W, SMOOTH)
        else:
            if STAGE != 2:
                _den_partial(part_ptr, t_ptr, st_b, st_s, w_ptr, S, n_pos, C, ignore_index, HAS_W)
            if STAGE == 0:
                _barrier(ws_ptr, tl.num_programs(0))
            if STAGE != 1:
                den = _denominator(part_ptr, SMOOTH)
    if STAGE != 1:
        inv_den = _inverse(den)
        if REDUCE == 0 or STAGE == 3:
            # One tile per program (a loop, even of one trip, costs registers: 64 -> 114
            # for the cluster path, 32 -> 64 for the two-pass one); STAGE 3's grid is the tiles.
            tile_loss = _ce_tile(x_ptr, sx_b, sx_s, sx_c, t_ptr, st_b, st_s, st_c, w_ptr, scale_ptr, scale_stride,
                                 loss_ptr, lse_ptr, g_ptr, sg_b, sg_s, sg_c, inv_den, tl.program_id(0).to(tl.int64),
                                 S, C, n_sblk, ignore_index, one_m_eps, eps_over_c, z_loss, cap, BLOCK_S, BLOCK_C,
                                 SINGLE, HAS_W, PROB, SMOOTH, HAS_ZL, HAS_CAP, NEED_GRAD, KEEP_L2, REVERSE, REDUCE)
            if REDUCE != 0:
                _finish(ws_ptr, part_ptr, out_ptr, scale_ptr, tl.sum(tile_loss, 0), den, REDUCE >= 2)
        else:   # this program's tiles of a persistent grid, and the sum of their losses (fp64)
            partial = tl.zeros([BLOCK_S], tl.float64)
            for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
                partial += _ce_tile(x_ptr, sx_b, sx_s, sx_c, t_ptr, st_b, st_s, st_c, w_ptr, scale_ptr, scale_stride,
                                    loss_ptr, lse_ptr, g_ptr, sg_b, sg_s, sg_c, inv_den, tl.cast(tile, tl.int64), S,
                                    C, n_sblk, ignore_index, one_m_eps, eps_over_c, z_loss, cap, BLOCK_S, BLOCK_C,
                                    SINGLE, HAS_W, PROB, SMOOTH, HAS_ZL, HAS_CAP, NEED_GRAD, KEEP_L2, REVERSE,
                                    REDUCE)
            _finish(ws_ptr, part_ptr, out_ptr, scale_ptr, tl.sum(partial, 0), den, REDUCE >= 2)


@triton.jit
def _rescale_kernel(g_ptr, s_ptr, n, BLOCK: tl.constexpr):
    # grad *= s in place over a small persistent grid.  When s == 1 (the usual
    # loss.backward()) the loop runs zero times: one tiny launch, no N x V
    # traffic, and no host sync to find that out.
    sc = tl.load(s_ptr).to(tl.float32)
    n_eff = tl.where(sc == 1.0, 0, n)
    step = tl.num_programs(0).to(tl.int64) * BLOCK
    for start in range(tl.program_id(0).to(tl.int64) * BLOCK, n_eff, step):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(g_ptr + offs, (g * sc).to(g_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launch plan

def tile_shape(C: int, S: int, classes_contiguous: bool) -> tuple[int, int]:
    """(BLOCK_S, BLOCK_C) for a [positions x classes] tile (shared with softmax)."""
    np2c = _device.next_pow2(C)
    if classes_contiguous:
        # the (R, C) case: wide class tiles, rows packed when C is small
        block_c = np2c if np2c <= _SINGLE_MAX else min(_LOOP_BLOCK, np2c)
        return max(1, min(_device.next_pow2(S), _TILE_ELEMS // block_c)), block_c
    # positions contiguous (K-dim (B, C, S)): coalesce along S, loop over C
    block_s = min(_device.next_pow2(S), _KDIM_BLOCK_S)
    return block_s, min(np2c, max(1, _TILE_ELEMS // block_s))


def row_path(rows: bool, C: int, need_grad: bool, device: torch.device, op: str = "ce") -> str:
    """single | cluster | split | twopass for a launch (``rows``: an (R, C) layout
    with contiguous classes).  Shared with softmax (op="softmax", need_grad=True: it writes y)."""
    if _device.next_pow2(C) <= _SINGLE_MAX:
        return "single"
    if not rows or not need_grad:
        return "twopass"   # K-dim; or forward only, which reads once on this path anyway
    want = _ROW_PATH
    if want in ("auto", "cluster") and device.type == "cuda" \
            and _device.next_pow2(C) <= _CLUSTER_CTAS * _CLUSTER_BLOCK \
            and _device.cluster_reductions(device):
        return "cluster"
    if want == "auto":
        want = _AUTO_PATH[op]
    if want in ("split", "cluster") and _device.cooperative(device):
        return "split"
    return "twopass"


def cluster_config(C: int) -> dict:
    """Launch kwargs of one row per cluster (shared with softmax)."""
    block_c = _device.next_pow2(C)
    return dict(BLOCK_S=1, BLOCK_C=block_c, SINGLE=True, KEEP_L2=False, REVERSE=False, num_warps=_CLUSTER_WARPS,
                num_ctas=max(2, block_c // _CLUSTER_BLOCK))


@functools.lru_cache(maxsize=256)
def _plan(B: int, S: int, C: int, sx_s: int, sx_c: int, need_grad: bool, reduce: int,
          device: torch.device):
    """(path, launch kwargs, position blocks per batch) from shapes and strides only."""
    rows = B == 1 and sx_c == 1
    path = row_path(rows, C, need_grad, device)
    if path == "cluster" and reduce == 3:
        # W needs a grid barrier, i.e. a cooperative launch, which clusters are not
        # given here: the op's measured pick among the other row paths instead.
        path = "split" if _AUTO_PATH["ce"] == "split" and _device.cooperative(device) else "twopass"
    if path == "cluster":
        return path, cluster_config(C), S
    block_s, block_c = tile_shape(C, S, sx_c == 1 or sx_s != 1)
    single = block_c >= C
    # A tile held in registers for the gradient: 32 values per thread (8192 classes:
    # 8 warps, ~100 registers, 2 CTAs per SM; at 16 warps ~80 registers fit one CTA).
    kw = dict(BLOCK_S=block_s, BLOCK_C=block_c, SINGLE=single, KEEP_L2=_KEEP_L2 and need_grad,
              REVERSE=_REVERSE and need_grad and not single,
              num_warps=max(4, min(16, block_s * block_c // (1024 if single else 512))))
    return path, kw, _device.cdiv(S, block_s)


def _scale_arg(scale: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(tensor, stride per position) of a 0-d or per-position scale, any float dtype
    (the kernel converts): no cast or copy launched for the usual upstream gradients."""
    if scale.numel() == 1:
        return scale, 0
    if scale.dim() == 1:
        return scale, scale.stride(0)
    return scale.contiguous(), 1


class _Plan:
    """Everything about a launch that follows from a call's metadata (shapes, strides,
    flags, device): the path, constexprs, strides as the kernel addresses them, grid and
    launchers.  Built once per key (``_launch``), so a repeated call decides nothing again
    (~10 us of Python a call otherwise; issue 10, item 3)."""
    __slots__ = ("path", "consts", "S", "C", "xs", "ts", "gs", "rows", "positions", "n_sblk", "tiles", "grid", "stages",
                 "programs", "launchers", "split_consts")

    def __init__(self, x, target, g, prob: bool, flags: tuple, reduce: int, device: torch.device):
        # x[b, c, s] = x_ptr + b*sx_b + c*sx_c + s*sx_s: (R, C) and (B, C, 1) are one
        # batch of S = R positions; a K-dim (B, C, S) input keeps its own strides.
        if x.dim() == 3 and x.shape[2] != 1:
            B, C, S = x.shape
            self.xs = (x.stride(0), x.stride(2), x.stride(1))
            self.ts = (target.stride(0), target.stride(2), target.stride(1)) if prob else \
                (target.stride(0), target.stride(1), 0)
            self.gs = (g.stride(0), g.stride(2), g.stride(1))
        else:
            B, C, S = 1, x.shape[1], x.shape[0]
            self.xs = (0, x.stride(0), x.stride(1))
            self.ts = (0, target.stride(0), target.stride(1)) if prob else (0, target.stride(0), 0)
            self.gs = (0, g.stride(0), g.stride(1))
        self.S, self.C, self.rows, self.positions = S, C, (x.shape[0],) + tuple(x.shape[2:]), B * S
        self.path, kw, self.n_sblk = _plan(B, S, C, self.xs[1], self.xs[2], flags[-1][1], reduce, device)
        if self.path == "split" and self.gs[1:] != (C, 1):
            # the split kernel writes the gradient as contiguous rows, which crossent's own
            # buffers are; a caller's grad_into of another layout takes the tile kernel
            self.path = "twopass"
        self.consts = dict(**kw, **dict(flags), REDUCE=reduce)
        self.split_consts = (("REDUCE", reduce),) + flags[:-1]   # NEED_GRAD: not the split kernel's
        self.tiles = B * self.n_sblk
        # Without a grid barrier: every tile its own program for per-position losses; a
        # bounded persistent grid when the last program adds up one partial per program.
        self.grid = self.tiles if reduce == 0 else min(self.tiles, _PROGRAMS_PER_SM * _device.num_sms(device))
        self.stages = (1, 2) if reduce == 3 else (0,)
        self.programs = None   # the cooperative grid, found at the first cooperative launch
        self.launchers = {}

    def launcher(self, stage: int, cooperative: bool = False):
        """_ce_kernel with these constexprs at ``stage`` (looking it up costs ~3 us a call)."""
        launch = self.launchers.get((stage, cooperative))
        if launch is None or launch.kernel is not _ce_kernel:   # or a wrapper swapped in (tests' recorders)
            coop = dict(launch_cooperative_grid=True) if cooperative else {}
            launch = self.launchers[stage, cooperative] = _lean.launcher(_ce_kernel, STAGE=stage, **coop,
                                                                         **self.consts)
        return launch


_PLANS: dict = {}
_MAX_PLANS = 1024   # new shapes keep coming (sequence lengths): bounded


def _forget_plans() -> None:
    _PLANS.clear()
    _plan.cache_clear()


_device.on_path_change(_forget_plans)   # a failed cooperative launch changes the paths


def _launch(x, target, weight, ignore_index, eps, z_loss, softcap, scale, need_grad, grad,
            reduce=0, loss_dtype=torch.float32, keep_rows=True, keep_lse=True, lse_dtype=torch.float32):
    """One sweep over the logits.  reduce 0: (per-position losses in loss_dtype, lse),
    the gradient scaled per position by ``scale``; reduce 1 / 2 / 3 (sum, mean over
    positions, mean over W): (the 0-d reduced loss in loss_dtype, lse), the gradient
    of loss * 1, and the mean's denominator written into ``scale`` (or nowhere: None);
    one launch on CUDA (see _grid.py).  For a caller that reads them not, the losses
    (keep_rows=False, reduce 0, fp32) and the lse (keep_lse=False) go to one scratch
    buffer instead of new tensors, and come back as None."""
    dev = x.device
    g = x if grad is None else grad   # x: a dummy pointer when there is no gradient
    # The plan's key: every input of _Plan.  x's shape fixes target's and g's, their strides
    # are their own, and the number of target's strides tells probabilities (x's rank) from
    # class indices.  No dtype: each launcher keys its compiled kernels on the dtypes.
    key = (x.shape, x.stride(), target.stride(), None if g is x else g.stride(), dev, weight is not None,
           eps > 0.0, z_loss != 0.0, softcap != 0.0, need_grad, reduce)
    plan = _PLANS.get(key)
    if plan is None:
        prob = target.is_floating_point()
        flags = (("HAS_W", weight is not None), ("PROB", prob), ("SMOOTH", eps > 0.0), ("HAS_ZL", z_loss != 0.0),
                 ("HAS_CAP", softcap != 0.0), ("NEED_GRAD", need_grad))
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = _Plan(x, target, g, prob, flags, reduce, dev)
    # Outputs nobody reads share one slot of a scratch buffer (written, never read back): an
    # allocation and its free cost ~2 us of host time each.  size=: a positional shape
    # tuple costs ~0.5 us more in torch's argument parser.
    discard = None if keep_lse and keep_rows and scale is not None else _grid.scratch(dev, plan.positions, 1)
    lse = torch.empty(size=plan.rows, device=dev, dtype=lse_dtype) if keep_lse else discard
    loss = torch.empty(size=plan.rows if reduce == 0 else (), device=dev, dtype=loss_dtype) \
        if keep_rows or reduce else discard
    if scale is None:   # reduce 0 without a gradient reads no scale
        scale = discard
    out = (loss if keep_rows or reduce else None, lse if keep_lse else None)
    # reduce > 0: scale_ptr is an output, the mean's denominator (1 for 'sum')
    scale, scale_stride = _scale_arg(scale) if reduce == 0 else (scale, 0)
    # Kernels index the weight as w_ptr + c: a strided weight costs an O(C) copy.
    w = x if weight is None else weight.contiguous()   # x: a dummy pointer, never read
    S, C, xs, ts = plan.S, plan.C, plan.xs, plan.ts
    scalars = (ignore_index, 1.0 - eps, eps / C, z_loss, softcap if softcap else 1.0)
    if plan.path == "split":
        try:
            split.ce(x, xs[1], target, ts[1], ts[2], w, scale, scale_stride, loss, lse, g, S, C,
                     scalars, plan.split_consts, reduce)
            return out
        except Exception as e:  # noqa: BLE001 - no cooperative launch here (MPS, some MIG setups),
            # or a Triton that cannot build the handshake: warn once, use the two-pass kernels
            if dev.type != "cuda" or torch.cuda.is_current_stream_capturing():
                raise
            _device.cooperative_failed(dev, e)   # forgets the plans
            return _launch(x, target, weight, ignore_index, eps, z_loss, softcap, scale, need_grad, grad,
                           reduce, loss_dtype, keep_rows, keep_lse, lse_dtype)
    gs = plan.gs
    rows_out = loss if reduce == 0 else lse            # reduce > 0: per-position losses not stored
    # the kernel's arguments before and after the workspace (ws, part)
    head = (x, xs[0], xs[1], xs[2], target, ts[0], ts[1], ts[2], w, scale, scale_stride, rows_out, lse,
            g, gs[0], gs[1], gs[2])
    tail = (loss, S, C, plan.n_sblk, plan.tiles, *scalars)
    if reduce == 3 and _MEAN_LAUNCH == "claim":   # any device: the interpreter runs it in order
        plan.launcher(3)((plan.tiles,), *head, *_grid.workspace(dev, 0, plan.tiles + 1), *tail)
        return out
    if reduce == 3 and dev.type == "cuda" and _device.cooperative(dev):
        try:
            if plan.programs is None:
                plan.programs = min(plan.tiles, _grid.resident(_ce_kernel, (*head, *_grid.workspace(dev, 0, 0), *tail),
                                                               dict(plan.consts, STAGE=0), dev))
            plan.launcher(0, cooperative=True)((plan.programs,), *head, *_grid.workspace(dev, 0, plan.programs),
                                               *tail)
            return out
        except Exception as e:  # noqa: BLE001 - as above; W then takes a launch of its own
            if torch.cuda.is_current_stream_capturing():
                raise
            _device.cooperative_failed(dev, e)
    args = (*head, *_grid.workspace(dev, 0, plan.grid), *tail)
    for stage in plan.stages:
        plan.launcher(stage)((plan.grid,), *args)
    return out


def _torch_backend():
    from crossent.backends import load
    return load("torch")


# ----------------------------------------------------------------------------- backend methods

def ce_forward(x, target, weight, ignore_index, label_smoothing, z_loss, softcap,
               scale, need_grad, grad_into=None, lse_lo=None):
    # fp64 math is left to the portable backend, as are inputs with no elements
    # (nothing to launch; that backend owns their degenerate losses: NaN rows for
    # C == 0 with smoothing or counted targets, lse = -inf) and torch.func's
    # wrapped tensors (the jvp rule's saved logits), which have no storage to launch on.
    if x.dtype == torch.float64 or x.numel() == 0 or torch._C._functorch.is_functorch_wrapped_tensor(x):
        return _torch_backend().ce_forward(x, target, weight, ignore_index, label_smoothing,
                                           z_loss, softcap, scale, need_grad, grad_into, lse_lo)
    grad = None
    if need_grad:
        grad = grad_into if grad_into is not None else torch.empty_like(x, memory_format=torch.contiguous_format)
    loss, lse = _launch(x, target, weight, int(ignore_index), float(label_smoothing),
                        float(z_loss), float(softcap or 0.0), scale, need_grad, grad,
                        loss_dtype=wide_dtype(x.device),   # row losses: backends/base.py
                        lse_dtype=torch.float32 if lse_lo is None else wide_dtype(x.device))
    if lse_lo is not None:   # the kernels added shift + log(sumexp) in fp64: split it (O(rows))
        wide, lse = lse, lse.float()
        torch.sub(wide, lse, out=lse_lo).nan_to_num_(nan=0.0)   # inf - inf: a row of inf max, as the torch backend
    return loss, lse, grad if grad is not None and grad_into is None else x.new_empty(0)


def fuses_forward(x) -> bool:
    """Whether ce_forward_fused runs x (what ce_forward leaves to the portable backend, it does not).
    While torch.compile traces, x is no functorch wrapper (and Dynamo cannot ask)."""
    return x.dtype != torch.float64 and x.numel() > 0 and (
        not _eager() or not torch._C._functorch.is_functorch_wrapped_tensor(x))


def ce_forward_fused(x, target, weight, denom, ignore_index, label_smoothing, z_loss, softcap,
                     reduction, out_dtype, need_grad, inplace):
    """(loss in out_dtype, lse or None, grad or None): the whole forward in one launch on CUDA.
    'mean' / 'sum': the reduced loss, the gradient of loss * 1 when need_grad (into x
    when inplace: then None), and the mean's denominator written into the 0-d fp32
    ``denom``; 'none': per-position losses (denom untouched).  denom None: the caller
    keeps neither the denominator nor the lse (None).  None, not empty tensors: an
    allocation less each for a caller that reads nothing there (~2 us with its free)."""
    prob = target.is_floating_point()
    reduce = 0 if reduction == "none" else 1 if reduction == "sum" else 2 if prob else 3
    grad = None
    if need_grad:   # empty_like: ~1.3 us less than torch.empty(x.shape, ...)
        grad = x if inplace else torch.empty_like(x, memory_format=torch.contiguous_format)
    loss, lse = _launch(x, target, weight, int(ignore_index), float(label_smoothing), float(z_loss),
                        float(softcap or 0.0), denom, grad is not None, grad, reduce, out_dtype,
                        keep_lse=denom is not None)
    return loss, lse, None if inplace else grad


def ce_backward(x, target, weight, lse, ignore_index, label_smoothing, z_loss, softcap, scale):
    if x.dtype == torch.float64:  # as ce_forward: the portable backend's own recompute
        return _torch_backend().ce_backward(x, target, weight, lse, ignore_index, label_smoothing,
                                            z_loss, softcap, scale)
    # The forward kernel again, with the per-row scale: it reads the logits as
    # often as the forward does (once on the single / cluster / split paths) and
    # forms p relative to the row max, which a saved, rounded lse would not allow.
    if x.numel() == 0 or torch._C._functorch.is_functorch_wrapped_tensor(x):   # as ce_forward
        return ce_forward(x, target, weight, ignore_index, label_smoothing, z_loss, softcap, scale, True)[2]
    grad = torch.empty_like(x, memory_format=torch.contiguous_format)
    _launch(x, target, weight, int(ignore_index), float(label_smoothing), float(z_loss), float(softcap or 0.0),
            scale, True, grad, keep_rows=False, keep_lse=False)
    return grad


_RESCALE: dict = {}   # (numel, device) -> (grid, launcher): ~1 us a call to form


def rescale_(grad, g):
    n = grad.numel()
    if n == 0:
        return
    if not grad.is_contiguous() or grad.dtype == torch.float64:
        grad.mul_(g)  # the kernel multiplies in fp32
        return
    dev = grad.device
    plan = _RESCALE.get((n, dev))
    if plan is None or plan[1].kernel is not _rescale_kernel:   # or a wrapper swapped in (tests)
        if len(_RESCALE) >= _MAX_PLANS:
            _RESCALE.clear()
        block = 4096
        plan = _RESCALE[n, dev] = ((min(_device.cdiv(n, block), 4 * _device.num_sms(dev)),),
                                   _lean.launcher(_rescale_kernel, BLOCK=block, num_warps=8))
    plan[1](plan[0], grad, g, n)
