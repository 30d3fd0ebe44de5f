"""``/api/atlases``: an atlas's layers, its channels as tiles (paged) and one channel's top-k."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Path

from jobs.results.query import run_summary
from services.api.bodies import (
    AtlasOut,
    Box,
    ChannelOut,
    ErrorOut,
    FeatureOut,
    LayerOut,
    Page,
    RunSummary,
    TileOut,
)
from services.api.catalog import Catalog
from services.api.deps import NAME_PATTERN, PageParams, catalog, image_url, page_params
from services.http.security import require_read_access
from services.http.settings import Settings

MAX_CHANNEL = 1_000_000
RunId = Path(pattern=NAME_PATTERN, description="Atlas run id.")
Layer = Path(pattern=NAME_PATTERN, description="Layer name, e.g. conv5.")
Channel = Path(ge=0, le=MAX_CHANNEL, description="Channel index.")
ERRORS = {404: {"model": ErrorOut}, 400: {"model": ErrorOut}}


def source_url(run_id: str, layer: str, channel: int, rank: int) -> str:
    return f"/api/atlases/{run_id}/layers/{layer}/channels/{channel}/sources/{rank}.png"


def router(settings: Settings) -> APIRouter:
    api = APIRouter(prefix="/api/atlases", tags=["atlases"], dependencies=[Depends(require_read_access)])
    page = page_params(settings)

    @api.get("/{run_id}", response_model=AtlasOut, summary="An atlas and its layers", responses=ERRORS)
    def atlas(run_id: str = RunId, cat: Catalog = Depends(catalog)) -> AtlasOut:
        reader = cat.reader(run_id)
        layers = [LayerOut(name=i.name, channels=i.channels, k=i.k, summary_url=image_url(i.summary_key))
                  for i in reader.layers()]
        return AtlasOut(summary=RunSummary(**run_summary(reader.manifest)), layers=layers)

    @api.get(
        "/{run_id}/layers/{layer}/channels",
        response_model=Page[TileOut],
        summary="A layer's channels as tiles (top activation and 3x3 grid images), paged",
        responses=ERRORS,
    )
    def tiles(
        run_id: str = RunId,
        layer: str = Layer,
        params: PageParams = Depends(page),
        cat: Catalog = Depends(catalog),
    ) -> Page[TileOut]:
        reader = cat.reader(run_id)
        total = reader.layer(layer).channels
        rows = reader.tiles(layer, params.offset, params.limit).to_pylist()
        items = [
            TileOut(channel=r["channel"], top_activation=r["activation"], dead=r["activation"] <= 0,
                    image_id=r["image_id"], label=r["label"],
                    projection_grid_url=image_url(r["projection_grid_key"]),
                    patch_grid_url=image_url(r["patch_grid_key"]))
            for r in rows
        ]
        return params.page(items, total)

    @api.get(
        "/{run_id}/layers/{layer}/channels/{channel}",
        response_model=ChannelOut,
        summary="One channel's top-k activations with their images and receptive boxes",
        responses=ERRORS,
    )
    def channel(
        run_id: str = RunId, layer: str = Layer, channel: int = Channel, cat: Catalog = Depends(catalog)
    ) -> ChannelOut:
        rows = cat.reader(run_id).channel(layer, channel).to_pylist()
        features = [
            FeatureOut(
                rank=r["rank"], activation=r["activation"], image_id=r["image_id"],
                image_index=r["image_index"], label=r["label"], y=r["y"], x=r["x"],
                box=Box(top=r["box_top"], left=r["box_left"], height=r["box_height"], width=r["box_width"]),
                patch_url=image_url(r["patch_key"]), projection_url=image_url(r["projection_key"]),
                source_url=source_url(run_id, layer, channel, r["rank"]),
            )
            for r in rows
        ]
        return ChannelOut(
            run_id=run_id, layer=layer, channel=channel, features=features,
            projection_grid_url=image_url(rows[0]["projection_grid_key"]),
            patch_grid_url=image_url(rows[0]["patch_grid_key"]),
        )

    return api
