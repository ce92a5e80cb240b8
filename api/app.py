"""The HTTP job API: routes under /v1, health, readiness and Prometheus metrics.

``create_app(settings, store, dispatcher)`` wires the routes to a job store and to any dispatcher object with
``start()``, ``submit(job_id)``, ``cancel(job_id)``, ``ready()`` and ``stop()`` (``workers.dispatch.RayDispatcher``
in production), and optionally ``check_resources(resources)``, which raises a FieldError naming the field when the
cluster could never hold a job's workers (``service.jobs.request.cluster_fits``); ``build_app(settings)`` builds
the real ones for ``llmpress serve``. This module holds HTTP only: what a job is and how it runs live in
``service/`` and ``workers/``.

Status codes a caller sees: 201 a job was created; 200 an ``Idempotency-Key`` replay (same key, same body: the
same job, ``Idempotent-Replayed: true``); 401 no or unknown key; 404 no such job *or another tenant's* (never 403,
so ids do not leak); 409 an idempotency key reused with another body, an output location another job claims,
artifacts of an unfinished job, or a retry of a job that neither failed nor was cancelled; 413 a body over
``max_request_bytes`` (refused before it is parsed); 422 invalid input (resources the cluster could never hold
too), ``detail[].loc`` naming the field; 400 a request that cannot be read at all (a body that is not UTF-8 or
nests too deeply, malformed HTTP framing). Every route's ``responses`` lists each of these it can return, with its
body, and tests/api/test_contract.py holds the server to that document.
"""

# No `from __future__ import annotations`: FastAPI must resolve the route-local Annotated aliases (Caller).
import asyncio
import json
import logging
import re
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Path, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from api import schemas
from api.dashboard import mount_dashboard
from api.metrics import metrics_registry
from service.engine.options import FieldError, OptionsError
from service.jobs.api_keys import KeyInfo, KeyRing
from service.jobs.job_store import (
    RETRYABLE, TERMINAL, IdempotencyConflict, InvalidCursor, Job, JobNotFound, JobStore, NotRetryable, OutputClaimed,
)
from service.jobs.request import REQUEST_FIELDS, JobRequest, Resources, output_location, stored_resources
from service.jobs.settings import Settings
from service.jobs.storage import StorageError, open_store
from service.jobs.webhook import webhook_payload

log = logging.getLogger(__name__)

API_VERSION = "1"
PRESIGN_SECONDS = 3600
SSE_POLL_SECONDS = 0.5
SSE_KEEPALIVE_SECONDS = 15.0
# Event ids are the store's 64-bit integers: a larger `after` or Last-Event-ID is a 422, not a database overflow.
MAX_EVENT_ID = 2**63 - 1
# The job store's own refusals (label limits) start with the field they are about: "labels: ...".
_FIELD_AT_START = re.compile(r"^([A-Za-z_]+(?:\.[A-Za-z_]+)*)\b")

DESCRIPTION = """\
Submit LLM compression jobs (SparseGPT, Wanda, magnitude, OWL recipes in llm-compressor's format), follow their
progress, gate them on perplexity and fetch the published safetensors.

**Authentication**: every `/v1` route needs `Authorization: Bearer <key>`. A key sees and cancels only its own
jobs unless it is an admin key; another tenant's job answers 404.

**Idempotency**: send `Idempotency-Key` with `POST /v1/jobs`; the same key and body returns the same job (200,
`Idempotent-Replayed: true`), the same key with another body is a 409.

**Workers**: `resources` runs one job on several Ray workers (`workers`, `cpus_per_worker`, `gpus_per_worker`); a
request the cluster's nodes could never hold is a 422 naming the field. A failed or cancelled job is run again
with `POST /v1/jobs/{job_id}/retry`.

**Errors**: `{"detail": "..."}`, or for invalid input (422) `{"detail": [{"loc": ["body", "dataset",
"num_samples"], "msg": "...", "type": "..."}]}` naming the field. A request that cannot be read at all is a 400:
a body that is not UTF-8 or nests too deeply (`{"detail": "..."}`), or HTTP framing the server cannot parse, such
as a Content-Length that is not a number (plain text, from the HTTP server itself, on any route). A body over the
server's limit is a 413 before it is read.
"""

