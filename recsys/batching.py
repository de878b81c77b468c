"""Turn jagged sequences into padded tensor batches, lazily, one batch at a time.

Sequences stay jagged (Arrow-style offsets + values) until a batch is built, and a batch is padded only to its
own longest row: users are bucketed by length, so an epoch does the arithmetic of the real tokens rather than of
``batch × max_len`` (RecBole's per-prefix copies and fixed padding are what we avoid). Padding is on the left,
so the prediction point is always the last column.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from pipelines.jagged import EvalSet, Jagged


@dataclass
class SequenceBatch:
    """A left-padded batch. ``items`` (B, T) with 0 = padding; ``targets`` (B, T) is the next item at each
    position (0 where there is none) for causal training, or None for inference."""

    items: torch.Tensor
    times: torch.Tensor
    targets: torch.Tensor | None = None
    user_idx: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "SequenceBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return SequenceBatch(move(self.items), move(self.times), move(self.targets), move(self.user_idx))

    @property
    def padding_mask(self) -> torch.Tensor:
        return self.items == 0


def _left_pad(rows: list[np.ndarray], width: int, dtype) -> np.ndarray:
    out = np.zeros((len(rows), width), dtype=dtype)
    for i, row in enumerate(rows):
        if len(row):
            out[i, width - len(row) :] = row
    return out


def pad_histories(histories: list[tuple[np.ndarray, np.ndarray]], max_len: int) -> SequenceBatch:
    """Inference batch from (items, times) histories: keep the most recent ``max_len`` events of each."""
    items = [h[0][-max_len:] for h in histories]
    times = [h[1][-max_len:] for h in histories]
    width = max(1, max(len(r) for r in items))
    return SequenceBatch(
        items=torch.from_numpy(_left_pad(items, width, np.int64)),
        times=torch.from_numpy(_left_pad(times, width, np.int64)),
    )


def length_bucketed_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle rows, then sort by length inside windows of 50 batches so each batch is nearly uniform in length,
    and shuffle the batch order. Randomness comes only from ``rng`` (deterministic per seed and epoch)."""
    order = rng.permutation(len(lengths))
    window = batch_size * 50
    batches = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


class CausalTrainBatches:
    """Next-item training on every position of each sequence at once (no per-prefix copies).

    A window of events e₁…e_m gives inputs e₁…e_{m−1} and targets e₂…e_m. Sequences longer than
    ``max_len + 1`` are cut, from the most recent end, into windows of ``max_len + 1`` events that overlap by one,
    so every training event is a target exactly once (none is dropped by truncation). Sequences of fewer than
    two events carry no target and are skipped.
    """

    def __init__(self, users: np.ndarray, train: Jagged, max_len: int, batch_size: int):
        self.train = train
        self.max_len = max_len
        self.batch_size = batch_size
        lengths = train.lengths()
        rows = np.flatnonzero(lengths >= 2)
        windows = -(-(lengths[rows] - 1) // max_len)  # ceil(targets / max_len)
        row_of = np.repeat(rows, windows)
        nth = np.arange(len(row_of)) - np.repeat(np.cumsum(windows) - windows, windows)  # 0 = most recent
        end = lengths[row_of] - nth * max_len
        start = np.maximum(end - max_len - 1, 0)
        self.starts = train.offsets[row_of] + start
        self.ends = train.offsets[row_of] + end
        self.users = users[row_of]
        self.lengths = self.ends - self.starts

    def num_targets(self) -> int:
        return int((self.lengths - 1).sum())

    def epoch(self, rng: np.random.Generator) -> Iterator[SequenceBatch]:
        for rows in length_bucketed_batches(self.lengths, self.batch_size, rng):
            items = [self.train.items[self.starts[r] : self.ends[r]] for r in rows]
            times = [self.train.times[self.starts[r] : self.ends[r]] for r in rows]
            width = int(self.lengths[rows].max()) - 1
            yield SequenceBatch(
                items=torch.from_numpy(_left_pad([x[:-1] for x in items], width, np.int64)),
                times=torch.from_numpy(_left_pad([t[:-1] for t in times], width, np.int64)),
                targets=torch.from_numpy(_left_pad([x[1:] for x in items], width, np.int64)),
                user_idx=torch.from_numpy(self.users[rows].astype(np.int64)),
            )

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)


