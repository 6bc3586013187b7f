"""crossent.distributed.megatron and .torchtitan against the real packages
(megatron-core 0.16.1, torchtitan 0.3.0; the ``dist`` extra), gloo, 2 and 3 ranks.

Megatron-core: its own tensor_parallel.vocab_parallel_cross_entropy (and
LanguageModule.compute_language_model_loss) is the reference without label
smoothing, on even shards (Megatron assumes them); with smoothing and on
uneven shards the reference is single-process torch.  torchtitan: its
CrossEntropyLoss (DTensor logits under the partial_dtensor backend, plain
local shards under spmd_types) and ChunkedLossWrapper over a ColwiseParallel
lm_head are the reference; with smoothing, z-loss or softcap it is
single-process crossent.
"""
from __future__ import annotations

import os
import sys

import pytest

from _dist import Checker, check, worker_main

HERE = os.path.abspath(__file__)


@pytest.mark.parametrize("world", [2, 3])
def test_megatron_core_and_torchtitan(world):
    """One spawn per world size for both packages (importing them is slow)."""
    pytest.importorskip("megatron.core")
    pytest.importorskip("torchtitan.components.loss")
    check(HERE, world, "all", min_cases=15)


# ---------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------
def _megatron_cases(ck: Checker, rank: int, world: int):
    import warnings

    import torch
    import torch.nn.functional as F
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex")
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.transformer.transformer_config import TransformerConfig

    from crossent.distributed import megatron as cm

    dev = ck.dev
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    tp = parallel_state.get_tensor_model_parallel_group()
    s, b = 5, 3
    for vl, eps, dt in [(4, 0.0, torch.float32), (3, 0.0, torch.bfloat16), (5, 0.1, torch.float32)]:
        V = vl * world
        g = torch.Generator().manual_seed(vl)
        full = (torch.randn(s, b, V, generator=g) * 4).to(dev, dt)
        t = torch.randint(0, V, (s, b), generator=g).to(dev)
        shard = full[..., rank * vl:(rank + 1) * vl]
        gout = torch.rand(s, b, generator=g).to(dev)
        name = f"megatron V={V} eps={eps} {dt}"
        xo = shard.clone().requires_grad_(True)
        ours = cm.vocab_parallel_cross_entropy(xo, t, label_smoothing=eps)
        ours.backward(gout)
        xm = shard.clone().requires_grad_(True)
        theirs = tensor_parallel.vocab_parallel_cross_entropy(xm * 1, t, eps)  # it overwrites its input
        theirs.backward(gout)
        ck.true(name + " dtype", ours.dtype == theirs.dtype == torch.float32, f"{ours.dtype} {theirs.dtype}")
        if eps == 0.0:
            tol = 1e-5 if dt == torch.float32 else 1e-2
            ck.close(name + " vs megatron", ours, theirs, rtol=tol, atol=tol)
            ck.close(name + " grad vs megatron", xo.grad.float(), xm.grad.float(), rtol=tol, atol=tol)
        else:  # Megatron's smoothing differs (#737): the reference is torch's
            xf = full.double().requires_grad_(True)
            ref = F.cross_entropy(xf.reshape(-1, V), t.reshape(-1), reduction="none", label_smoothing=eps)
            ref.backward(gout.double().reshape(-1))
            ck.close(name + " vs torch", ours.double(), ref.view(s, b), rtol=1e-5, atol=1e-5)
            ck.close(name + " grad vs torch", xo.grad.double(), xf.grad[..., rank * vl:(rank + 1) * vl],
                     rtol=1e-5, atol=1e-6)
        ck.cases += 1
    # fp64 on uneven shards, z-loss and softcap: single-process crossent.
    import crossent
    sizes = [5, 2, 6][:world]
    V, lo = sum(sizes), sum(sizes[:rank])
    g = torch.Generator().manual_seed(11)
    full = torch.randn(s, b, V, generator=g, dtype=torch.float64).to(dev)
    t = torch.randint(0, V, (s, b), generator=g).to(dev)
    for kw in [{}, dict(label_smoothing=0.2, z_loss=1e-3, softcap=2.5)]:
        xo = full[..., lo:lo + sizes[rank]].clone().requires_grad_(True)
        ours = cm.fused_vocab_parallel_cross_entropy(xo, t, tp, **kw)
        xf = full.clone().requires_grad_(True)
        ref = crossent.cross_entropy(xf.reshape(-1, V), t.reshape(-1), reduction="none", **kw).view(s, b)
        ck.close(f"uneven {kw}", ours.double(), ref)
        ck.close(f"uneven {kw} grad", torch.autograd.grad(ours.sum(), xo)[0],
                 torch.autograd.grad(ref.sum(), xf)[0][..., lo:lo + sizes[rank]])
        ck.cases += 1
    # compute_language_model_loss through a real LanguageModule: [b, s] labels.
    cfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1)

    class Theirs(LanguageModule):
        pass

    class Ours(cm.CrossentLanguageModelLoss, LanguageModule):
        pass

    vl, V = 4, 4 * world
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(s, b, V, generator=g)[..., rank * vl:(rank + 1) * vl].to(dev)
    labels = torch.randint(0, V, (b, s), generator=g).to(dev)
    xo, xm = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    ours = Ours(cfg).compute_language_model_loss(labels, xo)
    theirs = Theirs(cfg).compute_language_model_loss(labels, xm * 1)
    ck.close("compute_language_model_loss", ours, theirs, rtol=1e-5, atol=1e-6)
    ck.true("compute_language_model_loss layout", ours.shape == (b, s), str(ours.shape))
    ck.close("compute_language_model_loss grad", torch.autograd.grad(ours.sum(), xo)[0],
             torch.autograd.grad(theirs.sum(), xm)[0], rtol=1e-5, atol=1e-6)
    ck.cases += 1
    parallel_state.destroy_model_parallel()