TAGS = [
    {"name": "jobs", "description": "Create, list, follow and cancel compression jobs; fetch their artifacts."},
    {"name": "operations", "description": "Liveness, readiness and Prometheus metrics (no key needed)."},
]


def _example(example: Any, description: str = "OK", media: str = "application/json") -> dict:
    return {"description": description, "content": {media: {"example": example}}}


def _error(description: str, detail: Any, model: type = schemas.ErrorDetail) -> dict:
    return {"model": model, **_example({"detail": detail}, description)}


def _errors(description: str, **examples: tuple[str, Any]) -> dict:
    """An error response with several named examples: name=(summary, detail)."""
    return {"model": schemas.ErrorDetail, "description": description, "content": {"application/json": {"examples": {
        name.replace("_", "-"): {"summary": summary, "value": {"detail": detail}}
        for name, (summary, detail) in examples.items()}}}}


def _header(description: str) -> dict:
    return {"description": description, "required": True, "schema": {"type": "string"}}


# FastAPI files a response's "model" under the route's own media type (text/plain for /metrics): a response
# documented for every route names its JSON schema itself.
_ERROR_DETAIL_REF = {"$ref": "#/components/schemas/ErrorDetail"}


# Every route can get a 400: uvicorn answers HTTP framing it cannot parse (a Content-Length that is not a number)
# itself, in plain text, before the app sees the request; FastAPI answers a JSON body it cannot read (not UTF-8,
# nested deeper than the parser goes) and BodyLimit a Content-Length it cannot read (behind another server).
MALFORMED = {400: {
    "description": "The request cannot be read: a body that is not UTF-8 or nests too deeply, or malformed HTTP "
                   "framing (answered by the HTTP server itself, in plain text).",
    "content": {
        "application/json": {"schema": _ERROR_DETAIL_REF, "examples": {
            "body": {"summary": "The body is not readable JSON",
                     "value": {"detail": "There was an error parsing the body"}},
            "content-length": {"summary": "The Content-Length is not a number (behind a server that passes it on)",
                               "value": {"detail": "invalid Content-Length"}}}},
        "text/plain": {"schema": {"type": "string"}, "example": "Invalid HTTP request received."},
    },
}}
UNAUTHORIZED = {401: {**_error("No API key, or an unknown one.", "missing or invalid API key"),
                      "headers": {"WWW-Authenticate": _header("`Bearer`: the scheme the key goes in.")}}}
NOT_FOUND = {404: _error("No such job, or another tenant's.", "job not found")}
# BodyLimit: POST routes only (GET, HEAD, OPTIONS and DELETE carry no body it reads).
TOO_LARGE = {413: _error("The body is larger than LLMPRESS_MAX_REQUEST_BYTES (refused before it is read).",
                         "request body larger than 1048576 bytes (LLMPRESS_MAX_REQUEST_BYTES)")}
VALIDATION = {422: _error("Invalid input; `loc` names the field.", [
    {"loc": ["body", "dataset", "num_samples"], "msg": "dataset.num_samples must be >= 1, got 0",
     "type": "value_error"}], model=schemas.ValidationErrors)}
NOT_SUCCEEDED = {409: _error("The job has not succeeded (yet).",
                             "job k3v9x0q2m1ab is running: artifacts are published when it succeeds")}
UNSIGNED = {502: _error("The output's object store could not sign the URLs.",
                        "could not sign URLs for s3://releases/stories260K-2of4: ...")}
# What every /v1 route can answer besides its own statuses.
V1_ERRORS = {**MALFORMED, **UNAUTHORIZED, **VALIDATION}


