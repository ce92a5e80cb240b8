"""The service's settings: one object read from the environment (variables prefixed ``LLMPRESS_``).

Every field's description is its documentation (the README lists them). Secrets are ``SecretStr`` and the
database URL's password is masked, so neither a ``repr()``, a log line nor a validation error shows them.
"""

from __future__ import annotations

import functools
import re
from typing import Annotated
from urllib.parse import urlsplit, urlunsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.jobs.outbound import allow_entry

ENV_PREFIX = "LLMPRESS_"
# Key names become job owners and appear in URLs, logs and metrics labels: keep them plain.
KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")


def _mask_url_password(url: str) -> str:
    """``scheme://user:secret@host/db`` -> ``scheme://user:***@host/db``; other URLs unchanged."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"
    if parts.password is None:
        return url
    user_host = parts.netloc.rsplit("@", 1)
    user = user_host[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{user_host[1]}"))


def _split_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="ignore",
        # Fields with an environment alias (ray_address) can still be passed by name in Python.
        validate_by_name=True,
        # A validation error must not echo the offending value: it can be LLMPRESS_API_KEYS.
        hide_input_in_errors=True,
    )

    database_url: str = Field(
        "sqlite:///./llmpress.db",
        description=(
            "SQLAlchemy URL of the job store. The default is a SQLite file in the working directory (created on "
            "first use, WAL mode). For PostgreSQL use postgresql://user:password@host:5432/dbname (driven by "
            "psycopg 3). The password is masked wherever the settings are printed."
        ),
    )
    artifacts_root: str = Field(
        "./artifacts",
        description="Folder where jobs with a local output write their artifacts, and the default output location.",
    )
    api_keys: Annotated[dict[str, SecretStr], NoDecode] = Field(
        default_factory=dict,
        description=(
            'API keys accepted as "Authorization: Bearer <secret>", as "name:secret,name:secret". The name is the '
            "tenant that owns the jobs submitted with the key. Only hashes are kept in memory after startup; keys "
            "created with `llmpress keys create` are stored hashed in the job store and need no entry here."
        ),
    )
    admin_keys: Annotated[frozenset[str], NoDecode] = Field(
        default_factory=frozenset,
        description=(
            'Comma-separated key names with admin rights (see and cancel every tenant\'s jobs), e.g. "alice,ops". '
            "Applies to keys from LLMPRESS_API_KEYS and to stored keys alike."
        ),
    )
    input_roots: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description=(
            "Comma-separated folders whose files jobs may read as a local model, dataset or eval text, besides "
            "artifacts_root (always allowed). Empty by default: other local paths are refused, so a job cannot read "
            "arbitrary files of the server; S3 and Hub inputs need no entry."
        ),
    )
    host: str = Field("127.0.0.1", description="Interface `llmpress serve` listens on; 0.0.0.0 for all interfaces.")
    port: int = Field(8000, ge=0, le=65535,
                      description="TCP port `llmpress serve` listens on; 0: a free one, named in its log.")
    max_request_bytes: int = Field(
        1024 * 1024, gt=0, description="Largest accepted HTTP request body in bytes (default 1 MiB); larger is a 413."
    )
    ray_address: str | None = Field(
        None,
        validation_alias=AliasChoices("RAY_ADDRESS"),
        description=(
            "Read from RAY_ADDRESS (Ray's own variable, no prefix; LLMPRESS_RAY_ADDRESS is read when it is unset). "
            'Unset: a local Ray is started on this machine; "auto", ray://host:10001 or host:6379 joins a cluster.'
        ),
    )
    worker_start_timeout: float = Field(
        600.0, gt=0, description="Seconds a job with several workers waits for Ray to start them (after a lost node, "
                                 "for its placement group's bundle to be placed again) before it gives up the attempt.")
    hub_offline: bool = Field(
        False,
        validation_alias=AliasChoices("LLMPRESS_HUB_OFFLINE", "HF_HUB_OFFLINE"),
        description=(
            "Never contact the Hugging Face Hub (HF_HUB_OFFLINE=1 is read when LLMPRESS_HUB_OFFLINE is unset): a job "
            "whose model is a Hub id fails with a clear error unless the model is already in the local cache."
        ),
    )
    public_url: str | None = Field(
        None,
        description=(
            "Base URL clients reach this server at (e.g. https://llmpress.example.com), used in links the service "
            "hands out; unset: http://{host}:{port}."
        ),
    )
    webhook_allow_http: bool = Field(
        False,
        description=(
            "Let webhooks use plain http:// (off: https:// only, so the signed body and any token in the URL travel "
            "encrypted). Tests and closed networks turn it on."
        ),
    )
    webhook_allow_private: bool = Field(
        False,
        description=(
            "Let webhooks reach any address: loopback, private networks, link-local and cloud metadata included. "
            "Off: only public addresses (and LLMPRESS_WEBHOOK_ALLOW) are called, so a job cannot make the server "
            "POST to itself, the Ray dashboard or its cluster. Only for deployments whose every tenant is trusted."
        ),
    )
    webhook_allow: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description=(
            'Comma-separated networks and host names webhooks may reach besides public addresses, e.g. '
            '"10.20.0.0/16,127.0.0.1,hooks.corp.internal". A network (CIDR, or one address) allows every address '
            "in it. A host name allows that name, and no other, to resolve to private-network addresses (10/8, "
            "172.16/12, 192.168/16, fc00::/7), but never to loopback, link-local, 100.64/10, cloud metadata or "
            "other special addresses: those need a network entry. Every address a name resolves to is checked, at "
            "submit and again at each delivery, and the delivery connects to the checked address."
        ),
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _parse_api_keys(cls, value):
        if not isinstance(value, str):
            return value
        keys: dict[str, str] = {}
        for position, entry in enumerate(_split_list(value), start=1):
            # Never put the entry itself in a message: a malformed one may be a bare secret.
            name, sep, secret = entry.partition(":")
            name, secret = name.strip(), secret.strip()
            if not sep or not name or not secret:
                raise ValueError(f"{ENV_PREFIX}API_KEYS entry {position} is not name:secret")
            if not KEY_NAME.match(name):
                raise ValueError(
                    f"{ENV_PREFIX}API_KEYS entry {position}: the name must be letters, digits and _.@- "
                    f"(at most 128 characters)"
                )
            if name in keys:
                raise ValueError(f"{ENV_PREFIX}API_KEYS names {name!r} twice")
            keys[name] = secret
        return keys

    @field_validator("input_roots", mode="before")
    @classmethod
    def _parse_input_roots(cls, value):
        return tuple(_split_list(value)) if isinstance(value, str) else value

    @field_validator("webhook_allow", mode="before")
    @classmethod
    def _parse_webhook_allow(cls, value):
        entries = tuple(_split_list(value)) if isinstance(value, str) else value
        if not isinstance(entries, (list, tuple)) or not all(isinstance(entry, str) for entry in entries):
            return value  # pydantic's own type error
        for position, entry in enumerate(entries, start=1):
            try:
                allow_entry(entry)  # refused at startup, not at the first webhook
            except ValueError as exc:
                raise ValueError(f"{ENV_PREFIX}WEBHOOK_ALLOW entry {position}: {exc}") from None
        return tuple(entry.strip().lower() for entry in entries)

    @field_validator("admin_keys", mode="before")
    @classmethod
    def _parse_admin_keys(cls, value):
        return frozenset(_split_list(value)) if isinstance(value, str) else value

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip().rstrip("/")
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{ENV_PREFIX}PUBLIC_URL must be an http:// or https:// URL")
        return value

    @property
    def base_url(self) -> str:
        """``public_url``, or the address ``llmpress serve`` listens on."""
        return self.public_url or f"http://{self.host}:{self.port}"

    def __repr_args__(self):
        for name, value in super().__repr_args__():
            yield name, (_mask_url_password(value) if name == "database_url" else value)


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read from the environment once (tests call ``get_settings.cache_clear()``)."""
    return Settings()
