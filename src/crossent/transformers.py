"""crossent for Hugging Face transformers (imported on demand: ``import crossent``
does not import transformers).

    from crossent.transformers import use_crossent
    model = use_crossent(AutoModelForCausalLM.from_config(config), fused=True)

* Loss functions with the semantics of transformers' ``loss/loss_utils.py``
  (checked against transformers 5.23): ``causal_lm_loss`` (labels shifted
  inside: position t predicts labels[..., t+1]; or ``shift_labels`` given
  already aligned), ``masked_lm_loss``, ``sequence_classification_loss``,
  ``token_classification_loss``.  ``ignore_index`` -100; with
  ``num_items_in_batch`` the loss is ``sum / num_items_in_batch`` (Trainer's
  gradient accumulation), else the mean over non-ignored tokens.  Where
  transformers upcasts the logits to fp32 (causal, masked, token
  classification) the loss is fp32 here too, but the fp16/bf16 logits are
  never copied: crossent computes in fp32 and only the result is fp32.
* ``use_crossent(model, fused=False)`` sets ``model.loss_function`` on that
  one instance (transformers' own per-instance hook); nothing global or
  class-wide is touched, so Trainer still sees the model's ``loss_type``
  and counts ``num_items_in_batch`` over the shifted labels as it does for
  transformers' own loss.
* ``fused=True`` (causal LMs) also gives that instance its own ``forward``:
  in training mode with labels, the model runs with ``logits_to_keep`` set to
  no position (so the head builds no logits), the decoder's last hidden
  state is taken by a forward hook, and ``fused_causal_lm_loss`` applies the
  output embeddings (tied or not, bias, ``final_logit_softcapping``) and the
  loss in chunks (``crossent.linear_cross_entropy``).  ``outputs.logits`` is
  then None.  Otherwise (eval mode, no labels, a head that is not a plain
  ``nn.Linear``, e.g. LoRA on ``lm_head``, or a hooked/sharded one, MoE
  router-logit losses) the model's own forward runs, with crossent's loss.
"""
from __future__ import annotations

import functools
import inspect
import types
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.loss import loss_utils as _hf
from transformers.modeling_utils import slice_logits_to_keep

from .functional import _cross_entropy
from .linear import _linear_cross_entropy

__all__ = ["causal_lm_loss", "masked_lm_loss", "sequence_classification_loss",
           "token_classification_loss", "fused_causal_lm_loss", "causal_lm_compute_loss", "use_crossent"]


# ---------------------------------------------------------------------------
# Loss functions (transformers' signatures; extra keyword arguments ignored, as there)
# ---------------------------------------------------------------------------
def _divide(loss: Tensor, num_items_in_batch) -> Tensor:
    if torch.is_tensor(num_items_in_batch):  # an int is fine too (custom trainers)
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def _fixed_cross_entropy(source: Tensor, target: Tensor, num_items_in_batch=None, ignore_index: int = -100,
                         result_dtype: torch.dtype | None = None, **kwargs) -> Tensor:
    """transformers' fixed_cross_entropy: the mean over non-ignored targets,
    or the sum divided by ``num_items_in_batch`` when that is given."""
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = _cross_entropy(source, target, None, None, ignore_index, None, reduction, 0.0, 0.0, None, False,
                          stats=False, result_dtype=result_dtype).loss
    return _divide(loss, num_items_in_batch) if reduction == "sum" else loss


def causal_lm_loss(logits: Tensor, labels: Tensor, vocab_size: int, num_items_in_batch=None,
                   ignore_index: int = -100, shift_labels: Tensor | None = None, **kwargs) -> Tensor:
    """transformers' ForCausalLMLoss: logits (B, T, V), labels (B, T); fp32 result."""
    if shift_labels is None:
        # Position t predicts labels[..., t + 1]; the last position predicts nothing.
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    logits = logits.view(-1, vocab_size)
    target = shift_labels.reshape(-1).to(logits.device)
    return _fixed_cross_entropy(logits, target, num_items_in_batch, ignore_index, torch.float32)


