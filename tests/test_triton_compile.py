"""The Triton kernels compile for sm_90 (H100/H200) with the real compiler,
not only run in the CPU interpreter, the production launch plans pass the
static performance checks (see tests/_aot_compile.py), and their launches go
through the installed Triton's JIT to a fake sm_90 launcher (tests/_launch_path.py).
No GPU needed: triton's wheel carries the NVIDIA toolchain (ptxas).  Both checks
take the path the installed Triton supports (clusters only where they compile)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", minversion="3.6")  # backends.triton.MIN_TRITON


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


needs_toolchain = pytest.mark.skipif(
    not _has_nvidia_backend() or not _has_cuda_tools(),
    reason="this triton build has no NVIDIA backend or no ptxas / cuobjdump / nvdisasm")


def _env(tmp_path) -> dict:
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("TRITON_INTERPRET", None)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return env


def _run(script: str, tmp_path, start: str, *args: str) -> None:
    """Run tests/<script> without TRITON_INTERPRET; assert it printed ALL OK; its report from ``start`` on."""
    here = Path(__file__).resolve().parent
    out = subprocess.run([sys.executable, str(here / script), *args], env=_env(tmp_path), capture_output=True,
                         text=True, timeout=900)
    print(out.stdout[out.stdout.find(start):])   # the report (pytest -s)
    fails = "\n".join(line for line in out.stdout.splitlines() if line.startswith("FAIL"))
    assert out.returncode == 0 and "ALL OK" in out.stdout, fails[:4000] + out.stdout[-3000:] + out.stderr[-3000:]


@needs_toolchain
def test_kernels_compile_for_sm90(tmp_path):
    """Every kernel variant compiles for sm_90, and the production plans at the benchmark
    shapes spill nothing and fit >= 2 CTAs per SM (tests/_aot_compile.py)."""
    _run("_aot_compile.py", tmp_path, "cluster reductions")


@needs_toolchain
def test_launch_path_through_the_installed_triton(tmp_path):
    """The production launches go through this Triton's JIT to a (fake) sm_90 launcher: the
    cluster probe routes the plan, the cooperative grid fits, the flags reach the launcher
    (tests/_launch_path.py)."""
    _run("_launch_path.py", tmp_path, "cluster reductions")


@needs_toolchain
def test_lean_launch_matches_the_jit(tmp_path):
    """After the first call of a key, crossent's launches skip Triton's JIT dispatch and hand the
    launcher what JITFunction.run hands it, for every production launch; argument variants reach
    the compiled kernel the JIT reaches; device, stream, hooks and globals are honoured; crossent's
    own call sites take the lean path (tests/_launch_path.py --lean)."""
    _run("_launch_path.py", tmp_path, "lean launch", "--lean")


def test_lean_launch_off_switch(tmp_path):
    """CROSSENT_LEAN_LAUNCH=0 sends every launch through Triton's JIT."""
    check = "from crossent.backends.triton import _launch; print(_launch.ENABLED)"
    out = subprocess.run([sys.executable, "-c", check], env=dict(_env(tmp_path), CROSSENT_LEAN_LAUNCH="0"),
                         capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "False", out.stderr[-2000:]   # on (True) by default: _launch_path.py --lean
