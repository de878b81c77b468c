"""Shared efficient-sequence operators.

Each operator is one public function with ``backend="auto" | "reference" | "torch"``: ``reference`` is the readable
specification, ``torch`` the vectorised/chunked CPU path. Models call kernels; kernels never import models.
"""

from kernels.attention import attention
from kernels.cross_entropy import linear_cross_entropy
from kernels.topk import topk_scores

__all__ = ["attention", "linear_cross_entropy", "topk_scores"]