def masked_lm_loss(logits: Tensor, labels: Tensor, vocab_size: int, num_items_in_batch=None,
                   ignore_index: int = -100, **kwargs) -> Tensor:
    """transformers' ForMaskedLMLoss: no shift; fp32 result."""
    logits = logits.view(-1, vocab_size)
    target = labels.reshape(-1).to(logits.device)
    return _fixed_cross_entropy(logits, target, num_items_in_batch, ignore_index, torch.float32)


def sequence_classification_loss(labels: Tensor, pooled_logits: Tensor, config, **kwargs) -> Tensor:
    """transformers' ForSequenceClassificationLoss.  It sets
    ``config.problem_type`` when unset, as transformers does; single-label
    classification is crossent's (in the logits' dtype: transformers does not
    upcast here), regression and multi-label are transformers' own (MSE, BCE)."""
    num_labels = config.num_labels
    if config.problem_type is None:
        if num_labels == 1:
            config.problem_type = "regression"
        elif num_labels > 1 and labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    if config.problem_type != "single_label_classification":
        return _hf.ForSequenceClassificationLoss(labels, pooled_logits, config, **kwargs)
    labels = labels.to(pooled_logits.device)
    return _fixed_cross_entropy(pooled_logits.view(-1, num_labels), labels.view(-1), **kwargs)


def token_classification_loss(logits: Tensor, labels: Tensor, config, **kwargs) -> Tensor:
    """transformers' ForTokenClassification loss; fp32 result."""
    logits = logits.view(-1, config.num_labels)
    labels = labels.view(-1).to(logits.device)
    return _fixed_cross_entropy(logits, labels, **kwargs, result_dtype=torch.float32)


def fused_causal_lm_loss(hidden_states: Tensor, weight: Tensor, labels: Tensor | None = None, *,
                         bias: Tensor | None = None, softcap: float | None = None, num_items_in_batch=None,
                         ignore_index: int = -100, shift_labels: Tensor | None = None,
                         options=None) -> Tensor:
    """``causal_lm_loss(softcap(hidden_states @ weight.T + bias), labels, ...)``
    without the logits: hidden_states (B, T, D), weight (V, D) (the output
    embeddings, tied or not), labels (B, T) shifted inside, or
    ``shift_labels`` (B, T) already aligned with the positions (labels then
    unused).  fp32 result; gradients for hidden_states, weight and bias.
    options: crossent.LinearCrossEntropyOptions (chunking, accumulation policy).
    """
    reduction = "sum" if num_items_in_batch is not None else "mean"
    if shift_labels is None:
        # shift=True is the pad-and-shift above without copying hidden_states.
        target, shift = labels.to(hidden_states.device), True
    else:
        hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1])
        target, shift = shift_labels.reshape(-1).to(hidden_states.device), False
    loss = _linear_cross_entropy(hidden_states, weight, target, bias, None, reduction, ignore_index, 0.0,
                                 options, 0.0, softcap, shift, False, result_dtype=torch.float32).loss
    return _divide(loss, num_items_in_batch) if reduction == "sum" else loss


def causal_lm_compute_loss(outputs, labels: Tensor, num_items_in_batch=None) -> Tensor:
    """``Trainer(compute_loss_func=causal_lm_compute_loss)``: crossent's loss on
    the model's logits (Trainer pops the labels, so the model builds logits and
    computes no loss of its own)."""
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    return causal_lm_loss(logits, labels, logits.shape[-1], num_items_in_batch=num_items_in_batch)


# transformers' function -> ours (crossent's own map to themselves, so use_crossent is idempotent).
_LOSSES = {_hf.ForCausalLMLoss: causal_lm_loss, _hf.ForMaskedLMLoss: masked_lm_loss,
           _hf.ForSequenceClassificationLoss: sequence_classification_loss,
           _hf.ForTokenClassification: token_classification_loss}
