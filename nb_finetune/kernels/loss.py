"""The language-model loss without the logits: the vocabulary projection and cross-entropy
computed together, a few rows at a time.

A causal LM's loss takes the final hidden states [n, d] of the trained positions to logits
[n, V] (V about 50k), upcasts them to fp32, and runs log-softmax forward and backward over
them. On a CPU that is a pass over a few hundred MB of memory for each of those steps, a
large share of a training step. Here each chunk of rows is projected, reduced to its loss and its
gradient with respect to the hidden states while its logits are still in cache, and thrown
away. The gradient is computed in the forward pass (the projection is frozen, so nothing
else needs the logits) and scaled by the incoming gradient in the backward pass.

The arithmetic follows what autocast and transformers' loss do: logits in the compute dtype,
upcast to fp32, log-sum-exp in fp32, the gradient (softmax x scale, minus scale at the
target) in fp32, cast to the compute dtype for the matmul with the weight."""
from __future__ import annotations

import torch

from .models import plain_head

IGNORE_INDEX = -100  # transformers' label for a position without loss

# Rows per chunk on a CPU, by compute dtype. Each chunk reads the whole projection weight
# (vocabulary x hidden), so a larger vocabulary does not get fewer rows: thin chunks would spend
# their time re-reading it. A chunk's logits stay a small part of the full batch's.
CPU_CHUNK_ROWS = {torch.bfloat16: 128, torch.float32: 256}


def chunk_rows_for(compute_dtype: torch.dtype) -> int:
    return CPU_CHUNK_ROWS.get(compute_dtype, 64)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, scale, chunk_rows):
        with torch.autocast(hidden.device.type, enabled=False):  # the dtypes below are the point
            grad_hidden, loss = _LinearCrossEntropy.chunks(hidden, weight, targets, scale, chunk_rows)
        ctx.save_for_backward(grad_hidden)
        return loss

    @staticmethod
    def chunks(hidden, weight, targets, scale, chunk_rows, predictions=None):
        """The loss, and its gradient for hidden when that needs one; with `predictions` (long,
        [n]) each row's most likely token goes there too, for validation's token accuracy."""
        compute_dtype = weight.dtype
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start:start + chunk_rows]
            t = targets[start:start + chunk_rows, None]
            logits = (h.to(compute_dtype) @ weight.T).float()
            if predictions is not None:
                predictions[start:start + chunk_rows] = logits.argmax(dim=-1)
            target_logit = logits.gather(1, t)
            top = logits.amax(dim=-1, keepdim=True)
            exps = logits.sub_(top).exp_()  # in place: the logits are not needed again
            total = exps.sum(dim=-1, keepdim=True)
            loss += (top + total.log() - target_logit).sum()  # log-sum-exp minus the target's logit
            if grad_hidden is not None:
                grad = exps.mul_(scale / total)  # softmax x scale
                grad.scatter_add_(1, t, torch.full_like(target_logit, -scale))
                grad_hidden[start:start + chunk_rows] = (grad.to(compute_dtype) @ weight).to(hidden.dtype)
        return grad_hidden, loss * scale

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_loss.to(grad_hidden.dtype), None, None, None, None


class _LinearLogProbs(torch.autograd.Function):
    """Each row's log p(target) under `hidden @ weight.T`. The gradient of row i is
    (onehot(target_i) - softmax_i) @ weight, known in the forward pass while the chunk's logits
    are in cache; the backward pass scales it by the row's incoming gradient, with no second
    pass over the vocabulary."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows):
        with torch.autocast(hidden.device.type, enabled=False):
            logps, grad_hidden = _LinearLogProbs.chunks(hidden, weight, targets, chunk_rows)
        ctx.save_for_backward(grad_hidden)
        return logps

    @staticmethod
    def chunks(hidden, weight, targets, chunk_rows):
        compute_dtype = weight.dtype
        logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            t = targets[rows, None]
            logits = (hidden[rows].to(compute_dtype) @ weight.T).float()
            target_logit = logits.gather(1, t)
            top = logits.amax(dim=-1, keepdim=True)
            exps = logits.sub_(top).exp_()
            total = exps.sum(dim=-1, keepdim=True)
            logps[rows] = (target_logit - top - total.log()).squeeze(1)
            if grad_hidden is not None:
                grad = exps.div_(-total)  # -softmax
                grad.scatter_add_(1, t, torch.ones_like(target_logit))
                grad_hidden[rows] = (grad.to(compute_dtype) @ weight).to(hidden.dtype)
        return logps, grad_hidden

    @staticmethod
    def backward(ctx, grad_logps):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_logps[:, None].to(grad_hidden.dtype), None, None, None


def linear_log_probs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                     chunk_rows: int | None = None) -> torch.Tensor:
    """log p(target) [n], fp32, for each row of `hidden` [n, d] under the frozen projection
    `weight` [V, d] (in the compute dtype), without keeping the logits: what preference losses
    sum per answer (training.preference)."""
    if weight.requires_grad:
        raise ValueError("linear_log_probs computes no gradient for the projection; it must be frozen")
    return _LinearLogProbs.apply(hidden, weight, targets, chunk_rows or chunk_rows_for(weight.dtype))


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, scale: float,
                         chunk_rows: int | None = None) -> torch.Tensor:
    """scale x the summed cross-entropy of `hidden @ weight.T` against `targets`, computed in
    `weight`'s dtype (pass the weight already cast to the training's compute dtype).

    hidden: [n, d], the final hidden states of the positions with a target; weight: [V, d],
    frozen (no gradient is computed for it); targets: [n] token ids, none ignored. With
    `scale` = 1 / (trained tokens in the batch) this is transformers' causal-LM loss."""
    if weight.requires_grad:
        raise ValueError("linear_cross_entropy computes no gradient for the projection; it must be frozen")
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"{hidden.shape[0]} hidden states for {targets.shape[0]} targets")
    return _LinearCrossEntropy.apply(hidden, weight, targets, float(scale),
                                     chunk_rows or chunk_rows_for(weight.dtype))