def _torchtitan_cases(ck: Checker, rank: int, world: int):
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
    from torchtitan.components import loss as tl
    from torchtitan.distributed.spmd_types import set_current_spmd_mesh
    from torchtitan.distributed.utils import set_spmd_backend

    import crossent
    from crossent.distributed import torchtitan as ct

    dev = ck.dev
    mesh = init_device_mesh(dev, (world,), mesh_dim_names=("tp",))
    B, L, D = 2, 4, 6
    for V, kw in [(7, {}), (11, {}), (7, dict(label_smoothing=0.1, z_loss=1e-3, softcap=3.0))]:
        g = torch.Generator().manual_seed(V + len(kw))
        full = (torch.randn(B, L, V, generator=g) * 3).to(dev)
        labels = torch.randint(0, V, (B, L), generator=g).to(dev)
        labels[0, 1] = -100
        gvt = (labels != -100).sum()
        ours_fn = ct.CrossEntropyLoss.Config(**kw).build()
        theirs_fn = tl.CrossEntropyLoss.Config(global_vocab_size=V).build()
        name = f"torchtitan V={V} {kw}"
        xf = full.double().requires_grad_(True)
        ref = crossent.cross_entropy(xf.reshape(-1, V), labels.reshape(-1), reduction="sum", **kw) / gvt
        (ref_grad,) = torch.autograd.grad(ref, xf)
        # partial_dtensor backend: the logits are a DTensor sharded on the vocabulary.
        set_spmd_backend("partial_dtensor")
        xo = distribute_tensor(full, mesh, [Shard(2)]).requires_grad_(True)
        ours, metrics = ours_fn(xo, labels, gvt)
        ours.backward()
        ck.true(name + " returns (loss, {})", metrics == {} and ours.dtype == torch.float32)
        ck.true(name + " grad placements", tuple(xo.grad.placements) == (Shard(2),), str(xo.grad.placements))
        ck.close(name + " vs single process", ours.double(), ref, rtol=1e-5, atol=1e-6)
        ck.close(name + " grad vs single process", xo.grad.full_tensor().double(), ref_grad, rtol=1e-5, atol=1e-7)
        if not kw:
            xt = distribute_tensor(full, mesh, [Shard(2)]).requires_grad_(True)
            theirs, _ = theirs_fn(xt, labels, gvt)
            theirs.backward()
            ck.close(name + " vs torchtitan", ours, theirs, rtol=1e-5, atol=1e-6)
            ck.close(name + " grad vs torchtitan", xo.grad.full_tensor(), xt.grad.full_tensor(),
                     rtol=1e-5, atol=1e-7)
        ck.cases += 1
        # spmd_types backend: each rank's plain vocabulary shard.
        set_spmd_backend("spmd_types")
        shard = distribute_tensor(full, mesh, [Shard(2)]).to_local()
        with set_current_spmd_mesh(mesh):
            xo = shard.clone().requires_grad_(True)
            ours, _ = ours_fn(xo, labels, gvt)
            ours.backward()
            ck.close(name + " spmd_types", ours.double(), ref, rtol=1e-5, atol=1e-6)
            if not kw:
                xt = shard.clone().requires_grad_(True)
                theirs, _ = theirs_fn(xt, labels, gvt)
                theirs.backward()
                ck.close(name + " spmd_types vs torchtitan", ours, theirs, rtol=1e-5, atol=1e-6)
                ck.close(name + " spmd_types grad vs torchtitan", xo.grad, xt.grad, rtol=1e-5, atol=1e-7)
        ck.cases += 1
        # Fused head over a ColwiseParallel lm_head vs torchtitan's ChunkedLossWrapper.
        set_spmd_backend("partial_dtensor")
        W = torch.randn(V, D, generator=g).to(dev)
        h = torch.randn(B, L, D, generator=g).to(dev)
        heads = []
        for _ in range(2):
            head = torch.nn.Linear(D, V, bias=False).to(dev)
            with torch.no_grad():
                head.weight.copy_(W)
            heads.append(parallelize_module(head, mesh, ColwiseParallel(use_local_output=False)))
        fused = ct.LinearCrossEntropyLoss.Config(**kw).build()
        fused.set_lm_head(heads[0])
        hl = h.clone().requires_grad_(True)
        ours, _ = fused(hl * 1, labels, gvt)
        ours.backward()
        hf, Wf = h.double().requires_grad_(True), W.double().requires_grad_(True)
        ref = crossent.cross_entropy((hf @ Wf.T).reshape(-1, V), labels.reshape(-1), reduction="sum", **kw) / gvt
        ref_dh, ref_dw = torch.autograd.grad(ref, (hf, Wf))
        ck.close(name + " fused head", ours.double(), ref, rtol=1e-5, atol=1e-6)
        ck.close(name + " fused head dh", hl.grad.double(), ref_dh, rtol=1e-5, atol=1e-6)
        ck.close(name + " fused head dW", heads[0].weight.grad.full_tensor().double(), ref_dw, rtol=1e-5, atol=1e-6)
        if not kw:
            wrapper = tl.ChunkedLossWrapper.Config(num_chunks=2, loss_fn=tl.CrossEntropyLoss.Config()).build()
            wrapper.set_lm_head(heads[1])
            ht = h.clone().requires_grad_(True)
            theirs, _ = wrapper(ht * 1, labels, gvt)
            theirs.backward()
            ck.close(name + " fused head vs ChunkedLossWrapper", ours, theirs, rtol=1e-5, atol=1e-6)
            ck.close(name + " fused head dh vs ChunkedLossWrapper", hl.grad, ht.grad, rtol=1e-5, atol=1e-6)
            ck.close(name + " fused head dW vs ChunkedLossWrapper", heads[0].weight.grad.full_tensor(),
                     heads[1].weight.grad.full_tensor(), rtol=1e-5, atol=1e-6)
        ck.cases += 1


MODES = {"all": [_megatron_cases, _torchtitan_cases]}

if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    worker_main(MODES)
