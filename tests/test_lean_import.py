"""`import crossent` pulls in torch only: no triton, no CUDA initialisation.

(The first call goes through torch's custom-op machinery, which imports
torch._dynamo, and that imports triton when it is installed: torch's doing,
at call time, not ours at import time.)
"""
import subprocess
import sys


def _run_ok(code: str) -> None:
    """Run code in a fresh interpreter; it must exit 0 after printing 'ok'."""
    out = subprocess.run([sys.executable, "-c", code + "\nprint('ok')"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_import_is_lean():
    code = ("import sys, crossent, torch\n"
            "assert 'triton' not in sys.modules, 'triton imported'\n"
            "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo imported'\n"
            "assert not torch.cuda.is_initialized(), 'CUDA initialised'\n"
            "crossent.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]))\n"
            "assert not torch.cuda.is_initialized(), 'CUDA initialised by a CPU call'")
    _run_ok(code)


def test_import_without_torch_2_13_linear_module():
    """torch < 2.13 has no nn.LinearCrossEntropyLoss: crossent still imports and has one, on
    its copy of 2.13's (the library declares torch>=2.4; the GPU machines run torch 2.11)."""
    code = ("import torch\n"
            "if hasattr(torch.nn, 'LinearCrossEntropyLoss'):\n"
            "    del torch.nn.LinearCrossEntropyLoss\n"
            "import crossent\n"
            "m = crossent.nn.LinearCrossEntropyLoss(3, 7, bias=True, label_smoothing=0.1)\n"
            "assert type(m).__bases__[0].__name__ == '_LinearCrossEntropyLoss213'\n"
            "h, t = torch.randn(5, 3), torch.randint(0, 7, (5,))\n"
            "loss = m(h, t)\n"
            "ref = torch.nn.functional.cross_entropy(h @ m.linear.weight.T + m.linear.bias, t, label_smoothing=0.1)\n"
            "torch.testing.assert_close(loss, ref)\n"
            "crossent.linear_cross_entropy(torch.randn(5, 3), torch.randn(7, 3), torch.randint(0, 7, (5,)))")
    _run_ok(code)
