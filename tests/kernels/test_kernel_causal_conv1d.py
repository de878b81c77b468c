"""Causal depthwise conv1d (Mamba block, model-specs §3a step 2): F.conv1d path against the tap loop.

Error metric: rel_err(x, ref) = max|x − ref| / max|ref|, ≤ 1e-5 in fp32 for values and gradients.
"""

import pytest
import torch

from kernels.causal_conv1d import causal_conv1d
from tests.helpers import rel_err


def run(x, w, b, activation, backend):
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    out = causal_conv1d(leaves[0], leaves[1], leaves[2], activation=activation, backend=backend)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    (out * weights).sum().backward()
    return out.detach(), [t.grad for t in leaves if t is not None]


@pytest.mark.parametrize("length,channels,kernel", [(1, 3, 4), (7, 5, 4), (50, 8, 3), (201, 4, 4), (3, 2, 6)])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_torch_matches_reference(length, channels, kernel, activation, with_bias):
    g = torch.Generator().manual_seed(length)
    x, w = torch.randn(2, length, channels, generator=g), torch.randn(channels, kernel, generator=g)
    b = torch.randn(channels, generator=g) if with_bias else None
    out_ref, grads_ref = run(x, w, b, activation, "reference")
    out, grads = run(x, w, b, activation, "torch")
    assert out.shape == x.shape
    assert rel_err(out, out_ref) <= 1e-5
    for grad, grad_ref in zip(grads, grads_ref):
        assert rel_err(grad, grad_ref) <= 1e-5


def test_is_causal_and_matches_formula():
    """out[t] depends only on x[≤ t]; with weight [w0, w1, w2] out[t] = w0·x[t−2] + w1·x[t−1] + w2·x[t]."""
    x = torch.randn(1, 10, 2)
    w = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 4.0]])
    out = causal_conv1d(x, w)
    xp = torch.nn.functional.pad(x, (0, 0, 2, 0))
    expected = w[:, 0] * xp[:, :-2] + w[:, 1] * xp[:, 1:-1] + w[:, 2] * xp[:, 2:]
    torch.testing.assert_close(out, expected)
    changed = x.clone()
    changed[:, 6:] = 100.0
    assert torch.equal(causal_conv1d(changed, w)[:, :6], out[:, :6])


def test_bf16_close_to_fp32():
    """bf16 inputs (fp32 inside), bf16 output within rel_err 2e-2 of the fp32 result."""
    x, w, b = torch.randn(2, 30, 8), torch.randn(8, 4), torch.randn(8)
    ref = causal_conv1d(x, w, b, activation="silu", backend="reference")
    out = causal_conv1d(x.bfloat16(), w.bfloat16(), b.bfloat16(), activation="silu")
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) <= 2e-2


def test_validation():
    x, w = torch.randn(2, 5, 3), torch.randn(3, 4)
    with pytest.raises(ValueError):
        causal_conv1d(x, w, activation="relu")
    with pytest.raises(ValueError):
        causal_conv1d(x, torch.randn(4, 4))
    with pytest.raises(ValueError):
        causal_conv1d(x, w, backend="triton")
