"""Training objectives as objects: a model holds one and never branches on a loss name.

Each loss takes the query states at the supervised positions, their targets and the item table (row 0 =
padding, never a valid class), plus the items of each row's sequence for losses that sample negatives.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from kernels import linear_cross_entropy

LOSSES: dict[str, type["SequenceLoss"]] = {}


def register_loss(cls):
    LOSSES[cls.name] = cls
    return cls


class SequenceLoss:
    name: ClassVar[str]
    # True when the loss needs each row's sequence items (to keep sampled negatives off the history).
    needs_row_items: ClassVar[bool] = False

    @classmethod
    def from_config(cls, config) -> "SequenceLoss":
        return cls()

    def __call__(
        self,
        hidden: torch.Tensor,
        targets: torch.Tensor,
        item_table: torch.Tensor,
        row_items: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``hidden`` (N, d), ``targets`` (N,) in 1..V, ``item_table`` (V+1, d); ``row_items`` (N, S) are the items
        of the sequence each row comes from (used to keep sampled negatives off the user's history)."""
        raise NotImplementedError


@register_loss
class FullCrossEntropy(SequenceLoss):
    """Softmax over the whole catalogue ("SASRec+", Klenitskiy & Vasilev 2023; model-specs §1 CE loss, §8).

    Computed by ``kernels.linear_cross_entropy`` so the (N, V) logits are never materialised. The padding row is
    dropped from the vocabulary, so item i is class i−1.
    """

    name = "ce"

    def __init__(self, chunk_size: int = 2048):
        self.chunk_size = chunk_size

    def __call__(self, hidden, targets, item_table, row_items=None):
        return linear_cross_entropy(hidden, item_table[1:], targets - 1, ignore_index=-1, chunk_size=self.chunk_size)


@register_loss
class BCEWithNegatives(SequenceLoss):
    """The original SASRec objective (Kang & McAuley 2018, Eq. in §3.5; model-specs §1 BCE loss):
    −[log σ(h·e_pos) + Σ_neg log(1 − σ(h·e_neg))], with uniform negatives drawn outside the row's sequence."""

    name = "bce"
    needs_row_items = True

    def __init__(self, num_negatives: int = 1, max_resample: int = 10):
        self.num_negatives = num_negatives
        self.max_resample = max_resample

    @classmethod
    def from_config(cls, config) -> "BCEWithNegatives":
        return cls(num_negatives=config.num_negatives)

    def sample_negatives(self, targets: torch.Tensor, num_items: int, row_items: torch.Tensor | None) -> torch.Tensor:
        shape = (targets.shape[0], self.num_negatives)
        negatives = torch.randint(1, num_items + 1, shape, device=targets.device)
        forbidden = targets[:, None] if row_items is None else torch.cat([row_items, targets[:, None]], dim=1)
        for _ in range(self.max_resample):
            clash = (negatives[:, :, None] == forbidden[:, None, :]).any(dim=2)
            if not bool(clash.any()):
                break
            negatives[clash] = torch.randint(1, num_items + 1, (int(clash.sum()),), device=targets.device)
        return negatives

    def __call__(self, hidden, targets, item_table, row_items=None):
        negatives = self.sample_negatives(targets, item_table.shape[0] - 1, row_items)
        pos_logit = (hidden * item_table[targets]).sum(-1)
        neg_logit = torch.einsum("nd,nkd->nk", hidden, item_table[negatives])
        pos_loss = F.binary_cross_entropy_with_logits(pos_logit, torch.ones_like(pos_logit), reduction="none")
        neg_loss = F.binary_cross_entropy_with_logits(neg_logit, torch.zeros_like(neg_logit), reduction="none")
        return (pos_loss + neg_loss.sum(-1)).mean()


def build_loss(config) -> SequenceLoss:
    """The loss named by ``config.loss``, built from the fields of ``config`` that it uses."""
    if config.loss not in LOSSES:
        raise ValueError(f"unknown loss {config.loss!r}; available: {sorted(LOSSES)}")
    return LOSSES[config.loss].from_config(config)


def supervised_loss(loss_fn: SequenceLoss, states: torch.Tensor, batch, item_table: torch.Tensor) -> torch.Tensor:
    """``loss_fn`` at the supervised positions of per-position ``states`` (B, T, d): those where
    ``batch.targets`` is non-zero (every position for causal batches, the last column for last-position ones)."""
    supervised = batch.targets != 0
    row_items = None
    if loss_fn.needs_row_items:
        rows = torch.nonzero(supervised)[:, 0]
        row_items = torch.cat([batch.items, batch.targets], dim=1)[rows]
    return loss_fn(states[supervised], batch.targets[supervised], item_table, row_items)


def last_position_loss(loss_fn: SequenceLoss, hidden: torch.Tensor, batch, item_table: torch.Tensor) -> torch.Tensor:
    """``loss_fn`` on the last column only, for look-ahead models (SIGMA, TiM4Rec): ``hidden`` (B, d) is the
    state after the whole input, which never contains its target, and no earlier column (whose state has looked
    ahead at later items) is ever supervised. Rows without a target (``batch.targets[:, -1] == 0``) are skipped."""
    targets = batch.targets[:, -1]
    rows = targets != 0
    row_items = torch.cat([batch.items, targets[:, None]], dim=1)[rows] if loss_fn.needs_row_items else None
    return loss_fn(hidden[rows], targets[rows], item_table, row_items)
