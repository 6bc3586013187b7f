"""crossent.linear_cross_entropy: the LM-head matmul fused with cross-entropy.

``linear_cross_entropy(h, W, t, ...)`` equals
``cross_entropy(F.linear(h, W, b), t, ...)`` (torch 2.13's
``F.linear_cross_entropy``), values and gradients of h, W and b, without ever
holding the N x V logits: tokens are processed in chunks sized by a byte
budget, and each chunk's logits become its gradient in place of the logits.

Design (details in crossent/_linear_ops.py):
  * accurate  (auto's pick whenever memory allows): one token-chunked pass,
    ~6*N*D*V FLOPs.  Per chunk: logits (GEMM, into a buffer in the input
    dtype that crossent owns) -> the backend's CE kernel overwrites them with
    their gradient (computed in fp32: the true-class term and the max taken
    before any rounding) -> dx_c = g @ W, dW (+)= g.T @ x_c.  With one chunk
    dW is a single GEMM accumulated in fp32 and rounded once; with several,
    an fp32 accumulator (dW itself for fp32/fp64) written with beta=0 by the
    first chunk, rounded once at the end.  The same numbers as eager PyTorch
    (which also keeps logits and their gradient in the input dtype), with
    fp32 accumulation wherever eager has it.
    Extra memory: one chunk (+ a V x D fp32 accumulator for fp16/bf16 with
    several chunks).
  * balanced  torch's name for the middle policy; crossent's accurate already
    keeps chunks in the input dtype with fp32 accumulation, so balanced runs
    accurate.
  * compact   no V x D fp32 buffer (extra <= the gradients + chunk_bytes,
    default 256 MiB): token pass for loss, lse and dx, then a vocabulary
    pass that recomputes the logits of all tokens one block of classes at a
    time and writes dW[block] = g.T @ x from one contraction over the
    tokens (CCE-style, ~8*N*D*V FLOPs); still rounded once, deterministic.
  * auto      accurate, unless fp16/bf16 needs several chunks and their fp32
    accumulator would take more than a quarter of the free memory: compact.
    ``linear_cross_entropy_plan`` reports the pick without running anything.

Ignored tokens: on CPU their rows are dropped before the matmuls (reading a
CPU tensor needs no host sync); on accelerators all rows are kept so nothing
syncs (the kernel gives ignored rows a zero gradient).  A dropped row whose
hidden state is non-finite gets a zero gradient (eager PyTorch: NaN).

Extensions (keyword-only): z_loss, softcap (as crossent.cross_entropy),
leading batch dims (input (*B, D), target (*B) or (*B, C); torch accepts only
1-D/2-D input), ``shift`` (next-token prediction) and
``linear_cross_entropy_with_stats`` (per-token lse).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import torch.nn.functional as TF
from torch import Tensor

from . import _fast
from . import _validate as V
from . import backends, reference
from ._autograd import LinearCEOptions, LinearCrossEntropyFunction
from ._linear_ops import acc_dtype, vocab_tiles
from .functional import (CrossEntropyOutput, _ce_options, _cross_entropy, _denominator, _smoothing_range,
                         _z_term)

__all__ = ["linear_cross_entropy", "linear_cross_entropy_with_stats", "linear_cross_entropy_plan",
           "LinearCrossEntropyOptions", "LinearCrossEntropyPlan"]

_POLICIES = ("auto", "accurate", "balanced", "compact")
_LOWP = (torch.float16, torch.bfloat16)
# CPU: 1024 rows at V = 32k fp32.  Measured at 4096 x 512 x 32000 (BENCHMARKS.md):
# 32 MiB chunks ran 2.1x slower than 128 MiB (the dW GEMMs with K = 256 rows
# are write-bound on the V x D output), 256 MiB and one chunk only ~10% faster.
_CPU_CHUNK_BYTES = 128 << 20
# ... but never more than a quarter of the whole logits (down to 16 MiB): a
# fused head whose one chunk is the whole logits saves no memory at all.
_CPU_MIN_CHUNK_BYTES = 16 << 20
# Accelerators when free memory cannot be read (under torch.compile tracing).
_ACCEL_CHUNK_BYTES = 1 << 30
# compact's promise: extra memory <= the gradients + this (all its buffers);
# on CPU no more than accurate's one chunk.
_COMPACT_BYTES = {"cpu": _CPU_CHUNK_BYTES}
_COMPACT_BYTES_ACCEL = 256 << 20
# Chunk rows are multiples of the GEMM tile (CTA tiles of 128/256 rows on
# GPUs; 128 on CPU), so no GEMM of a chunk ends in a partial wave of tiles.
_TILE_ROWS = {"cpu": 128, "cuda": 256}


@dataclasses.dataclass(frozen=True)
class LinearCrossEntropyOptions:
    """crossent's options for :func:`linear_cross_entropy`.

    chunk_bytes: memory budget, in bytes, for the per-chunk buffers (the
        chunk's logits, overwritten by their gradient; compact: all its
        buffers).  None: accurate uses 128 MiB chunks on CPU and, on GPUs, one
        chunk when it fits in half the memory left free beyond the gradients
        (else the fewest that fit); compact uses 256 MiB (CPU: 128 MiB).
    chunk_size: tokens per chunk, overriding chunk_bytes for the token pass.
    acc_policy: 'accurate' | 'balanced' | 'compact' | 'auto' (see crossent.linear).
    allow_inplace: permission to write the input gradient into the hidden
        states' storage as each chunk finishes (saves an N x D buffer); used
        only when possible (reduction mean/sum, contiguous input that requires
        grad, no shift over a batch, not compact).  The hidden states are
        overwritten, so a second backward raises.
    """

    chunk_bytes: int | None = None
    chunk_size: int | None = None
    acc_policy: str = "auto"
    allow_inplace: bool = False

    def __post_init__(self):
        if self.acc_policy not in _POLICIES:
            raise ValueError(f"invalid acc_policy: {self.acc_policy!r}")
        for f in ("chunk_bytes", "chunk_size"):
            v = getattr(self, f)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise ValueError(f"{f} must be a positive int or None, got {v!r}")


class LinearCrossEntropyPlan(NamedTuple):
    """What a call would do: ``linear_cross_entropy_plan``'s result."""

    policy: str        # resolved acc_policy
    chunk_size: int    # tokens per chunk of the token pass
    num_chunks: int
    vocab_block: int   # classes per block of compact's vocabulary pass (V otherwise)
    extra_bytes: int   # estimated memory beyond inputs and gradients
    flops: int         # matmul FLOPs of forward + backward
    backend: str


