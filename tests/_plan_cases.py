"""Cross-entropy launches that differ from another in one component of the key of the triton
backend's launch plans (ce._launch: shapes, strides, flags, device), shared by
tests/test_triton_plans.py (interpreter) and tests/_launch_path.py --plans (fake sm_90 driver).

Each case names the case it differs from: run that one first and the plan it left behind is
exactly what a key missing this component would wrongly reuse.
"""
import torch

R, C = 6, 40


def inputs(dtype=torch.bfloat16) -> dict:
    """The tensors the cases are built from (fixed seed)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(R + 1, C + 24, generator=g) * 3).to(dtype)
    t = torch.randint(0, C, (2 * (R + 1),), generator=g)
    t[1] = -100
    probs = torch.softmax(torch.randn(R, C, generator=g), 1).to(dtype)
    return dict(x=x, t=t, probs=probs, w=torch.rand(C, generator=g).to(dtype))


def cases(dtype=torch.bfloat16) -> dict:
    """label -> (the case it differs from, keyword arguments of ``call``)."""
    d = inputs(dtype)
    x, t = d["x"][:R, :C].contiguous(), d["t"][:R].contiguous()
    base = dict(x=x, t=t)
    out = {"base": (None, base)}

    def case(label, parent="base", **change):
        out[label] = (parent, dict(out[parent][1], **change))
    case("more positions", x=d["x"][:R + 1, :C].contiguous(), t=d["t"][:R + 1].contiguous())
    case("more classes", x=d["x"][:R, :C + 1].contiguous())
    case("row stride", x=d["x"][:R, :C])                          # rows 64 apart
    case("class stride", x=x.t().contiguous().t())                # classes R apart
    case("target stride", t=d["t"][:2 * R:2])
    case("K-dim logits", x=x.reshape(2, 3, C).transpose(1, 2), t=t.reshape(2, 3))
    case("probabilities", t=d["probs"])
    case("weight", w=d["w"])
    case("smoothing", eps=0.1)
    case("z_loss", z=1e-3)
    case("softcap", cap=20.0)
    case("no gradient", need_grad=False)
    case("mean over W", reduction="mean")
    case("mean over positions", "probabilities", reduction="mean")
    case("per position", reduction="none")
    case("gradient buffer stride", "per position", grad_into="transposed")
    case("gradient into the logits", "no gradient", need_grad=True, inplace=True)   # x: the dummy g of both
    return out


def call(ce, x, t, w=None, eps=0.0, z=0.0, cap=0.0, reduction="sum", need_grad=True, grad_into=None,
         inplace=False):
    """(loss, lse, gradient or None) of one call of the triton backend's ``ce`` module:
    ce_forward for 'none' (unit scale per position), ce_forward_fused otherwise."""
    if inplace:
        x = x.clone()
    if reduction == "none":
        rows = torch.ones(x.shape[0], *x.shape[2:])
        buf = None
        if grad_into == "transposed":   # same shape as x, classes contiguous no more
            buf = torch.empty(x.shape[::-1], dtype=x.dtype).transpose(0, -1)
        loss, lse, grad = ce.ce_forward(x, t, w, -100, eps, z, cap, rows, need_grad, buf)
        return loss, lse, buf if buf is not None else grad if need_grad else None
    denom = torch.zeros(())
    loss, lse, grad = ce.ce_forward_fused(x, t, w, denom, -100, eps, z, cap, reduction, x.dtype, need_grad, inplace)
    return loss, lse, (x if inplace else grad) if need_grad else None
