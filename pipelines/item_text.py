"""Item text from the item table the readers write: one "Label: value. Label: value" string per item, in item_idx
order, from the template of the dataset's family (Amazon: title, brand, categories, price; MovieLens: title and
genres; anything else: the title). Text encoders (recsys.text) embed these strings for semantic ids and SLMRec."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

# values a reader writes for "no value": they carry no content, so they never reach the text
MISSING_MARKERS = {"", "unknown", "nan", "none", "null"}


def _clean(value) -> str:
    return str(value).strip()


# (column, label, how the value is written), in the order they appear in the text
TEMPLATES = {
    "amazon": (("title", "Title", _clean), ("brand", "Brand", _clean), ("categories", "Categories", _clean),
               ("price", "Price", lambda v: f"${float(v):.2f}")),
    "movielens": (("title", "Title", _clean), ("genres", "Genres", lambda v: str(v).replace("|", ", ").strip())),
    "generic": (("title", "Title", _clean),),
}


def _present(value) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return str(value).strip().lower() not in MISSING_MARKERS


def dataset_family(items: pd.DataFrame) -> str:
    """"movielens" when the item table has genres, "amazon" when it has brand or categories, else "generic"."""
    if "genres" in items.columns:
        return "movielens"
    if "brand" in items.columns or "categories" in items.columns:
        return "amazon"
    return "generic"


def item_text(row: dict, family: str) -> str:
    """The text of one item row (a dict of its columns) by its family's template; "" when no field is present."""
    return ". ".join(f"{label}: {write(row[column])}" for column, label, write in TEMPLATES[family]
                     if _present(row.get(column)))


def item_texts(items: pd.DataFrame, num_items: int | None = None) -> list[str]:
    """One text per item, in item_idx order 1..V (row i is item i + 1), from the family's template. An item
    without any text field is named by its external id when the table has one, else gets "" (which still gets an
    embedding: the encoder sees only its special tokens)."""
    if "item_idx" not in items.columns:
        raise ValueError("items table needs an item_idx column")
    items = items.sort_values("item_idx")
    idx = items["item_idx"].to_numpy()
    expected = np.arange(1, len(items) + 1)
    if len(idx) != (num_items if num_items is not None else len(idx)) or not np.array_equal(idx, expected):
        raise ValueError(f"items table must hold item_idx 1..{num_items or len(items)} exactly once each")
    family = dataset_family(items)
    texts = [item_text(row, family) for row in items.to_dict("records")]
    if "item_id" in items.columns:
        # an item with no text at all is named by its external id: content-free, but distinct, so a text-less
        # catalogue does not collapse onto one embedding (and one giant semantic-id collision group)
        ids = items["item_id"].astype(str).tolist()
        texts = [text or f"Item {item_id}" for text, item_id in zip(texts, ids)]
    return texts