_LOSSES.update({f: f for f in list(_LOSSES.values())})


# ---------------------------------------------------------------------------
# use_crossent
# ---------------------------------------------------------------------------
def use_crossent(model: nn.Module, *, fused: bool = False, options=None) -> nn.Module:
    """Make this model instance compute its loss with crossent; returns ``model``.

    model: a transformers ``PreTrainedModel``, or a wrapper with
        ``get_base_model()`` (PEFT), whose ``loss_function`` is one of
        transformers' causal-LM, masked-LM, sequence- or token-classification
        losses.  Only this instance changes (``model.loss_function``, and with
        ``fused`` its ``forward``); calling again with ``fused=False`` undoes
        the fused forward.
    fused: causal LMs only: in training mode with labels, never build the
        logits (see the module docstring).  Checked once here on a 4-token
        probe (eval mode, no grad): the model's logits must equal the output
        embeddings applied to the decoder's hidden states, else ValueError
        (a head this path does not know, e.g. a logit scale).
    options: crossent.LinearCrossEntropyOptions for the fused head (chunk
        size, accumulation policy); None: crossent's defaults.
    """
    hf = _pretrained(model)
    ours = _LOSSES.get(hf.loss_function)
    if ours is None:
        raise ValueError(f"crossent has no counterpart for {type(hf).__name__}'s loss_function "
                         f"{getattr(hf.loss_function, '__name__', hf.loss_function)!r}")
    if fused and ours is not causal_lm_loss:
        raise ValueError(f"fused=True is for causal LMs; {type(hf).__name__} uses {ours.__name__}")
    hf.loss_function = ours
    hf._crossent_options = options
    installed = "_crossent_prev_forward" in hf.__dict__
    if fused and not installed:
        _install_fused_forward(hf)
    elif not fused and installed:
        prev = hf.__dict__.pop("_crossent_prev_forward")
        if prev is None:
            del hf.forward
        else:
            hf.forward = prev
    return model


def _pretrained(model: nn.Module) -> PreTrainedModel:
    if isinstance(model, PreTrainedModel):
        return model
    get_base = getattr(model, "get_base_model", None)  # PEFT's PeftModel
    base = get_base() if callable(get_base) else None
    if isinstance(base, PreTrainedModel):
        return base
    raise TypeError(f"use_crossent expects a transformers PreTrainedModel (or a PEFT wrapper of one), "
                    f"got {type(model).__name__}")


def _install_fused_forward(model: PreTrainedModel) -> None:
    cls_forward = type(model).forward
    sig = inspect.signature(cls_forward)
    if "logits_to_keep" not in sig.parameters or "labels" not in sig.parameters:
        raise ValueError(f"fused=True needs a forward taking labels and logits_to_keep; "
                         f"{type(model).__name__}.forward does not")

    # A per-instance forward with the class forward's signature (Trainer inspects
    # it for loss kwargs and dataset columns).  It is bound with MethodType so
    # copy.deepcopy(model) rebinds it to the copy.
    @functools.wraps(cls_forward)
    def forward(self, *args, **kwargs):
        return _fused_forward(self, sig, args, kwargs)

    model._crossent_prev_forward = model.__dict__.get("forward")  # an earlier instance forward, if any
    model.forward = types.MethodType(forward, model)
    try:
        _probe(model)
    except BaseException:
        use_crossent(model, fused=False)
        raise


def _inner_forward(model: PreTrainedModel):
    prev = model._crossent_prev_forward
    return prev if prev is not None else types.MethodType(type(model).forward, model)


def _plain_linear(head) -> bool:
    """Weight (and bias) used as ``F.linear`` would: no wrapper module (LoRA),
    no hooks (accelerate offload, FSDP2 unsharding), no sharded weight."""
    return (type(head) is nn.Linear and not head._forward_hooks and not head._forward_pre_hooks
            and "forward" not in head.__dict__ and type(head.weight) in (nn.Parameter, Tensor))


