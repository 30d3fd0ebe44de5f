"""``/api/atlases``: an atlas's layers, its channels as tiles (paged) and one channel's top-k."""

from __future__ import annotations

from urllib.parse import quote

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


def channel_base(run_id: str, layer: str, channel: int) -> str:
    return f"/api/atlases/{quote(run_id)}/layers/{quote(layer)}/channels/{channel}"


def source_url(run_id: str, layer: str, channel: int, rank: int) -> str:
    return f"{channel_base(run_id, layer, channel)}/sources/{rank}.png"


def grid_url(run_id: str, layer: str, channel: int, kind: str, dead: bool = False) -> str | None:
    """The PNG of a channel's 3x3 grid (``kind`` patch or projection); None for a dead channel."""
    return None if dead else f"{channel_base(run_id, layer, channel)}/grids/{kind}.png"


def item_url(run_id: str, layer: str, channel: int, rank: int, kind: str) -> str:
    return f"{channel_base(run_id, layer, channel)}/images/{rank}/{kind}.png"


def is_dead(row: dict) -> bool:
    """A channel that never fired (format 1 atlases have no ``dead`` column: its activation says)."""
    return bool(row["dead"]) if "dead" in row else not row["activation"] > 0


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
            TileOut(channel=r["channel"], top_activation=r["activation"], dead=is_dead(r),
                    image_id=r["image_id"], label=r["label"],
                    projection_grid_url=grid_url(run_id, layer, r["channel"], "projection", is_dead(r)),
                    patch_grid_url=grid_url(run_id, layer, r["channel"], "patch", is_dead(r)))
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
        dead = is_dead(rows[0])
        features = [
            FeatureOut(
                rank=r["rank"], activation=r["activation"], image_id=r["image_id"],
                image_index=r["image_index"], label=r["label"], y=r["y"], x=r["x"],
                box=Box(top=r["box_top"], left=r["box_left"], height=r["box_height"], width=r["box_width"]),
                patch_url=None if dead else item_url(run_id, layer, channel, r["rank"], "patch"),
                projection_url=None if dead else item_url(run_id, layer, channel, r["rank"], "projection"),
                source_url=source_url(run_id, layer, channel, r["rank"]),
            )
            for r in rows
        ]
        return ChannelOut(
            run_id=run_id, layer=layer, channel=channel, dead=dead, features=features,
            projection_grid_url=grid_url(run_id, layer, channel, "projection", dead),
            patch_grid_url=grid_url(run_id, layer, channel, "patch", dead),
        )

    return api
