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

import torch

LOGITS_PER_CHUNK = 2**26  # logit elements per chunk: 256 MiB in fp32 (1,024 positions at vocab 65,536)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         loss_weights: torch.Tensor,
                         chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of loss_weights * cross-entropy, per-position cross-entropy) of the logits `hidden @ weight.T`.

    hidden [..., d], weight [vocab, d], targets and loss_weights [...]. The first output carries the gradient;
    the second is detached (for per-kind statistics). `chunk` positions per step (default: `LOGITS_PER_CHUNK`
    logits)."""
    shape = targets.shape
    hidden = hidden.reshape(-1, hidden.shape[-1])
    chunk = chunk or max(1, LOGITS_PER_CHUNK // weight.shape[0])
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    with torch.autocast(device, enabled=False):
        loss, ce = _LinearCrossEntropy.apply(hidden, weight, targets.reshape(-1),
                                             loss_weights.reshape(-1).float(), chunk, dtype, needs_grad)
    return loss, ce.view(shape)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, scale, chunk, dtype, needs_grad):
        w = weight.to(dtype)
        n = hidden.shape[0]
        ce = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if needs_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_grad else None
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            h = hidden[start:end].to(dtype)
            t = targets[start:end]
            logits = (h @ w.T).float()
            lse = torch.logsumexp(logits, dim=-1)
            ce[start:end] = lse - logits.gather(1, t[:, None]).squeeze(1)
            if needs_grad:  # d(sum scale * ce) / d logits = scale * (softmax - one_hot(target))
                grad = logits.sub_(lse[:, None]).exp_()
                grad[torch.arange(end - start, device=t.device), t] -= 1.0
                grad = grad.mul_(scale[start:end, None]).to(dtype)
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
                None, None, None, None, None)
