"""Parity of every kernel backend with its reference, values and gradients, on awkward shapes."""

import pytest
import torch
import torch.nn.functional as F

from kernels import attention, linear_cross_entropy, topk_scores


@pytest.mark.parametrize("one_pass", [True, False], ids=["one-pass", "chunked"])
@pytest.mark.parametrize("n,v,d,chunk", [(1, 5, 3, 2), (37, 101, 16, 32), (64, 1000, 8, 999), (5, 7, 4, 7)])
def test_linear_cross_entropy_matches_reference(n, v, d, chunk, one_pass):
    torch.manual_seed(0)
    hidden = torch.randn(n, d, dtype=torch.float64) * 3
    table = torch.randn(v, d, dtype=torch.float64)
    targets = torch.randint(0, v, (n,))
    targets[0] = 0  # some ignored rows
    outs = []
    for backend in ("reference", "torch"):
        h = hidden.clone().float().requires_grad_()
        w = table.clone().float().requires_grad_()
        loss = linear_cross_entropy(h, w, targets, ignore_index=0, chunk_size=chunk, backend=backend,
                                    max_logits_bytes=1 << 30 if one_pass else 0)
        loss.backward()
        outs.append((loss.detach(), h.grad, w.grad))
    ref, fast = outs
    if n == 1:  # the only row is ignored
        assert ref[0] == 0 and fast[0] == 0
        return
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast[1], ref[1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fast[2], ref[2], rtol=1e-4, atol=1e-6)


def test_linear_cross_entropy_equals_plain_cross_entropy_on_mean_of_kept_rows():
    torch.manual_seed(1)
    h, w = torch.randn(10, 4), torch.randn(20, 4)
    y = torch.tensor([3, -1, 5, 5, -1, 0, 19, 2, 2, 7])
    expected = F.cross_entropy(h @ w.T, y, ignore_index=-1)
    torch.testing.assert_close(linear_cross_entropy(h, w, y, ignore_index=-1, chunk_size=6), expected)


def test_linear_cross_entropy_one_pass_survives_retained_graphs_and_overlapping_calls():
    """The one-pass path reuses one workspace: a second loss built before the first one's backward pass must get
    its own buffer, and a second backward pass of a retained graph must give the same gradients again."""
    torch.manual_seed(3)
    table = torch.randn(50, 8, requires_grad=True)
    h1, h2 = torch.randn(12, 8, requires_grad=True), torch.randn(30, 8, requires_grad=True)
    y1, y2 = torch.randint(1, 50, (12,)), torch.randint(1, 50, (30,))  # 0 is the ignored index
    first, second = linear_cross_entropy(h1, table, y1), linear_cross_entropy(h2, table, y2)
    torch.testing.assert_close(first, F.cross_entropy(h1 @ table.T, y1))
    torch.testing.assert_close(second, F.cross_entropy(h2 @ table.T, y2))
    (first + second).backward(retain_graph=True)
    grads = (h1.grad.clone(), h2.grad.clone(), table.grad.clone())
    h_ref, t_ref = h1.detach().requires_grad_(), table.detach().requires_grad_()
    F.cross_entropy(h_ref @ t_ref.T, y1).backward()
    torch.testing.assert_close(h1.grad, h_ref.grad)
    for t in (h1, h2, table):
        t.grad = None
    (first + second).backward()
    for again, before in zip((h1.grad, h2.grad, table.grad), grads):
        torch.testing.assert_close(again, before)


def test_topk_matches_full_sort_with_exclusions():
    torch.manual_seed(2)
    q, table = torch.randn(6, 8), torch.randn(203, 8)
    offsets = torch.tensor([0, 0, 3, 3, 5, 5, 6])
    excluded = torch.tensor([1, 50, 202, 7, 8, 100])
    scores, idx = topk_scores(q, table, 10, exclude=(offsets, excluded), chunk_size=17)
    full = q @ table.T
    for row in range(6):
        for j in excluded[offsets[row]:offsets[row + 1]]:
            full[row, j] = float("-inf")
    ref_scores, ref_idx = torch.topk(full, 10, dim=1)
    torch.testing.assert_close(scores, ref_scores)
    assert torch.equal(idx, ref_idx)


def test_topk_rejects_bad_k():
    with pytest.raises(ValueError, match="k must be"):
        topk_scores(torch.randn(2, 3), torch.randn(5, 3), 6)


def test_attention_is_finite_on_fully_padded_rows_and_matches_reference():
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 2, 5, 4) for _ in range(3))
    pad = torch.tensor([[True, True, True, True, True], [True, True, False, False, False]])
    fast = attention(q, k, v, causal=True, key_padding_mask=pad)
    ref = attention(q, k, v, causal=True, key_padding_mask=pad, backend="reference")
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    # a real query never sees a pad key or a later key
    out_row = attention(q[1:, :, 2:], k[1:, :, 2:], v[1:, :, 2:], causal=True)
    torch.testing.assert_close(fast[1:, :, 2:], out_row, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_attention_for_the_last_queries_only_gives_the_last_rows(causal, backend):
    torch.manual_seed(4)
    q, k, v = (torch.randn(2, 2, 6, 4) for _ in range(3))
    pad = torch.tensor([[True, True, True, False, False, False], [False] * 6])
    full = attention(q, k, v, causal=causal, key_padding_mask=pad, backend=backend)
    for last in (1, 2):
        part = attention(q[:, :, -last:], k, v, causal=causal, key_padding_mask=pad, backend=backend)
        torch.testing.assert_close(part, full[:, :, -last:], rtol=1e-5, atol=1e-6)


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown backend"):
        linear_cross_entropy(torch.randn(2, 3), torch.randn(4, 3), torch.tensor([1, 2]), backend="cuda-magic")


def test_kernels_compute_in_fp32_under_bf16_autocast():
    """A model training under torch.autocast(bfloat16) calls the kernels inside it: their internal matmuls must not
    drop to bf16, so fp32 inputs give exactly the result they give without autocast."""
    from kernels import selective_scan, ssd

    torch.manual_seed(2)
    u, delta = torch.randn(2, 30, 6), torch.randn(2, 30, 6)
    A, B, C = -torch.rand(6, 4) - 0.1, torch.randn(2, 30, 4), torch.randn(2, 30, 4)
    x, dt, a_heads = torch.randn(2, 30, 2, 3), torch.randn(2, 30, 2), -torch.rand(2) - 0.1
    hidden, table, targets = torch.randn(16, 8), torch.randn(300, 8), torch.randint(1, 300, (16,))
    calls = {
        "selective_scan torch": lambda: selective_scan(u, delta, A, B, C, backend="torch"),
        "selective_scan auto": lambda: selective_scan(u, delta, A, B, C),
        "ssd torch": lambda: ssd(x, dt, a_heads, B[:, :, None], C[:, :, None], chunk_size=8, backend="torch"),
        "linear_cross_entropy": lambda: linear_cross_entropy(hidden, table, targets, chunk_size=64),
        "topk_scores": lambda: topk_scores(hidden, table, 5, chunk_size=64)[0],
    }
    for name, call in calls.items():
        plain = call()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under = call()
        assert under.dtype == plain.dtype == torch.float32, name
        assert torch.equal(under, plain), name