def _parameters_not_null(document: dict) -> dict:
    """``document`` (an OpenAPI document FastAPI built) with no query or header parameter documented as nullable.

    FastAPI documents an optional parameter as ``anyOf: [<its schema>, {"type": "null"}]``, but HTTP has no null: a
    caller leaves the parameter out (``required: false`` says it may), and a client that sends the text "null"
    gets a 422. Idempotent: the document is FastAPI's cached one, changed in place."""
    for path_item in document.get("paths", {}).values():
        for operation in path_item.values():
            for parameter in operation.get("parameters", []) if isinstance(operation, dict) else ():
                schema = parameter.get("schema", {})
                options = [s for s in schema.get("anyOf", []) if s.get("type") != "null"]
                if len(options) == 1 and len(schema["anyOf"]) == 2:
                    rest = {k: v for k, v in schema.items() if k != "anyOf"}
                    parameter["schema"] = {**options[0], **rest}
    return document


def _job_out(job: Job) -> schemas.Job:
    """Every job a response carries goes through here: the webhook secret removed, undeclared fields dropped."""
    return schemas.Job.model_validate(webhook_payload(job))


def _validation_error(loc: list, message: str, status: int = 422) -> JSONResponse:
    return JSONResponse({"detail": [{"loc": loc, "msg": message, "type": "value_error"}]}, status_code=status)


def _message_of(error: FieldError) -> str:
    """A FieldError's message starting with the dotted field it names."""
    message = str(error)
    return message if not error.field or message.startswith(error.field) else f"{error.field}: {message}"


def _field_of(message: str) -> list[str]:
    match = _FIELD_AT_START.match(message)
    if match is None or match.group(1).split(".")[0] not in REQUEST_FIELDS:
        return []
    return match.group(1).split(".")


