"""The web dashboard: one HTML page, its CSS and JavaScript under ``/static``, served by the API itself.

``mount_dashboard(app)`` adds, to an app built by ``api.app.create_app``:

- ``GET /``: the page (hash routes ``#/jobs``, ``#/jobs/<id>``, ``#/submit``); everything it shows comes from the
  ``/v1`` API, called from the browser with the API key the user signed in with (kept in sessionStorage only).
- ``GET /static/...``: the page's files (``api/static``): plain HTML, CSS and JavaScript, no build step, no CDN.
- ``GET /ui/recipes``: the bundled example recipes (``service/recipes/*.yaml``) for the submit form.
- ``GET /v1/jobs/{job_id}/artifacts/{key}``: one file of a succeeded job's local output, for the same key that may
  see the job (401 without a key, 404 for another tenant's job or a key the manifest does not list). S3 outputs
  answer with a redirect to a presigned URL, as ``/v1/jobs/{id}/artifacts`` hands out.

Every response of the dashboard carries a Content-Security-Policy that allows nothing but this origin and no
inline script or style, so the page can talk to no other server.
"""

# No `from __future__ import annotations`: FastAPI must resolve the route-local Annotated dependency (caller).

from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Path as PathParam
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from api import schemas
from service.jobs.api_keys import KeyInfo
from service.jobs.storage import MANIFEST_NAME, StorageError, check_key, open_store, parse_uri

STATIC = Path(__file__).resolve().parent / "static"
RECIPES = Path(__file__).resolve().parents[1] / "service" / "recipes"
PRESIGN_SECONDS = 3600

# 'self' only: no CDN, no inline script or style (the page sets styles through the CSSOM, which CSP allows),
# no framing by another site, and forms post only here.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
       "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


class _DashboardFiles(StaticFiles):
    """StaticFiles with the dashboard's security headers, revalidated on every load (no stale JS after an
    upgrade)."""

    async def get_response(self, path, scope):
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        response.headers["Cache-Control"] = "no-cache"
        return response


def example_recipes() -> list[dict]:
    """The bundled recipes as ``[{"name": "sparsegpt_2of4", "text": "<yaml>"}, ...]``, sorted by name."""
    return [{"name": path.stem, "text": path.read_text()} for path in sorted(RECIPES.glob("*.yaml"))]


def local_artifact_path(manifest: dict, key: str, artifacts_root: str | Path) -> Path:
    """The file on disk for ``key`` of a local output's ``manifest`` (the job's ``artifacts["manifest"]``).

    Only keys the manifest lists (and the manifest itself) are served, and the resolved file must lie inside the
    output folder, which must lie inside ``artifacts_root``: a '..' key, an absolute key or a symlink leading out
    raises LookupError, as does a key that is not listed.
    """
    listed = {entry["key"] for entry in manifest.get("files", [])} | {manifest.get("key") or MANIFEST_NAME}
    if key not in listed:
        raise LookupError(f"{key!r} is not a file of this output")
    try:
        check_key(key, "key")
        _, root, _ = parse_uri(manifest["uri"], field="output", local_root=Path(artifacts_root), confine=True)
    except StorageError as exc:
        raise LookupError(str(exc)) from None
    root_path = Path(root).resolve()
    path = root_path.joinpath(*key.split("/")).resolve()
    if not path.is_relative_to(root_path) or not path.is_file():
        raise LookupError(f"{key!r} is not a file of this output")
    return path


def mount_dashboard(app: FastAPI) -> None:
    """Serve the dashboard from ``app`` (built by ``create_app``: it reads ``app.state.settings``,
    ``app.state.store`` and the API's authentication dependency ``app.state.caller``)."""
    settings, store, caller = app.state.settings, app.state.store, app.state.caller

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"})

    @app.get("/ui/recipes", include_in_schema=False)
    def recipes():
        return JSONResponse(example_recipes(), headers=SECURITY_HEADERS)

    @app.get(
        "/v1/jobs/{job_id}/artifacts/{key:path}", tags=["jobs"], summary="Download an artifact",
        description="One file of a succeeded job's output, by its manifest key: the bytes for a local output, a "
                    f"redirect to a presigned URL (valid {PRESIGN_SECONDS} s) for an S3 output. 404 for a key the "
                    "manifest does not list.",
        # The statuses of api/app.py's /v1 routes, with the same bodies (api/app.py imports this module, so
        # its response constants cannot be imported here).
        responses={200: {"description": "The file.", "content": {"application/octet-stream": {}}},
                   307: {"description": "S3 output: the presigned URL.",
                         "headers": {"Location": {"description": "The presigned URL.", "required": True,
                                                  "schema": {"type": "string"}}}},
                   400: {"model": schemas.ErrorDetail, "description": "Malformed HTTP framing (answered by the HTTP "
                         "server itself, in plain text).",
                         "content": {"text/plain": {"schema": {"type": "string"},
                                                    "example": "Invalid HTTP request received."}}},
                   401: {"model": schemas.ErrorDetail, "description": "No API key, or an unknown one.",
                         "headers": {"WWW-Authenticate": {"description": "`Bearer`.", "required": True,
                                                          "schema": {"type": "string"}}}},
                   404: {"model": schemas.ErrorDetail,
                         "description": "No such job (or another tenant's), or no such file."},
                   409: {"model": schemas.ErrorDetail, "description": "The job has not succeeded (yet)."},
                   422: {"model": schemas.ValidationErrors, "description": "Invalid input; `loc` names the field."},
                   502: {"model": schemas.ErrorDetail, "description": "The output's object store could not sign "
                                                                       "the URL."}},
    )
    def artifact_file(
        job_id: Annotated[str, PathParam(max_length=32)], key: str,
        who: Annotated[KeyInfo, Depends(caller)],
    ):
        job = store.get(job_id, owner=who.name, admin=who.admin)
        if job is None:
            raise HTTPException(404, "job not found")
        if job.status != "succeeded" or not job.artifacts:
            raise HTTPException(409, f"job {job.id} is {job.status}: artifacts are published when it succeeds")
        manifest = job.artifacts["manifest"]
        if manifest["uri"].lower().startswith("s3:"):
            if key not in {f["key"] for f in manifest["files"]} | {manifest.get("key") or MANIFEST_NAME}:
                raise HTTPException(404, "no such file in this output")
            try:
                url = open_store(manifest["uri"], field="output").presigned_url(key, expires=PRESIGN_SECONDS)
            except StorageError as exc:
                raise HTTPException(502, f"could not sign a URL for {manifest['uri']}: {exc}") from None
            return RedirectResponse(url, status_code=307)
        try:
            path = local_artifact_path(manifest, key, settings.artifacts_root)
        except LookupError:
            raise HTTPException(404, "no such file in this output") from None
        return FileResponse(path, filename=path.name, media_type="application/octet-stream",
                            content_disposition_type="attachment")

    app.mount("/static", _DashboardFiles(directory=STATIC), name="dashboard-static")
