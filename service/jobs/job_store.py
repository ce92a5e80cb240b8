"""The persistent job store: jobs, their events and API keys in SQLite (default) or PostgreSQL.

Jobs survive an API restart. The store is what makes "a job finishes exactly once" true: every status change is
one compare-and-set ``UPDATE jobs SET status = :to ... WHERE id = :id AND status IN (:from...)``, so when two
workers race to finish the same job, exactly one UPDATE matches a row and the other gets ``False``.

Statuses and the transitions allowed between them::

    queued    -> running | cancelled | failed
    running   -> uploading | succeeded | failed | cancelled | queued   (re-queued after a lost worker: attempt + 1)
    uploading -> succeeded | failed | cancelled | queued   (the same; the manifest goes last, so nothing was published)
    succeeded, failed, cancelled: terminal; only ``retry`` queues a failed or cancelled job again (attempt + 1)

An output folder belongs to one job: ``create_job`` claims it in the job's own transaction (``output_claims``),
refusing a folder another job holds, one inside it or one around it (:class:`OutputClaimed`, HTTP 409). A failed
or cancelled job releases its claim in the transaction that ends it; a succeeded job keeps it until the same
tenant submits with ``overwrite``. A re-queued job keeps its claim and starts with empty progress and metrics; a
retried one (``retry``) claims its folder again, by the same rules, and keeps its metrics.

Callers get plain :class:`Job` and :class:`Event` dataclasses, copied out of the session before it closes.
All timestamps are timezone-aware UTC datetimes. Every method opens its own short transaction, so one
``JobStore`` can be shared by the API's threads and the workers' threads.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import secrets
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    and_,
    create_engine,
    delete,
    event,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import StaticPool

STATUSES = ("queued", "running", "uploading", "succeeded", "failed", "cancelled")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
# A worker owns the job in these (progress is recorded, a cancel is a request the worker honours).
ACTIVE = frozenset({"running", "uploading"})
TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"running", "cancelled", "failed"}),
    "running": frozenset({"uploading", "succeeded", "failed", "cancelled", "queued"}),
    "uploading": frozenset({"succeeded", "failed", "cancelled", "queued"}),
    "succeeded": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
}
# Columns a transition may set along with the status.
TRANSITION_FIELDS = frozenset({"error", "report", "artifacts", "worker_ref", "progress", "metrics"})

JOB_ID_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
JOB_ID_LENGTH = 12  # 36**12 ~ 2**62 ids; lower-case and never starting with "-", so safe in URLs and on CLIs
MAX_PAGE = 500
MAX_LABELS = 64
SQLITE_BUSY_TIMEOUT_MS = 30_000
# PostgreSQL advisory lock that serialises output claims ("llmp"): claims compare folders by prefix, which no
# unique index can express, so two overlapping claims must not be checked at the same time.
_CLAIM_LOCK = 0x6C6C6D70
RELEASES_CLAIM = frozenset({"failed", "cancelled"})
RETRYABLE = frozenset({"failed", "cancelled"})  # ``retry`` queues these again as a new attempt


class JobStoreError(Exception):
    pass


class IdempotencyConflict(JobStoreError):
    """The idempotency key was already used by this owner with another request body (HTTP 409)."""

    def __init__(self, idempotency_key: str, job_id: str):
        self.idempotency_key = idempotency_key
        self.job_id = job_id
        super().__init__(
            f"idempotency key {idempotency_key!r} was already used for job {job_id} with a different request body"
        )


class OutputClaimed(JobStoreError):
    """The output location, or a folder inside or around it, belongs to another job (HTTP 409). The message names
    neither that job's tenant nor where the folder lives on the server."""

    def __init__(self, field: str = "output", *, own_job: str | None = None):
        self.field = field
        self.own_job = own_job
        if own_job is not None:  # the caller's own job: naming it tells nothing about anyone else
            why = (f"your job {own_job} publishes to this location (or a folder inside or around it); wait for "
                   "it to end, or once it has succeeded send overwrite: true to replace its output")
        else:
            why = "another job publishes to this location (or a folder inside or around it); choose another output"
        super().__init__(f"{field}: {why}")