class BodyLimit:
    """Refuse a request body over ``limit`` bytes with a 413 before anything parses it: at once when its
    Content-Length says so, else (chunked) as soon as the bytes read pass the limit; the body read so far is
    replayed to the app."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.limit
            except ValueError:
                return await self._refuse(send, 400, "invalid Content-Length")
            if too_big:
                return await self._refuse(send, 413, self._message())
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._refuse(send, 413, self._message())
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    def _message(self) -> str:
        return f"request body larger than {self.limit} bytes (LLMPRESS_MAX_REQUEST_BYTES)"

    @staticmethod
    async def _refuse(send, status: int, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def create_app(settings: Settings, store: JobStore, dispatcher: Any) -> FastAPI:
    """The API over ``store``, handing new jobs to ``dispatcher`` (started and stopped with the app)."""
    keys = KeyRing.from_settings(store, settings)
    bearer = HTTPBearer(auto_error=False, scheme_name="ApiKey",
                        description="An API key: from LLMPRESS_API_KEYS (name:secret) or `llmpress keys create`.")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # On the server's own thread, not the thread pool: a local Ray's processes die with the thread that
        # started them (Linux's parent-death signal is per thread), and the pool ends idle threads after 10 s.
        dispatcher.start()
        try:
            yield
        finally:
            dispatcher.stop()

    app = FastAPI(
        title="llmpress job API", version=API_VERSION, description=DESCRIPTION, openapi_tags=TAGS,
        lifespan=lifespan, servers=[{"url": settings.base_url}],
    )
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
    app.state.settings, app.state.store, app.state.dispatcher = settings, store, dispatcher

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Never echo the input: it can hold the webhook secret.
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 405:
            # Starlette's Allow names the methods of the first route whose path matched; FastAPI has a route per
            # method (GET and POST /v1/jobs are two), so Allow would leave out the others. Name them all (the
            # static files' own 405 has no route with methods: it stays as it is).
            methods = {method for route in app.router.routes if route.matches(request.scope)[0] != Match.NONE
                       for method in getattr(route, "methods", None) or ()}
            if methods:
                exc = StarletteHTTPException(405, exc.detail, headers={**(exc.headers or {}),
                                                                       "Allow": ", ".join(sorted(methods))})
        return await http_exception_handler(request, exc)

    def caller(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> KeyInfo:
        key = keys.verify(credentials.credentials) if credentials is not None else None
        if key is None:
            raise HTTPException(401, "missing or invalid API key", headers={"WWW-Authenticate": "Bearer"})
        return key

    Caller = Annotated[KeyInfo, Depends(caller)]
    app.state.caller = caller  # the dashboard's authenticated routes use the same dependency
    JobId = Annotated[str, Path(description="The job's id.", examples=["k3v9x0q2m1ab"], max_length=32)]

    def visible_job(job_id: str, key: KeyInfo) -> Job:
        job = store.get(job_id, owner=key.name, admin=key.admin)
        if job is None:
            raise HTTPException(404, "job not found")
        return job

    def check_resources(resources: Resources | None) -> None:
        """The dispatcher's check that its cluster could ever hold the job's workers (FieldError when not), if it
        has one; a cluster it cannot ask is a 503, before anything is stored."""
        check = getattr(dispatcher, "check_resources", None)
        if check is None:
            return
        try:
            check(resources)
        except FieldError:
            raise
        except Exception as exc:
            log.exception("could not check the cluster's resources")
            raise HTTPException(503, f"could not ask the workers what they can hold ({type(exc).__name__}); "
                                     "try again") from None

    def dispatch(job: Job, again: str) -> None:
        """Hand the queued job to the workers; when they cannot take it, the job fails (saying ``again``: what to
        do) and the caller gets a 503."""
        try:
            dispatcher.submit(job.id)
        except Exception as exc:
            log.exception("could not dispatch job %s", job.id)
            error = f"could not hand the job to the workers ({type(exc).__name__}); {again}"
            store.transition(job.id, ["queued"], "failed", error=error)
            raise HTTPException(503, f"could not dispatch job {job.id}: {error}") from None

    # ------------------------------------------------------------------------------------------------ jobs

    @app.post(
        "/v1/jobs", tags=["jobs"], status_code=201, response_model=schemas.Job, summary="Create a job",
        description="Validate the request, store the job as `queued` and hand it to the workers. With "
                    "`Idempotency-Key`, a repeat of the same body returns the existing job with 200.",
        responses={201: {**_example(schemas.JOB_EXAMPLE | {"status": "queued"}, "The job was created."),
                         "headers": {"Location": _header("The job's URL, /v1/jobs/{id}.")}},
                   200: {**_example(schemas.JOB_EXAMPLE, "Idempotent replay: the job this key created before."),
                         "headers": {"Idempotent-Replayed": _header("`true`.")}},
                   409: _errors(
                       "The Idempotency-Key was used with another body, or the output location (or a folder inside "
                       "or around it) is claimed by another job; the message names no other tenant and no path.",
                       idempotency=("Idempotency-Key reused with another body",
                                    "idempotency key 'release-42' was already used for job k3v9x0q2m1ab with a "
                                    "different request body"),
                       output_claimed=("The output location is claimed by another job",
                                       "output: another job publishes to this location (or a folder inside or "
                                       "around it); choose another output")),
                   **TOO_LARGE,
                   503: _error("The workers could not take the job.", "could not dispatch job ...: ..."),
                   **V1_ERRORS},
    )
    def create_job(
        body: schemas.JobCreate, key: Caller, response: Response,
        idempotency_key: Annotated[str | None, Header(
            max_length=255, description="Makes retries safe: the same key and body return the same job.",
            examples=["release-2025-01-01-stories260K"])] = None,
    ):
        try:
            parsed = JobRequest.parse(body.model_dump(exclude_none=True), settings)
        except OptionsError as exc:
            return _validation_error(["body", *exc.loc], str(exc))
        try:
            check_resources(parsed.resources)
        except FieldError as exc:  # the cluster could never hold the workers asked for
            return _validation_error(["body", *(exc.field or "resources").split(".")], _message_of(exc))
        request = parsed.to_dict()
        labels = request.pop("labels", None)
        try:
            job, created = store.create_job(key.name, request, labels=labels, idempotency_key=idempotency_key,
                                            output_location=parsed.output_location(settings),
                                            overwrite=parsed.overwrite)
        except (IdempotencyConflict, OutputClaimed) as exc:
            raise HTTPException(409, str(exc)) from None
        except ValueError as exc:  # the store's label limits
            return _validation_error(["body", *_field_of(str(exc))], str(exc))
        if not created:
            response.status_code = 200
            response.headers["Idempotent-Replayed"] = "true"
            return _job_out(job)
        dispatch(job, "submit it again")
        response.headers["Location"] = f"/v1/jobs/{job.id}"
        return _job_out(job)

    @app.get(
        "/v1/jobs", tags=["jobs"], response_model=schemas.JobList, summary="List jobs",
        description="Your jobs (every tenant's for an admin key), newest first, one page at a time.",
        responses={200: _example({"items": [schemas.JOB_EXAMPLE], "next_cursor": "WyIyMDI1LTAxLTAxVDEy"}),
                   **V1_ERRORS},
    )
    def list_jobs(
        key: Caller,
        status: Annotated[list[schemas.JobStatus] | None, Query(
            description="Only jobs in these statuses (repeatable).", examples=[["running"]])] = None,
        label: Annotated[list[str] | None, Query(
            description="key=value; repeatable, all must match.", examples=[["team=release"]])] = None,
        limit: Annotated[int, Query(ge=1, le=500, description="Jobs per page.")] = 50,
        cursor: Annotated[str | None, Query(description="next_cursor of the previous page.")] = None,
    ):
        try:
            jobs, next_cursor = store.list(owner=key.name, admin=key.admin, status=status, label=label,
                                           limit=limit, cursor=cursor)
        except InvalidCursor as exc:
            return _validation_error(["query", "cursor"], str(exc))
        except ValueError as exc:
            return _validation_error(["query", "label"], str(exc))
        return schemas.JobList(items=[_job_out(j) for j in jobs], next_cursor=next_cursor)

    @app.get("/v1/jobs/{job_id}", tags=["jobs"], response_model=schemas.Job, summary="Get a job",
             description="The job's status, progress, per-layer metrics, report, artifacts and error.",
             responses={200: _example(schemas.JOB_EXAMPLE), **V1_ERRORS, **NOT_FOUND})
    def get_job(job_id: JobId, key: Caller):
        return _job_out(visible_job(job_id, key))

    @app.post(
        "/v1/jobs/{job_id}/cancel", tags=["jobs"], response_model=schemas.Job, summary="Cancel a job",
        description="A queued job is cancelled at once; a running one gets `cancel_requested` and stops between "
                    "layers (then `cancelled`); a finished job is returned unchanged.",
        responses={200: _example(schemas.JOB_EXAMPLE | {"cancel_requested": True}), **V1_ERRORS, **NOT_FOUND,
                   **TOO_LARGE},
    )
    def cancel_job(job_id: JobId, key: Caller):
        before = visible_job(job_id, key)
        job = store.request_cancel(job_id, owner=key.name, admin=key.admin)
        if job is None:
            raise HTTPException(404, "job not found")
        if not before.terminal:
            try:
                dispatcher.cancel(job_id)
            except Exception:  # the store's cancel flag stands: the worker stops between layers
                log.exception("dispatcher could not cancel job %s", job_id)
        return _job_out(job)

    @app.post(
        "/v1/jobs/{job_id}/retry", tags=["jobs"], response_model=schemas.Job, summary="Retry a job",
        description="Queue a failed or cancelled job again as its next attempt (`attempt` + 1, error and progress "
                    "cleared, per-layer metrics kept) and hand it to the workers. The job claims its output folder "
                    "again; the request is the one stored, unchanged.",
        responses={200: _example(schemas.JOB_EXAMPLE | {"status": "queued", "attempt": 2, "started_at": None,
                                                        "progress": {}}, "The job, queued again."),
                   409: _errors(
                       "The job did not fail and was not cancelled, its output folder was claimed by another job "
                       "meanwhile, or the cluster can no longer hold its workers.",
                       not_retryable=("The job succeeded, or has not ended",
                                      ("job k3v9x0q2m1ab succeeded; a succeeded job is not retried: submit a new "
                                       "job (with overwrite to replace its output)")),
                       output_claimed=("Its output location was claimed by another job meanwhile",
                                       ("output: another job publishes to this location (or a folder inside or "
                                        "around it); choose another output")),
                       resources=("The cluster can no longer hold the job's workers",
                                  ("job k3v9x0q2m1ab cannot run on this cluster: resources.workers: 3 workers of 1 "
                                   "CPU each were asked for, but the cluster's nodes can hold at most 2 at once"))),
                   503: _error("The workers could not take the job.", "could not dispatch job ...: ..."),
                   **V1_ERRORS, **NOT_FOUND, **TOO_LARGE},
    )
    def retry_job(job_id: JobId, key: Caller):
        before = visible_job(job_id, key)
        location = None  # a job that is not retryable is refused by the store, whatever its request
        if before.status in RETRYABLE:
            try:
                check_resources(stored_resources(before.request))
            except (FieldError, OptionsError) as exc:
                message = _message_of(exc) if isinstance(exc, FieldError) else str(exc)
                raise HTTPException(409, f"job {job_id} cannot run on this cluster: {message}") from None
            try:
                output = before.request.get("output")
                location = output_location(output, settings) if output else None
            except StorageError as exc:  # the service's artifacts folder moved since the job was accepted
                raise HTTPException(409, str(exc)) from None
        try:
            job = store.retry(job_id, owner=key.name, admin=key.admin, output_location=location)
        except JobNotFound:
            raise HTTPException(404, "job not found") from None
        except (NotRetryable, OutputClaimed) as exc:
            raise HTTPException(409, str(exc)) from None
        dispatch(job, "retry it again")
        return _job_out(job)

    @app.get(
        "/v1/jobs/{job_id}/events", tags=["jobs"], response_model=list[schemas.Event], summary="Job events",
        description="The job's events after `after`, oldest first, as JSON (poll with the last id seen). With "
                    "`Accept: text/event-stream`: server-sent events (`id`, `event` = type, `data` = the event as "
                    "JSON) that follow the job until it reaches a terminal state; `Last-Event-ID` resumes.",
        responses={200: {"description": "JSON list, or an event stream.", "content": {
            "application/json": {"example": [schemas.Event.model_json_schema()["examples"][0]]},
            "text/event-stream": {"example": 'id: 7\nevent: progress\ndata: {"id": 7, "type": "progress", ...}\n\n'},
        }}, **V1_ERRORS, **NOT_FOUND},
    )
    def job_events(
        job_id: JobId, key: Caller, request: Request,
        after: Annotated[int, Query(ge=0, le=MAX_EVENT_ID, description="Only events with a larger id.")] = 0,
        limit: Annotated[int, Query(ge=1, le=1000, description="At most this many events (JSON).")] = 1000,
        last_event_id: Annotated[int | None, Header(ge=0, le=MAX_EVENT_ID, description="SSE resume point.")] = None,
    ):
        visible_job(job_id, key)
        if "text/event-stream" in request.headers.get("accept", ""):
            start = max(after, last_event_id or 0)
            return StreamingResponse(_event_stream(store, job_id, start, request.is_disconnected),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return [schemas.Event.model_validate(e.to_dict()) for e in store.events(job_id, after_id=after, limit=limit)]

    @app.get(
        "/v1/jobs/{job_id}/artifacts", tags=["jobs"], response_model=schemas.ArtifactsResponse,
        summary="Job artifacts",
        description="A succeeded job's manifest: every file with its size and sha256, and presigned GET URLs "
                    f"(valid {PRESIGN_SECONDS} s) when the output is on S3.",
        responses={200: _example(schemas.ArtifactsResponse.model_json_schema()["examples"][0]),
                   **NOT_SUCCEEDED, **UNSIGNED, **V1_ERRORS, **NOT_FOUND},
    )
    def job_artifacts(job_id: JobId, key: Caller):
        job = visible_job(job_id, key)
        if job.status != "succeeded" or not job.artifacts:
            raise HTTPException(409, f"job {job.id} is {job.status}: artifacts are published when it succeeds")
        manifest = schemas.Manifest.model_validate(job.artifacts["manifest"])
        sign: Callable[[str], str | None] = lambda _key: None  # noqa: E731
        if manifest.uri.lower().startswith("s3:"):
            try:
                target = open_store(manifest.uri, field="output")
                sign = lambda k: target.presigned_url(k, expires=PRESIGN_SECONDS)  # noqa: E731
            except StorageError as exc:
                raise HTTPException(502, f"could not sign URLs for {manifest.uri}: {exc}") from None
        files = [schemas.ArtifactFile(**f.model_dump(), url=sign(f.key)) for f in manifest.files]
        return schemas.ArtifactsResponse(
            job_id=job.id, uri=manifest.uri, manifest_key=manifest.key, manifest_url=sign(manifest.key),
            created_at=manifest.created_at, total_size=manifest.total_size, files=files, extra=manifest.extra,
            expires_in=PRESIGN_SECONDS if files and files[0].url else None,
        )

    # ------------------------------------------------------------------------------------------- operations

    @app.get("/healthz", tags=["operations"], response_model=schemas.Health, summary="Liveness",
             description="200 while the process serves HTTP.",
             responses={200: _example({"status": "ok"}), **MALFORMED})
    def healthz():
        return schemas.Health(status="ok")

    @app.get(
        "/readyz", tags=["operations"], response_model=schemas.Readiness, summary="Readiness",
        description="200 when the job store answers and the workers (Ray) are reachable, 503 otherwise.",
        responses={200: _example({"status": "ready", "checks": {"store": "ok", "workers": "ok"}}),
                   503: {"model": schemas.Readiness,
                         **_example({"status": "not ready", "checks": {"store": "ok", "workers": "not ready"}},
                                    "A dependency is down.")},
                   **MALFORMED},
    )
    def readyz():
        checks = {}
        try:
            store.ping()
            checks["store"] = "ok"
        except Exception as exc:
            checks["store"] = f"unreachable ({type(exc).__name__})"
        try:
            checks["workers"] = "ok" if dispatcher.ready() else "not ready"
        except Exception as exc:
            checks["workers"] = f"unreachable ({type(exc).__name__})"
        ready = all(v == "ok" for v in checks.values())
        body = schemas.Readiness(status="ready" if ready else "not ready", checks=checks)
        return JSONResponse(jsonable_encoder(body), status_code=200 if ready else 503)

    registry = metrics_registry(store)

    @app.get(
        "/metrics", tags=["operations"], summary="Prometheus metrics", response_class=PlainTextResponse,
        description="llmpress_jobs{status}, llmpress_queue_depth, llmpress_job_duration_seconds (histogram by "
                    "final status), llmpress_layers_compressed_total; figures from the job store, so every API "
                    "replica reports the same.",
        responses={200: _example('llmpress_jobs{status="queued"} 3.0\nllmpress_queue_depth 3.0\n', media="text/plain"),
                   **MALFORMED},
    )
    def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    mount_dashboard(app)  # the web UI at / (api/dashboard.py), with its own Content-Security-Policy
    openapi = app.openapi
    app.openapi = lambda: _parameters_not_null(openapi())
    return app


async def _event_stream(store: JobStore, job_id: str, after: int, disconnected):
    """Server-sent events of the job from id ``after`` on, until the job is terminal and every event is sent."""
    idle = 0.0
    while True:
        # The status first, then the events: when the job was already terminal, this read holds its last event.
        job = await run_in_threadpool(store.get, job_id)
        events = await run_in_threadpool(store.events, job_id, after)
        for event in events:
            after = event.id
            yield f"id: {event.id}\nevent: {event.type}\ndata: {json.dumps(event.to_dict())}\n\n"
        if events:
            idle = 0.0
            continue  # there may be more than one page
        if job is None or job.status in TERMINAL:
            return
        if await disconnected():
            return
        await asyncio.sleep(SSE_POLL_SECONDS)
        idle += SSE_POLL_SECONDS
        if idle >= SSE_KEEPALIVE_SECONDS:  # a comment line keeps proxies from closing a quiet stream
            idle = 0.0
            yield ": keep-alive\n\n"


def build_app(settings: Settings | None = None) -> FastAPI:
    """The production app (what ``llmpress serve`` runs): the job store at ``settings.database_url`` and the Ray
    dispatcher, which connects to Ray and recovers unfinished jobs when the app starts."""
    from service.jobs.settings import get_settings
    from workers.dispatch import RayDispatcher

    settings = settings or get_settings()
    store = JobStore(settings.database_url)
    return create_app(settings, store, RayDispatcher(store, settings))
