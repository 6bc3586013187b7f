"""The gloo tests of crossent.distributed with CUDA tensors: every rank holds
its logits on GPU 0 (two or three processes share it) and gloo moves the
O(N) statistics, so the CUDA path of the vocab-parallel code (and of the
DTensor door) runs wherever a GPU is at hand, NCCL or not.  Same cases as
tests/test_distributed.py and tests/test_dtensor.py; on CUDA an out-of-range
target gives NaN instead of IndexError (checking would sync)."""
import os
import sys

import pytest
import torch

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, TESTS)
from _dist import check  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# Ranks still running then are killed and reported with their Python stacks (tests/_dist.py),
# inside the GPU window's per-test limit (benchmarks/gpu_window.py, stage tests-dist).
DEADLINE_S = 45


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_cuda(world):
    check(os.path.join(TESTS, "test_distributed.py"), world, "cases", device="cuda", min_cases=100,
          deadline_s=DEADLINE_S)


@pytest.mark.parametrize("world", [2, 3])
def test_dtensor_cuda(world):
    check(os.path.join(TESTS, "test_dtensor.py"), world, "cases", device="cuda", min_cases=50,
          deadline_s=DEADLINE_S)
