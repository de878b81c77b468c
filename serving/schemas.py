"""Request and response bodies of the ``/v1`` API (they are the OpenAPI schema). Limits are part of the contract:
anything outside them is answered 422 with the offending field named."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

ItemId = Annotated[str, StringConstraints(min_length=1, max_length=256)] | Annotated[int, Field(ge=-(2**63), lt=2**63)]
Timestamp = Annotated[int, Field(ge=-(2**62), le=2**62)]
ModelName = Annotated[str, StringConstraints(min_length=1, max_length=100)]
MAX_LIST = 10_000


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"history": ["B00004TMFE", "B0000536H1"], "k": 10, "exclude_seen": True}]})

    history: list[ItemId] = Field(default_factory=list, max_length=MAX_LIST,
                                  description="external item ids, oldest first; only the model's most recent "
                                              "max_len known items are used")
    timestamps: list[Timestamp] | None = Field(None, max_length=MAX_LIST,
                                               description="unix seconds, one per history item (time-aware models)")
    k: int = Field(10, ge=1, le=1000)
    exclude_seen: bool = True
    exclude: list[ItemId] = Field(default_factory=list, max_length=MAX_LIST)
    model: ModelName | None = Field(None, description="a served model's name; default: the first one")

    @model_validator(mode="after")
    def _timestamps_match_history(self):
        if self.timestamps is not None and len(self.timestamps) != len(self.history):
            raise ValueError(f"timestamps has {len(self.timestamps)} entries for {len(self.history)} history items")
        return self


class ScoredItem(BaseModel):
    item_id: str
    score: float
    title: str | None = None


class RecommendResponse(BaseModel):
    model: str
    version: str
    items: list[ScoredItem]
    unknown_items: list[str]
    fallback: Literal["popularity"] | None = None


class BatchRecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    requests: list[RecommendRequest] = Field(min_length=1, max_length=256)


class BatchRecommendResponse(BaseModel):
    results: list[RecommendResponse]


class SimilarResponse(BaseModel):
    model: str
    version: str
    item_id: str
    items: list[ScoredItem]


class ItemResponse(BaseModel):
    model: str
    item_id: str
    title: str | None = None
    popularity: float


class ModelsResponse(BaseModel):
    default: str
    models: list[dict]


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: ModelName | None = Field(None, description="which served model to reload; default: the first one")
    source: Annotated[str, StringConstraints(min_length=1, max_length=4096)] | None = Field(
        None, description="a bundle directory under the allowed roots or a models:/ URI; default: the model's own "
                          "source again (an alias URI then picks up the version the alias points at now)")


class ReloadResponse(BaseModel):
    model: str
    previous_version: str | None
    version: str
    source: str
