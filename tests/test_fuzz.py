"""The fuzz tier: seeded random differential cases against torch 2.13.

Every public function (functional, nn modules, linear_cross_entropy, the
vocab-parallel losses on a one-rank group, log_probs / linear_log_probs and
their vocab-parallel forms) over dtypes, 0-D to 5-D shapes
with zero sizes and odd/prime class counts, memory layouts, target kinds and
dtypes, class weights, ignore_index values (wrapping ones included), label
smoothing, reductions and legacy arguments, non-finite and huge inputs,
grad modes (torch.compile on a few percent of the cases) and bad arguments;
both backends, named explicitly (the triton one under TRITON_INTERPRET=1 on
CPU).  Cases: tests/_fuzz_cases.py; running and judging: tests/_fuzz.py and
tests/_fuzz_rules.py.

  CROSSENT_FUZZ_SEED     seed (default fixed, so CI is reproducible)
  CROSSENT_FUZZ_CASES    cases per run (default 400; a fifth go to triton)
  CROSSENT_FUZZ_SECONDS  wall-clock cap for the whole tier (default 150)

Each failing case prints as one line that reproduces it.
"""
from __future__ import annotations

import os
import random
import time

import pytest

from _fuzz import check, init_single_process, reproducer
from _fuzz_cases import draw

SEED = int(os.environ.get("CROSSENT_FUZZ_SEED", "9"))
CASES = int(os.environ.get("CROSSENT_FUZZ_CASES", "400"))
SECONDS = float(os.environ.get("CROSSENT_FUZZ_SECONDS", "150"))
# The interpreter runs each kernel launch in Python: fewer, smaller triton cases.
SHARE = {"torch": 0.8, "triton": 0.2}

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy inf/nan in the interpreter


@pytest.fixture(scope="module")
def one_rank_group():
    """The vocab-parallel cases' process group, gone again after this module."""
    import torch.distributed as dist
    ours = not dist.is_initialized()
    init_single_process()
    yield
    if ours:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", list(SHARE))
def test_fuzz(backend, one_rank_group):
    if backend == "triton":
        pytest.importorskip("triton")
        if os.environ.get("TRITON_INTERPRET") != "1":  # conftest sets it wherever CUDA is absent
            pytest.skip("the fuzz runs CPU tensors: the triton backend needs TRITON_INTERPRET=1")
    rng = random.Random(f"{SEED}:{backend}")
    deadline = time.monotonic() + SECONDS * SHARE[backend]
    failures, ran = [], 0
    for _ in range(round(CASES * SHARE[backend])):
        if time.monotonic() > deadline:
            break
        spec = draw(rng, backend)
        msg = check(spec)
        ran += 1
        if msg:
            failures.append(f"{reproducer(spec)}  # {' '.join(msg.split())}")
    print(f"fuzz[{backend}] seed {SEED}: {ran} cases, {len(failures)} failed")
    assert not failures, f"{len(failures)} of {ran} cases differ from torch:\n" + "\n".join(failures)
