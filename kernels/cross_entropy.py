"""Cross-entropy of ``hidden @ item_table.T`` without materialising the [N, V] logits.

Model-specs §8 ("Chunked CE"), after Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models"
(ICLR 2025): ℓ_i = logsumexp_j(h_i·e_j) − h_i·e_{y_i}. The forward pass walks the vocabulary in chunks and keeps
a running (max, sum-of-exp) pair per row in fp32; only the per-row logsumexp is saved. The backward pass
recomputes each chunk's logits, so peak memory is O(N·chunk) instead of O(N·V).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._backend import fp32_under_autocast, resolve_backend

DEFAULT_CHUNK = 2048


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    # One (N, chunk) buffer is reused for every chunk: fresh large allocations on the CPU cost page faults that
    # take longer than the matmul itself, and a chunk that fits in cache keeps exp() cheap.
    @staticmethod
    def forward(ctx, hidden, table, targets, chunk_size):
        h = hidden.float()
        w = table.float()
        n = h.shape[0]
        running_max = torch.full((n,), float("-inf"), device=h.device)
        running_sum = torch.zeros(n, device=h.device)
        buffer = torch.empty(n, min(chunk_size, w.shape[0]), device=h.device)
        for start in range(0, w.shape[0], chunk_size):
            w_chunk = w[start : start + chunk_size]
            logits = buffer[:, : w_chunk.shape[0]]
            torch.mm(h, w_chunk.T, out=logits)
            new_max = torch.maximum(running_max, logits.amax(dim=1))
            running_sum.mul_(torch.exp(running_max - new_max))
            running_sum += logits.sub_(new_max[:, None]).exp_().sum(dim=1)
            running_max = new_max
        lse = running_max + torch.log(running_sum)
        target_logit = (h * w[targets]).sum(dim=1)
        ctx.save_for_backward(hidden, table, targets, lse)
        ctx.chunk_size = chunk_size
        return (lse - target_logit).mean()

    @staticmethod
    def backward(ctx, grad_out):
        hidden, table, targets, lse = ctx.saved_tensors
        h = hidden.float()
        w = table.float()
        scale = grad_out.float() / h.shape[0]
        grad_h = torch.zeros_like(h)
        grad_w = torch.empty_like(w) if ctx.needs_input_grad[1] else None
        buffer = torch.empty(h.shape[0], min(ctx.chunk_size, w.shape[0]), device=h.device)
        for start in range(0, w.shape[0], ctx.chunk_size):
            w_chunk = w[start : start + ctx.chunk_size]
            probs = buffer[:, : w_chunk.shape[0]]
            torch.mm(h, w_chunk.T, out=probs)
            # softmax probabilities of this chunk times dL/dlogit's common factor
            probs.sub_(lse[:, None]).exp_().mul_(scale)
            grad_h.addmm_(probs, w_chunk)
            if grad_w is not None:
                torch.mm(probs.T, h, out=grad_w[start : start + ctx.chunk_size])
        # the −h·e_y term of the loss
        grad_h -= scale * w[targets]
        if grad_w is not None:
            grad_w.index_add_(0, targets, -scale * h)
            grad_w = grad_w.to(table.dtype)
        return grad_h.to(hidden.dtype), grad_w, None, None


@fp32_under_autocast
def linear_cross_entropy(
    hidden: torch.Tensor,
    item_table: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = 0,
    chunk_size: int = DEFAULT_CHUNK,
    backend: str = "auto",
) -> torch.Tensor:
    """Mean cross-entropy over the rows of ``hidden`` (N, d) whose target (N,) is not ``ignore_index``.

    ``item_table`` is (V, d); logits are ``hidden @ item_table.T``. Returns a scalar; 0 (with a gradient path)
    when every row is ignored.
    """
    backend = resolve_backend(backend, hidden, item_table, has_triton=True)
    if hidden.ndim != 2 or item_table.ndim != 2 or hidden.shape[1] != item_table.shape[1]:
        raise ValueError(
            f"expected hidden (N, d) and item_table (V, d), got {tuple(hidden.shape)}, {tuple(item_table.shape)}"
        )
    keep = targets != ignore_index
    if not bool(keep.all()):
        hidden, targets = hidden[keep], targets[keep]
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0 + item_table.sum() * 0.0
    if backend == "reference":
        return F.cross_entropy(hidden.float() @ item_table.float().T, targets)
    if backend == "triton":
        from kernels._triton_cross_entropy import TritonLinearCrossEntropy

        return TritonLinearCrossEntropy.apply(hidden, item_table, targets)
    return _ChunkedLinearCrossEntropy.apply(hidden, item_table, targets, int(chunk_size))
