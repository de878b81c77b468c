"""TiM4Rec (recsys/models/tim4rec.py; Fan et al. 2024, model-specs §5): the torch SSD/conv paths against the
reference loops (outputs and gradients), padding invariance (extra left pads and garbage timestamps at pads), the
time path being live and per-user, last-position training that never sees its target, learning a successor
pattern and a purely time-driven pattern, and registration. Error metric: rel_err = max|x − ref| / max|ref|."""

import numpy as np
import pytest
import torch
from pydantic import ValidationError

import recsys.models.tim4rec  # noqa: F401  (registers "tim4rec")
from pipelines.jagged import Jagged
from recsys.batching import LastPositionTrainBatches, SequenceBatch, pad_histories
from recsys.models.base import MODELS, build_model
from recsys.models.tim4rec import SequenceLayerNorm, TiM4Rec, time_gaps
from recsys.trainer import TrainConfig
from tests.helpers import rel_err

NUM_ITEMS = 20
# 4 heads of 8 channels, 3 SSD chunks of 4 over the 12 columns
TINY = {"hidden_size": 16, "max_len": 12, "head_dim": 8, "d_state": 8, "chunk_size": 4, "dropout": 0.0}
T0 = 1_600_000_000  # a realistic unix time
GAPS = [60, 7200, 86400, 600, 30, 3600, 5, 99999, 42, 7, 1, 2, 500, 9]


def batch_of(rows, width, times=None, pad_time=0):
    """Left-padded batch; default gaps grow irregularly (1 min, 2 h, 1 day, ...) so LN_L sees varied values."""
    items = torch.zeros(len(rows), width, dtype=torch.long)
    stamps = torch.full((len(rows), width), pad_time, dtype=torch.long)
    for i, row in enumerate(rows):
        stamp = times[i] if times else T0 + np.cumsum(GAPS[:len(row)])
        items[i, width - len(row):] = torch.tensor(row)
        stamps[i, width - len(row):] = torch.as_tensor(np.asarray(stamp, dtype=np.int64))
    return SequenceBatch(items=items, times=stamps)


def scores(model, batch):
    with torch.no_grad():
        return model.encode(batch) @ model.item_embeddings().T


def liven_time_path(model, std=0.3):
    """At init the time path moves the scores by less than float32 resolution: every Linear is N(0, 0.02) (so s ≈ 0,
    dt is small and the SSD term C·h is small beside D·x) and softplus′(dt_bias) ≈ Δ ∈ [1e-3, 1e-1]. Larger weights
    and steps (as training produces) make the time path's effect unmistakable."""
    torch.manual_seed(1)
    with torch.no_grad():
        for module in [*model.layers.modules(), *model.time_paths.modules()]:
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d)):
                module.weight.normal_(std=std)
                if module.bias is not None:
                    module.bias.normal_(std=std)
        for layer in model.layers:
            layer.mixer.dt_bias.fill_(0.5)
    return model


def twin_models(config):
    """The same weights under backend="torch" and backend="reference"."""
    torch.manual_seed(0)
    fast = build_model("tim4rec", NUM_ITEMS, {**config, "backend": "torch"})
    ref = build_model("tim4rec", NUM_ITEMS, {**config, "backend": "reference"})
    ref.load_state_dict(fast.state_dict())
    return fast, ref


# (a) torch path == reference path -----------------------------------------------------------------------------

@pytest.mark.parametrize("extra", [{}, {"p2p_residual": False, "time_log1p": True, "ngroups": 2, "num_layers": 3}])
def test_torch_backend_matches_reference_outputs_and_gradients(extra):
    fast, ref = twin_models({**TINY, **extra})
    liven_time_path(fast)
    ref.load_state_dict(fast.state_dict())
    batch = batch_of([[3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [7, 8, 2], [9]], 12)
    batch.targets = torch.zeros_like(batch.items)
    batch.targets[:, -1] = torch.tensor([1, 2, 3])
    outs = []
    for model in (fast, ref):
        model.train()  # dropout is 0: train mode exercises the training path deterministically
        hidden = model.encode(batch)
        loss = model.loss(batch)
        loss.backward()
        outs.append((hidden.detach(), loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}))
    (h, loss, grads), (h_ref, loss_ref, grads_ref) = outs
    assert rel_err(h, h_ref) <= 1e-4
    assert rel_err(loss, loss_ref) <= 1e-4
    assert grads.keys() == grads_ref.keys()
    for k, g in grads_ref.items():
        assert rel_err(grads[k], g) <= 1e-4, k
    assert grads_ref["time_paths.0.w_a.weight"].abs().max() > 0  # the time path is trained