class NotRetryable(JobStoreError):
    """Only a failed or cancelled job is retried (HTTP 409); the message says what to do instead."""

    def __init__(self, status: str, job_id: str | None = None):
        self.status = status
        self.job_id = job_id
        job = f"job {job_id}" if job_id else "the job"
        if status == "succeeded":
            why = (f"{job} succeeded; a succeeded job is not retried: submit a new job (with overwrite to replace "
                   "its output)")
        elif status == "queued":
            why = f"{job} is queued; only a failed or cancelled job is retried: this one runs when a worker is free"
        else:
            why = (f"{job} is {status}; only a failed or cancelled job is retried: wait for it to end, or cancel "
                   "it first")
        super().__init__(why)


class InvalidTransition(JobStoreError, ValueError):
    def __init__(self, from_status: str, to_status: str):
        self.from_status = from_status
        self.to_status = to_status
        allowed = ", ".join(sorted(TRANSITIONS.get(from_status, ()))) or "none, it is terminal"
        super().__init__(
            f"a job cannot go from {from_status!r} to {to_status!r} (allowed from {from_status!r}: {allowed})"
        )


class InvalidCursor(JobStoreError, ValueError):
    pass


class JobNotFound(JobStoreError, LookupError):
    pass


# --- schema -------------------------------------------------------------------------------------------------------


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive, as UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("the job store only takes timezone-aware datetimes")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


# None is stored as SQL NULL (not the JSON text 'null'); JSONB on PostgreSQL.
JSONType = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
# 64-bit ids on PostgreSQL; SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
EventId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


class JobRow(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16))
    request: Mapped[dict[str, Any]] = mapped_column(JSONType)
    labels: Mapped[dict[str, str]] = mapped_column(JSONType)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_sha256: Mapped[str] = mapped_column(String(64))
    progress: Mapped[dict[str, Any]] = mapped_column(JSONType)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONType)
    report: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    artifacts: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    error: Mapped[str | None] = mapped_column(Text)
    attempt: Mapped[int] = mapped_column(Integer)
    worker_ref: Mapped[str | None] = mapped_column(String(255))
    cancel_requested: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (
        # NULL keys never collide, so jobs without an idempotency key are unconstrained.
        UniqueConstraint("owner", "idempotency_key", name="uq_jobs_owner_idempotency_key"),
        Index("ix_jobs_created_id", "created_at", "id"),
        Index("ix_jobs_owner_created_id", "owner", "created_at", "id"),
        Index("ix_jobs_status", "status"),
    )


class JobEventRow(Base):
    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(EventId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    type: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict[str, Any]] = mapped_column(JSONType)

    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"),)


