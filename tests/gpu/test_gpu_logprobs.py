"""crossent.log_probs / linear_log_probs on a real GPU (Triton kernels, cuBLAS
matmuls) against the eager RL formula, at LLM vocabulary sizes (Llama-3's
128256 classes: the looped one-read path of the kernels).

Tolerance: the project's rule (tests/_tol.py), values and gradients, random
upstream gradients for both outputs, fp32 and bf16, temperature != 1, ignored
positions.  CROSSENT_GPU_TEST_DEVICE=cpu runs the same checks on the CPU
(smaller vocabulary) to check this file's logic without a GPU.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

DEV = os.environ.get("CROSSENT_GPU_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import crossent  # noqa: E402
from test_logprobs import _check, eager  # noqa: E402

V_BIG = 128256 if DEV == "cuda" else 3001


def _inputs(shape, dtype, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    t = torch.randint(0, V_BIG, shape, generator=g, device=DEV)
    t.view(-1)[::4] = -100
    ga = torch.randn(shape, generator=g, device=DEV, dtype=torch.float64)
    gb = torch.randn(shape, generator=g, device=DEV, dtype=torch.float64)
    return g, t, ga, gb


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_log_probs_gpu(dtype):
    g, t, ga, gb = _inputs((3, 37), dtype, 0)
    x = (torch.randn(3, 37, V_BIG, generator=g, device=DEV) * 4).to(dtype).requires_grad_()
    out = crossent.log_probs(x, t, temperature=0.8, entropy=True)
    _check(out, [x], lambda lg, dt: eager(lg, t, 0.8, -100, dt), ga, gb, "both", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_log_probs_gpu(dtype):
    D = 256
    g, t, ga, gb = _inputs((2, 80), dtype, 1)
    h = torch.randn(2, 80, D, generator=g, device=DEV).to(dtype).requires_grad_()
    W = (torch.randn(V_BIG, D, generator=g, device=DEV) / D ** 0.5).to(dtype).requires_grad_()
    out = crossent.linear_log_probs(h, W, t, temperature=1.3, entropy=True)

    def ref(h, W, dt):
        lg = torch.nn.functional.linear(h, W)
        return eager(lg if lg.dtype == torch.float64 else lg.to(dtype), t, 1.3, -100, dt)

    _check(out, [h, W], ref, ga, gb, "both", dtype)
