"""Images: PNGs of committed runs streamed from the store, and source images with their receptive
box drawn, re-read from the dataset the atlas was built on."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Literal

import pyarrow as pa
from fastapi import APIRouter, Depends, HTTPException, Path, Query, status
from fastapi.responses import Response, StreamingResponse

from services.api.bodies import ErrorOut
from services.api.catalog import Catalog
from services.api.deps import catalog, safe_key
from services.api.routes.atlas import Channel, Layer, RunId
from services.http.security import require_read_access

CHUNK = 64 * 1024
# Committed runs never change: browsers may keep their images for good.
IMMUTABLE = "public, max-age=31536000, immutable"
PNG = {"content": {"image/png": {}}, "description": "A PNG image."}
ERRORS = {404: {"model": ErrorOut}, 400: {"model": ErrorOut}}


def _chunks(stream: pa.NativeFile) -> Iterator[bytes]:
    try:
        while True:
            data = stream.read(CHUNK)
            if not data:
                return
            yield bytes(data)
    finally:
        stream.close()


def router() -> APIRouter:
    api = APIRouter(tags=["images"], dependencies=[Depends(require_read_access)])

    @api.get(
        "/api/images/{key:path}",
        response_class=StreamingResponse,
        summary="Stream a PNG of a committed run from the store",
        responses={200: PNG, **ERRORS},
    )
    def image(key: str, cat: Catalog = Depends(catalog)) -> StreamingResponse:
        """``key`` is a store key as found in the tables (``atlas/<run>/images/...png``). Keys
        with ``..``, absolute keys or backslashes are refused (400); only ``.png`` files inside a
        committed run are served (404 otherwise, e.g. for another bucket's or an unfinished run's
        files)."""
        safe_key(key)
        parts = key.split("/")
        if not key.endswith(".png") or len(parts) < 3 or not cat.is_committed(parts[0], parts[1]):
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no image {key!r} in a committed run")
        try:
            stream, size = cat.open_image(key)
        except FileNotFoundError:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no image {key!r} in the store") from None
        return StreamingResponse(_chunks(stream), media_type="image/png",
                                 headers={"Content-Length": str(size), "Cache-Control": IMMUTABLE})

    @api.get(
        "/api/atlases/{run_id}/layers/{layer}/channels/{channel}/grids/{kind}.png",
        response_class=Response,
        summary="A channel's 3x3 grid of its top patches or projections",
        responses={200: PNG, **ERRORS},
    )
    def channel_grid(
        run_id: str = RunId,
        layer: str = Layer,
        channel: int = Channel,
        kind: Literal["patch", "projection"] = Path(description="patch or projection"),
        cat: Catalog = Depends(catalog),
    ) -> Response:
        """Drawn from the atlas's images table (one row group read), or read from its PNG file for
        atlases before 0.2."""
        png = cat.reader(run_id).png(layer, channel, f"{kind}_grid")
        return Response(png, media_type="image/png", headers={"Cache-Control": IMMUTABLE})

    @api.get(
        "/api/atlases/{run_id}/layers/{layer}/channels/{channel}/images/{rank}/{kind}.png",
        response_class=Response,
        summary="One top activation's image patch or its deconvnet projection",
        responses={200: PNG, **ERRORS},
    )
    def channel_image(
        run_id: str = RunId,
        layer: str = Layer,
        channel: int = Channel,
        rank: int = Path(ge=0, le=99),
        kind: Literal["patch", "projection"] = Path(description="patch or projection"),
        cat: Catalog = Depends(catalog),
    ) -> Response:
        png = cat.reader(run_id).png(layer, channel, kind, rank)
        return Response(png, media_type="image/png", headers={"Cache-Control": IMMUTABLE})

    @api.get(
        "/api/atlases/{run_id}/layers/{layer}/channels/{channel}/sources/{rank}.png",
        response_class=Response,
        summary="The input image of one top activation, with its receptive box drawn",
        responses={200: PNG, **ERRORS, 409: {"model": ErrorOut}},
    )
    def source(
        run_id: str = RunId,
        layer: str = Layer,
        channel: int = Channel,
        rank: int = Path(ge=0, le=99),
        scale: int = Query(4, ge=1, le=8, description="Upscaling factor (nearest neighbour)."),
        cat: Catalog = Depends(catalog),
    ) -> Response:
        """The image is re-read from the atlas's dataset (as its spec describes it) and preprocessed
        as the job did (short side resized, center crop), so the box is exactly the receptive field
        in the pixels the model saw. 404 when this server cannot read the dataset; 409 when the
        dataset no longer holds the same image at that index."""
        from PIL import Image, ImageDraw

        rows = cat.reader(run_id).channel(layer, channel).to_pylist()
        row = next((r for r in rows if r["rank"] == rank), None)
        if row is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"channel {channel} of {layer} has no rank {rank}")
        try:
            source = cat.source(run_id)
            batch = source.read([row["image_index"]])
        except (OSError, ValueError) as exc:
            detail = f"the atlas's dataset cannot be read here: {exc}"
            raise HTTPException(status.HTTP_404_NOT_FOUND, detail) from None
        if len(batch.indices) == 0:
            reason = batch.skipped[0][1] if batch.skipped else "unreadable"
            detail = f"image {row['image_id']} cannot be read: {reason}"
            raise HTTPException(status.HTTP_404_NOT_FOUND, detail)
        if source.image_id(row["image_index"]) != row["image_id"]:
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                f"the dataset changed since the atlas: index {row['image_index']} is now "
                f"{source.image_id(row['image_index'])}, not {row['image_id']}",
            )
        image = Image.fromarray(batch.images[0])
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
        draw = ImageDraw.Draw(image)
        top, left = row["box_top"] * scale, row["box_left"] * scale
        bottom = (row["box_top"] + row["box_height"]) * scale - 1
        right = (row["box_left"] + row["box_width"]) * scale - 1
        draw.rectangle([left, top, right, bottom], outline=(255, 32, 32), width=max(1, scale // 2))
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return Response(buf.getvalue(), media_type="image/png", headers={"Cache-Control": IMMUTABLE})

    return api
