"""CPU benchmark: crossent vs torch eager vs torch.compile, one fresh process per measurement.

    python benchmarks/cpu_bench.py --quick                 # < 1 min on 2 cores
    python benchmarks/cpu_bench.py --json bench-results/cpu.json
    python benchmarks/cpu_bench.py --cases 'ce-*' --providers crossent,torch

Same options and output as ``crossent bench``; see crossent/_bench_worker.py for what is measured.
"""
import sys

import harness  # noqa: F401  (makes src/ importable from a checkout)
from crossent._bench import main

if __name__ == "__main__":
    sys.exit(main())
