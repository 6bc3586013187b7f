"""`import crossent` pulls in torch only: no triton, no CUDA initialisation.

(The first call goes through torch's custom-op machinery, which imports
torch._dynamo, and that imports triton when it is installed: torch's doing,
at call time, not ours at import time.)
"""
import subprocess
import sys


def test_import_is_lean():
    code = ("import sys, crossent, torch\n"
            "assert 'triton' not in sys.modules, 'triton imported'\n"
            "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo imported'\n"
            "assert not torch.cuda.is_initialized(), 'CUDA initialised'\n"
            "crossent.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]))\n"
            "assert not torch.cuda.is_initialized(), 'CUDA initialised by a CPU call'\n"
            "print('lean')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "lean" in out.stdout, out.stderr
