"""Response and request bodies of the HTTP API (they are what the OpenAPI document shows)."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from pydantic import BaseModel, Field

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    """One page of a longer list: ``items[i]`` is item ``offset + i`` of ``total``."""

    items: list[T]
    total: int
    offset: int
    limit: int
    next_offset: int | None = Field(None, description="Offset of the next page; null on the last page.")


class RunSummary(BaseModel):
    kind: str
    run_id: str
    name: str | None = None
    committed_at: str
    model_arch: str | None = None
    model_checkpoint: str | None = None
    model_fingerprint: str | None = None
    dataset_format: str | None = None
    dataset_fingerprint: str | None = None
    images: int | None = None
    layers: list[str] | None = None
    k: int | None = None
    files: int = Field(0, description="Files in the run (besides manifest.json).")


class RunDetail(BaseModel):
    summary: RunSummary
    manifest: dict[str, Any] = Field(description="The committed manifest, without its `files` list.")


class LayerOut(BaseModel):
    name: str
    channels: int
    k: int
    summary_url: str | None = Field(None, description="PNG with every channel's top-1 projection.")


class AtlasOut(BaseModel):
    summary: RunSummary
    layers: list[LayerOut]
    class_names: list[str] | None = Field(
        None, description="The dataset's classes: label n is class_names[n]. Null for atlases that "
        "did not record them (their labels are numbers only)."
    )
    dataset_uri: str | None = Field(None, description="Where the images came from (null: procedural).")


class SelectivityFields(BaseModel):
    """How much a channel prefers one class, from its top-k rows (labels of -1, unknown, not counted)."""

    top_label: int | None = Field(None, description="The most frequent label of its top-k images.")
    top_label_name: str | None = Field(None, description="Its class name, where the atlas knows it.")
    selectivity: float | None = Field(
        None, ge=0, le=1, description="Share of the top-k images with a known label that have "
        "top_label; null for a dead channel or one with no known label."
    )


class TileOut(SelectivityFields):
    """What the viewer shows for a channel before it is opened (its strongest activation)."""

    channel: int
    top_activation: float
    dead: bool = Field(description="True when the channel never activates (top activation <= 0).")
    image_id: str
    label: int = Field(description="The top image's label (-1: unknown).")
    label_name: str | None = Field(None, description="Its class name; null when unknown.")
    projection_grid_url: str | None
    patch_grid_url: str | None


class Box(BaseModel):
    top: int
    left: int
    height: int
    width: int


class FeatureOut(BaseModel):
    rank: int
    activation: float
    image_id: str
    image_index: int
    label: int = Field(description="The image's label (-1: unknown).")
    label_name: str | None = Field(None, description="Its class name; null when unknown.")
    y: int
    x: int
    box: Box = Field(description="Receptive field in the model's input pixels (image_size square).")
    patch_url: str | None
    projection_url: str | None
    source_url: str = Field(
        description="The whole input image re-read from the dataset, with the box drawn (PNG)."
    )


class ChannelOut(SelectivityFields):
    run_id: str
    layer: str
    channel: int
    dead: bool = Field(False, description="The channel never fired: its one row has no images.")
    projection_grid_url: str | None
    patch_grid_url: str | None
    features: list[FeatureOut]


class DiffRowOut(BaseModel):
    rank: int
    layer: str
    channel: int
    status: str = Field(description="died | born | alive | dead")
    shared_topk: int
    k: int
    top_activation_a: float
    top_activation_b: float
    delta_activation: float
    relative_change: float | None
    top_image_a: str | None
    top_image_b: str | None
    projection_grid_url_a: str | None
    projection_grid_url_b: str | None
    patch_grid_url_a: str | None
    patch_grid_url_b: str | None


class DiffOut(BaseModel):
    run_a: str
    run_b: str
    layers: list[str]
    counts: dict[str, int] = Field(description="Channels per status over the whole diff (before filters).")
    warnings: list[str]
    page: Page[DiffRowOut]


class DiffRequest(BaseModel):
    """Write the diff of two atlases into the store as Parquet (``DIFF_SCHEMA``)."""

    model_config = {"extra": "forbid"}

    run_a: str = Field(max_length=128)
    run_b: str = Field(max_length=128)
    layers: list[str] | None = Field(None, max_length=64)
    name: str | None = Field(
        None,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="File name under diffs/ (default: <run_a>--<run_b>.parquet).",
    )


class DiffWritten(BaseModel):
    key: str = Field(description="Store key of the Parquet file.")
    uri: str
    rows: int
    counts: dict[str, int]


class ErrorOut(BaseModel):
    detail: str
