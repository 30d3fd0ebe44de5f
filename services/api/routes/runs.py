"""``/api/runs``: committed runs of every kind in the store."""

from __future__ import annotations

from datetime import datetime, timezone

from fastapi import APIRouter, Depends, HTTPException, Path, Query, status

from jobs.results.query import list_runs, run_summary
from jobs.store import MissingKeyError, read_manifest
from services.api.bodies import ErrorOut, Page, RunDetail, RunSummary
from services.api.catalog import Catalog
from services.api.deps import NAME_PATTERN, PageParams, catalog, page_params
from services.http.security import require_read_access
from services.http.settings import Settings


def router(settings: Settings) -> APIRouter:
    api = APIRouter(prefix="/api/runs", tags=["runs"], dependencies=[Depends(require_read_access)])
    page = page_params(settings)

    @api.get("", response_model=Page[RunSummary], summary="List committed runs (oldest first)")
    def runs(
        kind: str | None = Query(None, pattern=NAME_PATTERN, description="Only runs of this kind."),
        since: datetime | None = Query(None, description="Only runs committed at or after (ISO 8601)."),
        params: PageParams = Depends(page),
        cat: Catalog = Depends(catalog),
    ) -> Page[RunSummary]:
        if since is not None and since.tzinfo is None:
            since = since.replace(tzinfo=timezone.utc)
        found = [RunSummary(**r) for r in list_runs(cat.store, kind, since)]
        return params.page(found)

    @api.get(
        "/{kind}/{run_id}",
        response_model=RunDetail,
        summary="One run's manifest",
        responses={404: {"model": ErrorOut}, 400: {"model": ErrorOut}},
    )
    def run(
        kind: str = Path(pattern=NAME_PATTERN),
        run_id: str = Path(pattern=NAME_PATTERN),
        cat: Catalog = Depends(catalog),
    ) -> RunDetail:
        try:
            manifest = read_manifest(cat.store, kind, run_id)
        except ValueError as exc:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, f"bad run: {exc}") from None
        except MissingKeyError:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no committed run {kind}/{run_id}") from None
        body = {k: v for k, v in manifest.items() if k != "files"}
        return RunDetail(summary=RunSummary(**run_summary(manifest)), manifest=body)

    return api
