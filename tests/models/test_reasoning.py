"""ReaRec (recsys/reasoning.py) on SASRec and Mamba4Rec: the reasoning chain, its inference step count, prefix
training, and the ERL and PRL loss objects (recsys/losses.py) against direct computations."""

import pytest
import torch
import torch.nn.functional as F

from recsys.losses import EnsembleReasoning, ProgressiveReasoning
from recsys.models import build_model
from recsys.supervision import LastPosition
from tests.helpers import left_padded_batch

NUM_ITEMS = 20
TINY = {"hidden_size": 16, "max_len": 12}
ROWS = [[3, 4, 5, 6], [7, 8], [9]]


@pytest.mark.parametrize("name", ["sasrec", "mamba4rec"])
def test_the_chain_starts_at_the_plain_state_and_inference_steps_choose_its_length(name):
    torch.manual_seed(0)
    model = build_model(name, NUM_ITEMS, {**TINY, "reasoning_steps": 3, "reasoning": "prl"}).eval()
    assert isinstance(model.supervision, LastPosition)
    batch = left_padded_batch(ROWS, 4)
    with torch.no_grad():
        states = model.reasoning_states(batch, 3)
        assert states.shape == (3, 4, 16)
        torch.testing.assert_close(states[:, 0], model.sequence_states(batch)[:, -1])
        torch.testing.assert_close(model.encode(batch), states[:, -1])  # PRL: the last step
        fewer = build_model(name, NUM_ITEMS, {**model.config.model_dump(), "inference_steps": 1}).eval()
        fewer.load_state_dict(model.state_dict())
        torch.testing.assert_close(fewer.encode(batch), states[:, 1])
        erl = build_model(name, NUM_ITEMS, {**model.config.model_dump(), "reasoning": "erl"}).eval()
        erl.load_state_dict(model.state_dict())
        torch.testing.assert_close(erl.encode(batch), states.mean(1))  # ERL: the mean of the steps


def test_inference_steps_beyond_the_trained_ones_are_refused():
    with pytest.raises(ValueError, match="exceeds the 2 reasoning steps"):
        build_model("sasrec", NUM_ITEMS, {**TINY, "reasoning_steps": 2, "inference_steps": 3})


def test_no_reasoning_adds_no_parameter():
    torch.manual_seed(0)
    plain = build_model("sasrec", NUM_ITEMS, TINY)
    assert not any("reasoning" in name for name, _ in plain.named_parameters())
    assert sum(p.numel() for p in build_model("sasrec", NUM_ITEMS, {**TINY, "reasoning_steps": 2}).parameters()) \
        == plain.num_parameters() + 2 * 16


def test_erl_is_cross_entropy_of_the_mean_minus_the_pairwise_kl():
    torch.manual_seed(1)
    states, table, targets = torch.randn(5, 3, 8), torch.randn(11, 8), torch.randint(1, 11, (5,))
    ce = F.cross_entropy(states.mean(1) @ table[1:].T, targets - 1)
    torch.testing.assert_close(EnsembleReasoning(1.0, 0.0)(states, targets, table), ce)
    p = (states @ table[1:].T).softmax(-1)
    kl = [(p[:, j] * (p[:, j].log() - p[:, i].log())).sum(-1).mean() for i in range(3) for j in range(3) if i != j]
    torch.testing.assert_close(EnsembleReasoning(1.0, 0.5)(states, targets, table), ce - 0.5 * torch.stack(kl).mean())
    same = states[:, :1].expand(5, 3, 8)  # identical steps: no diversity to reward
    torch.testing.assert_close(EnsembleReasoning(1.0, 0.5)(same, targets, table),
                               F.cross_entropy(same[:, 0] @ table[1:].T, targets - 1))


def test_prl_anneals_the_temperature_and_contrasts_two_views():
    torch.manual_seed(2)
    states, table, targets = torch.randn(6, 3, 8), torch.randn(11, 8), torch.randint(1, 11, (6,))
    loss = ProgressiveReasoning(0.5, 4.0, 0.0)(states, targets, table)
    logits = states @ table[1:].T
    expected = F.cross_entropy(logits[:, 2] / 0.5, targets - 1) + F.cross_entropy(
        torch.cat([logits[:, 0] / (0.5 * 16), logits[:, 1] / (0.5 * 4)]), torch.cat([targets - 1] * 2))
    torch.testing.assert_close(loss, expected)  # the mean over both earlier steps, each at its temperature
    contrast = ProgressiveReasoning(0.5, 4.0, 1.0)
    matched = contrast(states, targets, table, states + 0.01 * torch.randn_like(states)) - loss
    shuffled = contrast(states, targets, table, states[torch.randperm(6)]) - loss
    assert matched < shuffled