def _softcap(model: PreTrainedModel) -> float | None:
    return getattr(model.config.get_text_config(), "final_logit_softcapping", None)


def _hidden_and_output(model: PreTrainedModel, inner, kwargs: dict):
    """Run the model's own forward; also return the decoder's last hidden state."""
    seen = []
    hook = model.get_decoder().register_forward_hook(lambda mod, args, out: seen.append(out))
    try:
        out = inner(**kwargs, return_dict=True)
    finally:
        hook.remove()
    if not seen:
        raise ValueError(f"{type(model).__name__}.get_decoder() returned a module its forward does not call")
    h = seen[-1]
    return (h[0] if isinstance(h, tuple) else h.last_hidden_state), out


def _fused_forward(self: PreTrainedModel, sig: inspect.Signature, args: tuple, kwargs: dict):
    inner = _inner_forward(self)
    bound = sig.bind(self, *args, **kwargs).arguments
    kw = {}
    for name, value in list(bound.items())[1:]:
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            return inner(*args, **kwargs)
        kw.update(value if kind is inspect.Parameter.VAR_KEYWORD else {name: value})
    labels, head = kw.get("labels"), self.get_output_embeddings()
    router = kw.get("output_router_logits", getattr(self.config, "output_router_logits", False))
    if not self.training or labels is None or router:
        return inner(*args, **kwargs)
    if not _plain_linear(head):
        warnings.warn(f"crossent: {type(head).__name__} output head is not a plain nn.Linear (or is hooked "
                      "or sharded); computing the logits as usual", stacklevel=3)
        return inner(*args, **kwargs)
    keep = kw.pop("logits_to_keep", 0)
    return_dict = kw.pop("return_dict", None)
    # An empty index tensor: the head projects no position, so no logits exist.
    kw.update(labels=None, logits_to_keep=torch.empty(0, dtype=torch.long, device=head.weight.device))
    hidden, out = _hidden_and_output(self, inner, kw)
    if not (isinstance(keep, int) and keep == 0):
        hidden = slice_logits_to_keep(hidden, keep)
    loss = fused_causal_lm_loss(hidden, head.weight, labels, bias=head.bias, softcap=_softcap(self),
                                num_items_in_batch=kw.get("num_items_in_batch"),
                                ignore_index=kw.get("ignore_index", -100), shift_labels=kw.get("shift_labels"),
                                options=self._crossent_options)
    fields = {k: v for k, v in out.items() if k != "logits"}
    fields["loss"] = loss
    out = type(out)(**fields)
    if return_dict is None:  # as transformers' can_return_tuple decides
        return_dict = getattr(self.config, "return_dict", True)
    return out if return_dict else out.to_tuple()


def _probe(model: PreTrainedModel) -> None:
    """The fused path's assumption, on 4 tokens: logits == softcap(h @ W.T + b)."""
    head = model.get_output_embeddings()
    if not _plain_linear(head) or head.weight.device.type == "meta":
        return  # the fused path is not taken for such a head, or there is nothing to run yet
    ids = (torch.arange(1, 5, device=head.weight.device) % head.weight.shape[0]).unsqueeze(0)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            h, out = _hidden_and_output(model, _inner_forward(model), {"input_ids": ids})
            mine = F.linear(h, head.weight, head.bias)
            cap = _softcap(model)
            if cap is not None:
                mine = cap * torch.tanh(mine / cap)
    finally:
        for m, mode in modes.items():
            m.training = mode
    ref = out.logits.float()
    tol = 1e-3 if mine.dtype in (torch.float32, torch.float64) else 3e-2
    if out.logits.shape != mine.shape or not torch.allclose(mine.float(), ref, rtol=tol,
                                                            atol=tol * (1 + float(ref.abs().max()))):
        raise ValueError(f"fused=True: {type(model).__name__}'s logits are not its output embeddings applied "
                         "to its decoder's last hidden state (and final_logit_softcapping); use fused=False")
