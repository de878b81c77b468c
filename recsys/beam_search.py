"""Constrained beam search over semantic ids (TIGER, Rajput et al. 2023, §3.2 "Generative retrieval";
model-specs §7 "Inference").

Decoding emits one code per level. A prefix trie of the catalogue's code tuples says which codes may follow a
prefix; all others get logit −∞ before the log-softmax, so every finished beam is a real item. A beam's score is
Σ_d log p(c_d | history, c_<d); the final beams, best first, are the ranking.

The trie is stored level by level as dense tables rather than as nodes: the prefixes of length d get integer keys
(mixed radix over the level sizes), sorted, and an (n_prefixes_d, K_d) boolean table marks their children. A
lookup is a ``searchsorted``, so a whole beam batch is checked at once.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


class PrefixTrie:
    """Valid code prefixes of the items ``item_ids`` whose code tuples are the rows of ``codes`` (N, L)."""

    def __init__(self, codes: torch.Tensor, sizes: Sequence[int], item_ids: torch.Tensor):
        codes = codes.long().cpu()
        if codes.ndim != 2 or codes.shape[1] != len(sizes):
            raise ValueError(f"codes of shape {tuple(codes.shape)} do not match {len(sizes)} levels")
        if len(codes) == 0:
            raise ValueError("a trie needs at least one item")
        bounds = torch.tensor(list(sizes))
        if (codes < 0).any() or (codes >= bounds).any():
            raise ValueError("a code lies outside its level's codebook")
        self.sizes = [int(s) for s in sizes]
        self.levels = len(sizes)
        self.prefix_keys: list[torch.Tensor] = []
        self.children: list[torch.Tensor] = []
        for d in range(self.levels):
            keys, inverse = torch.unique(self.key(codes[:, :d]), return_inverse=True)
            allowed = torch.zeros(len(keys), self.sizes[d], dtype=torch.bool)
            allowed[inverse, codes[:, d]] = True
            self.prefix_keys.append(keys)
            self.children.append(allowed)
        full = self.key(codes)
        order = torch.argsort(full)
        self.full_keys = full[order]
        if (self.full_keys[1:] == self.full_keys[:-1]).any():
            raise ValueError("two items share a code tuple; resolve collisions first")
        self.item_ids = item_ids.long().cpu()[order]

    def __len__(self) -> int:
        return len(self.full_keys)

    def key(self, prefix: torch.Tensor) -> torch.Tensor:
        key = torch.zeros(prefix.shape[0], dtype=torch.long, device=prefix.device)
        for d in range(prefix.shape[1]):
            key = key * self.sizes[d] + prefix[:, d]
        return key

    def _lookup(self, table: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.searchsorted(table, keys).clamp_max(len(table) - 1)
        return pos, table[pos] == keys

    def allowed_next(self, prefix: torch.Tensor) -> torch.Tensor:
        """(R, K_d) mask of the codes that extend each prefix (R, d) towards some item; all False off the trie."""
        d = prefix.shape[1]
        keys = self.key(prefix.cpu())
        pos, found = self._lookup(self.prefix_keys[d], keys)
        return (self.children[d][pos] & found[:, None]).to(prefix.device)

    def items_of(self, codes: torch.Tensor) -> torch.Tensor:
        """Item id of each full code tuple (R, L); 0 where the tuple is no item."""
        pos, found = self._lookup(self.full_keys, self.key(codes.cpu()))
        return torch.where(found, self.item_ids[pos], 0).to(codes.device)


StepLogits = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def beams_side_by_side_mask(width: int, t: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(W·t, W·t) attention mask for ``width`` beams of ``t`` tokens laid end to end in one row: a token sees its
    own beam's tokens up to itself (causal, block-diagonal), so the beams decode together as if each were alone."""
    pos = torch.arange(width * t, device=device)
    return ((pos[:, None] // t) == (pos[None, :] // t)) & (pos[None, :] <= pos[:, None])


@torch.no_grad()
def constrained_beam_search(step_logits: StepLogits, trie: PrefixTrie, batch_size: int, beam_width: int,
                            device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search over the trie's levels. ``step_logits(prefix (R, d), row (R,))`` gives the next-code logits
    (R, K_d) of each beam; ``row`` says which query the beam belongs to.

    Returns item ids (B, W) and scores Σ log p (B, W), best first, with W = min(beam_width, len(trie)): while
    fewer than ``beam_width`` prefixes exist every one is kept, and each kept prefix extends to at least one item,
    so all W final beams are items.
    """
    if beam_width < 1:
        raise ValueError(f"beam_width must be ≥ 1, got {beam_width}")
    prefixes = torch.zeros(batch_size, 1, 0, dtype=torch.long, device=device)
    scores = torch.zeros(batch_size, 1, device=device)
    for d in range(trie.levels):
        width = prefixes.shape[1]
        flat = prefixes.reshape(batch_size * width, d)
        rows = torch.arange(batch_size, device=device).repeat_interleave(width)
        logits = step_logits(flat, rows).float()
        allowed = trie.allowed_next(flat)
        if logits.shape != allowed.shape:
            raise ValueError(f"step_logits gave shape {tuple(logits.shape)}, expected {tuple(allowed.shape)}")
        log_p = torch.log_softmax(logits.masked_fill(~allowed, -torch.inf), dim=-1)
        # a beam with no valid continuation (only when fewer prefixes than beams exist) stays at −∞, never NaN
        log_p = torch.where(allowed, log_p, -torch.inf)
        candidates = (scores.reshape(-1, 1) + log_p).reshape(batch_size, width * trie.sizes[d])
        scores, index = candidates.topk(min(beam_width, candidates.shape[1]), dim=1)
        parent, code = index // trie.sizes[d], index % trie.sizes[d]
        prefixes = torch.cat([prefixes.gather(1, parent[..., None].expand(-1, -1, d)), code[..., None]], 2)
    keep = min(beam_width, len(trie))
    prefixes, scores = prefixes[:, :keep], scores[:, :keep]
    items = trie.items_of(prefixes.reshape(-1, trie.levels)).reshape(batch_size, keep)
    return items, scores
