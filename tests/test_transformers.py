"""crossent.transformers against transformers' own losses, on tiny random-init
models built in code (no hub downloads).

Causal LMs (Llama, Qwen2, Gemma2 with final_logit_softcapping, GPT-2 with tied
embeddings): the loss and every parameter gradient of ``use_crossent(model)``
and ``use_crossent(model, fused=True)`` are held to the project's rule against
a float64 reference (the same weights in fp64, loss by torch in fp64): no
worse than a small multiple of transformers' own fp32 error.  Trainer with
gradient accumulation logs the same losses; the fused head's peak memory
(RSS high-water mark of a fresh process) stays below one logits tensor.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from crossent.transformers import (causal_lm_compute_loss, causal_lm_loss, fused_causal_lm_loss,  # noqa: E402
                                   use_crossent)

from _tol import assert_close_to_ref  # noqa: E402

V = 384
ROOT = Path(__file__).resolve().parents[1]


def _config(arch: str, vocab: int = V, hidden: int = 32):
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
    if arch == "llama":
        return transformers.LlamaConfig(**common)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common)
    if arch == "gemma2":  # final_logit_softcapping small enough to bite at these logit sizes
        return transformers.Gemma2Config(**common, head_dim=8, final_logit_softcapping=0.5)
    if arch == "gpt2":  # tied input/output embeddings; dropout off so train mode is deterministic
        return transformers.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=2, n_head=4, n_positions=64,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                       bos_token_id=0, eos_token_id=0)
    raise ValueError(arch)


def _model(arch: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(_config(arch, **kw)).train()


def _batch(seed: int = 0, B: int = 3, T: int = 16, vocab: int = V):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt
    labels[2, 9:] = -100  # padding
    return ids, labels


def _grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(model, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    return out, _grads(model)


def _reference(model, ids, labels, nib, shift_labels=None):
    """fp64 weights, fp64 logits from the model itself, torch's loss in fp64."""
    m64 = copy.deepcopy(model).double()
    logits = m64(input_ids=ids).logits
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=-100)[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shift_labels.reshape(-1),
                           reduction="mean" if nib is None else "sum")
    if nib is not None:
        loss = loss / nib
    loss.backward()
    return loss.detach(), _grads(m64)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "gpt2"])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("mode", ["mean", "num_items", "shift_labels"])
def test_causal_lm_loss_and_grads(arch, fused, mode):
    theirs_m = _model(arch)
    ours_m = use_crossent(copy.deepcopy(theirs_m), fused=fused)
    ids, labels = _batch()
    nib = torch.tensor(31) if mode == "num_items" else None  # not the batch's own count: exercises the division
    extra = {"num_items_in_batch": nib} if nib is not None else {}
    shift = None
    if mode == "shift_labels":  # already aligned, e.g. from a padding-free collator
        shift = F.pad(labels, (0, 1), value=-100)[:, 1:].clone()
        shift[1, ::3] = -100
        extra["shift_labels"] = shift
    ref_loss, ref_grads = _reference(theirs_m, ids, labels, nib, shift)
    theirs, theirs_g = _run(theirs_m, input_ids=ids, labels=labels, **extra)
    ours, ours_g = _run(ours_m, input_ids=ids, labels=labels, **extra)
    assert ours.loss.dtype == torch.float32
    assert (ours.logits is None) == fused
    assert_close_to_ref(ours.loss.detach(), theirs.loss.detach(), ref_loss, what="loss")
    assert ours_g.keys() == theirs_g.keys() == ref_grads.keys()
    if arch == "gpt2":  # tied: one parameter is both the embedding and the head
        assert ours_m.lm_head.weight is ours_m.transformer.wte.weight
    for name in theirs_g:
        assert_close_to_ref(ours_g[name], theirs_g[name], ref_grads[name], dtype=torch.float32, what=name)


def test_low_precision_result_is_fp32():
    """transformers upcasts bf16 logits to fp32 before the loss; a bf16 sum over
    many tokens would be rounded (the trap in issue 12).  The plain loss sees
    the same bf16 logits, so it matches to fp32 tolerance; the fused head's
    logits never exist in bf16, so it is merely close."""
    theirs_m = _model("llama").to(torch.bfloat16)
    ids, labels = _batch(T=32)
    nib = (labels[:, 1:] != -100).sum()
    theirs = theirs_m(input_ids=ids, labels=labels, num_items_in_batch=nib).loss
    plain = use_crossent(copy.deepcopy(theirs_m))(input_ids=ids, labels=labels, num_items_in_batch=nib).loss
    fused = use_crossent(copy.deepcopy(theirs_m), fused=True)(input_ids=ids, labels=labels,
                                                               num_items_in_batch=nib).loss
    assert theirs.dtype == plain.dtype == fused.dtype == torch.float32
    torch.testing.assert_close(plain, theirs, rtol=2e-6, atol=0)
    torch.testing.assert_close(fused, theirs, rtol=2e-2, atol=0)