# (b) padding invariance ---------------------------------------------------------------------------------------

def test_extra_left_pads_never_change_a_score():
    torch.manual_seed(0)
    model = liven_time_path(build_model("tim4rec", NUM_ITEMS, TINY)).eval()
    rows = [[3, 4, 5, 6], [7, 8], [9]]
    tight = scores(model, batch_of(rows, 4))
    wide = scores(model, batch_of(rows, 12))
    alone = scores(model, batch_of(rows[1:2], 2))
    assert tight.shape == (3, NUM_ITEMS + 1)
    torch.testing.assert_close(wide, tight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alone[0], tight[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("extra", [{}, {"p2p_residual": False, "num_layers": 3}])
def test_a_narrow_batch_equals_its_max_len_padding_in_outputs_and_gradients(extra):
    """A batch of width W < max_len runs at width W (sliced Linear(L → L) weights, the last W entries of LN_L's
    affine); every parameter is randomised so that a wrong slice shows."""
    torch.manual_seed(0)
    model = build_model("tim4rec", NUM_ITEMS, {**TINY, **extra})
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("time_", "layers")) and "A_log" not in name and "dt_bias" not in name:
                p.add_(torch.randn_like(p) * 0.3)
    rows = [[3, 4, 5, 6, 7], [7, 8], [9]]
    results = []
    for width in (5, 12):
        model.zero_grad()
        hidden = model.encode(batch_of(rows, width))
        (hidden * torch.randn(hidden.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
        results.append((hidden.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}))
    (narrow, grads), (wide, grads_wide) = results
    assert rel_err(narrow, wide) <= 1e-5
    assert grads_wide["time_paths.0.w_b.weight"][:, :7].abs().max() > 0  # W_b reads all of W_a's outputs
    for k, g in grads_wide.items():
        assert rel_err(grads[k], g) <= 1e-4, k


def test_garbage_timestamps_at_pads_never_change_a_score():
    torch.manual_seed(0)
    model = liven_time_path(build_model("tim4rec", NUM_ITEMS, TINY)).eval()
    rows = [[3, 4, 5, 6], [7, 8], [9]]
    clean = scores(model, batch_of(rows, 8))
    for pad_time in (T0 + 10**6, -(10**9), 1):
        torch.testing.assert_close(scores(model, batch_of(rows, 8, pad_time=pad_time)), clean, rtol=0, atol=0)
    garbage = batch_of(rows, 8)
    garbage.times[garbage.items == 0] = torch.randint(-(10**12), 10**12, (int((garbage.items == 0).sum()),))
    torch.testing.assert_close(scores(model, garbage), clean, rtol=0, atol=0)


def test_time_gaps_are_zero_at_pads_and_first_event_and_the_sequence_norm_ignores_pads():
    items = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    times = torch.tensor([[99, -7, 100, 160, 150], [10, 20, 40, 80, 160]])
    assert time_gaps(items, times, log1p=False).tolist() == [[0, 0, 0, 60, 0], [0, 10, 20, 40, 80]]
    norm = SequenceLayerNorm(5, eps=1e-5)
    delta = time_gaps(items, times, log1p=False)[:, None, :]
    mask = (items != 0).float()[:, None, :]
    out = norm(delta, mask)[:, 0]
    assert out[0, :2].tolist() == [0.0, 0.0]
    real = out[0, 2:]  # normalised over the 3 real positions only: zero mean, unit (biased) variance
    assert abs(real.mean().item()) < 1e-5 and abs(real.var(unbiased=False).item() - 1) < 1e-3


# (c) time matters, per user -----------------------------------------------------------------------------------

def test_changing_the_time_gaps_changes_the_scores():
    torch.manual_seed(0)
    rows = [[3, 4, 5, 6, 7]]
    steady = [T0 + np.arange(5) * 3600]
    bursty = [T0 + np.array([0, 10, 20, 86400 * 30, 86400 * 30 + 5])]
    # at init (N(0, 0.02) Linears, small dt) the time path moves the scores by less than float32 resolution
    model = liven_time_path(build_model("tim4rec", NUM_ITEMS, TINY)).eval()
    assert rel_err(scores(model, batch_of(rows, 5, bursty)), scores(model, batch_of(rows, 5, steady))) > 1e-3
    # only gaps matter: shifting every timestamp leaves the scores alone
    shifted = [steady[0] + 12345]
    torch.testing.assert_close(scores(model, batch_of(rows, 5, shifted)), scores(model, batch_of(rows, 5, steady)))
    # with use_time off the same change does nothing (the difference above is the time path's)
    torch.manual_seed(0)
    plain = build_model("tim4rec", NUM_ITEMS, {**TINY, "use_time": False}).eval()
    torch.testing.assert_close(scores(plain, batch_of(rows, 5, bursty)), scores(plain, batch_of(rows, 5, steady)))


def test_a_users_scores_depend_only_on_its_own_times():
    torch.manual_seed(0)
    model = liven_time_path(build_model("tim4rec", NUM_ITEMS, TINY)).eval()
    rows = [[3, 4, 5, 6], [7, 8, 9, 10, 11]]
    mine = T0 + np.array([0, 60, 3600, 7200])
    before = scores(model, batch_of(rows, 6, [mine, T0 + np.arange(5) * 60]))
    after = scores(model, batch_of(rows, 6, [mine, T0 + np.array([0, 1, 86400, 86401, 10**7])]))
    torch.testing.assert_close(after[0], before[0], rtol=1e-6, atol=1e-6)
    assert rel_err(after[1], before[1]) > 1e-3  # float32 noise: ~1e-7


# (d) last-position training never sees its target -------------------------------------------------------------

def toy_train(num_users=30, length=9, seed=0):
    rng = np.random.default_rng(seed)
    items = rng.integers(1, NUM_ITEMS + 1, num_users * length)
    times = np.concatenate([T0 + np.cumsum(rng.integers(1, 10**5, length)) for _ in range(num_users)])
    return Jagged.from_lengths(np.full(num_users, length), items, times)


def test_training_batches_are_last_position_prefixes_without_their_target():
    model = build_model("tim4rec", NUM_ITEMS, {**TINY, "prefix_fraction": 0.5})
    train = toy_train()
    batches = model.train_batches(np.arange(len(train)), train, 16)
    assert isinstance(batches, LastPositionTrainBatches) and batches.fraction == 0.5
    for batch in batches.epoch(np.random.default_rng(0)):
        assert batch.items.shape[1] <= model.config.max_len
        assert (batch.targets[:, :-1] == 0).all() and (batch.targets[:, -1] != 0).all()
        for row in range(len(batch.items)):
            items, times = train.row(int(batch.user_idx[row]))
            n = int((batch.items[row] != 0).sum())
            # the input is exactly a prefix e_1..e_{c−1} (its times too) and the target is e_c
            c = next(c for c in range(1, len(items)) if np.array_equal(items[max(0, c - n):c], batch.items[row, -n:])
                     and np.array_equal(times[max(0, c - n):c], batch.times[row, -n:])
                     and items[c] == batch.targets[row, -1])
            assert c >= n


def test_the_loss_reads_only_the_last_column_and_the_state_never_depends_on_the_target():
    torch.manual_seed(0)
    model = liven_time_path(build_model("tim4rec", NUM_ITEMS, TINY)).train()  # dropout 0
    train = toy_train()
    batch = next(iter(model.train_batches(np.arange(len(train)), train, 8).epoch(np.random.default_rng(0))))
    seen = []

    class Spy:  # records the query states the loss receives
        needs_row_items = False

        def __call__(self, hidden, *args):
            seen.append(hidden.detach().clone())
            return loss_fn(hidden, *args)

    loss_fn, model.loss_fn = model.loss_fn, Spy()
    base = model.loss(batch)
    other = SequenceBatch(batch.items, batch.times, batch.targets.clone(), batch.user_idx)
    other.targets[:, -1] = other.targets[:, -1] % NUM_ITEMS + 1  # every target changed
    model.loss(other)
    torch.testing.assert_close(seen[1], seen[0], rtol=0, atol=0)
    # junk targets in earlier columns are never supervised
    junk = SequenceBatch(batch.items, batch.times, batch.targets.clone(), batch.user_idx)
    junk.targets[:, :-1] = 1
    torch.testing.assert_close(model.loss(junk), base, rtol=0, atol=0)
    # the trained state is the serving state: the same history through pad_histories gives the same query
    histories = [(row[row != 0].numpy(), t[row != 0].numpy()) for row, t in zip(batch.items, batch.times)]
    model.eval()
    with torch.no_grad():
        served = model.encode(pad_histories(histories, model.config.max_len))
    torch.testing.assert_close(served, seen[0], rtol=1e-5, atol=1e-6)


# (e) learning -------------------------------------------------------------------------------------------------
def time_pattern_batch(rng, n):
    """Random items; the next item is 1 after a short last gap (a minute) and 2 after a long one (a month): only the
    time path can tell them apart."""
    items = torch.from_numpy(rng.integers(3, NUM_ITEMS + 1, (n, 6)))
    gaps = rng.choice([60, 3600, 86400], (n, 6))
    long_last = rng.random(n) < 0.5
    gaps[:, -1] = np.where(long_last, 30 * 86400, 60)
    times = torch.from_numpy(T0 + np.cumsum(gaps, axis=1))
    targets = torch.zeros_like(items)
    targets[:, -1] = torch.from_numpy(np.where(long_last, 2, 1))
    return SequenceBatch(items, times, targets)


def train_on_time_pattern(model, max_steps, stop_at=None):
    """Adam steps on fresh time-pattern batches; returns the held-out accuracy between items 1 and 2, stopping
    early once it reaches ``stop_at`` (checked every 10 steps)."""
    rng = np.random.default_rng(0)
    test = time_pattern_batch(np.random.default_rng(99), 400)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    accuracy = 0.0
    for step in range(1, max_steps + 1):
        model.train()
        optimizer.zero_grad()
        model.loss(time_pattern_batch(rng, 32)).backward()
        optimizer.step()
        if step % 10 == 0 or step == max_steps:
            out = scores(model.eval(), test)[:, 1:3]
            accuracy = ((out.argmax(1) + 1) == test.targets[:, -1]).float().mean().item()
            if stop_at is not None and accuracy >= stop_at:
                break
    return accuracy


def test_learns_a_pattern_carried_only_by_the_time_gaps():
    """From the faithful init the time path's effect starts below float32 resolution, so the loss sits at the
    50/50 plateau until it escapes (60-150 steps over seeds 0-7); then the time gaps decide the item."""
    torch.manual_seed(0)
    model = build_model("tim4rec", NUM_ITEMS, TINY)
    assert train_on_time_pattern(model, max_steps=300, stop_at=0.95) >= 0.95  # chance: 0.5


def test_without_the_time_path_the_time_pattern_stays_at_chance():
    torch.manual_seed(0)
    model = build_model("tim4rec", NUM_ITEMS, {**TINY, "use_time": False})
    assert train_on_time_pattern(model, max_steps=100) <= 0.7  # items are random: nothing else carries the signal


# (f) registration and config ----------------------------------------------------------------------------------

def test_registration_and_config():
    assert MODELS["tim4rec"] is TiM4Rec
    model = build_model("tim4rec", NUM_ITEMS)
    c = model.config
    assert (c.hidden_size, c.num_layers, c.dropout, c.time_dropout, c.d_state, c.d_conv, c.expand, c.head_dim,
            c.chunk_size, c.norm_eps, c.p2p_residual, c.max_len, c.backend) == (
        64, 2, 0.4, 0.0, 32, 4, 2, 32, 32, 1e-5, True, 50, "auto")
    assert c.num_heads == 4 and model.item_embeddings().shape == (NUM_ITEMS + 1, 64)
    assert type(c).model_validate_json(c.model_dump_json()) == c
    assert set(TiM4Rec.train_defaults) <= set(TrainConfig.model_fields)
    with pytest.raises(ValidationError):
        build_model("tim4rec", NUM_ITEMS, {"hiden_size": 8})
    with pytest.raises(ValidationError):
        build_model("tim4rec", NUM_ITEMS, {"hidden_size": 24, "head_dim": 32})  # d_in 48 is not a multiple of 32
    with pytest.raises(ValueError, match="exceeds max_len"):
        build_model("tim4rec", NUM_ITEMS, TINY).encode(batch_of([list(range(1, 14))], 13))


def test_mamba2_specific_inits_and_no_weight_decay_markers():
    torch.manual_seed(0)
    block = build_model("tim4rec", NUM_ITEMS).layers[0].mixer
    A = torch.exp(block.A_log)
    assert ((A >= 1) & (A <= 16)).all()
    dt = torch.nn.functional.softplus(block.dt_bias)
    assert ((dt >= 1e-3 - 1e-6) & (dt <= 1e-1 + 1e-6)).all()
    assert torch.equal(block.D, torch.ones_like(block.D))
    assert all(getattr(p, "_no_weight_decay", False) for p in (block.A_log, block.dt_bias, block.D))