class LastPositionTrainBatches:
    """Training at the last position only, over prefix cut points drawn afresh every epoch.

    For models that look ahead inside their input (SIGMA's flip and non-causal conv, TiM4Rec's Linear(L→L) time
    path; model-specs §4, §5 pitfalls) an all-position loss would leak each target into its own input. A cut at
    event c of a sequence gives the input e_{max(1, c−max_len)}…e_{c−1} and the single target e_c. Every epoch
    draws ``fraction`` of all cut points without replacement (1.0: every prefix once, in a new order); only the
    (row, position) indices are kept, never copies of the prefixes. ``targets`` (B, T) is zero except in the last
    column, so trainers and losses treat these batches like causal ones.
    """

    def __init__(self, users: np.ndarray, train: Jagged, max_len: int, batch_size: int, fraction: float = 1.0):
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        self.train = train
        self.max_len = max_len
        self.batch_size = batch_size
        self.fraction = fraction
        rows = train.row_ids()
        starts = train.offsets[rows]
        cut = np.flatnonzero(np.arange(len(rows)) > starts)  # every event but a row's first is a target
        self.positions = cut
        self.starts = np.maximum(starts[cut], cut - max_len)
        self.users = users[rows[cut]]

    def num_targets(self) -> int:
        return int(round(len(self.positions) * self.fraction))

    def epoch(self, rng: np.random.Generator) -> Iterator[SequenceBatch]:
        chosen = rng.choice(len(self.positions), size=self.num_targets(), replace=False)
        lengths = self.positions[chosen] - self.starts[chosen]
        for rows in length_bucketed_batches(lengths, self.batch_size, rng):
            picked = chosen[rows]
            ends, starts = self.positions[picked], self.starts[picked]
            width = int((ends - starts).max())
            items = [self.train.items[s:e] for s, e in zip(starts, ends)]
            times = [self.train.times[s:e] for s, e in zip(starts, ends)]
            targets = np.zeros((len(picked), width), dtype=np.int64)
            targets[:, -1] = self.train.items[ends]
            yield SequenceBatch(
                items=torch.from_numpy(_left_pad(items, width, np.int64)),
                times=torch.from_numpy(_left_pad(times, width, np.int64)),
                targets=torch.from_numpy(targets),
                user_idx=torch.from_numpy(self.users[picked].astype(np.int64)),
            )

    def __len__(self) -> int:
        return -(-self.num_targets() // self.batch_size)


def cloze_mask(
    items: np.ndarray, lengths: np.ndarray, mask_last: np.ndarray, mask_prob: float, max_predictions: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Boolean (B, W) mask of the positions to hide in left-padded ``items`` (B, W) whose rows hold ``lengths``
    items. Rows flagged in ``mask_last`` hide only their last item; the others hide
    n = min(max_predictions, max(1, round(m·ρ))) positions drawn uniformly among their m items (half rounds up).
    Pads are never chosen: their random keys sort after every real position and n ≤ m."""
    b, w = items.shape
    keys = rng.random((b, w))
    keys[items == 0] = 2.0
    ranks = np.argsort(np.argsort(keys, axis=1, kind="stable"), axis=1, kind="stable")
    n = np.minimum(max_predictions, np.maximum(1, np.floor(lengths * mask_prob + 0.5).astype(np.int64)))
    n = np.minimum(n, lengths)
    masked = ranks < n[:, None]
    masked[mask_last] = False
    masked[mask_last, -1] = True
    return masked


class ClozeTrainBatches:
    """BERT4Rec's cloze training data (model-specs §2): windows over each training history, masked afresh every
    epoch, plus mask-last instances for a ``mask_last_prob`` share of the windows.

    ``items`` holds the masked input (masked positions replaced by ``mask_token``), ``targets`` the original item
    at masked positions and 0 elsewhere, so the trainer counts the masked positions as supervised targets.
    Only indices into ``train`` are stored, never copies of the windows.
    """

    def __init__(
        self, users: np.ndarray, train: Jagged, max_len: int, batch_size: int, mask_token: int,
        mask_prob: float, max_predictions: int, mask_last_prob: float = 0.1, window_step: float = 0.1,
        mask_last_prefix: bool = False,
    ):
        self.train = train
        self.batch_size = batch_size
        self.mask_token = mask_token
        self.mask_prob = mask_prob
        self.max_predictions = max_predictions
        self.mask_last_prob = mask_last_prob
        self.mask_last_prefix = mask_last_prefix
        step = max(1, int(window_step * max_len))
        lengths = train.lengths()
        rows = np.flatnonzero(lengths >= 1)
        extra = lengths[rows] - max_len
        # windows ending at the last item, then every ``step`` items earlier while they start after item 0, plus
        # the window holding the first max_len items (gen_data_fin.py: range(len − L, 0, −step) + [0])
        count = np.where(extra > 0, -(-extra // step) + 1, 1)
        row_of = np.repeat(rows, count)
        nth = np.arange(len(row_of)) - np.repeat(np.cumsum(count) - count, count)
        start = np.maximum(np.repeat(extra, count) - nth * step, 0)
        end = np.minimum(start + max_len, lengths[row_of])
        self.starts = train.offsets[row_of] + start
        self.ends = train.offsets[row_of] + end
        self.users = np.asarray(users)[row_of]
        self.lengths = self.ends - self.starts

    def num_instances(self) -> int:
        return len(self.lengths) + int(round(self.mask_last_prob * len(self.lengths)))

    def epoch(self, rng: np.random.Generator) -> Iterator[SequenceBatch]:
        n = len(self.lengths)
        extra = rng.choice(n, size=self.num_instances() - n, replace=False)
        windows = np.concatenate([np.arange(n), extra])
        mask_last = np.arange(len(windows)) >= n
        starts, ends = self.starts[windows], self.ends[windows]  # fancy indexing: fresh arrays, safe to edit
        if self.mask_last_prefix:
            # a cut point uniform over the window's prefixes of ≥ 2 items (the whole 1-item window otherwise)
            window = self.lengths[extra]
            shortest = np.minimum(window, 2)
            ends[n:] = starts[n:] + shortest + (rng.random(len(extra)) * (window - shortest + 1)).astype(np.int64)
        lengths = ends - starts
        for picked in length_bucketed_batches(lengths, self.batch_size, rng):
            width = int(lengths[picked].max())
            items = _left_pad([self.train.items[s:e] for s, e in zip(starts[picked], ends[picked])], width, np.int64)
            times = _left_pad([self.train.times[s:e] for s, e in zip(starts[picked], ends[picked])], width, np.int64)
            masked = cloze_mask(items, lengths[picked], mask_last[picked], self.mask_prob, self.max_predictions, rng)
            yield SequenceBatch(
                items=torch.from_numpy(np.where(masked, self.mask_token, items)),
                times=torch.from_numpy(times),
                targets=torch.from_numpy(np.where(masked, items, 0)),
                user_idx=torch.from_numpy(self.users[windows[picked]].astype(np.int64)),
            )

    def __len__(self) -> int:
        return -(-self.num_instances() // self.batch_size)


@dataclass
class EvalBatch:
    batch: SequenceBatch
    targets: torch.Tensor            # (B,) target item per row
    exclude: tuple[torch.Tensor, torch.Tensor]  # CSR (offsets, items) of the full history, for exclude_seen


def eval_batches(eval_set: EvalSet, max_len: int, batch_size: int) -> Iterator[EvalBatch]:
    """Evaluation batches in a fixed order (sorted by history length, so results never depend on batching noise)."""
    lengths = eval_set.history.lengths()
    order = np.argsort(lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        histories = [eval_set.history.row(r) for r in rows]
        batch = pad_histories(histories, max_len)
        batch.user_idx = torch.from_numpy(eval_set.user_idx[rows].astype(np.int64))
        seen = [h[0] for h in histories]
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(s) for s in seen])
        flat = np.concatenate(seen).astype(np.int64) if offsets[-1] else np.zeros(0, dtype=np.int64)
        yield EvalBatch(
            batch=batch,
            targets=torch.from_numpy(eval_set.target[rows].astype(np.int64)),
            exclude=(torch.from_numpy(offsets), torch.from_numpy(flat)),
        )
