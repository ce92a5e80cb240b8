"""API keys: created and stored hashed in the job store, or given in LLMPRESS_API_KEYS; checked per request.

A key's name is its tenant: jobs are owned by the name, so a new key created under a revoked key's name sees
that name's jobs (key rotation). A stored secret looks like ``lp_<key_id>.<token>``: the key id finds the one
row to check, so a request costs one indexed lookup and one hash, whatever the number of keys.

Hashing is salted HMAC-SHA256, not a slow password hash: the secrets are 256 random bits (``token_urlsafe(32)``),
far beyond brute force, and a slow KDF would cost tens of milliseconds on every request. Every comparison is
``hmac.compare_digest``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from pydantic import SecretStr
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.jobs.job_store import ApiKeyRow, JobStore
from service.jobs.settings import KEY_NAME

if TYPE_CHECKING:
    from service.jobs.settings import Settings

SECRET_PREFIX = "lp_"


class KeyExists(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class KeyInfo:
    """Who a key is: ``name`` (the tenant that owns its jobs), ``admin``, and where it comes from
    (``"store"`` or ``"environment"``)."""

    name: str
    admin: bool
    source: str
    created_at: datetime | None = None

    def to_dict(self) -> dict:
        return {
            "name": self.name, "admin": self.admin, "source": self.source,
            "created_at": self.created_at.isoformat() if self.created_at else None,
        }


def _digest(salt: bytes, secret: str) -> str:
    return hmac.new(salt, secret.encode(), hashlib.sha256).hexdigest()


def _split_secret(secret: str) -> str | None:
    """The key id of a stored key's secret, or None if it does not have that shape."""
    if not secret.startswith(SECRET_PREFIX):
        return None
    key_id, dot, token = secret[len(SECRET_PREFIX):].partition(".")
    return key_id if dot and key_id and token else None


@contextmanager
def _session(store_or_session: JobStore | Session) -> Iterator[Session]:
    if isinstance(store_or_session, Session):
        yield store_or_session  # the caller's transaction
    else:
        with store_or_session.session() as session:
            yield session


def create_key(store_or_session: JobStore | Session, name: str, admin: bool = False) -> str:
    """Create a key named ``name`` and return its secret; only a salted hash is stored, so this is the one
    time the secret exists. Raises :class:`KeyExists` if the name is taken (revoke it first to rotate)."""
    if not isinstance(name, str) or not KEY_NAME.match(name):
        raise ValueError(f"key name {name!r}: letters, digits and _.@- (at most 128 characters)")
    key_id = secrets.token_hex(6)
    secret = f"{SECRET_PREFIX}{key_id}.{secrets.token_urlsafe(32)}"
    salt = secrets.token_bytes(16)
    row = ApiKeyRow(
        name=name, key_id=key_id, salt=salt.hex(), secret_hash=_digest(salt, secret), admin=admin,
        created_at=datetime.now(timezone.utc),
    )
    try:
        with _session(store_or_session) as session:
            if session.get(ApiKeyRow, name) is not None:
                raise KeyExists(f"a key named {name!r} exists; revoke it first to replace it")
            session.add(row)
            session.flush()
    except IntegrityError:
        raise KeyExists(f"a key named {name!r} exists; revoke it first to replace it") from None
    return secret


def list_keys(store_or_session: JobStore | Session, settings: Settings | None = None) -> list[KeyInfo]:
    """Stored keys and, when ``settings`` is given, the environment's, sorted by name. Never secrets or hashes."""
    admins = settings.admin_keys if settings is not None else frozenset()
    with _session(store_or_session) as session:
        keys = [
            KeyInfo(row.name, row.admin or row.name in admins, "store", row.created_at)
            for row in session.scalars(select(ApiKeyRow))
        ]
    if settings is not None:
        keys += [KeyInfo(name, name in admins, "environment") for name in settings.api_keys]
    return sorted(keys, key=lambda k: (k.name, k.source))


def revoke(store_or_session: JobStore | Session, name: str) -> bool:
    """Delete the stored key ``name``; False if there is none (keys from the environment are removed there)."""
    with _session(store_or_session) as session:
        return session.execute(delete(ApiKeyRow).where(ApiKeyRow.name == name)).rowcount == 1


class KeyRing:
    """Checks presented secrets against the environment's keys (hashed in memory here, at startup) and the
    store's. Build one per process: ``KeyRing(store, settings.api_keys, settings.admin_keys)``."""

    def __init__(
        self,
        store: JobStore | None,
        env_keys: Mapping[str, SecretStr | str] | None = None,
        admin_names: frozenset[str] | set[str] = frozenset(),
    ):
        self.store = store
        self.admin_names = frozenset(admin_names)
        self._salt = secrets.token_bytes(16)  # per process: the in-memory hashes mean nothing elsewhere
        self._env = [
            (name, _digest(self._salt, s.get_secret_value() if isinstance(s, SecretStr) else s))
            for name, s in (env_keys or {}).items()
        ]

    @classmethod
    def from_settings(cls, store: JobStore | None, settings: Settings) -> KeyRing:
        return cls(store, settings.api_keys, settings.admin_keys)

    def verify(self, secret: str | None) -> KeyInfo | None:
        """The key's identity, or None for a missing or unknown secret."""
        if not secret:
            return None
        digest = _digest(self._salt, secret)
        match = None
        for name, expected in self._env:  # no early exit: the time taken does not depend on which key matched
            if hmac.compare_digest(digest, expected):
                match = name
        if match is not None:
            return KeyInfo(match, match in self.admin_names, "environment")
        key_id = _split_secret(secret)
        if key_id is None or self.store is None:
            return None
        with self.store.session(write=False) as session:
            row = session.scalars(select(ApiKeyRow).where(ApiKeyRow.key_id == key_id)).one_or_none()
            if row is None:
                return None
            if not hmac.compare_digest(_digest(bytes.fromhex(row.salt), secret), row.secret_hash):
                return None
            return KeyInfo(row.name, row.admin or row.name in self.admin_names, "store", row.created_at)
