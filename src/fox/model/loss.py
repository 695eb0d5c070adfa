"""Cross-entropy of the LM head without (B, T, V) fp32 logits.

At 16k tokens and GPT-2's vocabulary the logits alone are 3.3 GB in fp32, and autograd would keep them (or
their bf16 copy and the softmax) until the backward. Here the tokens go through the head in chunks; each chunk's
logits live only inside the loop, and the gradients of the hidden states and of the head's weight are formed
right there, so the backward only scales them. The matmuls are cuBLAS's; under torch.compile the elementwise
part (log-sum-exp, softmax, the target's logit) fuses into a few passes per chunk.

Written here rather than taken from liger-kernel or cut-cross-entropy: both are CUDA-only Triton kernels, while
this one function must also be the CPU path (CI, the embedded default) and the fp64 oracle of its own test; the
GEMMs, which dominate its time, are the same cuBLAS calls either way.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
"""Targets equal to this are skipped, as in torch.nn.functional.cross_entropy."""


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_NC: torch.Tensor, weight_VC: torch.Tensor, targets_N: torch.Tensor, vocab_size: int,
                chunk: int, form_grads: bool) -> torch.Tensor:
        compute = torch.promote_types(h_NC.dtype, torch.float32)
        n_tokens = h_NC.shape[0]
        valid_N = targets_N != IGNORE_INDEX
        n_valid = valid_N.sum().clamp_min(1).to(compute)
        grad_h_NC = torch.empty_like(h_NC) if form_grads else None
        grad_w_VC = torch.zeros(weight_VC.shape, dtype=compute, device=weight_VC.device) if form_grads else None
        total = torch.zeros((), dtype=compute, device=h_NC.device)
        for lo in range(0, n_tokens, chunk):
            h_nC, targets_n, valid_n = h_NC[lo:lo + chunk], targets_N[lo:lo + chunk], valid_N[lo:lo + chunk]
            logits_nV = (h_nC @ weight_VC.t()).to(compute)
            if vocab_size < logits_nV.shape[1]:                  # padding columns of the head: never a class
                logits_nV[:, vocab_size:] = float("-inf")
            lse_n = torch.logsumexp(logits_nV, dim=1)
            safe_n = torch.where(valid_n, targets_n, 0)
            target_logit_n = logits_nV.gather(1, safe_n[:, None]).squeeze(1)
            total = total + torch.where(valid_n, lse_n - target_logit_n, 0.0).sum()
            if form_grads:
                # d(mean loss)/d logits = (softmax - onehot) / n_valid on valid rows, 0 on ignored ones
                grad_nV = torch.exp(logits_nV - lse_n[:, None])
                grad_nV.scatter_add_(1, safe_n[:, None], torch.full_like(lse_n[:, None], -1.0))
                grad_nV = (grad_nV * (valid_n.to(compute) / n_valid)[:, None]).to(h_NC.dtype)
                grad_h_NC[lo:lo + chunk] = grad_nV @ weight_VC
                grad_w_VC += (grad_nV.t() @ h_nC).to(compute)
        if form_grads:
            ctx.save_for_backward(grad_h_NC, grad_w_VC.to(weight_VC.dtype))
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h_NC, grad_w_VC = ctx.saved_tensors
        return (grad_h_NC * grad_loss.to(grad_h_NC.dtype), grad_w_VC * grad_loss.to(grad_w_VC.dtype), None, None, None,
                None)


def linear_cross_entropy(h_NC: torch.Tensor, weight_VC: torch.Tensor, targets_N: torch.Tensor, vocab_size: int,
                         chunk: int = 4096) -> torch.Tensor:
    """mean_i CE(h_i W^T, t_i) over targets != IGNORE_INDEX, in fp32 at least; W may carry padding rows past
    vocab_size, which take no probability. Peak extra memory: one (chunk, V) fp32 block, plus the gradients."""
    # the gradients are formed in the forward, so only when a backward can follow (needs_input_grad says True
    # under no_grad too)
    grad = torch.is_grad_enabled() and (h_NC.requires_grad or weight_VC.requires_grad)
    return _LinearCrossEntropy.apply(h_NC, weight_VC, targets_N, vocab_size, chunk, grad)