def has_plain_head(lm) -> bool:
    """Whether `lm` (a transformers causal LM, on any device, meta included) computes its loss as
    a bias-free linear lm_head followed by transformers' causal-LM loss: what the loss here
    replaces exactly. Training and the memory estimate both ask this."""
    head = lm.get_output_embeddings()
    return plain_head(lm.config) and type(head) is torch.nn.Linear and head.bias is None


def replaces_loss_of(model) -> bool:
    """Whether the fused loss takes over `model`'s (a peft model or a causal LM): a plain head
    that is frozen (an adapted or trained head keeps the model's own path)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return has_plain_head(lm) and not lm.get_output_embeddings().weight.requires_grad


class FusedCausalLMLoss:
    """linear_cross_entropy in place of a causal LM's output projection and loss, called by the
    trainer's compute_loss (torchtune's SFTLoss takes the model's output the same way). The
    model runs with no position kept for its head and no labels, so neither its projection
    nor its own loss runs; a forward hook on its decoder (transformers' `get_decoder()`) hands
    on the final hidden states, and the loss here projects the trained positions' chunk by
    chunk. The projection's weight is cast to the compute dtype once (it is frozen), not on
    every pass as autocast does.

    A pass without gradients (validation) gives the loss, and each trained position's most
    likely token (argmax of its logits) left in `predictions`, for the token accuracy; keeping
    the logits of every trained position at once would add most of a GB to training's peak."""

    def __init__(self, lm, compute_dtype: torch.dtype, chunk_rows: int | None = None):
        self.lm = lm
        self.head = lm.get_output_embeddings()
        self.weight = self.head.weight.detach().to(compute_dtype)
        self.chunk_rows = chunk_rows or chunk_rows_for(compute_dtype)
        self.predictions: torch.Tensor | None = None  # of the last pass without gradients

    @classmethod
    def for_model(cls, model, compute_dtype: torch.dtype) -> "FusedCausalLMLoss | None":
        """One for `model` (a peft model or a transformers causal LM) when its head and loss are
        the plain ones this replaces exactly, else None."""
        if not replaces_loss_of(model):
            return None  # another head or loss, or an adapted or trained head: keep the model's own path
        return cls(model.get_base_model() if hasattr(model, "get_base_model") else model, compute_dtype)

    def __call__(self, model, inputs: dict, keep: torch.Tensor, following: torch.Tensor,
                 num_items_in_batch=None) -> torch.Tensor:
        """The loss of `model` (what the trainer calls, wrappers included) on `inputs`: the
        hidden states at `keep` (bool, batch x length) against the tokens `following` them."""
        self.predictions = None
        hidden = self.hidden_states(model, inputs, keep)
        return self.loss(hidden, None, num_items_in_batch=num_items_in_batch, shift_labels=following)

    def hidden_states(self, model, inputs: dict, keep: torch.Tensor) -> torch.Tensor:
        """`model`'s final hidden states at `keep` [n, hidden], its head and own loss left unrun."""
        captured = []
        hook = self.lm.get_decoder().register_forward_hook(lambda module, args, output: captured.append(output[0]))
        plain = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels", "logits_to_keep")}
        try:
            model(**plain, logits_to_keep=torch.zeros_like(keep))  # no position for the head
        finally:
            hook.remove()
        return captured[-1][keep]

    def loss(self, logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=IGNORE_INDEX,
             shift_labels=None, **kwargs):
        """transformers' ForCausalLMLoss, given hidden states where it takes logits."""
        hidden = logits.reshape(-1, logits.shape[-1])
        if shift_labels is None:
            shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        targets = shift_labels.reshape(-1).to(hidden.device)
        trained = targets != ignore_index
        if not bool(trained.all()):
            hidden, targets = hidden[trained], targets[trained]
        count = float(num_items_in_batch) if num_items_in_batch is not None else max(targets.numel(), 1)
        if hidden.requires_grad:
            return linear_cross_entropy(hidden, self.weight, targets, 1.0 / count, self.chunk_rows)
        self.predictions = torch.empty(targets.shape[0], dtype=torch.long, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            _, loss = _LinearCrossEntropy.chunks(hidden, self.weight, targets, 1.0 / count, self.chunk_rows,
                                                 self.predictions)
        return loss