def test_fused_falls_back_when_logits_are_needed():
    model = use_crossent(_model("llama"), fused=True)
    ids, labels = _batch()
    assert model(input_ids=ids).logits.shape == (*ids.shape, V)  # no labels
    model.eval()
    out = model(input_ids=ids, labels=labels)  # eval: logits and loss
    assert out.logits is not None
    torch.testing.assert_close(out.loss, causal_lm_loss(out.logits, labels, V))
    model.train()
    assert model(input_ids=ids, labels=labels).logits is None
    tup = model(input_ids=ids, labels=labels, return_dict=False)
    assert isinstance(tup, tuple) and tup[0].dim() == 0


def test_per_instance_only():
    """No class or global patching: other instances, the class and LOSS_MAPPING are untouched."""
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
    mapping = dict(LOSS_MAPPING)
    patched, other = use_crossent(_model("llama"), fused=True), _model("llama")
    cls = type(patched)
    assert LOSS_MAPPING == mapping and other.loss_function is ForCausalLMLoss
    assert "forward" not in other.__dict__ and cls.forward is type(other).forward
    assert patched.loss_function is causal_lm_loss
    ids, labels = _batch()
    assert other(input_ids=ids, labels=labels).logits is not None
    twin = copy.deepcopy(patched)  # the instance forward is rebound to the copy
    assert twin.forward.__self__ is twin
    use_crossent(patched, fused=False)
    assert "forward" not in patched.__dict__ and patched(input_ids=ids, labels=labels).logits is not None


def test_unknown_head_is_refused():
    """A head the fused path does not know (here a logit scale, as Cohere has) fails the probe."""
    model = _model("llama")
    real = type(model).forward

    def scaled(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        out.logits = out.logits * 0.5
        return out

    model.forward = scaled.__get__(model)
    with pytest.raises(ValueError, match="output embeddings"):
        use_crossent(model, fused=True)
    assert model.__dict__["forward"].__func__ is scaled and model.loss_function is causal_lm_loss


def test_fused_loss_function_directly():
    """fused_causal_lm_loss == causal_lm_loss on the logits (plain-PyTorch loops)."""
    torch.manual_seed(0)
    h = torch.randn(2, 9, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[1, 4] = -100
    a = fused_causal_lm_loss(h, w, labels, softcap=3.0)
    b = causal_lm_loss(3.0 * torch.tanh((h @ w.T) / 3.0), labels, 50)
    torch.testing.assert_close(a, b)
    ga = torch.autograd.grad(a, (h, w))
    gb = torch.autograd.grad(b, (h, w))
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y)


def _classifier_case(cls_name, labels_fn, **cfg):
    torch.manual_seed(0)
    config = _config("llama")
    for k, v in cfg.items():
        setattr(config, k, v)
    config.pad_token_id = 0
    theirs_m = getattr(transformers, cls_name)(config).eval()  # eval: no classifier dropout
    ours_m = use_crossent(copy.deepcopy(theirs_m))
    ids, _ = _batch()
    labels = labels_fn(ids)
    theirs, tg = _run(theirs_m, input_ids=ids, labels=labels)
    ours, og = _run(ours_m, input_ids=ids, labels=labels)
    torch.testing.assert_close(ours.loss, theirs.loss)
    for n in tg:
        torch.testing.assert_close(og[n], tg[n])
    return ours_m


def test_sequence_and_token_classification():
    from crossent.transformers import sequence_classification_loss, token_classification_loss
    m = _classifier_case("LlamaForSequenceClassification", lambda ids: torch.tensor([0, 2, 1]), num_labels=3)
    assert m.loss_function is sequence_classification_loss and m.config.problem_type == "single_label_classification"
    _classifier_case("LlamaForSequenceClassification", lambda ids: torch.randn(3), num_labels=1)  # regression
    tok = lambda ids: torch.where(ids % 3 == 0, -100, ids % 5)  # noqa: E731
    m = _classifier_case("LlamaForTokenClassification", tok, num_labels=5)
    assert m.loss_function is token_classification_loss


def test_masked_lm():
    from crossent.transformers import masked_lm_loss
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    theirs_m = transformers.BertForMaskedLM(config).train()
    ours_m = use_crossent(copy.deepcopy(theirs_m))
    assert ours_m.loss_function is masked_lm_loss
    ids, labels = _batch()
    theirs, tg = _run(theirs_m, input_ids=ids, labels=labels)
    ours, og = _run(ours_m, input_ids=ids, labels=labels)
    torch.testing.assert_close(ours.loss, theirs.loss)
    for n in tg:
        torch.testing.assert_close(og[n], tg[n])
    with pytest.raises(ValueError, match="causal"):
        use_crossent(copy.deepcopy(theirs_m), fused=True)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "lm_head"]])
