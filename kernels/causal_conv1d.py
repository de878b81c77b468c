"""Causal depthwise 1-D convolution of the Mamba block (model-specs §3a step 2; Gu & Dao, "Mamba: Linear-Time
Sequence Modeling with Selective State Spaces" (2023), §3.4 / Fig. 3, the Conv1d before the SSM):

    out[b, t, c] = act( bias[c] + Σ_{k=0}^{K−1} weight[c, k] · x[b, t − (K−1) + k, c] ),   x[b, s, c] = 0 for s < 0

i.e. left-pad the sequence with K−1 zeros so that position t sees only positions ≤ t (§3a pitfall: the
convolution must be causal), one filter per channel (groups = channels), output length = input length.
x is channels-last (batch, length, channels), as the Mamba block produces it; weight is (channels, K).
Computed in fp32, returned in x's dtype.

Backends: ``reference`` loops over the K taps (the formula above); ``torch`` is ``F.conv1d`` with groups.
No Triton kernel (``auto`` always picks ``torch``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._backend import resolve_backend

ACTIVATIONS = (None, "silu")


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Depthwise causal convolution of x (batch, length, channels) with weight (channels, kernel)."""
    backend = resolve_backend(backend, x, weight, has_triton=False)
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if x.ndim != 3 or weight.ndim != 2 or weight.shape[0] != x.shape[2]:
        raise ValueError(
            f"expected x (batch, length, channels) and weight (channels, kernel), got {tuple(x.shape)}, "
            f"{tuple(weight.shape)}"
        )
    if bias is not None and bias.shape != (x.shape[2],):
        raise ValueError(f"expected bias ({x.shape[2]},), got {tuple(bias.shape)}")
    channels, kernel = weight.shape
    x32, w32 = x.float(), weight.float()
    if backend == "reference":
        length = x.shape[1]
        padded = F.pad(x32, (0, 0, kernel - 1, 0))  # K−1 zeros before the first step
        out = torch.zeros_like(x32)
        for k in range(kernel):
            out = out + w32[:, k] * padded[:, k : k + length]
        if bias is not None:
            out = out + bias.float()
    else:
        out = F.conv1d(F.pad(x32.transpose(1, 2), (kernel - 1, 0)), w32[:, None, :],
                       None if bias is None else bias.float(), groups=channels).transpose(1, 2)
    if activation == "silu":
        out = F.silu(out)
    return out.to(x.dtype)