def _from_torch_options(o, N: int, D: int, V: int) -> LinearCrossEntropyOptions:
    """torch.nn.LinearCrossEntropyOptions -> ours.  batch_chunk_size and an
    explicit chunking_method ('aspect_ratio[:k]') give the chunk size;
    'auto' leaves it to the byte budget.  acc_dtype is ignored (crossent
    always accumulates in fp32, fp64 for fp64), allow_retain_graph too (a
    second backward always works here)."""
    size = o.batch_chunk_size
    cm = o.chunking_method
    if cm not in (None, "auto") and N > 0:
        size = o._compute_batch_chunk_size(N, D, V, cm)
    return LinearCrossEntropyOptions(chunk_size=max(1, size) if size else None,
                                     acc_policy=o.acc_policy)


def _free_bytes(device: torch.device) -> int | None:
    if torch.compiler.is_compiling():
        return None
    try:
        if device.type == "cuda":
            # free on the device + what torch's caching allocator holds unused
            cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            return torch.cuda.mem_get_info(device)[0] + cached
        if device.type == "cpu":
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
    except Exception:
        return None
    return None


def _chunk_rows(N: int, per_row: int, budget: int, tile: int) -> int:
    """Rows per chunk: all N when they fit in ``budget`` bytes; else the
    fewest equal chunks that fit, each a multiple of ``tile`` rows."""
    cap = max(1, budget // max(1, per_row))
    if N <= cap:
        return max(1, N)
    if cap < tile:
        return cap
    k = -(-N // cap)
    while True:
        rows = -(-(-(-N // k)) // tile) * tile
        if rows <= cap:
            return rows
        k += 1


def _plan(N: int, D: int, V: int, dtype: torch.dtype, device: torch.device, opts,
          backend: str) -> tuple[LinearCrossEntropyPlan, int]:
    """Resolve the policy and the chunking; returns (plan, compact's budget).

    accurate: one (rows, V) buffer in the input dtype per chunk (logits, then
    their gradient in place); with fp16/bf16 and several chunks, a V x D fp32
    dW accumulator too (one chunk needs none).  On accelerators, as few chunks
    as half the memory left free beyond the gradients allows (each extra
    chunk costs a read-modify-write of the accumulator); on CPU 128 MiB chunks,
    at most a quarter of the logits (at least 16 MiB).
    compact: all buffers within chunk_bytes (default 256 MiB, CPU 128 MiB):
    for the token pass's chunk all of it where the CE backend writes the
    gradient over the logits with no temporaries of their size (Triton), else
    a quarter (the rest is the torch backend's fp32 temporaries, up to four
    per piece of the chunk); all of it for the vocabulary pass's tiles, which
    run after (their per-logit bytes: the backend's block_grad_scratch).
    auto: accurate unless the fp32 accumulator it would need takes more than
    a quarter of the free memory."""
    opts = opts or LinearCrossEntropyOptions()
    if not isinstance(opts, LinearCrossEntropyOptions):
        opts = _from_torch_options(opts, N, D, V)
    lowp = dtype in _LOWP
    elt = dtype.itemsize
    acc_elt = 8 if dtype == torch.float64 else 4
    per_row = V * elt
    acc_bytes = V * D * acc_elt if lowp else 0
    tile = _TILE_ROWS.get(device.type, 256)

    def room() -> int | None:
        """Free memory beyond the gradients; read only where needed (reading
        /proc/meminfo costs more than a tiny CPU call's whole math)."""
        free = _free_bytes(device)
        return None if free is None else max(0, free - (N + V) * D * elt)

    def accurate_rows() -> int:
        if opts.chunk_size:
            return min(opts.chunk_size, max(1, N))
        if opts.chunk_bytes:
            return _chunk_rows(N, per_row, opts.chunk_bytes, tile)
        if device.type == "cpu":
            cap = min(_CPU_CHUNK_BYTES, max(_CPU_MIN_CHUNK_BYTES, N * per_row // 4))
            return _chunk_rows(N, per_row, cap, tile)
        r = room()
        if r is None:
            return _chunk_rows(N, per_row, _ACCEL_CHUNK_BYTES, tile)
        if N * per_row <= r // 2:
            return max(1, N)
        return _chunk_rows(N, per_row, max(0, r - acc_bytes) // 2, tile)

    policy = "accurate" if opts.acc_policy == "balanced" else opts.acc_policy
    rows = accurate_rows() if policy != "compact" else 0
    if policy == "auto":
        r = room() if rows < N and acc_bytes else None
        policy = "compact" if (r is not None and 4 * acc_bytes > r) else "accurate"
    budget = opts.chunk_bytes or _COMPACT_BYTES.get(device.type, _COMPACT_BYTES_ACCEL)
    vb = V
    if policy == "compact":
        be = backends.load(backend)
        token_bytes = budget if be.ce_in_place(dtype) else budget // 4
        rows = min(opts.chunk_size, max(1, N)) if opts.chunk_size else \
            _chunk_rows(N, per_row, token_bytes, tile)
        vb = vocab_tiles(N, V, D, elt, acc_elt, False, be.block_grad_scratch(dtype, False, False), budget)[0]
        extra = budget
    else:
        extra = min(rows, N) * per_row + (acc_bytes if rows < N else 0)
    # compact's vocabulary pass recomputes the logits (2 N D V more); with one class the
    # token pass takes dW itself (_linear_ops.run), so there is no second pass
    flops = (8 if policy == "compact" and V != 1 else 6) * N * D * V
    num = -(-N // rows) if N else 0
    return LinearCrossEntropyPlan(policy, rows, num, vb, int(extra), flops, backend), budget


def linear_cross_entropy_plan(input: Tensor, linear_weight: Tensor, *, options=None,
                              shift: bool = False) -> LinearCrossEntropyPlan:
    """How :func:`linear_cross_entropy` would run these shapes: the policy
    'auto' picks, chunking, estimated extra memory and FLOPs.  Runs nothing."""
    D, V = input.shape[-1], linear_weight.shape[0]
    N = 1
    for s in input.shape[:-1]:
        N *= s
    if shift and input.dim() >= 2 and input.shape[-2]:
        N -= N // input.shape[-2]
    return _plan(N, D, V, input.dtype, input.device, options, backends.name_for(input.device.type))[0]


def _checks(input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None):
    """torch.nn.functional.linear_cross_entropy's own checks, same messages;
    input with more than 2 dims is crossent's extension (2-D weights only)."""
    kdim = linear_weight.dim() > 2
    if input.dim() < 1 or (input.dim() > 2 and kdim):
        raise RuntimeError(f"expected input with dimensionality 1 or 2, got {input.dim()}")
    if linear_weight.dim() < 2:
        raise RuntimeError(
            f"expected linear_weight with dimensionality at least 2, got {linear_weight.dim()}")
    in_features = input.shape[-1]
    if in_features != linear_weight.shape[-1]:
        raise RuntimeError(
            "expected equal input and linear_weight last dimensions (in_features), "
            f"got {input.shape[-1]} and {linear_weight.shape[-1]}, respectively")
    C, out_features = linear_weight.shape[0], tuple(linear_weight.shape[1:-1])
    if linear_bias is not None and tuple(linear_bias.shape) != (C, *out_features):
        raise RuntimeError(f"expected linear_bias shape {(C, *out_features)}, got {tuple(linear_bias.shape)}")
    if out_features and input.dim() == 1:
        raise RuntimeError(
            f"K-dimensional loss defined by linear_weight shape {tuple(linear_weight.shape)} requires"
            f" batched input, (N, {in_features}), got unbatched input with shape {tuple(input.shape)}")
    return C, out_features


def _linear_cross_entropy(input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                          label_smoothing, options, z_loss, softcap, shift, stats,
                          result_dtype=None) -> CrossEntropyOutput:
    # result_dtype (class indices, 2-D weight): the loss's dtype instead of
    # input.dtype (crossent.transformers returns fp32 losses for bf16 models).
    V.tensor_arg(input, "linear_cross_entropy", "input", 1)
    V.tensor_arg(linear_weight, "linear_cross_entropy", "linear_weight", 2)
    V.tensor_arg(target, "linear_cross_entropy", "target", 3)
    input, linear_weight, linear_bias = _fast.autocast_linear_args(input, linear_weight, linear_bias)
    if isinstance(weight, torch.Tensor) and weight.dtype in _LOWP and torch.is_autocast_enabled(input.device.type):
        weight = weight.float()  # autocast runs cross_entropy in fp32: its class weight is cast too
    C, out_features = _checks(input, linear_weight, linear_bias)
    batch = tuple(input.shape[:-1])
    prob = tuple(target.shape) == (*batch, C, *out_features)
    if prob and ignore_index is not None:
        raise RuntimeError("ignore_index cannot be specified when target contains probabilities")
    ignore_index = -100 if ignore_index is None else ignore_index
    D = input.shape[-1]
    if shift:
        if out_features or input.dim() < 2:
            raise ValueError("shift=True needs input (..., T, D) with T the sequence dim and a 2-D "
                             "linear_weight")
        tdim = target.dim() - (2 if prob else 1)
        if tdim < 0 or tuple(target.shape[:tdim + 1]) != batch:
            raise ValueError(f"shift=True: expected target of shape {list(batch)} (class indices) or "
                             f"{list(batch) + [C]} (probabilities), got {list(target.shape)}")
    # The linear's dtype/device checks, with F.linear's own messages (on empty slices).
    bias0 = None if linear_bias is None else linear_bias.reshape(-1)[:0]
    # (a 1-D input whole: F.linear's vector path has messages of its own)
    TF.linear(input if input.dim() == 1 else _matrix(input)[:0], _matrix(linear_weight)[:0], bias0)
    if out_features or any(V.func_transforms()) or (
            prob and torch.is_grad_enabled()
            and (target.requires_grad or (weight is not None and weight.requires_grad))):
        # K-dim loss (softmax over dim 1 of (N, C, d1..dk)), vmap or forward-mode
        # AD (the fused pass has neither a batching nor a jvp rule), or gradients
        # w.r.t. targets/weights: crossent.cross_entropy on materialised logits.
        logits = TF.linear(input, _matrix(linear_weight),
                           None if linear_bias is None else linear_bias.reshape(-1))
        if shift:
            logits, target = logits[..., :-1, :], (target[..., 1:, :] if prob else target[..., 1:])
        if input.dim() > 2:
            logits, target = logits.reshape(-1, C), (target.reshape(-1, C) if prob else target.reshape(-1))
        if V.func_transforms()[1] and not (out_features or stats):
            # Forward-mode AD: torch's own ops, whose jvp rules see through F.linear's addmm.
            eps, zl, cap = _ce_options(label_smoothing, z_loss, softcap)
            loss = reference.cross_entropy(logits, target, weight, ignore_index,
                                           V.reduction(None, None, reduction), eps, z_loss=zl,
                                           softcap=cap or None)
            out = CrossEntropyOutput(loss, loss, loss)
        else:
            out = _cross_entropy(logits.reshape(*logits.shape[:-1], C, *out_features) if out_features
                                 else logits, target, weight, None, ignore_index, None, reduction,
                                 label_smoothing, z_loss, softcap, False)
        if input.dim() > 2:   # per-position results (lse whatever the reduction) get the batch shape
            nb = batch[:-1] + (max(batch[-1] - 1, 0),) if shift else batch
            out = CrossEntropyOutput(*(o.reshape(nb) if o.dim() else o for o in out))
        return out

    # cross_entropy's checks, on a meta tensor of the logits' shape.
    red = V.reduction(None, None, reduction)
    ignore_index = V.int_arg(ignore_index, "cross_entropy_loss", "ignore_index", 5)
    eps, z_loss, cap = _ce_options(label_smoothing, z_loss, softcap, check_range=False)  # in torch's order below
    if shift:
        input_x = input
        batch = batch[:-1] + (max(batch[-1] - 1, 0),)   # as input[..., :-1, :]: none of no positions
        target = target[..., 1:, :] if prob else target[..., 1:]
    nd = len(batch)
    if nd > 1 and not prob and tuple(target.shape) != batch:  # (prob: target is (*batch, C) already)
        raise ValueError(f"Expected target of shape {list(batch)} (class indices) or {list(batch) + [C]} "
                         f"(probabilities), got {list(target.shape)}")
    # Under autocast torch's cross_entropy sees fp32 logits (an fp32 op), so a
    # class weight is checked against fp32.
    meta = torch.empty((*batch, C) if nd <= 1 else (_numel(batch), C),
                       dtype=_fast.autocast_out_dtype(input, input.dtype), device="meta")
    t_chk = target if nd <= 1 else target.reshape(-1, C) if prob else target.reshape(-1)
    if prob:
        V.prob_target(meta, t_chk, weight, ignore_index)
    else:
        _smoothing_range(eps)
    V.floating_input(meta, V.softmax_kernel(True, 0 if meta.dim() == 1 else 1, meta.dim()))
    if prob:
        _smoothing_range(eps)
        out_dtype = torch.result_type(meta, target)
        if weight is not None:
            out_dtype = torch.promote_types(out_dtype, weight.dtype)
    else:
        V.class_target(meta, t_chk, weight)
        V.weight_no_grad(weight)
        out_dtype = input.dtype if result_dtype is None else result_dtype
        V.check_target_bounds(target, C, ignore_index)
    out_dtype = _fast.autocast_out_dtype(input, out_dtype)
    if out_dtype == torch.float64 and input.dtype != torch.float64:
        # fp64 probability targets or class weights make the loss fp64: compute in
        # it, as cross_entropy does (autograd casts the gradients back)
        input, linear_weight = input.double(), linear_weight.double()
        linear_bias = None if linear_bias is None else linear_bias.double()
        if shift:
            input_x = input_x.double()

    # Canonical rows: x (M, D), optional row map, target (N,) / (N, C).
    N = _numel(batch)
    rows = None
    if shift:
        T = input_x.shape[-2]
        x = _matrix(input_x)
        B = x.shape[0] // T if T else 0
        if B > 1:
            ar = torch.arange(T - 1, device=input.device)
            rows = (torch.arange(B, device=input.device).unsqueeze(1) * T + ar).reshape(-1)
    else:
        x = _matrix(input)
    # Class indices as int64: ignore_index is then compared as an exact integer
    # (a uint8 target 156 is class 156 under ignore_index=-100, which uint8
    # arithmetic would wrap to 156; issue 9).  O(N), next to O(N*D*V) work.
    t = target.reshape(-1, C) if prob else target.reshape(-1).long()
    acc = acc_dtype(input.dtype)
    # NaN where torch's smoothed mean divides by a zero weight sum (0/0 in its nll part).
    denom = _denominator(t, weight, ignore_index, C, eps, prob, acc)
    backend = backends.name_for(input.device.type)
    plan, budget = _plan(N, D, C, input.dtype, input.device, options, backend)
    allow = bool(getattr(options, "allow_inplace", False))
    inplace = (allow and red != "none" and input.requires_grad and torch.is_grad_enabled()
               and x.is_contiguous() and rows is None and x.shape[0] == N and plan.policy != "compact")
    opts = LinearCEOptions(reduction=red, ignore_index=ignore_index, label_smoothing=eps, z_loss=z_loss,
                           softcap=cap, policy=plan.policy, chunk_rows=plan.chunk_size, budget=budget,
                           drop_ignored=not stats, inplace=inplace, backend=backend, out_dtype=out_dtype)
    with _fast.no_autocast(input.device.type):  # our matmuls accumulate in fp32
        grad_on = torch.is_grad_enabled()
        needs = (grad_on and x.requires_grad, grad_on and linear_weight.requires_grad,
                 grad_on and linear_bias is not None and linear_bias.requires_grad)
        loss, lse, *_ = LinearCrossEntropyFunction.call(x, rows, linear_weight, linear_bias, t, weight,
                                                        denom, opts, needs)
    lse = lse.reshape(batch)
    if red == "none":
        loss = loss.reshape(batch)
    zt = _z_term(lse, t, prob, ignore_index, z_loss, red, denom).to(out_dtype) if stats else loss
    return CrossEntropyOutput(loss, lse, zt)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _matrix(t: Tensor) -> Tensor:
    """(..., D) -> (rows, D); unlike reshape(-1, D) also for D = 0 (in_features = 0)."""
    return t.reshape(_numel(t.shape[:-1]), t.shape[-1])


def linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor, *,
                         linear_bias: Tensor | None = None, weight: Tensor | None = None,
                         reduction: str = "mean", ignore_index: int | None = None,
                         label_smoothing: float = 0.0, options=None, z_loss: float = 0.0,
                         softcap: float | None = None, shift: bool = False) -> Tensor:
    """cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...) without
    the logits in memory; torch 2.13's F.linear_cross_entropy signature.

    input: (D), (N, D), or (*B, D) (extension: leading batch dims, logits'
        class dim last).  linear_weight: (C, D), or (C, d1..dk, D) for a
        K-dim loss (input (N, D); computed by crossent.cross_entropy on
        materialised logits, as torch does).  target: class indices (*B) or
        probabilities (*B, C).  ignore_index: None means -100 for class
        indices; giving one with probability targets raises, as in torch.
    options: crossent.LinearCrossEntropyOptions, or torch.nn.LinearCrossEntropyOptions
        (mapped; the chunked path runs whatever the other arguments are).
    z_loss, softcap: as crossent.cross_entropy.
    shift: next-token prediction: position i predicts target i+1 along the
        sequence dim (input's dim -2, target's last index dim), i.e. the
        result equals linear_cross_entropy(input[..., :-1, :], ..., target[..., 1:])
        (probabilities: target[..., 1:, :]) but the hidden states are never
        copied.  'none' returns (*B[:-1], T-1); 'mean' averages the T-1
        positions of every sequence.
    A DTensor ``linear_weight`` (sharded by rows) goes to crossent.distributed.dtensor.
    """
    if type(linear_weight).__name__ == "DTensor":  # a name check: plain tensors pay no import
        from .distributed.dtensor import linear_cross_entropy as dtensor_linear_cross_entropy
        return dtensor_linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias,
                                            weight=weight, reduction=reduction, ignore_index=ignore_index,
                                            label_smoothing=label_smoothing, options=options,
                                            z_loss=z_loss, softcap=softcap, shift=shift)
    lean = _fast.linear_cross_entropy(input, linear_weight, target, linear_bias, weight, reduction,
                                      ignore_index, label_smoothing, options, z_loss, softcap, shift)
    if lean is not None:
        return lean
    return _linear_cross_entropy(input, linear_weight, target, linear_bias, weight, reduction,
                                 ignore_index, label_smoothing, options, z_loss, softcap, shift,
                                 False).loss


def linear_cross_entropy_with_stats(input: Tensor, linear_weight: Tensor, target: Tensor, *,
                                    linear_bias: Tensor | None = None, weight: Tensor | None = None,
                                    reduction: str = "mean", ignore_index: int | None = None,
                                    label_smoothing: float = 0.0, options=None, z_loss: float = 0.0,
                                    softcap: float | None = None,
                                    shift: bool = False) -> CrossEntropyOutput:
    """:func:`linear_cross_entropy` plus per-token lse and the z-loss term
    (always a crossent.CrossEntropyOutput; lse has the 'none' loss's shape)."""
    return _linear_cross_entropy(input, linear_weight, target, linear_bias, weight, reduction,
                                 ignore_index, label_smoothing, options, z_loss, softcap, shift, True)
