"""The Triton linear cross-entropy against the reference (CPU: `make test-triton`, Triton's interpreter)."""

import pytest
import torch

from kernels import linear_cross_entropy

pytestmark = pytest.mark.triton


@pytest.mark.parametrize("n,v,d", [(1, 5, 3), (37, 101, 16), (70, 300, 64), (5, 7, 20)])
def test_triton_linear_cross_entropy_matches_reference(n, v, d):
    pytest.importorskip("triton")
    torch.manual_seed(0)
    hidden, table = torch.randn(n, d) * 2, torch.randn(v, d)
    targets = torch.randint(1, v, (n,))
    results = []
    for backend in ("reference", "triton"):
        h, w = hidden.clone().requires_grad_(), table.clone().requires_grad_()
        loss = linear_cross_entropy(h, w, targets, ignore_index=0, backend=backend)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    (ref_loss, ref_h, ref_w), (loss, grad_h, grad_w) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_h, ref_h, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad_w, ref_w, rtol=1e-4, atol=1e-6)


def test_auto_never_picks_triton_on_cpu():
    from kernels._backend import resolve_backend

    assert resolve_backend("auto", torch.zeros(1), has_triton=True) == "torch"


@pytest.mark.parametrize("dtype", [
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
        __import__("os").environ.get("TRITON_INTERPRET") == "1",
        reason="Triton's interpreter reads bf16 tensors as raw bits (numpy has no bf16); checked on a GPU only")),
])
def test_triton_linear_cross_entropy_half_precision_is_close(dtype):
    """16-bit inputs (fp32 accumulation inside): loss within 1e-2 relative, gradients within 5e-2 of fp32."""
    pytest.importorskip("triton")
    torch.manual_seed(1)
    hidden, table, targets = torch.randn(40, 32), torch.randn(150, 32), torch.randint(1, 150, (40,))
    ref = linear_cross_entropy(hidden, table, targets, backend="reference")
    h = hidden.to(dtype).requires_grad_()
    loss = linear_cross_entropy(h, table.to(dtype), targets, backend="triton")
    loss.backward()
    h32 = hidden.clone().requires_grad_()
    linear_cross_entropy(h32, table, targets, backend="reference").backward()
    torch.testing.assert_close(loss.float(), ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(h.grad.float(), h32.grad, rtol=5e-2, atol=5e-3)
