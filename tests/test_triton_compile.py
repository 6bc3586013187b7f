"""The Triton kernels compile for sm_90 (H100/H200) with the real compiler,
not only run in the CPU interpreter, and the production launch plans pass the
static performance checks (see tests/_aot_compile.py).  No GPU needed: triton's wheel carries
the NVIDIA toolchain (ptxas)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")


def _has_nvidia_backend() -> bool:
    try:
        import triton.backends.nvidia.compiler  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def _has_cuda_tools() -> bool:
    # ptxas compiles; cuobjdump / nvdisasm read registers, spills and SASS (static checks)
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return all((tools / t).exists() for t in ("ptxas", "cuobjdump", "nvdisasm"))


@pytest.mark.skipif(not _has_nvidia_backend() or not _has_cuda_tools(),
                    reason="this triton build has no NVIDIA backend or no ptxas / cuobjdump / nvdisasm")
def test_kernels_compile_for_sm90(tmp_path):
    """Every kernel variant compiles for sm_90, and the production plans at the benchmark
    shapes read the logits once, spill nothing and fit >= 2 CTAs per SM (tests/_aot_compile.py)."""
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("TRITON_INTERPRET", None)
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root / "src"), env.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("_aot_compile.py"))], env=env,
                         capture_output=True, text=True, timeout=900)
    print(out.stdout[out.stdout.find("cluster reductions"):])   # the static-check table (pytest -s)
    fails = "\n".join(line for line in out.stdout.splitlines() if line.startswith("FAIL"))
    assert out.returncode == 0 and "ALL OK" in out.stdout, fails[:4000] + out.stdout[-3000:] + out.stderr[-3000:]
