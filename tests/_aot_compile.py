"""Compile crossent's Triton kernels for an H100/H200 (sm_90) without a GPU.

1. Every kernel variant compiles with the real compiler (the CPU interpreter
   accepts code that the compiler rejects: a plain global int read inside a
   kernel once broke every compiled launch).
2. Static performance checks of the production launch configurations at the
   benchmark shapes (bf16): the path the launch plan picks reads the logits
   once, the kernel spills nothing (cuobjdump: LOCAL:0), and its registers
   leave room for >= 2 CTAs per SM.  SASS instructions per element are printed
   (nvdisasm, shipped in the triton wheel): the instructions of the kernel's
   main loop over the values one thread holds.
Run by tests/test_triton_compile.py in a subprocess, because TRITON_INTERPRET
must be unset when the kernels are imported.  Prints one line per check, then
ALL OK.  ``--explore`` also prints registers / SASS per element of split-kernel
configurations (slice width x warps x prefetch), for choosing the defaults.
"""
import itertools
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from crossent.backends.triton import _device, ce, softmax, split  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SMS = 132                       # H100 SXM / H200
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
BENCH_SHAPES = [(8192, 32000), (8192, 128256), (16384, 256000)]


class Ptr:
    """A pointer argument of the given Triton dtype (16-byte aligned, as torch allocates)."""

    def __init__(self, dtype: str):
        self.dtype = dtype


def _signature(fn, args: dict):
    """signature, divisibility attributes and constants as the JIT specialises these values
    (an int equal to 1 becomes a constexpr; one divisible by 16 gets tt.divisibility)."""
    sig, attrs, consts = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name not in args:
            continue
        v = args[name]
        if isinstance(v, Ptr):
            sig[name] = "*" + v.dtype
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        elif v == 1:
            sig[name] = "constexpr"
            consts[name] = 1
        else:
            sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs, consts


def compile_kernel(fn, args: dict, consts: dict, options: dict):
    sig, attrs, ones = _signature(fn, args)
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs={**ones, **consts}, attrs=attrs),
                          target=TARGET, options=options)


def compile_one(fn, sig: dict, consts: dict, tag: str, num_warps: int = 8) -> bool:
    """Compile one variant from an explicit signature; print OK/FAIL (for other
    kernel modules' compile tests, e.g. tests/test_logprobs.py)."""
    try:
        triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=TARGET,
                       options={"num_warps": num_warps})
    except Exception as e:  # noqa: BLE001 - report whatever the compiler raises
        print(f"FAIL {tag}: {type(e).__name__}: {e}")
        return False
    print(f"OK   {tag}")
    return True


