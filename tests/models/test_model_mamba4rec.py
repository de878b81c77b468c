"""Mamba4Rec and its Mamba-1 block (recsys/models/mamba4rec.py): the torch scan path against the reference loop
(outputs and gradients), left padding as an exact no-op, causality, the Mamba inits, registration, and learning a
trivially predictable pattern. Error metric: rel_err = max|x − ref| / max|ref|."""

import math

import numpy as np
import torch
import torch.nn.functional as F

import recsys.models.mamba4rec  # noqa: F401  (registers "mamba4rec")
from pipelines.jagged import Jagged
from recsys.batching import CausalTrainBatches
from recsys.models.base import MODELS, build_model
from recsys.models.mamba4rec import Mamba4Rec
from recsys.nn import MambaBlock
from tests.helpers import left_padded_batch, rel_err

NUM_ITEMS = 20
TINY = {"hidden_size": 16, "max_len": 12, "d_state": 8}


def test_mamba_block_torch_matches_reference_with_gradients():
    torch.manual_seed(0)
    fast = MambaBlock(8, d_state=4, backend="torch")
    ref = MambaBlock(8, d_state=4, backend="reference")
    ref.load_state_dict(fast.state_dict())
    u = torch.randn(3, 9, 8)
    pad_mask = torch.arange(9)[None, :] >= torch.tensor([[0], [4], [8]])  # lengths 9, 5, 1 (left-padded)
    weights = torch.randn(3, 9, 8)
    outs = []
    for block in (fast, ref):
        x = u.clone().requires_grad_()
        y = block(x, pad_mask)
        (y * weights).sum().backward()
        outs.append((y.detach(), x.grad, {k: p.grad for k, p in block.named_parameters()}))
    (y, gx, grads), (y_ref, gx_ref, grads_ref) = outs
    assert rel_err(y, y_ref) <= 1e-4
    assert rel_err(gx, gx_ref) <= 1e-4
    for k, g in grads_ref.items():
        assert rel_err(grads[k], g) <= 1e-4, k
def test_pads_are_an_exact_no_op_in_the_block_whatever_their_values():
    torch.manual_seed(0)
    block = MambaBlock(8, d_state=4, backend="torch")
    u = torch.randn(1, 5, 8)
    garbage = torch.randn(1, 3, 8) * 100
    wide = torch.cat([garbage, u], dim=1)
    pad_mask = torch.arange(8)[None, :] >= 3
    with torch.no_grad():
        y_tight = block(u, torch.ones(1, 5, dtype=torch.bool))
        y_wide = block(wide, pad_mask)
    assert torch.equal(y_wide[:, :3], torch.zeros(1, 3, 8))
    torch.testing.assert_close(y_wide[:, 3:], y_tight, rtol=1e-5, atol=1e-6)


def test_mamba4rec_is_causal():
    """Every position's state ignores later items, so training on every position cannot see its target."""
    torch.manual_seed(0)
    model = build_model("mamba4rec", NUM_ITEMS, TINY).eval()
    a = left_padded_batch([[3, 4, 5, 6, 7]], 5)
    b = left_padded_batch([[3, 4, 5, 12, 13]], 5)
    with torch.no_grad():
        sa, sb = model.sequence_states(a), model.sequence_states(b)
    torch.testing.assert_close(sa[:, :3], sb[:, :3])
    assert not torch.allclose(sa[:, 3:], sb[:, 3:])


def test_mamba_inits():
    torch.manual_seed(0)
    model = build_model("mamba4rec", NUM_ITEMS, {"hidden_size": 40})
    block = model.layers[0].mixer
    assert block.dt_rank == math.ceil(40 / 16) == 3 and block.d_inner == 80 and block.d_state == 32
    dt = F.softplus(block.dt_proj.bias.detach())
    assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 1e-1 * (1 + 1e-4)
    assert block.dt_proj.weight.abs().max() <= 3 ** -0.5
    assert torch.allclose(-torch.exp(block.A_log), -torch.arange(1.0, 33.0).expand(80, 32))
    assert torch.equal(block.D.detach(), torch.ones(80))
    assert all(getattr(p, "_no_weight_decay", False) for p in (block.A_log, block.D, block.dt_proj.bias))
    # N(0, 0.02) on the other Linear / Embedding weights, padding row zero
    assert abs(model.item_embedding.weight[1:].std().item() - 0.02) < 0.004
    assert torch.equal(model.item_embedding.weight[0].detach(), torch.zeros(40))
    assert abs(block.in_proj.weight.std().item() - 0.02) < 0.004


def test_registration_and_defaults():
    assert MODELS["mamba4rec"] is Mamba4Rec
    model = build_model("mamba4rec", NUM_ITEMS)
    c = model.config
    assert (c.hidden_size, c.num_layers, c.d_state, c.d_conv, c.expand, c.dropout, c.max_len, c.backend) == (
        64, 1, 32, 4, 2, 0.2, 50, "auto")
    assert model.item_embeddings().shape == (NUM_ITEMS + 1, 64)
    assert isinstance(model.train_batches(np.arange(2), Jagged.from_lengths(
        np.array([3, 2]), np.array([1, 2, 3, 4, 5]), np.arange(5)), 8), CausalTrainBatches)