def test_peft_lora(targets):
    """LoRA on attention: the fused head runs.  LoRA on lm_head: the head is no
    plain nn.Linear any more, so the logits are built (with a warning)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    theirs_m = peft.get_peft_model(_model("llama"), peft.LoraConfig(r=4, target_modules=targets,
                                                                    init_lora_weights=False, lora_dropout=0.0))
    ours_m = use_crossent(copy.deepcopy(theirs_m), fused=True)
    ids, labels = _batch()
    theirs, tg = _run(theirs_m, input_ids=ids, labels=labels)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ours, og = _run(ours_m, input_ids=ids, labels=labels)
    head_lora = "lm_head" in targets
    assert (ours.logits is None) != head_lora
    assert any("not a plain nn.Linear" in str(x.message) for x in w) == head_lora
    torch.testing.assert_close(ours.loss, theirs.loss)
    assert og.keys() == tg.keys() and any("lora" in n for n in og)
    for n in tg:
        torch.testing.assert_close(og[n], tg[n])


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=12, T=12):
        g = torch.Generator().manual_seed(1)
        self.items = []
        for i in range(n):
            ids = torch.randint(0, V, (T,), generator=g)
            labels = ids.clone()
            labels[: i % 5] = -100  # varying counts: num_items_in_batch matters
            self.items.append({"input_ids": ids, "labels": labels})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_trainer_gradient_accumulation(tmp_path, monkeypatch):
    """Trainer, gradient accumulation 2: transformers' default loss, the fused
    head and compute_loss_func log the same losses and gradient norms."""
    pytest.importorskip("accelerate")
    import crossent.transformers as ct
    fused_calls = []

    def counted(*args, **kwargs):
        fused_calls.append(kwargs["num_items_in_batch"])
        return fused_causal_lm_loss(*args, **kwargs)

    monkeypatch.setattr(ct, "fused_causal_lm_loss", counted)

    def train(setup):
        model = _model("llama")
        kw = setup(model)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no", seed=0, data_seed=0,
            max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2,
            logging_steps=1, disable_tqdm=True, dataloader_num_workers=0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=_Rows(), **kw)
        trainer.train()
        logs = [r for r in trainer.state.log_history if "loss" in r]
        return [r["loss"] for r in logs], [r["grad_norm"] for r in logs]

    default, default_gn = train(lambda m: {})
    fused, fused_gn = train(lambda m: (use_crossent(m, fused=True), {})[1])
    plain, plain_gn = train(lambda m: {"compute_loss_func": causal_lm_compute_loss})
    # 3 optimizer steps x 2 micro-batches through the fused head, each told the step's token count
    assert len(default) == 3 and len(fused_calls) == 6 and all(torch.is_tensor(n) for n in fused_calls)
    for losses, gn in ((fused, fused_gn), (plain, plain_gn)):
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(default), rtol=1e-5, atol=0)
        torch.testing.assert_close(torch.tensor(gn), torch.tensor(default_gn), rtol=1e-4, atol=0)


_MEMORY_WORKER = r"""
import json, sys, torch, transformers
from crossent._bench import _peak_kib, _reset_peak, _rss_kib
from crossent.transformers import use_crossent
torch.manual_seed(0)
cfg = transformers.LlamaConfig(vocab_size=32768, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2)
model = transformers.LlamaForCausalLM(cfg).train()
if sys.argv[1] == "fused":
    use_crossent(model, fused=True)
ids = torch.randint(0, 32768, (4, 256))
def step():
    model(input_ids=ids, labels=ids).loss.backward()
step()  # warm-up: parameter gradients exist from here on
model.zero_grad(set_to_none=False)
base, method = _rss_kib("VmRSS"), _reset_peak()
step()
print(json.dumps({"extra": (_peak_kib(method) - base) * 1024, "method": method,
                  "logits": ids.numel() * 32768 * 4}))
"""


@pytest.mark.slow
def test_fused_peak_memory_below_one_logits_tensor():
    """Extra peak RSS of one training step (after a warm-up step, gradients
    already allocated), in a fresh process per mode, as `crossent bench`
    measures memory.  transformers' default path is measured too: it must
    exceed one logits tensor, or the measurement could not see one."""
    res = {}
    for mode in ("default", "fused"):
        out = subprocess.run([sys.executable, "-c", _MEMORY_WORKER, mode], capture_output=True, text=True,
                             timeout=300, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    logits = res["fused"]["logits"]
    assert res["default"]["extra"] > logits, res
    assert res["fused"]["extra"] < logits, res


def test_example_smoke(tmp_path):
    """examples/train_stdlib_lm.py --smoke: tokenizer, three runs, table, PNG."""
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "train_stdlib_lm.py"), "--smoke",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "fused" in out.stdout and "tokens/s" in out.stdout
    assert (tmp_path / "loss_curves.png").stat().st_size > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["max_rel_loss_diff"]["crossent"] < 1e-5 and summary["max_rel_loss_diff"]["fused"] < 1e-5


def test_import_crossent_does_not_import_transformers():
    code = "import sys, crossent; assert 'transformers' not in sys.modules and 'crossent.transformers' not in sys.modules"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
