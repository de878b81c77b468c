"""Leave-one-out and global temporal splits over per-user time-ordered sequences.

Both are fully vectorised over the jagged arrays (no per-user Python loop), and both guarantee the
contract of docs/architecture.md: a training sequence never contains its own validation or test
target nor anything after it; a test history may contain the validation item.
"""

from __future__ import annotations

import numpy as np

from .jagged import EvalSet, Jagged, Split


def _eval_set(user_idx: np.ndarray, sequences: Jagged, rows: np.ndarray, history_len: np.ndarray,
              history: Jagged | None = None) -> EvalSet:
    """Examples for ``rows``: history = first ``history_len`` events (``history`` when the caller already holds
    exactly that), target = the event right after."""
    picked = sequences.take(rows)
    target, target_time = picked.element(history_len)
    return EvalSet(
        user_idx=user_idx[rows].astype(np.int32),
        history=picked.prefix(history_len) if history is None else history,
        target=target.astype(np.int32),
        target_time=target_time.astype(np.int64),
    )


def _train(user_idx: np.ndarray, sequences: Jagged, train_len: np.ndarray) -> tuple[np.ndarray, Jagged]:
    keep = np.flatnonzero(train_len > 0)
    train = sequences.take(keep).prefix(train_len[keep])
    return user_idx[keep].astype(np.int32), train


def leave_one_out_split(user_idx: np.ndarray, sequences: Jagged) -> Split:
    """Last event = test target, second last = validation target (users with >= 3 events).

    Users with fewer than 3 events contribute their whole sequence to training only, so that they
    are never evaluated on a history of length 0.
    """
    user_idx = np.asarray(user_idx)
    lengths = sequences.lengths()
    evaluated = lengths >= 3
    train_len = np.where(evaluated, lengths - 2, lengths)
    train_users, train = _train(user_idx, sequences, train_len)
    rows = np.flatnonzero(evaluated)
    # When every user is evaluated (any k-core >= 3) the validation histories are exactly the training sequences:
    # share them instead of building a second copy of nearly every event.
    shared = train if len(rows) == len(sequences) else None
    valid = _eval_set(user_idx, sequences, rows, lengths[rows] - 2, shared)
    test = _eval_set(user_idx, sequences, rows, lengths[rows] - 1)
    return Split("loo", train_users, train, valid, test)


def _count_before(sequences: Jagged, cutoff: int) -> np.ndarray:
    """Per row, how many events have ``t < cutoff`` (a prefix, since rows are time-sorted)."""
    before = (sequences.times < cutoff).astype(np.int64)
    return np.bincount(sequences.row_ids(), weights=before, minlength=len(sequences)).astype(np.int64)


def temporal_split(user_idx: np.ndarray, sequences: Jagged, valid_cutoff: int, test_cutoff: int) -> Split:
    """One global time cutoff pair for everybody.

    train: events with ``t < valid_cutoff``. valid: users with an event in ``[valid_cutoff, test_cutoff)``
    and at least one event before ``valid_cutoff``; target = their first event in the window.
    test: users with an event ``>= test_cutoff`` and at least one before; history = all events before
    ``test_cutoff`` (it may contain the validation target), target = first event ``>= test_cutoff``.
    """
    if valid_cutoff > test_cutoff:
        raise ValueError(f"valid_cutoff ({valid_cutoff}) must not be after test_cutoff ({test_cutoff})")
    user_idx = np.asarray(user_idx)
    lengths = sequences.lengths()
    n_before_valid = _count_before(sequences, valid_cutoff)
    n_before_test = _count_before(sequences, test_cutoff)
    train_users, train = _train(user_idx, sequences, n_before_valid)

    # The first event at/after valid_cutoff sits at index n_before_valid; it is in the window iff
    # that index is also before the test cutoff.
    valid_rows = np.flatnonzero((n_before_valid > 0) & (n_before_valid < n_before_test))
    test_rows = np.flatnonzero((n_before_test > 0) & (n_before_test < lengths))
    valid = _eval_set(user_idx, sequences, valid_rows, n_before_valid[valid_rows])
    test = _eval_set(user_idx, sequences, test_rows, n_before_test[test_rows])
    return Split("temporal", train_users, train, valid, test)


def default_temporal_cutoffs(times: np.ndarray, valid_quantile: float = 0.8,
                             test_quantile: float = 0.9) -> tuple[int, int]:
    """Cutoffs at quantiles of all timestamps (recorded in the manifest at build time)."""
    if len(times) == 0:
        return 0, 0
    q = np.quantile(times, [valid_quantile, test_quantile], method="lower")
    return int(q[0]), int(q[1])


def lower_quantile_index(n: int, q: float) -> int:
    """The rank ``default_temporal_cutoffs`` (numpy's ``quantile(method="lower")``) picks among n sorted values,
    floor((n - 1) q): what an engine that cannot hold every timestamp (Spark) selects instead."""
    return int(np.floor((n - 1) * np.float64(q)))
