"""Shared efficient-sequence operators.

Each operator is one public function with ``backend="auto" | "reference" | "torch" | "triton"``: ``reference`` is
the readable specification, ``torch`` the vectorised/chunked path that runs anywhere, ``triton`` the GPU kernel
(where there is one; ``auto`` picks it only for CUDA tensors). ``selective_scan`` and ``ssd`` also have ``cpu``,
fused C loops compiled at first use, which ``auto`` picks for CPU tensors when they build. The scans, the linear
cross-entropy and top-k keep fp32 arithmetic inside even when called under ``torch.autocast``. Models call kernels;
kernels never import models.
"""

from kernels.attention import attention
from kernels.causal_conv1d import causal_conv1d
from kernels.cross_entropy import linear_cross_entropy
from kernels.selective_scan import selective_scan
from kernels.ssd import ssd
from kernels.topk import topk_scores

__all__ = ["attention", "causal_conv1d", "linear_cross_entropy", "selective_scan", "ssd", "topk_scores"]
