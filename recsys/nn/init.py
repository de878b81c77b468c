"""Weight inits of the reference implementations, applied over a whole model in parameter-creation order (the
order fixes the random draws, so models initialise the same whatever parts they are assembled from)."""

from __future__ import annotations

import torch
from torch import nn


def zero_padding_rows(model: nn.Module) -> None:
    """Row ``padding_idx`` of every embedding back to zero (an init drew over it)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()


def xavier_init(model: nn.Module) -> None:
    """SASRec's reference init: Xavier-normal on every matrix, zero biases, padding rows zero."""
    for name, param in model.named_parameters():
        if param.dim() > 1:
            nn.init.xavier_normal_(param)
        elif "bias" in name:
            nn.init.zeros_(param)
    zero_padding_rows(model)


def truncated_normal_init(model: nn.Module, std: float) -> None:
    """BERT's init: Linear and Embedding weights from N(0, std²) cut at ±2σ (as TensorFlow does), Linear biases 0,
    LayerNorm (1, 0), padding rows zero."""
    _init_modules(model, lambda weight: nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std))


def normal_init(model: nn.Module, std: float = 0.02, skip: tuple[nn.Module, ...] = (),
                kaiming_conv: bool = False) -> None:
    """Mamba4Rec's ``_init_weights`` (also TiM4Rec's): Linear and Embedding weights N(0, std²), Linear biases 0,
    LayerNorm (1, 0), padding rows zero; modules in ``skip`` keep their own init (Mamba's Δ projection);
    ``kaiming_conv``: Kaiming-normal Conv1d weights with zero biases (TiM4Rec's ``is_kai_ming_init``)."""
    _init_modules(model, lambda weight: nn.init.normal_(weight, mean=0.0, std=std), skip, kaiming_conv)


def _init_modules(model: nn.Module, init_weight, skip: tuple[nn.Module, ...] = (), kaiming_conv: bool = False) -> None:
    """``init_weight`` on every Linear and Embedding weight, in module order (the order fixes the random draws),
    Linear biases 0, LayerNorm (1, 0), optionally Kaiming-normal Conv1d; then the padding rows back to zero."""
    skipped = {id(m) for m in skip}
    for module in model.modules():
        if id(module) in skipped:
            continue
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init_weight(module.weight)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv1d) and kaiming_conv:
            nn.init.kaiming_normal_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    zero_padding_rows(model)
