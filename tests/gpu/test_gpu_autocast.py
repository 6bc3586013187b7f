"""crossent under CUDA autocast, against torch there (tests/test_autocast_devices.py reads
the op lists on CPU): (log_)softmax are fp32 ops of CUDA's autocast, so fp16/bf16 logits
give fp32 results (an explicit dtype wins); cross_entropy is not, and torch rounds its
log-probabilities to the input's dtype before nll_loss (fp32), while crossent returns the
fp32 loss of the same input values: within that rounding of torch's, equal to torch's on
fp32 copies.  tests/test_autocast.py has the CUDA cases of the losses' gradients."""
import pytest
import torch
import torch.nn.functional as F

import crossent

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEV = "cuda"
ULP = {torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}   # machine epsilon


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("log", [False, True])
def test_softmax_under_autocast(dtype, log):
    torch.manual_seed(0)
    x = (torch.randn(33, 1000, device=DEV) * 3).to(dtype).requires_grad_()
    ours_fn, theirs_fn = (crossent.log_softmax, torch.log_softmax) if log else (crossent.softmax, torch.softmax)
    with torch.autocast(DEV, dtype=dtype):
        ours, theirs = ours_fn(x, 1), theirs_fn(x, 1)
        assert ours_fn(x, 1, dtype=dtype).dtype == theirs_fn(x, 1, dtype=dtype).dtype == dtype
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(ours)
    (gx,) = torch.autograd.grad(ours, x, g)
    (gt,) = torch.autograd.grad(theirs, x, g)
    assert gx.dtype == gt.dtype == dtype
    torch.testing.assert_close(gx.float(), gt.float(), rtol=ULP[dtype], atol=ULP[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kw", [{}, {"label_smoothing": 0.1}, {"reduction": "none"}])
def test_cross_entropy_under_autocast(dtype, kw):
    torch.manual_seed(1)
    x = (torch.randn(64, 5000, device=DEV) * 3).to(dtype)
    t = torch.randint(0, 5000, (64,), device=DEV)
    t[::7] = -100
    with torch.autocast(DEV, dtype=dtype):
        ours, theirs = crossent.cross_entropy(x, t, **kw), F.cross_entropy(x, t, **kw)
        nll, nll_t = crossent.nll_loss(x, t), F.nll_loss(x, t)   # an fp32 op there too
    assert ours.dtype == theirs.dtype == nll.dtype == nll_t.dtype == torch.float32
    torch.testing.assert_close(ours, F.cross_entropy(x.float(), t, **kw), rtol=1e-5, atol=1e-5)
    # torch's log-probabilities rounded to dtype: each within half an ulp of its magnitude
    # (smoothing adds the classes' mean, rounded likewise)
    torch.testing.assert_close(ours, theirs, rtol=ULP[dtype], atol=1e-6)
    torch.testing.assert_close(nll, nll_t, rtol=1e-6, atol=0)
