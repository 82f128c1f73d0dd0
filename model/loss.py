"""The training loss over the output head, a chunk of positions at a time.

Materialising the logits of a whole batch costs B x T x vocab floats (8 x 4096 positions at vocab 65,536: 8 GiB in
fp32, and autograd keeps them for the backward). `linear_cross_entropy` instead takes the final hidden states and
the head's weight, and for each chunk of positions computes the logits, the cross-entropy and, already in the
forward, the chunk's gradients for the hidden states and the weight (the loss is the last operation, so its
gradient is known up to the scalar the backward multiplies in). Only one chunk of logits exists at a time, and no
matmul is recomputed. The same idea as Liger-Kernel's fused linear cross-entropy, in plain PyTorch.

Under autocast the two matmuls run in the autocast dtype and the softmax in fp32, as `F.linear` + `F.cross_entropy`
would; the weight's gradient is accumulated over the chunks in fp32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

LOGITS_PER_CHUNK = 2**26  # logit elements per chunk: 256 MiB in fp32 (1,024 positions at vocab 65,536)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         loss_weights: torch.Tensor, chunk: int | None = None,
                         kernel: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of loss_weights * cross-entropy, per-position cross-entropy) of the logits `hidden @ weight.T`.

    hidden [..., d], weight [vocab, d], targets and loss_weights [...]. The first output carries the gradient;
    the second is detached (for per-kind statistics). `chunk` positions at a time (default: `LOGITS_PER_CHUNK`
    logits); `kernel` computes each chunk's cross-entropy and logit gradient (default:
    `cross_entropy_and_gradient`; `apply_compile` passes a compiled one, which fuses its elementwise passes)."""
    shape = targets.shape
    hidden = hidden.reshape(-1, hidden.shape[-1])
    chunk = chunk or max(1, LOGITS_PER_CHUNK // weight.shape[0])
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    with torch.autocast(device, enabled=False):
        loss, ce = _LinearCrossEntropy.apply(hidden, weight, targets.reshape(-1), loss_weights.reshape(-1).float(),
                                             chunk, dtype, needs_grad, kernel or cross_entropy_and_gradient)
    return loss, ce.view(shape)


def cross_entropy_and_gradient(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor,
                               needs_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cross-entropy [n] of logits [n, vocab] (softmax in fp32) and, with `needs_grad`, the gradient of
    sum(scale * cross-entropy) for the logits, scale * (softmax - one_hot(target)), in the logits' dtype."""
    full = logits.float()
    lse = torch.logsumexp(full, dim=-1)
    ce = lse - full.gather(1, targets[:, None]).squeeze(1)
    if not needs_grad:
        return ce, None
    grad = full.sub_(lse[:, None]).exp_()
    grad[torch.arange(len(targets), device=targets.device), targets] -= 1.0
    return ce, grad.mul_(scale[:, None]).to(logits.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, scale, chunk, dtype, needs_grad, kernel):
        w = weight.to(dtype)
        n = hidden.shape[0]
        ce = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if needs_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_grad else None
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            h = hidden[start:end].to(dtype)
            ce[start:end], grad = kernel(h @ w.T, targets[start:end], scale[start:end], needs_grad)
            if needs_grad:
                grad_hidden[start:end] = grad @ w
                if dtype == torch.float32:
                    grad_weight.addmm_(grad.T, h)
                else:
                    grad_weight += (grad.T @ h).float()
        ctx.mark_non_differentiable(ce)
        if needs_grad:
            ctx.save_for_backward(grad_hidden, grad_weight)
            ctx.dtypes = (hidden.dtype, weight.dtype)
        return (ce * scale).sum(), ce

    @staticmethod
    def backward(ctx, grad_loss, grad_ce):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        return ((grad_hidden * grad_loss).to(hidden_dtype), (grad_weight * grad_loss).to(weight_dtype),
                None, None, None, None, None, None)