class OutputClaimRow(Base):
    """An output folder and the one job that may publish there (see ``JobStore.create_job``).

    ``location`` is ``service.jobs.storage.location_key``'s spelling (``s3://bucket/a/`` or ``file:///dir/``), so
    equal folders have equal keys and a folder inside another has the other's key as a prefix. A claim is taken
    with its job, in one transaction, and given up when the job fails or is cancelled; a succeeded job keeps it.
    """

    __tablename__ = "output_claims"

    location: Mapped[str] = mapped_column(String(2048), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    # The succeeded job of the same tenant whose output this job replaces (``overwrite``), if any: only then may
    # the job's publisher replace a manifest it finds there.
    replaces: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class BlockCheckpointRow(Base):
    """A finished block of a job's run (service.engine.block_checkpoints): its shard, already in the output location,
    with the sha256 it was uploaded with, its report entries, and the fingerprint of the run that made it. Kept
    across attempts and retries, so a job taken up again reuses its finished blocks; a cancel drops them."""

    __tablename__ = "block_checkpoints"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    block: Mapped[int] = mapped_column(Integer, primary_key=True)
    shard: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    fingerprint: Mapped[dict[str, Any]] = mapped_column(JSONType)
    report: Mapped[dict[str, Any]] = mapped_column(JSONType)
    attempt: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class ApiKeyRow(Base):
    """A stored API key: only a salted hash of the secret (see ``service.jobs.api_keys``)."""

    __tablename__ = "api_keys"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    # The public part of the secret ("lp_<key_id>.<token>"), so a presented secret finds its one row.
    key_id: Mapped[str] = mapped_column(String(32), unique=True)
    salt: Mapped[str] = mapped_column(String(64))
    secret_hash: Mapped[str] = mapped_column(String(128))
    admin: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


# --- what callers get ---------------------------------------------------------------------------------------------


def _iso(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


@dataclasses.dataclass(frozen=True)
class Job:
    id: str
    owner: str
    status: str
    request: dict[str, Any]
    labels: dict[str, str]
    idempotency_key: str | None
    request_sha256: str
    progress: dict[str, Any]
    metrics: dict[str, Any]
    report: dict[str, Any] | None
    artifacts: dict[str, Any] | None
    error: str | None
    attempt: int
    worker_ref: str | None
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready (timestamps as ISO 8601 strings). The API chooses what it exposes: note that
        ``request`` is stored as submitted, webhook secret included."""
        return {f.name: _iso(getattr(self, f.name)) for f in dataclasses.fields(self)}


@dataclasses.dataclass(frozen=True)
class Event:
    id: int
    job_id: str
    created_at: datetime
    type: str
    data: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _iso(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _job(row: JobRow) -> Job:
    return Job(**{f.name: getattr(row, f.name) for f in dataclasses.fields(Job)})


def _event(row: JobEventRow) -> Event:
    return Event(id=row.id, job_id=row.job_id, created_at=row.created_at, type=row.type, data=row.data)


# --- helpers ------------------------------------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(timezone.utc)


def new_job_id() -> str:
    return "".join(secrets.choice(JOB_ID_ALPHABET) for _ in range(JOB_ID_LENGTH))


def canonical_json(value: Any) -> str:
    """One text per JSON value: sorted keys, no whitespace, no NaN/Infinity (which JSON cannot carry)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def request_sha256(request: Mapping[str, Any], labels: Mapping[str, str] | None = None) -> str:
    """sha256 of the canonical request body; labels are part of the body, so they count."""
    body = canonical_json({"request": request, "labels": dict(labels or {})})
    return hashlib.sha256(body.encode()).hexdigest()


def _check_owner(owner: str) -> str:
    if not isinstance(owner, str) or not owner or len(owner) > 128:
        raise ValueError(f"owner must be a non-empty string of at most 128 characters, got {owner!r}")
    return owner


def _check_labels(labels: Mapping[str, str] | None) -> dict[str, str]:
    labels = dict(labels or {})
    if len(labels) > MAX_LABELS:
        raise ValueError(f"labels: at most {MAX_LABELS}, got {len(labels)}")
    for key, value in labels.items():
        if not isinstance(key, str) or not key or len(key) > 128 or "=" in key or "," in key:
            raise ValueError(f"labels: key {key!r} must be 1-128 characters without '=' or ','")
        if not isinstance(value, str) or len(value) > 256:
            raise ValueError(f"labels: value of {key!r} must be a string of at most 256 characters")
    return labels


def _check_status(status: str) -> str:
    if status not in STATUSES:
        raise ValueError(f"unknown job status {status!r} (one of {', '.join(STATUSES)})")
    return status


def _check_transition(from_statuses: Iterable[str], to_status: str) -> list[str]:
    _check_status(to_status)
    froms = [from_statuses] if isinstance(from_statuses, str) else list(from_statuses)
    if not froms:
        raise ValueError("transition needs at least one status to move from")
    for status in froms:
        if to_status not in TRANSITIONS[_check_status(status)]:
            raise InvalidTransition(status, to_status)
    return froms


def _parse_label(label: str) -> tuple[str, str]:
    key, sep, value = label.partition("=")
    if not sep or not key:
        raise ValueError(f"label filter {label!r} must be key=value")
    return key, value


def _encode_cursor(job: Job) -> str:
    raw = json.dumps([job.created_at.isoformat(), job.id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, job_id = json.loads(raw)
        created_at = datetime.fromisoformat(created)
        if created_at.tzinfo is None or not isinstance(job_id, str):
            raise ValueError
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise InvalidCursor("invalid cursor: pass back the next_cursor of a previous page unchanged") from None
    return created_at, job_id


def _enclosing(location: str) -> list[str]:
    """Every folder that holds ``location`` and the location itself: 's3://b/x/y/' -> ['s3://b/', 's3://b/x/',
    's3://b/x/y/'] (the spelling of ``storage.location_key``)."""
    start = location.index("://") + 3
    return [location[:i + 1] for i in range(start, len(location)) if location[i] == "/"]


def _deep_merge(base: Mapping[str, Any], delta: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in delta.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _json_roundtrip(value: Any) -> Any:
    """What the database will give back (tuples become lists, ...); also refuses what JSON cannot hold."""
    return json.loads(canonical_json(value))


def _create_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        # psycopg 3 is what we install; SQLAlchemy's bare "postgresql" would mean psycopg2.
        parsed = parsed.set(drivername="postgresql+psycopg")
    if not parsed.drivername.startswith("sqlite"):
        return create_engine(parsed, pool_pre_ping=True)

    database = parsed.database or ""
    if database in ("", ":memory:"):
        # One connection shared by every session: single-threaded tests only.
        engine = create_engine(parsed, poolclass=StaticPool, connect_args={"check_same_thread": False})
    else:
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            parsed, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        # sqlite3 would otherwise BEGIN only before the first write, in DEFERRED mode; we BEGIN ourselves below.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # WAL: readers (the API) never wait for the writer (a worker), and the writer never waits for readers.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA synchronous=NORMAL")  # durable across application crashes in WAL mode
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        # Write transactions take the write lock up front (BEGIN IMMEDIATE), so a read-then-write transaction
        # waits its turn through busy_timeout instead of failing with SQLITE_BUSY when another writer got there
        # first (a DEFERRED transaction cannot upgrade its read snapshot to a write once the file moved on).
        immediate = conn.get_execution_options().get("llmpress_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


# --- the store ----------------------------------------------------------------------------------------------------


class JobStore:
    """Jobs, events and API keys in the database at ``url`` (an SQLAlchemy URL; schema created if missing).

    ``sqlite:///path.db`` (WAL, busy timeout) or ``postgresql://user:pw@host/db`` (psycopg 3). Thread-safe.
    """

    def __init__(self, url: str):
        self.engine = _create_engine(url)
        self.dialect = self.engine.dialect.name
        Base.metadata.create_all(self.engine)
        self._reads = sessionmaker(self.engine, expire_on_commit=False)
        self._writes = sessionmaker(self.engine.execution_options(llmpress_write=True), expire_on_commit=False)

    def __repr__(self) -> str:
        return f"JobStore({self.engine.url.render_as_string(hide_password=True)!r})"

    def session(self, write: bool = True) -> AbstractContextManager[Session]:
        """A session inside one transaction, committed when the block ends (rolled back on an exception)."""
        return (self._writes if write else self._reads).begin()

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        """Raises if the database cannot be reached (for /readyz)."""
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    # --- jobs ---------------------------------------------------------------------------------------------------

    def create_job(
        self,
        owner: str,
        request: Mapping[str, Any],
        labels: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        *,
        output_location: str | None = None,
        overwrite: bool = False,
    ) -> tuple[Job, bool]:
        """A new queued job, or with an ``idempotency_key`` this owner already used: the existing job.

        Returns ``(job, created)``. The same key with the same body (request and labels, compared by the sha256
        of their canonical JSON) returns the existing job with ``created=False``, whatever its status; the same
        key with another body raises :class:`IdempotencyConflict`. Keys are scoped to the owner.

        ``output_location`` (``storage.location_key``) is claimed for the new job in the same transaction: when
        another job's claim covers it, a folder inside it or a folder around it, :class:`OutputClaimed` is raised
        and no job is created. ``overwrite`` takes over the claim of this owner's *succeeded* job on exactly this
        location (its output is to be replaced); a claim of a job still in flight, or of another owner, is never
        taken over.
        """
        _check_owner(owner)
        labels = _check_labels(labels)
        if idempotency_key is not None and (not idempotency_key or len(idempotency_key) > 255):
            raise ValueError("idempotency key must be 1-255 characters")
        request = _json_roundtrip(dict(request))
        body_sha256 = request_sha256(request, labels)
        for _ in range(3):
            try:
                with self.session() as s:
                    if idempotency_key is not None:
                        existing = s.scalars(
                            select(JobRow).where(JobRow.owner == owner, JobRow.idempotency_key == idempotency_key)
                        ).one_or_none()
                        if existing is not None:
                            if existing.request_sha256 != body_sha256:
                                raise IdempotencyConflict(idempotency_key, existing.id)
                            return _job(existing), False
                    now = _now()
                    row = JobRow(
                        id=new_job_id(), owner=owner, status="queued", request=request, labels=labels,
                        idempotency_key=idempotency_key, request_sha256=body_sha256, progress={}, metrics={},
                        report=None, artifacts=None, error=None, attempt=1, worker_ref=None,
                        cancel_requested=False, created_at=now, started_at=None, finished_at=None, updated_at=now,
                    )
                    s.add(row)
                    s.flush()  # the job row before its first event (foreign key)
                    s.add(JobEventRow(job_id=row.id, created_at=now, type="status", data={"status": "queued"}))
                    if output_location is not None:
                        self._claim(s, owner, output_location, row.id, overwrite, now)
                    return _job(row), True
            except IntegrityError:
                # PostgreSQL: a concurrent request inserted the same (owner, key) first; the next pass finds it.
                # (Or, once in ~2**62, the random id collided.) SQLite never gets here: BEGIN IMMEDIATE serializes.
                continue
        raise JobStoreError("could not create the job: repeated conflicting inserts")

    def _claim(self, s: Session, owner: str, location: str, job_id: str, overwrite: bool, now: datetime) -> None:
        if self.dialect == "postgresql":  # SQLite's BEGIN IMMEDIATE already serialises every writer
            s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _CLAIM_LOCK})
        held = s.execute(
            select(OutputClaimRow.location, JobRow.id, JobRow.owner, JobRow.status)
            .join(JobRow, JobRow.id == OutputClaimRow.job_id)
            .where(or_(OutputClaimRow.location.in_(_enclosing(location)),
                       OutputClaimRow.location.startswith(location, autoescape=True)))
        ).all()
        replaces = None
        for claimed, other, other_owner, status in held:
            if overwrite and claimed == location and other_owner == owner and status == "succeeded":
                s.execute(delete(OutputClaimRow).where(OutputClaimRow.location == claimed))
                replaces = other
                continue
            raise OutputClaimed(own_job=other if other_owner == owner else None)
        s.add(OutputClaimRow(location=location, job_id=job_id, replaces=replaces, created_at=now))

    def output_claim(self, job_id: str) -> tuple[str, str | None] | None:
        """``(location, replaces)`` of the output the job holds (``replaces``: the succeeded job whose output it
        may overwrite), or None when it holds none."""
        with self.session(write=False) as s:
            row = s.execute(select(OutputClaimRow.location, OutputClaimRow.replaces)
                            .where(OutputClaimRow.job_id == job_id)).first()
            return (row[0], row[1]) if row is not None else None

    def get(self, job_id: str, owner: str | None = None, admin: bool = False) -> Job | None:
        """The job, or None if there is none or it belongs to another owner (unless ``admin``).

        ``owner=None`` is for internal callers (workers, the dispatcher): the job whoever owns it.
        """
        query = select(JobRow).where(JobRow.id == job_id)
        if owner is not None and not admin:
            query = query.where(JobRow.owner == owner)
        with self.session(write=False) as s:
            row = s.scalars(query).one_or_none()
            return _job(row) if row is not None else None

    def list(
        self,
        owner: str | None = None,
        admin: bool = False,
        status: str | Sequence[str] | None = None,
        label: str | Sequence[str] | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[Job], str | None]:
        """One page of jobs, newest first: ``(jobs, next_cursor)``; ``next_cursor`` is None on the last page.

        ``owner``'s jobs, or everyone's with ``admin=True``. ``status``: one status or several. ``label``:
        ``"key=value"`` or several (all must match). The cursor is opaque; it points after the last job of the
        page by (created_at, id), so jobs created while paging never shift or repeat the pages that follow.
        """
        if not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit must be between 1 and {MAX_PAGE}, got {limit}")
        query = select(JobRow)
        if not admin:
            if owner is None:
                raise ValueError("list needs an owner unless admin=True")
            query = query.where(JobRow.owner == owner)
        if status is not None:
            statuses = [status] if isinstance(status, str) else list(status)
            query = query.where(JobRow.status.in_([_check_status(s) for s in statuses]))
        if label is not None:
            for key, value in map(_parse_label, [label] if isinstance(label, str) else label):
                query = query.where(JobRow.labels[key].as_string() == value)
        if cursor is not None:
            created_at, job_id = _decode_cursor(cursor)
            query = query.where(
                or_(JobRow.created_at < created_at, and_(JobRow.created_at == created_at, JobRow.id < job_id))
            )
        query = query.order_by(JobRow.created_at.desc(), JobRow.id.desc()).limit(limit + 1)
        with self.session(write=False) as s:
            jobs = [_job(row) for row in s.scalars(query)]
        if len(jobs) > limit:
            return jobs[:limit], _encode_cursor(jobs[limit - 1])
        return jobs, None

    def transition(self, job_id: str, from_statuses: str | Iterable[str], to_status: str, *,
                   attempt: int | None = None, **fields: Any) -> bool:
        """Move the job to ``to_status`` if it is in one of ``from_statuses``: one atomic compare-and-set.

        Returns False when the job is not in any of them (another worker or a cancel got there first) or does not
        exist. A worker passes the ``attempt`` it took the job as: a worker presumed lost whose job was re-queued
        (attempt + 1) and taken by another then changes nothing (a fencing token). Raises :class:`InvalidTransition` when a pair is not allowed at all. ``fields`` may also set
        error, report, artifacts, worker_ref, progress, metrics. Timestamps follow: ``running`` sets started_at,
        a terminal status sets finished_at; ``running -> queued`` (a lost worker) adds one to ``attempt`` and
        clears worker_ref and started_at. A ``status`` event is recorded in the same transaction.
        """
        froms = _check_transition(from_statuses, to_status)
        unknown = set(fields) - TRANSITION_FIELDS
        if unknown:
            raise TypeError(f"transition cannot set {sorted(unknown)} (only {sorted(TRANSITION_FIELDS)})")
        now = _now()
        values: dict[str, Any] = {"status": to_status, "updated_at": now}
        if to_status == "running":
            values["started_at"] = now
        elif to_status == "queued":
            # A new attempt starts from nothing: the lost one's progress and per-layer figures are not its own.
            values.update(attempt=JobRow.attempt + 1, worker_ref=None, started_at=None, progress={}, metrics={})
        if to_status in TERMINAL:
            values["finished_at"] = now
        values.update({k: _json_roundtrip(v) if k != "error" else v for k, v in fields.items()})
        data: dict[str, Any] = {"status": to_status}
        if fields.get("error"):
            data["error"] = fields["error"]
        with self.session() as s:
            where = [JobRow.id == job_id, JobRow.status.in_(froms)]
            if attempt is not None:
                where.append(JobRow.attempt == attempt)
            result = s.execute(
                update(JobRow)
                .where(*where)
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            if result.rowcount != 1:
                return False
            s.add(JobEventRow(job_id=job_id, created_at=now, type="status", data=data))
            if to_status in RELEASES_CLAIM:  # its output folder is free again, in the same transaction
                s.execute(delete(OutputClaimRow).where(OutputClaimRow.job_id == job_id))
        return True

    def set_progress(
        self, job_id: str, progress: Mapping[str, Any], metrics_delta: Mapping[str, Any] | None = None, *,
        attempt: int | None = None,
    ) -> bool:
        """Record progress (``{"stage", "layer", "layers", "fraction"}``) and merge ``metrics_delta`` into the
        job's metrics (nested dicts merge key by key, e.g. ``{"layers": {"3": {...}}}``); adds a ``progress`` event.

        Only while the job is running or uploading (and, given ``attempt``, still in that attempt): returns False
        otherwise (it was cancelled, failed, or re-queued), which a worker can take as "stop".
        """
        progress = _json_roundtrip(dict(progress))
        delta = _json_roundtrip(dict(metrics_delta)) if metrics_delta else None
        now = _now()
        with self.session() as s:
            # FOR UPDATE (PostgreSQL): concurrent merges into metrics must not lose each other's keys.
            # SQLite's BEGIN IMMEDIATE already excludes other writers.
            where = [JobRow.id == job_id, JobRow.status.in_(ACTIVE)]
            if attempt is not None:
                where.append(JobRow.attempt == attempt)
            row = s.scalars(select(JobRow).where(*where).with_for_update()).one_or_none()
            if row is None:
                return False
            row.progress = progress
            if delta:
                row.metrics = _deep_merge(row.metrics or {}, delta)
            row.updated_at = now
            data = {"progress": progress} if delta is None else {"progress": progress, "metrics": delta}
            s.add(JobEventRow(job_id=job_id, created_at=now, type="progress", data=data))
        return True

    def add_event(self, job_id: str, type: str, data: Mapping[str, Any] | None = None) -> Event:
        """Append an event to the job's stream (what ``events()`` and the SSE endpoint return)."""
        now = _now()
        with self.session() as s:
            # Touching the job row first locks it, so one job's events commit in id order on PostgreSQL too
            # (a poller that has seen id N never later finds a smaller id appear).
            result = s.execute(
                update(JobRow).where(JobRow.id == job_id).values(updated_at=now)
                .execution_options(synchronize_session=False)
            )
            if result.rowcount != 1:
                raise JobNotFound(f"no job {job_id!r}")
            row = JobEventRow(job_id=job_id, created_at=now, type=type, data=_json_roundtrip(dict(data or {})))
            s.add(row)
            s.flush()
            return _event(row)

    def events(self, job_id: str, after_id: int = 0, limit: int = 1000) -> list[Event]:
        """The job's events with id > ``after_id``, oldest first (poll with the last id seen).

        No owner check here: the API checks the job with ``get(job_id, owner)`` first.
        """
        query = (
            select(JobEventRow)
            .where(JobEventRow.job_id == job_id, JobEventRow.id > after_id)
            .order_by(JobEventRow.id)
            .limit(limit)
        )
        with self.session(write=False) as s:
            return [_event(row) for row in s.scalars(query)]

    def request_cancel(self, job_id: str, owner: str | None = None, admin: bool = False) -> Job | None:
        """Cancel the job: a queued one is cancelled at once; a running or uploading one gets
        ``cancel_requested`` (its worker stops between layers and moves it to cancelled); a finished one is left
        as it is. Returns the job as it is now, or None if not found or not ``owner``'s (unless ``admin``).
        """
        now = _now()
        visible = [JobRow.id == job_id]
        if owner is not None and not admin:
            visible.append(JobRow.owner == owner)
        with self.session() as s:
            cancelled = s.execute(
                update(JobRow)
                .where(*visible, JobRow.status == "queued")
                .values(status="cancelled", cancel_requested=True, finished_at=now, updated_at=now)
                .execution_options(synchronize_session=False)
            ).rowcount
            if cancelled:
                s.add(JobEventRow(job_id=job_id, created_at=now, type="status", data={"status": "cancelled"}))
                s.execute(delete(OutputClaimRow).where(OutputClaimRow.job_id == job_id))
            else:
                requested = s.execute(
                    update(JobRow)
                    .where(*visible, JobRow.status.in_(ACTIVE), JobRow.cancel_requested.is_(False))
                    .values(cancel_requested=True, updated_at=now)
                    .execution_options(synchronize_session=False)
                ).rowcount
                if requested:
                    s.add(JobEventRow(job_id=job_id, created_at=now, type="cancel_requested", data={}))
            row = s.scalars(select(JobRow).where(*visible)).one_or_none()
            return _job(row) if row is not None else None

    def retry(self, job_id: str, owner: str | None = None, admin: bool = False, *,
              output_location: str | None = None) -> Job:
        """Queue a failed or cancelled job again as its next attempt, and return it.

        attempt + 1; error, report, started_at, finished_at and worker_ref cleared, cancel_requested false,
        progress reset to {}; metrics are kept (a new attempt may resume from the layers already done). In the
        same transaction the job claims ``output_location`` again (``storage.location_key``; it gave it up when it
        ended) by ``create_job``'s rules: :class:`OutputClaimed` when another job took the folder meanwhile. A
        ``status`` event and a ``retried`` event (``{"attempt": n}``) are recorded. :class:`NotRetryable` for a
        job in any other status; :class:`JobNotFound` when there is none or it is not ``owner``'s (unless
        ``admin``).
        """
        visible = [JobRow.id == job_id]
        if owner is not None and not admin:
            visible.append(JobRow.owner == owner)
        now = _now()
        with self.session() as s:
            row = s.scalars(select(JobRow).where(*visible).with_for_update()).one_or_none()
            if row is None:
                raise JobNotFound(f"no job {job_id!r}")
            if row.status not in RETRYABLE:
                raise NotRetryable(row.status, row.id)
            if output_location is not None:
                s.execute(delete(OutputClaimRow).where(OutputClaimRow.job_id == row.id))
                self._claim(s, row.owner, output_location, row.id, bool((row.request or {}).get("overwrite")), now)
            row.status, row.attempt, row.updated_at = "queued", row.attempt + 1, now
            row.error = row.report = row.started_at = row.finished_at = row.worker_ref = None
            row.cancel_requested, row.progress = False, {}
            s.add(JobEventRow(job_id=row.id, created_at=now, type="status", data={"status": "queued"}))
            s.add(JobEventRow(job_id=row.id, created_at=now, type="retried", data={"attempt": row.attempt}))
            s.flush()
            return _job(row)

    # --- per-block checkpoints ------------------------------------------------------------------------------------

    def record_checkpoint(self, job_id: str, attempt: int, block: int, *, shard: str, sha256: str, size: int,
                          fingerprint: Mapping[str, str], report: Mapping[str, Any]) -> bool:
        """Record (or replace) block ``block``'s checkpoint, only while the job is running or uploading in
        ``attempt`` (a fenced write, like set_progress): False otherwise."""
        now = _now()
        with self.session() as s:
            current = s.scalars(select(JobRow.attempt).where(JobRow.id == job_id, JobRow.status.in_(ACTIVE))
                                .with_for_update()).one_or_none()
            if current != attempt:
                return False
            s.execute(delete(BlockCheckpointRow).where(BlockCheckpointRow.job_id == job_id,
                                                       BlockCheckpointRow.block == block))
            s.add(BlockCheckpointRow(job_id=job_id, block=block, shard=shard, sha256=sha256, size=size,
                                     fingerprint=_json_roundtrip(dict(fingerprint)),
                                     report=_json_roundtrip(dict(report)), attempt=attempt, created_at=now))
        return True

    def checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        """The job's block checkpoints, by block index."""
        with self.session(write=False) as s:
            rows = s.scalars(select(BlockCheckpointRow).where(BlockCheckpointRow.job_id == job_id)
                             .order_by(BlockCheckpointRow.block))
            return [{"block": r.block, "shard": r.shard, "sha256": r.sha256, "size": r.size,
                     "fingerprint": dict(r.fingerprint), "report": dict(r.report), "attempt": r.attempt}
                    for r in rows]

    def clear_checkpoints(self, job_id: str) -> int:
        """Drop the job's block checkpoints (a run that starts over, or a cancel); how many there were."""
        with self.session() as s:
            return s.execute(delete(BlockCheckpointRow).where(BlockCheckpointRow.job_id == job_id)).rowcount

    def set_waiting(self, job_id: str, reason: str | None) -> bool:
        """Say why a queued job has not started (``progress.waiting``), or clear it; only while it is queued."""
        progress = {"stage": "queued", "waiting": reason} if reason else {}
        with self.session() as s:
            result = s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.status == "queued")
                               .values(progress=progress, updated_at=_now())
                               .execution_options(synchronize_session=False))
            return result.rowcount == 1

    def cancel_requested(self, job_id: str) -> bool:
        """Whether a cancel was requested (a worker asks this between layers)."""
        with self.session(write=False) as s:
            return bool(s.scalar(select(JobRow.cancel_requested).where(JobRow.id == job_id)))

    def recoverable(self) -> list[Job]:
        """Jobs to take up again after a restart, oldest first: queued ones (dispatch again) and running or
        uploading ones (re-attach through ``worker_ref``, or ``transition(id, [status], "queued")``; when
        ``cancel_requested`` is set, finish the cancellation instead)."""
        query = (
            select(JobRow)
            .where(JobRow.status.in_(("queued", *sorted(ACTIVE))))
            .order_by(JobRow.created_at, JobRow.id)
        )
        with self.session(write=False) as s:
            return [_job(row) for row in s.scalars(query)]

    # --- figures for /metrics -------------------------------------------------------------------------------------

    def counts_by_status(self) -> dict[str, int]:
        """Number of jobs in each status, every status present (0 when none)."""
        counts = dict.fromkeys(STATUSES, 0)
        with self.session(write=False) as s:
            for status, count in s.execute(select(JobRow.status, func.count()).group_by(JobRow.status)):
                counts[status] = count
        return counts

    def durations(self, since: datetime | None = None) -> list[tuple[str, float]]:
        """``(status, seconds from started to finished)`` of finished jobs that started, optionally only those
        finished after ``since``; for the job-duration histogram."""
        query = select(JobRow.status, JobRow.started_at, JobRow.finished_at).where(
            JobRow.status.in_(sorted(TERMINAL)), JobRow.started_at.is_not(None), JobRow.finished_at.is_not(None)
        )
        if since is not None:
            query = query.where(JobRow.finished_at > since)
        with self.session(write=False) as s:
            return [(status, (finished - started).total_seconds()) for status, started, finished in s.execute(query)]

