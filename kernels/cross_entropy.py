"""Cross-entropy of ``hidden @ item_table.T`` without materialising the [N, V] logits.

Model-specs §8 ("Chunked CE"), after Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models"
(ICLR 2025): ℓ_i = logsumexp_j(h_i·e_j) − h_i·e_{y_i}. The forward pass walks the vocabulary in chunks and keeps
a running (max, sum-of-exp) pair per row in fp32; only the per-row logsumexp is saved. The backward pass
recomputes each chunk's logits, so peak memory is O(N·chunk) instead of O(N·V).

When the (N, V) fp32 logits fit in ``max_logits_bytes`` (the usual case for a training batch of a recommender
catalogue) a one-pass path is cheaper: one matmul and one fused log-softmax in the forward pass, kept for the
backward pass, which turns it into the softmax in place (one exp pass), subtracts the one-hot targets and does the
two gradient matmuls, dL/dH = (P − Y)·E/N and dL/dE = (P − Y)ᵀ·H/N. That is three matmuls and two elementwise
passes over N·V instead of four matmuls and about eight passes. Its (N, V) buffer is a workspace reused from one
call to the next: a fresh allocation of that size costs page faults that take longer than the log-softmax itself.
"""

from __future__ import annotations

import sys
import threading

import torch
import torch.nn.functional as F

from kernels._backend import fp32_under_autocast, resolve_backend

DEFAULT_CHUNK = 2048
# Largest (N, V) fp32 logits the one-pass path materialises; above it the chunked path runs.
DEFAULT_MAX_LOGITS_BYTES = 1 << 30


class _Workspace:
    """One reusable fp32 buffer per device for the one-pass path's (N, V) log-probabilities.

    A call takes the buffer only when nobody else holds it: the autograd context of a call whose backward pass has
    not run yet keeps a reference to it (``sys.getrefcount`` sees it), and a call that finds it held gets a buffer
    of its own. The buffer grows to the largest size asked for and is then reused.
    """

    def __init__(self):
        self._buffers: dict[torch.device, torch.Tensor] = {}
        self._lock = threading.Lock()

    def take(self, numel: int, device: torch.device) -> torch.Tensor:
        with self._lock:
            buffer = self._buffers.get(device)
            # references: the dict, ``buffer`` and getrefcount's argument; a fourth is a context still using it
            if buffer is not None and sys.getrefcount(buffer) > 3:
                return torch.empty(numel, device=device)
            if buffer is None or buffer.numel() < numel:
                self._buffers.pop(device, None)
                del buffer
                buffer = torch.empty(numel, device=device)
                self._buffers[device] = buffer
            return buffer


_WORKSPACE = _Workspace()


class _OnePassLinearCrossEntropy(torch.autograd.Function):
    """ℓ_i = −log softmax(h_i·Eᵀ)_{y_i} with the (N, V) log-probabilities kept for the backward pass."""

    @staticmethod
    def forward(ctx, hidden, table, targets):
        h = hidden.float()
        w = table.float()
        n, v = h.shape[0], w.shape[0]
        workspace = _WORKSPACE.take(n * v, h.device)
        log_probs = workspace[: n * v].view(n, v)
        torch.mm(h, w.T, out=log_probs)
        torch.log_softmax(log_probs, dim=1, out=log_probs)
        loss = -log_probs.gather(1, targets[:, None].long()).mean()
        ctx.save_for_backward(hidden, table, targets)
        ctx.workspace, ctx.shape = workspace, (n, v)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        hidden, table, targets = ctx.saved_tensors
        h = hidden.float()
        w = table.float()
        n, v = ctx.shape
        # the workspace is let go here, so the next step's forward pass finds it free while this graph still lives
        workspace, ctx.workspace = ctx.workspace, None
        if workspace is None:  # a second backward pass (retain_graph=True): the first turned the buffer into P − Y
            probs = torch.log_softmax(torch.mm(h, w.T), dim=1)
        else:
            probs = workspace[: n * v].view(n, v)
        probs.exp_()
        rows = torch.arange(n, device=h.device)
        probs[rows, targets] -= 1.0
        scale = grad_out.float() / n
        grad_h = torch.mm(probs, w).mul_(scale)
        grad_w = torch.mm(probs.T, h * scale).to(table.dtype) if ctx.needs_input_grad[1] else None
        return grad_h.to(hidden.dtype), grad_w, None


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
    max_logits_bytes: int = DEFAULT_MAX_LOGITS_BYTES,
) -> torch.Tensor:
    """Mean cross-entropy over the rows of ``hidden`` (N, d) whose target (N,) is not ``ignore_index``.

    ``item_table`` is (V, d); logits are ``hidden @ item_table.T``. Returns a scalar; 0 (with a gradient path)
    when every row is ignored. The torch backend keeps the kept rows' fp32 logits whole when they take at most
    ``max_logits_bytes`` (one-pass path; 0 forces the chunked path), else walks the vocabulary ``chunk_size``
    items at a time.
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
    if hidden.shape[0] * item_table.shape[0] * 4 <= max_logits_bytes:
        return _OnePassLinearCrossEntropy.apply(hidden, item_table, targets)
    return _ChunkedLinearCrossEntropy.apply(hidden, item_table, targets, int(chunk_size))
