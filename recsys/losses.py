"""Training objectives as objects: a model holds one and never branches on a loss name.

Each loss takes the query states at the supervised positions, their targets and the item table (row 0 =
padding, never a valid class), plus the items of each row's sequence for losses that sample negatives.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

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

    @staticmethod
    def data_parallel_weight(local_targets: int, global_targets: int, world: int) -> float:
        """The factor on a rank's mean loss under DistributedDataParallel, which averages gradients over ranks:
        (local mean × local targets) / global targets × world, so the averaged gradient is the one-process
        gradient of the mean over the global batch (a rank with no targets contributes 0)."""
        return local_targets * world / max(global_targets, 1)

    def prepare(self, item_counts: np.ndarray) -> None:
        """Called once before training (``SequentialModel.prepare_training``, from ``Trainer.fit``) with
        ``item_counts`` (V+1,): how often each item is a target in the TRAINING split (index 0 = padding, 0).
        Losses that sample by popularity or correct for sampling bias keep what they need; most need nothing."""

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

@register_loss
class SampledSoftmax(SequenceLoss):
    """Sampled softmax with logQ correction over in-batch positives and shared negatives.

    Yi et al., "Sampling-Bias-Corrected Neural Modeling for Large Corpus Item Recommendations" (RecSys 2019),
    Eq. (3): the batch softmax uses the corrected logit s^c(x_i, y_j) = s(x_i, y_j) − log p_j, where p_j is the
    probability that item j is among the sampled candidates; without it, popular items (which appear as in-batch
    negatives far more often) are over-penalised. The shared negatives follow "Mixed Negative Sampling" (Yang et al.,
    WWW 2020 companion): the candidates of every row are the N in-batch positives (the targets of all supervised
    rows, the row's own included) plus K negatives drawn once per batch, shared by all rows, uniformly or by
    popularity, with replacement.

    How the two sources are combined. The candidate columns form a multiset drawn from a mixture: N draws from
    the training-target distribution p_t(j) = c_j / Σc (in-batch positives are training targets) and K draws from
    the negative sampler q_n(j) (uniform: 1/V; popularity: (c_j + 1)^α / Σ(c + 1)^α, the +1 so an item never seen as
    a training target can still be sampled and its Q is never 0). The expected number of columns holding item j is
    therefore E_j = N·p_t(j) + K·q_n(j), and every candidate logit, the positive's included, is corrected by
    −log E_j (the sampled-softmax correction of Jean et al. 2015 / Bengio & Senécal 2008 with K·Q(j) the expected
    count of j among K draws; a constant factor cancels in the softmax, but the mixture of two sources with
    different sizes N and K does not, so the counts, not the probabilities, are what is subtracted).
    With ``in_batch=False`` the candidates are the row's positive plus the K shared negatives and E_j = K·q_n(j):
    with uniform negatives the correction is the constant log(K/V), so sampling the whole catalogue once gives
    exactly the full softmax. ``logq=False`` drops the correction (plain sampled softmax, for comparison).

    Accidental hits: any candidate column holding the row's own positive item (another row's identical target, or
    a shared negative that happens to be it) is masked to −inf, except the positive itself (column 0 without
    in-batch candidates, the row's own diagonal column with them).

    c_j are the training split's target counts given to ``prepare`` (never valid/test targets). Random draws use
    torch's global RNG on the hidden states' device. Returns the mean over rows, as the other losses do.
    In-batch draws are only approximately i.i.d. from p_t (a batch holds whole sequences), as in the paper.
    """

    name = "sampled_softmax"

    def __init__(self, num_negatives: int = 256, sampling: str = "uniform", alpha: float = 0.75,
                 logq: bool = True, in_batch: bool = True):
        if sampling not in ("uniform", "popularity"):
            raise ValueError(f"negative_sampling must be 'uniform' or 'popularity', got {sampling!r}")
        if num_negatives < 0 or (num_negatives == 0 and not in_batch):
            raise ValueError("sampled_softmax needs in-batch candidates or at least one shared negative")
        self.num_negatives = num_negatives
        self.sampling = sampling
        self.alpha = alpha
        self.logq = logq
        self.in_batch = in_batch
        self.item_counts: np.ndarray | None = None
        self._tables: dict = {}

    @classmethod
    def from_config(cls, config) -> "SampledSoftmax":
        return cls(num_negatives=config.num_negatives, sampling=config.negative_sampling,
                   alpha=config.popularity_alpha, logq=config.logq, in_batch=config.in_batch_negatives)

    def prepare(self, item_counts: np.ndarray) -> None:
        counts = np.asarray(item_counts, dtype=np.float64).copy()
        counts[0] = 0.0
        self.item_counts = counts
        self._tables = {}

    def _needs_counts(self) -> bool:
        return self.sampling == "popularity" or (self.in_batch and self.logq)

    def distributions(self, num_items: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(p_t, q_n, cdf): the training-target distribution and the negative sampler's distribution, both (V+1,)
        float64 with index 0 (padding) at 0, and the sampler's CDF over items 1..V (None when uniform)."""
        key = (num_items, str(device))
        if key not in self._tables:
            if self.item_counts is None:
                if self._needs_counts():
                    raise RuntimeError("sampled_softmax needs the training split's item counts: call "
                                       "prepare(item_counts) (SequentialModel.prepare_training does) before training")
                counts = np.zeros(num_items + 1)
            else:
                counts = self.item_counts
                if len(counts) != num_items + 1:
                    raise ValueError(f"prepare() got counts for {len(counts) - 1} items, "
                                     f"the item table has {num_items}")
            total = counts.sum()
            p_t = counts / total if total > 0 else np.zeros_like(counts)
            if self.sampling == "uniform":
                q_n = np.full(num_items + 1, 1.0 / num_items)
            else:
                q_n = (counts + 1.0) ** self.alpha
            q_n[0] = 0.0
            q_n = q_n / q_n.sum()
            p_t, q_n = (torch.from_numpy(x).to(device) for x in (p_t, q_n))
            cdf = torch.cumsum(q_n[1:], 0) if self.sampling == "popularity" else None
            self._tables[key] = (p_t, q_n, cdf)
        return self._tables[key]

    def sample_negatives(self, num_items: int, device) -> torch.Tensor:
        """K item ids in 1..V, i.i.d. from the negative sampler (torch's global RNG), shared by the whole batch."""
        if self.sampling == "uniform":
            return torch.randint(1, num_items + 1, (self.num_negatives,), device=device)
        _, _, cdf = self.distributions(num_items, device)
        u = torch.rand(self.num_negatives, dtype=torch.float64, device=device) * cdf[-1]
        return torch.searchsorted(cdf, u, right=True).clamp_(max=num_items - 1) + 1

    def log_expected_count(self, items: torch.Tensor, num_rows: int, num_items: int) -> torch.Tensor:
        """log E_j = log(N·p_t(j) + K·q_n(j)) for ``items`` (any shape), N = in-batch candidates (0 without them)."""
        p_t, q_n, _ = self.distributions(num_items, items.device)
        expected = (num_rows if self.in_batch else 0) * p_t[items] + self.num_negatives * q_n[items]
        return torch.log(expected.clamp_min(1e-30)).float()

    def logits(self, hidden, targets, item_table, negatives):
        """The corrected, masked logits (N, C) and the column of each row's positive (N,).

        Columns: with in-batch candidates, [targets of all N rows | K negatives] (row r's positive is column r);
        without, [row's positive | K negatives] (positive in column 0)."""
        num_items = item_table.shape[0] - 1
        n = targets.shape[0]
        if self.in_batch:
            candidates = torch.cat([targets, negatives])
            logits = (hidden @ item_table[candidates].T).float()
            labels = torch.arange(n, device=targets.device)
            hits = candidates[None, :] == targets[:, None]
            hits[labels, labels] = False
        else:
            candidates = torch.cat([targets, negatives])  # only for the correction below
            pos = (hidden * item_table[targets]).sum(-1, keepdim=True)
            neg = hidden @ item_table[negatives].T
            logits = torch.cat([pos, neg], dim=1).float()
            labels = torch.zeros(n, dtype=torch.long, device=targets.device)
            hits = torch.cat([torch.zeros(n, 1, dtype=torch.bool, device=targets.device),
                              negatives[None, :] == targets[:, None]], dim=1)
        if self.logq:
            correction = self.log_expected_count(candidates, n, num_items)
            if not self.in_batch:
                # column 0 of row r is targets[r]: a per-row correction, then the shared negatives' one
                correction = torch.cat([correction[:n, None], correction[None, n:].expand(n, -1)], dim=1)
            logits = logits - correction
        return logits.masked_fill(hits, float("-inf")), labels

    def __call__(self, hidden, targets, item_table, row_items=None):
        if hidden.shape[0] == 0:
            return hidden.sum() * 0.0 + item_table.sum() * 0.0
        negatives = self.sample_negatives(item_table.shape[0] - 1, hidden.device)
        logits, labels = self.logits(hidden, targets, item_table, negatives)
        return F.cross_entropy(logits, labels)


class SemanticIdCrossEntropy:
    """TIGER's objective (Rajput et al. 2023, §3.2): teacher-forced cross-entropy over the L+1 codes of the
    target item's semantic id, each level's logits over that level's vocabulary (GRID's one head per level), the
    mean over levels. ``level_logits`` [(N, size_d)], ``codes`` (N, L+1)."""

    def __call__(self, level_logits: list[torch.Tensor], codes: torch.Tensor) -> torch.Tensor:
        return torch.stack([F.cross_entropy(logits, codes[:, d]) for d, logits in enumerate(level_logits)]).mean()


class BlockDistillation:
    """SLMRec's feature-alignment loss (Xu et al., ICLR 2025, §3 "knowledge distillation"; model-specs §6):
    L_KD = Σ_b mean_rows[λ·(1 − cos(h^s_b, h^t_b)) + l2_weight·‖h^s_b − h^t_b‖₂] over the aligned blocks'
    (rows, hidden) states of student and frozen teacher."""

    def __init__(self, cosine_weight: float = 1.0, l2_weight: float = 0.1):
        self.cosine_weight = cosine_weight
        self.l2_weight = l2_weight

    def __call__(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
        total = student[0].new_zeros(())
        for s, t in zip(student, teacher, strict=True):
            cosine = 1.0 - F.cosine_similarity(s, t, dim=-1)
            # vector_norm's gradient at a zero difference is 0 (not NaN), so identical states are a stable minimum
            distance = torch.linalg.vector_norm(s - t, dim=-1)
            total = total + (self.cosine_weight * cosine + self.l2_weight * distance).mean()
        return total


class EnsembleReasoning:
    """ReaRec's ERL (Tang et al. 2025, §3.3.1; recsys/reasoning.py): cross-entropy of the mean reasoning state,
    minus λ × the mean over step pairs i ≠ j of KL(p_j ‖ p_i) with p_i held fixed (a diversity reward, as in the
    authors' code). ``states`` (B, K+1, d), ``targets`` (B,) in 1..V, ``table`` (V+1, d)."""

    def __init__(self, temperature: float, kl_weight: float):
        self.temperature, self.kl_weight = temperature, kl_weight

    def __call__(self, states, targets, table, other=None) -> torch.Tensor:
        items = table[1:]
        loss = F.cross_entropy(states.mean(dim=1) @ items.T / self.temperature, targets - 1)
        steps = states.shape[1]
        if not self.kl_weight or steps < 2:
            return loss
        logits = states @ items.T / self.temperature  # (B, K+1, V)
        log_p = logits.log_softmax(-1)
        p = log_p.exp()
        # KL(p_j ‖ p_i) = Σ p_j log p_j − Σ p_j log p_i: one entropy per step and one batched matmul, not (K+1)² V
        cross = torch.einsum("bjv,biv->bij", p, log_p.detach())
        kl = (p * log_p).sum(-1)[:, None, :] - cross  # [b, i, j]
        off_diagonal = ~torch.eye(steps, dtype=torch.bool, device=states.device)
        return loss - self.kl_weight * kl[:, off_diagonal].mean()


class ProgressiveReasoning:
    """ReaRec's PRL (Tang et al. 2025, §3.3.2): the last state's cross-entropy at temperature τ plus the mean of
    the earlier states' at τ·s^(K−k), and with a second noisy pass ``other`` an InfoNCE between the two passes'
    states h₁..h_K over the batch (temperature τ), weighted by ``contrast_weight``."""

    def __init__(self, temperature: float, temperature_scale: float, contrast_weight: float):
        self.temperature, self.scale, self.contrast_weight = temperature, temperature_scale, contrast_weight

    def __call__(self, states, targets, table, other=None) -> torch.Tensor:
        items = table[1:]
        labels = targets - 1
        steps = states.shape[1] - 1
        loss = F.cross_entropy(states[:, -1] @ items.T / self.temperature, labels)
        if steps:
            temperatures = self.temperature * self.scale ** torch.arange(steps, 0, -1, device=states.device)
            earlier = states[:, :-1] @ items.T / temperatures[None, :, None]  # (B, K, V)
            loss = loss + F.cross_entropy(earlier.flatten(0, 1), labels.repeat_interleave(steps))
        if other is not None and steps and self.contrast_weight:
            similarity = torch.einsum("btd,ktd->tbk", other[:, 1:], states[:, 1:]) / self.temperature  # (K, B, B)
            rows = torch.arange(len(states), device=states.device).repeat(steps)
            loss = loss + self.contrast_weight * F.cross_entropy(similarity.flatten(0, 1), rows)
        return loss


def info_nce(a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent over the 2N states [a; b] (Chen et al. 2020, Eq. 1): row i's positive is its pair, the
    other rows are negatives except those with the same ``labels`` (false negatives, masked; Qin et al. 2024
    §4.4), dot-product similarity at ``temperature``."""
    z = torch.cat([a, b])
    n = len(a)
    similarity = z @ z.T / temperature
    pair = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    positive = similarity[torch.arange(2 * n, device=z.device), pair]
    both = torch.cat([labels, labels])
    negatives = similarity.masked_fill(both[:, None] == both[None, :], float("-inf"))
    return F.cross_entropy(torch.cat([positive[:, None], negatives], dim=1),
                           torch.zeros(2 * n, dtype=torch.long, device=z.device))


class IntentContrastiveLoss:
    """ICSRec's auxiliary terms (Qin et al., WSDM 2024, §4.2-4.3; recsys/intents.py): λ × the coarse-grain InfoNCE
    between states h₁, h₂ of prefixes with the same next item (same-target pairs masked), plus β × the fine-grain
    InfoNCE of each state against its nearest k-means centroid (same-intent pairs masked)."""

    def __init__(self, coarse_weight: float, fine_weight: float, temperature: float):
        self.coarse_weight, self.fine_weight, self.temperature = coarse_weight, fine_weight, temperature

    def __call__(self, h1, h2, targets, centroids=None) -> torch.Tensor:
        loss = h1.new_zeros(())
        if self.coarse_weight:
            loss = loss + self.coarse_weight * info_nce(h1, h2, targets, self.temperature)
        if self.fine_weight and centroids is not None:
            centroids = centroids.to(h1.device, h1.dtype)
            for h in (h1, h2):
                intent = torch.cdist(h.detach(), centroids).argmin(dim=1)
                loss = loss + self.fine_weight * info_nce(h, centroids[intent], intent, self.temperature)
        return loss


class LossSettings(BaseModel):
    """The loss fields of every model config whose model builds its loss with ``build_loss`` (mixed into
    SASRec's, GRU4Rec's, Mamba4Rec's and TiM4Rec's configs)."""

    model_config = ConfigDict(extra="forbid")
    loss: Literal["ce", "bce", "sampled_softmax"] = "ce"
    # bce: negatives per target; sampled_softmax: negatives shared by the batch. None: 256 for sampled_softmax, else 1.
    num_negatives: int | None = Field(None, ge=0)
    negative_sampling: Literal["uniform", "popularity"] = "uniform"  # sampled_softmax's shared negatives
    popularity_alpha: float = Field(0.75, ge=0)  # popularity sampling ∝ (training count + 1)^alpha
    logq: bool = True  # sampled_softmax: subtract log expected count (Yi et al. 2019)
    in_batch_negatives: bool = True  # sampled_softmax: the other rows' targets are candidates too

    @model_validator(mode="after")
    def _default_negatives(self):
        if self.num_negatives is None:
            self.num_negatives = 256 if self.loss == "sampled_softmax" else 1
        return self


def training_target_counts(train, num_items: int) -> np.ndarray:
    """(V+1,) how often each item is a training target: every event of ``train`` (a Jagged split) but each
    sequence's first, which is never a target."""
    counts = np.bincount(np.asarray(train.items, dtype=np.int64), minlength=num_items + 1)
    lengths = np.asarray(train.lengths())
    firsts = np.asarray(train.offsets[:-1])[lengths > 0]
    counts -= np.bincount(np.asarray(train.items, dtype=np.int64)[firsts], minlength=num_items + 1)
    return counts[: num_items + 1]


def build_loss(config) -> SequenceLoss:
    """The loss named by ``config.loss``, built from the fields of ``config`` that it uses."""
    if config.loss not in LOSSES:
        raise ValueError(f"unknown loss {config.loss!r}; available: {sorted(LOSSES)}")
    return LOSSES[config.loss].from_config(config)
