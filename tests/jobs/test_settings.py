"""Settings from the environment: parsing, errors that name the variable, secrets kept out of reprs."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from service.jobs.settings import Settings, get_settings
from tests.fixture_paths import REPO


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("LLMPRESS_") or name in ("RAY_ADDRESS", "HF_HUB_OFFLINE"):
            monkeypatch.delenv(name)
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def test_defaults():
    s = Settings()
    assert s.database_url == "sqlite:///./llmpress.db" and s.artifacts_root == "./artifacts"
    assert s.api_keys == {} and s.admin_keys == frozenset()
    assert (s.host, s.port, s.max_request_bytes) == ("127.0.0.1", 8000, 1024 * 1024)
    assert s.ray_address is None and s.hub_offline is False and s.public_url is None
    assert (s.webhook_allow, s.webhook_allow_private, s.webhook_allow_http) == ((), False, False)
    assert s.base_url == "http://127.0.0.1:8000"


def test_every_field_is_documented():
    for name, field in Settings.model_fields.items():
        assert field.description and len(field.description) > 30, name


def test_environment(clean_env):
    env = {
        "LLMPRESS_DATABASE_URL": "postgresql://llm:pw@db:5432/llmpress",
        "LLMPRESS_ARTIFACTS_ROOT": "/data/artifacts",
        "LLMPRESS_API_KEYS": " alice:s3cret-a , ci.bot@team:s3:cret-b ,",
        "LLMPRESS_ADMIN_KEYS": "alice, ops",
        "LLMPRESS_HOST": "0.0.0.0",
        "LLMPRESS_PORT": "9000",
        "LLMPRESS_MAX_REQUEST_BYTES": "2048",
        "RAY_ADDRESS": "ray://head:10001",
        "LLMPRESS_HUB_OFFLINE": "true",
        "LLMPRESS_PUBLIC_URL": "https://llmpress.example.com/",
        "LLMPRESS_WEBHOOK_ALLOW": " 10.20.0.0/16, Hooks.Corp.Internal ,127.0.0.1,",
        "LLMPRESS_WEBHOOK_ALLOW_HTTP": "1",
    }
    for name, value in env.items():
        clean_env.setenv(name, value)
    s = get_settings()
    assert s.database_url == env["LLMPRESS_DATABASE_URL"] and s.artifacts_root == "/data/artifacts"
    assert {k: v.get_secret_value() for k, v in s.api_keys.items()} == {"alice": "s3cret-a", "ci.bot@team": "s3:cret-b"}
    assert s.admin_keys == {"alice", "ops"}
    assert (s.host, s.port, s.max_request_bytes) == ("0.0.0.0", 9000, 2048)
    assert s.ray_address == "ray://head:10001" and s.hub_offline
    assert s.public_url == s.base_url == "https://llmpress.example.com"
    assert s.webhook_allow == ("10.20.0.0/16", "hooks.corp.internal", "127.0.0.1") and s.webhook_allow_http
    assert get_settings() is s  # cached
    clean_env.setenv("LLMPRESS_PORT", "9001")
    assert get_settings().port == 9000
    get_settings.cache_clear()
    assert get_settings().port == 9001


def test_ray_address_and_hub_offline_sources(clean_env):
    clean_env.setenv("LLMPRESS_RAY_ADDRESS", "prefixed:6379")
    clean_env.setenv("HF_HUB_OFFLINE", "1")
    s = Settings()
    assert s.ray_address == "prefixed:6379" and s.hub_offline
    clean_env.setenv("RAY_ADDRESS", "head:6379")  # Ray's own variable wins
    clean_env.setenv("LLMPRESS_HUB_OFFLINE", "false")  # ours wins over Hugging Face's
    s = Settings()
    assert s.ray_address == "head:6379" and not s.hub_offline
    assert Settings(ray_address="auto", hub_offline=True).ray_address == "auto"  # by name in Python


@pytest.mark.parametrize("value", [
    "alice:ok,justasecretvalue",  # no colon: maybe a bare secret, never echoed
    "alice:ok,bob:",
    ":justasecretvalue",
    "alice:ok,alice:justasecretvalue",
    "bad name:justasecretvalue",
])
def test_malformed_api_keys_name_the_variable_not_the_secret(clean_env, value):
    clean_env.setenv("LLMPRESS_API_KEYS", value)
    with pytest.raises(ValidationError) as err:
        Settings()
    message = str(err.value)
    assert "LLMPRESS_API_KEYS" in message
    assert "justasecretvalue" not in message and "ok," not in message


@pytest.mark.parametrize("name,value", [
    ("LLMPRESS_PORT", "70000"), ("LLMPRESS_PORT", "http"), ("LLMPRESS_MAX_REQUEST_BYTES", "0"),
    ("LLMPRESS_PUBLIC_URL", "ftp://x"), ("LLMPRESS_PUBLIC_URL", "llmpress.example.com"),
    ("LLMPRESS_WEBHOOK_ALLOW", "10.0.0.1/8"), ("LLMPRESS_WEBHOOK_ALLOW", "hooks.corp,http://x/"),
    ("LLMPRESS_WEBHOOK_ALLOW", "300.1.1.1"), ("LLMPRESS_WEBHOOK_ALLOW_PRIVATE", "maybe"),
])
def test_invalid_values(clean_env, name, value):
    clean_env.setenv(name, value)
    with pytest.raises(ValidationError, match=name.removeprefix("LLMPRESS_").lower()):
        Settings()


def test_secrets_never_printed(clean_env):
    clean_env.setenv("LLMPRESS_API_KEYS", "alice:topsecret-1,bob:topsecret-2")
    clean_env.setenv("LLMPRESS_DATABASE_URL", "postgresql+psycopg://llm:dbpassword@db/llmpress")
    s = Settings()
    for text in (repr(s), str(s), s.model_dump_json(), repr(s.api_keys), f"{s}"):
        assert "topsecret" not in text, text
    for text in (repr(s), str(s)):
        assert "dbpassword" not in text and "llm:***@db" in text
    assert s.api_keys["bob"].get_secret_value() == "topsecret-2"
    assert s.database_url.endswith("llm:dbpassword@db/llmpress")  # the value itself is intact for the engine


def test_every_setting_is_documented_in_the_readme():
    readme = (REPO / "README.md").read_text()
    for name, field in Settings.model_fields.items():
        variable = "RAY_ADDRESS" if name == "ray_address" else f"LLMPRESS_{name.upper()}"
        assert f"`{variable}`" in readme, f"{variable} ({name}) is missing from the README's settings table"
