"""Compile crossent's Triton kernels for an H100/H200 (sm_90) without a GPU.

The CPU interpreter runs kernels as Python, and it accepts code that the real
compiler rejects: a plain global int read inside a kernel is one example, and it
broke every compiled cross-entropy launch until this check existed.  Run by
tests/test_triton_compile.py in a subprocess, because TRITON_INTERPRET must be
unset when the kernels are imported.  Prints one line per variant, then ALL OK.
"""
import itertools
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from crossent.backends.triton import ce, softmax  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def compile_one(fn, sig, consts, tag) -> bool:
    try:
        triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=TARGET,
                       options={"num_warps": 8})
    except Exception as e:  # noqa: BLE001 - report whatever the compiler raises
        print(f"FAIL {tag}: {type(e).__name__}: {e}")
        return False
    print(f"OK   {tag}")
    return True


def ce_variants():
    # (MODE, SINGLE, BLOCK_S, BLOCK_C, NSPLIT): fused single tile, fused looped, packed rows,
    # split partials + finish, and the backward from a saved lse.
    paths = [(ce.FUSED, True, 1, 32768, 1), (ce.FUSED, False, 1, 8192, 1), (ce.FUSED, True, 8, 512, 1),
             (ce.PARTIALS, False, 1, 8192, 8), (ce.FINISH, False, 1, 8192, 8), (ce.BWD, False, 1, 8192, 1)]
    flags = [dict(HAS_W=False, SMOOTH=False, PROB=False, HAS_ZL=False, HAS_CAP=False),
             dict(HAS_W=True, SMOOTH=True, PROB=True, HAS_ZL=True, HAS_CAP=True)]
    for (mode, single, bs, bc, ns), f, xdt in itertools.product(paths, flags, ("bf16", "fp32")):
        yield mode, single, bs, bc, ns, f, xdt


def main() -> int:
    ok = True
    for mode, single, bs, bc, ns, f, xdt in ce_variants():
        sig = {"x_ptr": f"*{xdt}", "sx_b": "i64", "sx_s": "i64", "sx_c": "i64",
               "t_ptr": f"*{xdt}" if f["PROB"] else "*i64", "st_b": "i64", "st_s": "i64", "st_c": "i64",
               "w_ptr": "*fp32", "sumw_ptr": "*fp32", "scale_ptr": "*fp32", "scale_stride": "i32",
               "loss_ptr": "*fp32", "lse_ptr": "*fp32", "g_ptr": f"*{xdt}", "sg_b": "i64", "sg_s": "i64",
               "sg_c": "i64", "part_ptr": "*fp32", "S": "i64", "C": "i32", "n_sblk": "i32", "CHUNK": "i32",
               "ignore_index": "i64", "one_m_eps": "fp32", "eps_over_c": "fp32", "z_loss": "fp32",
               "cap": "fp32"}
        consts = dict(BLOCK_S=bs, BLOCK_C=bc, NSPLIT=ns, NSPLIT_P2=triton.next_power_of_2(ns), MODE=mode,
                      SINGLE=single, NEED_GRAD=mode != ce.PARTIALS, **f)
        ok &= compile_one(ce._ce_kernel, sig, consts, f"ce mode={mode} single={single} {xdt} {f}")
    ok &= compile_one(ce._rescale_kernel, {"g_ptr": "*bf16", "s_ptr": "*fp32", "n": "i64"}, {"BLOCK": 4096},
                      "rescale")
    for kind, log, single in itertools.product(("fwd", "bwd"), (False, True), (True, False)):
        fn = softmax._softmax_fwd_kernel if kind == "fwd" else softmax._softmax_bwd_kernel
        sig = {"x_ptr": "*bf16", "y_ptr": "*bf16"} if kind == "fwd" else \
            {"g_ptr": "*bf16", "y_ptr": "*bf16", "dx_ptr": "*bf16"}
        sig.update({"S": "i64", "C": "i32", "sb": "i64", "ss": "i64", "sc": "i64", "n_sblk": "i32"})
        ok &= compile_one(fn, sig, dict(BLOCK_S=1, BLOCK_C=8192, SINGLE=single, LOG=log),
                          f"softmax {kind} log={log} single={single}")
    print("ALL OK" if ok else "SOME FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
