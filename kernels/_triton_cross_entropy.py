"""Triton kernels for ``linear_cross_entropy`` (model-specs §8; Wijmans et al., "Cut Your Losses in
Large-Vocabulary Language Models", ICLR 2025, the blockwise linear-log-sum-exp).

Forward: one program per block of rows walks the catalogue in blocks, computing the logit tile ``H_b · W_cᵀ`` in
registers/SRAM and folding it into a running (max, sum of exp) pair (eq. "online logsumexp"); only the per-row
logsumexp leaves the kernel. Backward recomputes the tiles: ``P = exp(Z − lse)·g/N`` and
- ``dH_b = Σ_c P_bc · W_c`` (one program per row block, loop over item blocks),
- ``dW_c = Σ_b P_bcᵀ · H_b`` (one program per item block, loop over row blocks),
so the [N, V] logits never reach global memory in either direction. The ``−h·e_y`` term is a gather done in torch.
Imported lazily: only ``backend="triton"`` needs the triton package.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 32
BLOCK_V = 64


@triton.jit
def _lse_forward(h_ptr, w_ptr, lse_ptr, n_rows, n_items, dim,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_d = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    h = tl.load(h_ptr + rows[:, None] * dim + cols_d[None, :], mask=row_ok[:, None] & (cols_d[None, :] < dim),
                other=0.0)
    running_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_N,), tl.float32)
    for start in range(0, n_items, BLOCK_V):
        items = start + tl.arange(0, BLOCK_V)
        item_ok = items < n_items
        w = tl.load(w_ptr + items[:, None] * dim + cols_d[None, :],
                    mask=item_ok[:, None] & (cols_d[None, :] < dim), other=0.0)
        if IEEE:
            z = tl.dot(h, tl.trans(w), input_precision="ieee")
        else:
            z = tl.dot(h, tl.trans(w))
        z = tl.where(item_ok[None, :], z, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(z, axis=1))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        running_max = new_max
    tl.store(lse_ptr + rows, running_max + tl.log(running_sum), mask=row_ok)


@triton.jit
def _grad_hidden(h_ptr, w_ptr, lse_ptr, gh_ptr, scale, n_rows, n_items, dim,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_d = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    d_ok = cols_d < dim
    h = tl.load(h_ptr + rows[:, None] * dim + cols_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for start in range(0, n_items, BLOCK_V):
        items = start + tl.arange(0, BLOCK_V)
        item_ok = items < n_items
        w = tl.load(w_ptr + items[:, None] * dim + cols_d[None, :], mask=item_ok[:, None] & d_ok[None, :], other=0.0)
        if IEEE:
            z = tl.dot(h, tl.trans(w), input_precision="ieee")
        else:
            z = tl.dot(h, tl.trans(w))
        p = tl.where(item_ok[None, :] & row_ok[:, None], tl.exp(z - lse[:, None]) * scale, 0.0)
        if IEEE:
            acc += tl.dot(p, w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(p.to(w.dtype), w)
    tl.store(gh_ptr + rows[:, None] * dim + cols_d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _grad_table(h_ptr, w_ptr, lse_ptr, gw_ptr, scale, n_rows, n_items, dim,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    pid = tl.program_id(0)
    items = pid * BLOCK_V + tl.arange(0, BLOCK_V)
    cols_d = tl.arange(0, BLOCK_D)
    item_ok = items < n_items
    d_ok = cols_d < dim
    w = tl.load(w_ptr + items[:, None] * dim + cols_d[None, :], mask=item_ok[:, None] & d_ok[None, :], other=0.0)
    acc = tl.zeros((BLOCK_V, BLOCK_D), tl.float32)
    for start in range(0, n_rows, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        row_ok = rows < n_rows
        h = tl.load(h_ptr + rows[:, None] * dim + cols_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        if IEEE:
            z = tl.dot(h, tl.trans(w), input_precision="ieee")
        else:
            z = tl.dot(h, tl.trans(w))
        p = tl.where(item_ok[None, :] & row_ok[:, None], tl.exp(z - lse[:, None]) * scale, 0.0)
        if IEEE:
            acc += tl.dot(tl.trans(p), h.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(tl.trans(p).to(h.dtype), h)
    tl.store(gw_ptr + items[:, None] * dim + cols_d[None, :], acc, mask=item_ok[:, None] & d_ok[None, :])


def _launch_args(hidden: torch.Tensor) -> dict:
    return dict(BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_D=max(16, triton.next_power_of_2(hidden.shape[1])),
                IEEE=hidden.dtype == torch.float32)


class TritonLinearCrossEntropy(torch.autograd.Function):
    """Same contract as the torch path's Function: (hidden (N, d), table (V, d), targets (N,)) → mean loss."""

    @staticmethod
    def forward(ctx, hidden, table, targets):
        hidden, table = hidden.contiguous(), table.contiguous()
        n, v, d = hidden.shape[0], table.shape[0], hidden.shape[1]
        lse = torch.empty(n, device=hidden.device, dtype=torch.float32)
        _lse_forward[(triton.cdiv(n, BLOCK_N),)](hidden, table, lse, n, v, d, **_launch_args(hidden))
        target_logit = (hidden.float() * table[targets].float()).sum(dim=1)
        ctx.save_for_backward(hidden, table, targets, lse)
        return (lse - target_logit).mean()

    @staticmethod
    def backward(ctx, grad_out):
        hidden, table, targets, lse = ctx.saved_tensors
        n, v, d = hidden.shape[0], table.shape[0], hidden.shape[1]
        scale = float(grad_out) / n
        args = _launch_args(hidden)
        grad_h = torch.empty(n, d, device=hidden.device, dtype=torch.float32)
        _grad_hidden[(triton.cdiv(n, BLOCK_N),)](hidden, table, lse, grad_h, scale, n, v, d, **args)
        grad_h -= scale * table[targets].float()
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.empty(v, d, device=hidden.device, dtype=torch.float32)
            _grad_table[(triton.cdiv(v, BLOCK_V),)](hidden, table, lse, grad_w, scale, n, v, d, **args)
            grad_w.index_add_(0, targets, -scale * hidden.float())
            grad_w = grad_w.to(table.dtype)
        return grad_h.to(hidden.dtype), grad_w, None
