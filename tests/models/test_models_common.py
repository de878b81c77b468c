"""Properties every model of the registry must have: pads never change a score, the model-contract shapes hold, a
few epochs on a trivially predictable pattern learn it (well above chance), its config round-trips and a bundle
restores its scores exactly."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

import recsys.models  # noqa: F401  (registers every built-in model)
from pipelines.jagged import Jagged
from recsys.bundle import load_bundle, save_bundle
from recsys.models.base import MODELS, build_model
from tests.helpers import left_padded_batch, rel_err

NUM_ITEMS = 20
TINY = {"hidden_size": 16, "max_len": 12}
# Cloze training supervises only the masked positions and must learn, through attention, to read the neighbouring
# item: BERT4Rec needs more passes than the causal models (model-specs §2, "under-training").
LEARNING_EPOCHS = {"bert4rec": 40}


def trainable_models():
    """Score-based trainable models: these properties are about ``encode``/``item_embeddings``. Generative models
    (``generative = True``, e.g. tiger) have neither; tests/models/test_model_tiger.py covers the same properties
    for them."""
    return sorted(name for name, cls in MODELS.items() if cls.trainable and not cls.generative)


@pytest.mark.parametrize("name", [n for n in trainable_models() if "backend" in MODELS[n].Config.model_fields])
def test_kernel_backends_give_the_reference_outputs_and_gradients(name):
    """Models on the sequence kernels train on the ``torch`` path: with the same weights it must give the plain
    recurrence's (``reference``) scores and loss gradients, fp32 to 1e-4 (issue 4)."""
    torch.manual_seed(0)
    fast = build_model(name, NUM_ITEMS, {**TINY, "num_layers": 2, "backend": "torch"}).eval()
    ref = build_model(name, NUM_ITEMS, {**TINY, "num_layers": 2, "backend": "reference"}).eval()
    ref.load_state_dict(fast.state_dict())
    rows = [[3, 4, 5, 6, 7, 8, 9], [9, 2, 1], [11, 12]]
    train = Jagged.from_lengths(np.array([len(r) for r in rows]), np.concatenate(rows), np.arange(12) * 3600)
    batch = next(iter(fast.train_batches(np.arange(3), train, 8).epoch(np.random.default_rng(0))))
    assert rel_err(fast.encode(batch), ref.encode(batch)) <= 1e-4
    grads = []
    for model in (fast, ref):
        model.zero_grad()
        model.loss(batch).backward()
        grads.append({k: p.grad for k, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(k.endswith("A_log") for k in grads[0])
    for k, g in grads[1].items():
        assert rel_err(grads[0][k], g) <= 1e-4, k


# model variants whose padding handling differs from the defaults
VARIANTS = {"sigma": [{"gate_variant": "symmetric"}], "gru4rec": [{"output_projection": False}],
            "sasrec": [{"layer": "ligr"}, {"reasoning_steps": 2}], "mamba4rec": [{"reasoning_steps": 2,
                                                                                  "reasoning": "prl"}]}


@pytest.mark.parametrize("name,extra", [(n, e) for n in trainable_models() for e in [{}, *VARIANTS.get(n, [])]])
def test_padding_never_changes_a_score(name, extra):
    torch.manual_seed(0)
    layers = {"num_layers": 2} if "num_layers" in MODELS[name].Config.model_fields else {}
    model = build_model(name, NUM_ITEMS, {**TINY, **layers, **extra}).eval()
    with torch.no_grad():  # trained LayerNorms have biases, so a pad's normalised embedding is not zero: make it so
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm) and module.bias is not None:
                module.bias.normal_()
    rows = [[3, 4, 5, 6], [7, 8], [9]]
    with torch.no_grad():
        tight = model.encode(left_padded_batch(rows, 4)) @ model.item_embeddings().T
        wide = model.encode(left_padded_batch(rows, 12)) @ model.item_embeddings().T
        alone = model.encode(left_padded_batch(rows[1:2], 2)) @ model.item_embeddings().T
    assert tight.shape == (3, NUM_ITEMS + 1)
    torch.testing.assert_close(wide, tight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(alone[0], tight[1], rtol=1e-4, atol=1e-5)


OPTIONS = [("sasrec", {"reasoning_steps": 2}), ("sasrec", {"reasoning_steps": 2, "reasoning": "prl"}),
           ("mamba4rec", {"reasoning_steps": 2, "reasoning": "prl"}), ("mamba4rec", {"reasoning_steps": 2}),
           ("sasrec", {"intent_coarse_weight": 0.3, "intent_fine_weight": 0.1, "intents": 8}),
           ("gru4rec", {"intent_coarse_weight": 0.3, "intent_fine_weight": 0.1, "intents": 8})]


@pytest.mark.parametrize("name,extra", [(n, {}) for n in trainable_models()] + OPTIONS)
def test_learns_a_successor_pattern(name, extra):
    """Item i is always followed by i+1 (cyclically): after a few epochs the next item is ranked first."""
    rng = np.random.default_rng(0)
    rows = [(np.arange(start, start + 8) % NUM_ITEMS) + 1 for start in rng.integers(0, NUM_ITEMS, 200)]
    train = Jagged.from_lengths(np.full(len(rows), 8), np.concatenate(rows), np.tile(np.arange(8) * 60, len(rows)))
    torch.manual_seed(0)
    model = build_model(name, NUM_ITEMS, {**TINY, "dropout": 0.0, **extra}
                        if "dropout" in MODELS[name].Config.model_fields else TINY)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.prepare_training(train)  # as Trainer.fit does
    batches = model.train_batches(np.arange(len(rows)), train, 64)
    for epoch in range(LEARNING_EPOCHS.get(name, 12)):
        model.start_epoch(epoch)
        model.train()
        for batch in batches.epoch(np.random.default_rng(epoch)):
            optimizer.zero_grad()
            model.loss(batch).backward()
            optimizer.step()
    model.eval()
    histories = [[(s + j) % NUM_ITEMS + 1 for j in range(5)] for s in range(NUM_ITEMS)]
    with torch.no_grad():
        scores = model.encode(left_padded_batch(histories, 5)) @ model.item_embeddings().T
    scores[:, 0] = -torch.inf
    expected = torch.tensor([(s + 5) % NUM_ITEMS + 1 for s in range(NUM_ITEMS)])
    assert (scores.argmax(1) == expected).float().mean() >= 0.6  # chance: 0.05


@pytest.mark.parametrize("name", sorted(MODELS))
def test_config_round_trips_through_json(name):
    """Every registered model's config (defaults and a changed field) survives model_dump → JSON → Config, which
    is how bundles, MLflow params and resumed runs read it back."""
    cls = MODELS[name].Config
    for config in (cls(), cls(max_len=7)):
        restored = cls(**json.loads(json.dumps(config.model_dump(mode="json"))))
        assert restored == config
    with pytest.raises(ValueError):
        cls(not_a_setting=1)  # a typo never passes silently


@pytest.mark.parametrize("name", trainable_models())
def test_a_bundle_restores_the_same_scores(name, tmp_path):
    torch.manual_seed(0)
    model = build_model(name, NUM_ITEMS, TINY).eval()
    items = pd.DataFrame({"item_idx": np.arange(1, NUM_ITEMS + 1), "item_id": [f"i{i}" for i in range(NUM_ITEMS)]})
    loaded = load_bundle(save_bundle(tmp_path / name, model, {}, items, {})).model
    assert type(loaded) is type(model) and loaded.config == model.config
    batch = left_padded_batch([[3, 4, 5, 6], [7, 8], [9]], 4)
    with torch.no_grad():
        a, b = loaded.recommend(batch, 5), model.recommend(batch, 5)
    assert torch.equal(a.items, b.items) and torch.equal(a.scores, b.scores)
