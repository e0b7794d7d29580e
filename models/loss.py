"""The LM head and its cross-entropy, fused so that backward never holds the logits.

A (batch, seq, vocab) fp32 logits tensor is 2 GiB at 64K tokens with an 8K vocabulary; the
loss as autograd computes it keeps as much again (the log-softmax) and allocates the
logits' gradient and its fill besides, tensors that a CPU worker's allocator hands to the
kernel and takes back every step. Here the head and the loss are one autograd function
(the fused linear cross-entropy of Liger-Kernel and Cut Cross-Entropy): forward computes,
`chunk_tokens` rows at a time (all of them when unset), the logits in one buffer reused
for every chunk, the chunk's summed loss, the softmax in place of the logits and from it
the gradients of the hidden states, the weight and the bias; backward only scales those by
the loss's gradient. Nothing of the logits outlives forward, no logits are computed twice
(a checkpointed chunk would compute them again in backward), and the peak holds one
chunk's logits. The value and the gradients equal autograd's cross-entropy over the whole
logits (the order of a float sum aside).

Shapes: B batch, L tokens, C model width, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

IGNORE = -100  # labels of positions without a target


class LMHead(nn.Linear):
    """The output projection to the vocabulary. Called with hidden states alone it returns
    the logits; with labels it returns the summed cross-entropy over the labelled positions
    (fp32, or fp64 for an fp64 model), `chunk_tokens` rows at a time when that is set. The
    loss runs inside this module's forward, so ZeRO-3 gathers the weight for it as for any
    layer."""

    chunk_tokens: int | None = None  # set by models.transformer.set_loss_chunking

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:  # type: ignore[override]
        if labels is None:
            return super().forward(x)  # (B, L, V)
        x, labels = x.flatten(0, -2), labels.flatten()  # (B*L, C), (B*L,)
        return LinearCrossEntropy.apply(x, self.weight, self.bias, labels, self.chunk_tokens)


class LinearCrossEntropy(torch.autograd.Function):
    """sum over labelled rows of cross_entropy(x @ weight.T + bias, labels), its gradients
    computed in forward, chunk by chunk (module docstring)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,  # (N, C)
        weight: Tensor,  # (V, C)
        bias: Tensor | None,  # (V,)
        labels: Tensor,  # (N,)
        chunk_tokens: int | None,
    ) -> Tensor:
        n = x.shape[0]
        chunk = max(1, min(chunk_tokens or n, n))
        dtype = _loss_dtype(x.dtype)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]  # type: ignore[attr-defined]
        need_grad = need_x or need_w or need_b
        # gradients of the weight and bias gather over chunks in the loss dtype
        grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_x else None
        grad_w = torch.zeros_like(weight, dtype=dtype) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=dtype) if need_b and bias is not None else None
        logits = x.new_empty((chunk, weight.shape[0]))  # the two buffers, reused
        logp = logits.new_empty(logits.shape, dtype=dtype)
        total = torch.zeros((), dtype=dtype, device=x.device)
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            xs, ys = x[rows], labels[rows]
            m = xs.shape[0]
            if bias is None:
                z = torch.mm(xs, weight.t(), out=logits[:m])
            else:
                z = torch.addmm(bias, xs, weight.t(), out=logits[:m])
            lp = torch.log_softmax(z, dim=-1, dtype=dtype, out=logp[:m])
            kept = ys != IGNORE
            target = torch.where(kept, ys, 0)[:, None]
            total -= (lp.gather(1, target).squeeze(1) * kept).sum()
            if not need_grad:
                continue
            # d loss / d logits = softmax - one-hot, zero on unlabelled rows: in place
            g = lp.exp_()
            g.scatter_add_(1, target, -torch.ones_like(target, dtype=dtype))
            g.mul_(kept[:, None])
            gl = g if g.dtype == z.dtype else z.copy_(g)  # in the model's dtype
            if grad_x is not None:
                torch.mm(gl, weight, out=grad_x[rows])
            if grad_w is not None:
                _accumulate(grad_w, gl.t(), xs)
            if grad_b is not None:
                grad_b += g.sum(0)
        ctx.save_for_backward(grad_x, grad_w, grad_b)
        ctx.weight_dtype = weight.dtype  # type: ignore[attr-defined]
        return total

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor):  # type: ignore[override]
        grad_x, grad_w, grad_b = ctx.saved_tensors  # type: ignore[attr-defined]
        dtype = ctx.weight_dtype  # type: ignore[attr-defined]
        gx = None if grad_x is None else grad_x * grad.to(grad_x.dtype)
        gw = None if grad_w is None else (grad_w * grad).to(dtype)
        gb = None if grad_b is None else (grad_b * grad).to(dtype)
        return gx, gw, gb, None, None


def _accumulate(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b, the product taken in a's dtype (a 16-bit matmul stays one)."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    else:
        acc += torch.mm(a, b)


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for 16-bit (and fp32) logits, fp64 for fp64 ones."""
    return torch.promote_types(dtype, torch.float32)
