"""``/api/diffs``: the ranked per-channel diff of two atlases; writing one to the store (token)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Response, status

from jobs.results.diff import diff_to_parquet
from services.api.bodies import DiffOut, DiffRequest, DiffRowOut, DiffWritten, ErrorOut
from services.api.catalog import Catalog
from services.api.deps import NAME_PATTERN, PageParams, catalog, page_params
from services.api.routes.atlas import grid_url
from services.http.security import require_read_access, require_token
from services.http.settings import Settings

DIFFS_PREFIX = "diffs"
ERRORS = {404: {"model": ErrorOut}, 400: {"model": ErrorOut}}


def _row(r: dict[str, Any], run_a: str, run_b: str) -> DiffRowOut:
    """A diff row with the grid images of both sides (none where the channel did not fire)."""
    fired = {"a": r["status"] in ("alive", "died"), "b": r["status"] in ("alive", "born")}
    runs = {"a": run_a, "b": run_b}
    urls = {f"{kind}_grid_url_{side}": grid_url(runs[side], r["layer"], r["channel"], kind, not fired[side])
            for kind in ("projection", "patch") for side in ("a", "b")}
    plain = {k: v for k, v in r.items() if not k.endswith(("_key_a", "_key_b"))}
    return DiffRowOut(**plain, **urls)


def router(settings: Settings) -> APIRouter:
    api = APIRouter(prefix="/api/diffs", tags=["diffs"])
    page = page_params(settings)

    @api.get(
        "/{run_a}/{run_b}",
        response_model=DiffOut,
        summary="Per-channel changes from atlas A to atlas B, most changed first",
        responses=ERRORS,
        dependencies=[Depends(require_read_access)],
    )
    def diff(
        run_a: str = Path(pattern=NAME_PATTERN, description="Atlas run id (before)."),
        run_b: str = Path(pattern=NAME_PATTERN, description="Atlas run id (after)."),
        layer: list[str] | None = Query(None, max_length=64, description="Only these layers (repeatable)."),
        status_: Literal["died", "born", "alive", "dead"] | None = Query(
            None, alias="status", description="Only channels with this status."
        ),
        sort: Literal["rank", "channel"] = Query(
            "rank", description="rank: most changed first (the diff's own order); channel: by layer "
            "and channel number."
        ),
        params: PageParams = Depends(page),
        cat: Catalog = Depends(catalog),
    ) -> DiffOut:
        result = cat.diff(run_a, run_b, layer)
        table = result.table
        rows = table.to_pylist()
        if status_:
            rows = [r for r in rows if r["status"] == status_]
        if sort == "channel":
            order = {name: i for i, name in enumerate(result.layers)}  # the atlas's layer order
            rows.sort(key=lambda r: (order.get(r["layer"], len(order)), r["channel"]))
        page_rows = rows[params.offset : params.offset + params.limit]
        return DiffOut(run_a=run_a, run_b=run_b, layers=result.layers, counts=result.counts(),
                       warnings=result.warnings,
                       page=params.page([_row(r, run_a, run_b) for r in page_rows], total=len(rows)))

    @api.post(
        "",
        response_model=DiffWritten,
        status_code=status.HTTP_201_CREATED,
        summary="Write the diff of two atlases to the store as Parquet (needs the bearer token)",
        description="Written once: the object is created only if its key is free (an exclusive "
        "create locally, a conditional `If-None-Match: *` PUT on S3), so two concurrent requests "
        "never interleave. Asking again for the same diff under the same name answers 200 with "
        "the object already there; a different diff under a taken name is refused with 409.",
        responses={**ERRORS, 200: {"model": DiffWritten}, 401: {"model": ErrorOut},
                   403: {"model": ErrorOut}, 409: {"model": ErrorOut}, 413: {"model": ErrorOut}},
        dependencies=[Depends(require_token)],
    )
    def write(body: DiffRequest, response: Response, cat: Catalog = Depends(catalog)) -> DiffWritten:
        result = cat.diff(body.run_a, body.run_b, body.layers)
        name = body.name or f"{body.run_a}--{body.run_b}.parquet"
        if not name.endswith(".parquet"):
            name += ".parquet"
        key = f"{DIFFS_PREFIX}/{name}"  # a fixed prefix: the API can never overwrite a run's files
        data = diff_to_parquet(result)  # deterministic: the same diff gives the same bytes
        if cat.store.create_exclusive(key, data) is None:
            existing, _ = cat.store.get_versioned(key)
            if existing != data:
                raise HTTPException(status.HTTP_409_CONFLICT,
                                    f"{key} already holds a different diff; choose another name")
            response.status_code = status.HTTP_200_OK  # the same request again: nothing to write
        return DiffWritten(key=key, uri=cat.store.uri_of(key), rows=result.table.num_rows,
                           counts=result.counts())

    return api