def cubin_usage(cubin: bytes, sass: bool = False) -> dict:
    """registers, stack, local memory (spills), shared memory of a cubin (cuobjdump), and
    with ``sass`` its SASS listing (nvdisasm)."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", path],
                               capture_output=True, text=True, check=True).stdout
        listing = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", path],
                                 capture_output=True, text=True, check=True).stdout if sass else ""
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    return dict(regs=int(m[1]), stack=int(m[2]), shared=int(m[3]), local=int(m[4]), sass=listing)


def resources(ck) -> dict:
    """cubin_usage of a compiled kernel, with its SASS."""
    return cubin_usage(ck.asm["cubin"], sass=True)


def loops(sass: str) -> list[int]:
    """Instruction counts of the backward-branch loops in a SASS listing, largest first."""
    labels, count, out = {}, 0, []
    for line in sass.splitlines():
        lab = re.match(r"^(\.L_x_\d+):", line)
        if lab:
            labels[lab[1]] = count
        elif re.match(r"\s+/\*[0-9a-f]+\*/", line):
            count += 1
            br = re.search(r"BRA `\((\.L_x_\d+)\)", line)
            if br and br[1] in labels and labels[br[1]] < count - 2:
                out.append(count - labels[br[1]])
    return sorted(out, reverse=True)


def n_instructions(sass: str) -> int:
    return sum(1 for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]+\*/", line))


def ctas_per_sm(regs: int, shared: int, num_warps: int) -> int:
    per_warp = -(-regs * 32 // 256) * 256
    return min((65536 // per_warp) // num_warps, (228 * 1024) // shared if shared else 32, 64 // num_warps)


# ----------------------------------------------------------------------------- argument sets

FLAG_SETS = [dict(HAS_W=False, SMOOTH=False, PROB=False, HAS_ZL=False, HAS_CAP=False),
             dict(HAS_W=True, SMOOTH=True, PROB=False, HAS_ZL=True, HAS_CAP=True),
             dict(HAS_W=True, SMOOTH=True, PROB=True, HAS_ZL=True, HAS_CAP=True)]


def fused_args(xdt, prob, R, C):
    return dict(x_ptr=Ptr(xdt), sx_b=0, sx_s=C, sx_c=1, t_ptr=Ptr(xdt if prob else "i64"),
                st_b=0, st_s=C if prob else 1, st_c=1, w_ptr=Ptr("fp32"), scale_ptr=Ptr("fp32"),
                scale_stride=0, loss_ptr=Ptr("fp32"), lse_ptr=Ptr("fp32"), g_ptr=Ptr(xdt), sg_b=0,
                sg_s=C, sg_c=1, ws_ptr=Ptr("i32"), part_ptr=Ptr("fp64"), out_ptr=Ptr(xdt), S=R, C=C,
                n_sblk=R, n_tiles=R, ignore_index=-100, one_m_eps=1.0, eps_over_c=0.0, z_loss=0.0, cap=1.0)


def split_args(xdt, prob, R, C):
    return dict(x_ptr=Ptr(xdt), sx_r=C, t_ptr=Ptr(xdt if prob else "i64"), st_r=C if prob else 1,
                st_c=1, w_ptr=Ptr("fp32"), scale_ptr=Ptr("fp32"), scale_stride=0,
                loss_ptr=Ptr("fp32"), lse_ptr=Ptr("fp32"), g_ptr=Ptr(xdt), part_ptr=Ptr("fp32"),
                ws_ptr=Ptr("i32"), acc_ptr=Ptr("fp64"), out_ptr=Ptr(xdt), R=R, C=C, n_groups=SMS,
                ignore_index=-100, one_m_eps=1.0,
                eps_over_c=0.0, z_loss=0.0, cap=1.0)


def softmax_split_args(R, C):
    return dict(x_ptr=Ptr("bf16"), y_ptr=Ptr("bf16"), part_ptr=Ptr("fp32"), ws_ptr=Ptr("i32"),
                R=R, C=C, n_groups=SMS)


# ----------------------------------------------------------------------------- 1. every variant

def check_variants() -> bool:
    ok = True

    def one(tag, fn, args, consts, **options):
        nonlocal ok
        try:
            compile_kernel(fn, args, consts, dict(num_warps=8, **options))
            print(f"OK   {tag}")
        except Exception as e:  # noqa: BLE001 - report whatever the compiler raises
            print(f"FAIL {tag}: {type(e).__name__}: {e}")
            ok = False

    # every flag set in bf16, the plain one in fp32 too
    dtypes_flags = [("bf16", f) for f in FLAG_SETS] + [("fp32", FLAG_SETS[0])]
    # REDUCE 0 (per position) and 1 (sum) in one launch; 2 / 3 (mean over positions /
    # over W) in one cooperative launch (STAGE 0), or the two launches of the interpreter
    # and of GPUs without cooperative launches (STAGE 1, 2).  2 is for probabilities only,
    # 3 for class indices only; every stage for one tile shape, the usual two for the others.
    reduce_stages = [(0, 0), (1, 0), (2, 0), (3, 0), (3, 1), (3, 2), (3, 3)]

    def wanted(red, stage, f, first):
        return (red != 2 or f["PROB"]) and (red != 3 or not f["PROB"]) and (first or stage == 0 and red != 1)
    for k, ((single, bs, bc), (xdt, f), (red, stage)) in enumerate(itertools.product(
            [(True, 1, 16384), (False, 1, 8192), (True, 8, 512), (False, 64, 64)], dtypes_flags, reduce_stages)):
        if wanted(red, stage, f, k < len(dtypes_flags) * len(reduce_stages)):
            one(f"ce fused single={single} {bs}x{bc} {xdt} reduce={red} stage={stage} {f}", ce._ce_kernel,
                fused_args(xdt, f["PROB"], 4096, 1000),
                dict(BLOCK_S=bs, BLOCK_C=bc, SINGLE=single, NEED_GRAD=True, KEEP_L2=not single, REVERSE=not single,
                     REDUCE=red, STAGE=stage, **f), launch_cooperative_grid=stage == 0 and red == 3)
    # STAGE 3 (W from a claiming program) is the tile kernel's alone
    for (red, stage), pre, (xdt, f) in itertools.product([rs for rs in reduce_stages if rs[1] != 3], (False, True),
                                                         dtypes_flags):
        if wanted(red, stage, f, True) and not (pre and (stage != 0 or red != 3 or f is not FLAG_SETS[0])):
            one(f"ce split reduce={red} stage={stage} prefetch={pre} {xdt} {f}", split._ce_split_kernel,
                split_args(xdt, f["PROB"], 4096, 100000),
                dict(BLOCK=8192, NSPLIT=13, NSPLIT_P2=16, STAGE=stage, PREFETCH=pre, REDUCE=red, **f),
                launch_cooperative_grid=stage == 0)
    # linear's compact token pass: per-position losses and gradient, the lse in fp64 (lse_lo)
    for single, bs, bc in [(True, 8, 512), (False, 1, 8192)]:
        one(f"ce fused lse fp64 single={single} {bs}x{bc}", ce._ce_kernel,
            dict(fused_args("bf16", False, 4096, 1000), lse_ptr=Ptr("fp64")),
            dict(BLOCK_S=bs, BLOCK_C=bc, SINGLE=single, NEED_GRAD=True, KEEP_L2=not single, REVERSE=not single,
                 REDUCE=0, STAGE=0, **FLAG_SETS[1]))
    one("ce split lse fp64", split._ce_split_kernel, dict(split_args("bf16", False, 4096, 100000), lse_ptr=Ptr("fp64")),
        dict(BLOCK=8192, NSPLIT=13, NSPLIT_P2=16, STAGE=0, PREFETCH=False, REDUCE=0, **FLAG_SETS[1]),
        launch_cooperative_grid=True)
    for stage, log in itertools.product((0, 1, 2), (False, True)):
        one(f"softmax split stage={stage} log={log}", split._softmax_split_kernel,
            softmax_split_args(4096, 100000),
            dict(BLOCK=8192, NSPLIT=13, NSPLIT_P2=16, STAGE=stage, PREFETCH=False, LOG=log),
            launch_cooperative_grid=stage == 0)
    one("rescale", ce._rescale_kernel, dict(g_ptr=Ptr("bf16"), s_ptr=Ptr("fp32"), n=2**33), dict(BLOCK=4096))
    for kind, log, single in itertools.product(("fwd", "bwd"), (False, True), (True, False)):
        fn = softmax._softmax_fwd_kernel if kind == "fwd" else softmax._softmax_bwd_kernel
        args = dict(x_ptr=Ptr("bf16"), y_ptr=Ptr("bf16")) if kind == "fwd" else \
            dict(g_ptr=Ptr("bf16"), y_ptr=Ptr("bf16"), dx_ptr=Ptr("bf16"))
        args.update(S=4096, C=1000, sb=0, ss=1000, sc=1, n_sblk=4096)
        one(f"softmax {kind} log={log} single={single}", fn, args,
            dict(BLOCK_S=1, BLOCK_C=8192, SINGLE=single, LOG=log))
    return ok


# ----------------------------------------------------------------------------- 2. production plans

def production(R: int, C: int, cluster: bool, reduce: int) -> tuple[str, object, dict, dict, dict, int]:
    """(path, kernel, args, constexprs, options, values per thread) that the launch plan picks
    for bf16 (R, C) forward+backward on a 132-SM sm_90 device, with or without cluster reductions,
    for reduce 3 (the mean's forward with its gradient) or 0 (a backward that recomputes)."""
    dev = torch.device("cuda", 0)
    _device.num_sms.cache_clear()
    orig_sms, orig_cluster = _device.num_sms, _device.cluster_reductions
    _device.num_sms = lambda d: SMS
    _device.cluster_reductions = lambda d: cluster
    ce.configure()
    try:
        path, kw, _ = ce._plan(1, R, C, C, 1, True, reduce, dev)
        p = split.plan(R, C, torch.device("cpu"))   # slice plan (the cpu device only skips occupancy)
    finally:
        _device.num_sms, _device.cluster_reductions = orig_sms, orig_cluster
        ce.configure()
    flags = FLAG_SETS[0]
    if path == "split":
        consts = dict(BLOCK=p["BLOCK"], NSPLIT=p["NSPLIT"], NSPLIT_P2=p["NSPLIT_P2"], STAGE=0,
                      PREFETCH=p["PREFETCH"], REDUCE=reduce, **flags)
        opts = dict(num_warps=p["num_warps"], launch_cooperative_grid=True)
        return path, split._ce_split_kernel, split_args("bf16", False, R, C), consts, opts, \
            p["BLOCK"] // (32 * p["num_warps"])
    kw = dict(kw)
    opts = dict(num_warps=kw.pop("num_warps"), num_ctas=kw.pop("num_ctas", 1),
                launch_cooperative_grid=reduce == 3)
    per_thread = kw["BLOCK_S"] * kw["BLOCK_C"] // (32 * opts["num_warps"] * opts["num_ctas"])
    if not kw["SINGLE"]:
        per_thread = kw["BLOCK_S"] * kw["BLOCK_C"] // (32 * opts["num_warps"])
    return path, ce._ce_kernel, fused_args("bf16", False, R, C), \
        dict(NEED_GRAD=True, REDUCE=reduce, STAGE=0, **kw, **flags), opts, per_thread


def check_production() -> bool:
    ok = True
    cluster_here = _device.compiles_cluster_reduction(TARGET)
    print(f"cluster reductions compile for sm_90 with triton {triton.__version__}: {cluster_here}")
    print("shape            triton   loss  path     regs spills CTAs/SM  SASS/elem  one-read")
    seen = set()
    # mean: the forward that also forms W, the loss and the gradient (one launch);
    # none: the backward's recompute.  A single-tile shape (C <= 16384) beside the benchmark ones.
    # "claim": the mean's forward with W from a claiming program (ce._MEAN_LAUNCH = "claim", STAGE 3:
    # one program per tile, no cooperative launch), beside the default cooperative one.
    for (R, C), cluster, loss in itertools.product(BENCH_SHAPES + [(8192, 8192)], sorted({False, cluster_here}),
                                                   ("mean", "claim", "none")):
        path, fn, args, consts, opts, per_thread = production(R, C, cluster, 0 if loss == "none" else 3)
        if loss == "claim":
            if fn is not ce._ce_kernel:
                continue
            consts, opts = dict(consts, STAGE=3), dict(opts, launch_cooperative_grid=False)
        key = (fn, R, C, tuple(sorted(consts.items())), tuple(sorted(opts.items())))
        if key in seen:
            continue
        seen.add(key)
        ck = compile_kernel(fn, args, consts, opts)
        res = resources(ck)
        if path == "split" or loss == "mean":   # a barrier: a release on arrival, acquire loads while waiting
            ok &= "atom.global.gpu.acq_rel" in ck.asm["ptx"] and "ld.global.gpu.acquire" in ck.asm["ptx"]
        if loss == "claim":   # the claim (compare-and-swap) and the waiters' acquire loads
            ok &= "atom.global.acq_rel.gpu.cas" in ck.asm["ptx"] and "ld.global.gpu.acquire" in ck.asm["ptx"]
        if path == "cluster":  # the reduction goes through distributed shared memory
            ok &= "mapa.shared::cluster" in ck.asm["ptx"] and "barrier.cluster" in ck.asm["ptx"]
        ctas = ctas_per_sm(res["regs"], res["shared"], opts["num_warps"])
        body = loops(res["sass"])
        if path == "twopass":
            per_elem = (body[0] + body[1]) / per_thread if len(body) > 1 else float("nan")
        else:
            per_elem = (body[0] if body else n_instructions(res["sass"])) / per_thread
        # one-read is reported, not required: on an H100 the two-pass kernel (second read
        # partly from L2) beat the one-read split kernel for cross-entropy (ce._AUTO_PATH).
        one_read = path in ("single", "cluster", "split")
        good = res["local"] == 0 and res["stack"] == 0 and ctas >= 2
        ok &= good
        who = "3.9-like" if cluster else "3.6-like"
        print(f"{'OK  ' if good else 'FAIL'} {R}x{C:<7} {who} {loss:5} {path:8} "
              f"{res['regs']:4} {res['local']:6} {ctas:7} {per_elem:9.1f}  {one_read}")
    # softmax forward, bf16 8192 x 128256, on the GPU machine's Triton (no cluster reductions)
    R, C = 8192, 128256
    p = split.plan(R, C, torch.device("cpu"))
    res = resources(compile_kernel(
        split._softmax_split_kernel, softmax_split_args(R, C),
        dict(BLOCK=p["BLOCK"], NSPLIT=p["NSPLIT"], NSPLIT_P2=p["NSPLIT_P2"], STAGE=0, PREFETCH=p["PREFETCH"],
             LOG=False), dict(num_warps=p["num_warps"], launch_cooperative_grid=True)))
    ctas = ctas_per_sm(res["regs"], res["shared"], p["num_warps"])
    good = res["local"] == 0 and ctas >= 2
    ok &= good
    print(f"{'OK  ' if good else 'FAIL'} softmax {R}x{C} 3.6-like split    {res['regs']:4} {res['local']:6} "
          f"{ctas:7} {loops(res['sass'])[0] / (p['BLOCK'] / (32 * p['num_warps'])):9.1f}  True")
    return ok


def explore(R=8192, C=128256) -> None:
    print(f"split kernel at {R}x{C} bf16: slice x warps x prefetch -> regs, CTAs/SM, SASS/elem")
    for block, warps, pre in itertools.product((4096, 8192, 16384), (4, 8, 16), (False,)):
        nsplit = triton.cdiv(C, block)
        consts = dict(BLOCK=block, NSPLIT=nsplit, NSPLIT_P2=triton.next_power_of_2(nsplit), STAGE=0,
                      PREFETCH=pre, REDUCE=3, **FLAG_SETS[0])
        try:
            res = resources(compile_kernel(split._ce_split_kernel, split_args("bf16", False, R, C), consts,
                                           dict(num_warps=warps, launch_cooperative_grid=True)))
        except Exception as e:  # noqa: BLE001
            print(f"  {block:6} {warps:3} {pre!s:5} failed: {type(e).__name__}")
            continue
        body = loops(res["sass"])
        print(f"  {block:6} {warps:3} {pre!s:5} regs {res['regs']:4} local {res['local']:4} "
              f"CTAs/SM {ctas_per_sm(res['regs'], res['shared'], warps):2} "
              f"SASS/elem {body[0] / (block / (32 * warps)):6.1f}")


def main() -> int:
    if "--explore" in sys.argv:
        explore()
        return 0
    ok = check_variants()
    ok &= check_production()
    print("ALL OK" if ok else "SOME FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
