"""Fixtures shared by several test modules."""

from __future__ import annotations

import os

# Ray gives a local node the machine's outward address (and turns a _node_ip_address of 127.0.0.1 into it,
# services.resolve_ip_for_localhost); with cluster mode off it takes loopback (services.get_node_ip_address), so
# every Ray the tests start, in this process or in a `llmpress serve` child, listens and talks on 127.0.0.1 only.
# Read once when ray is imported: set before anything imports it.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import boto3  # noqa: E402
import pytest  # noqa: E402
from moto.server import ThreadedMotoServer  # noqa: E402


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free loopback port, with boto3 pointed at it through the standard AWS variables."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        # Keep the developer's own ~/.aws out of the picture, and no instance-metadata probing.
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
        mp.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        yield boto3.client("s3")
    server.stop()


@pytest.fixture(scope="session", autouse=True)
def stub_dns():
    """No test makes a DNS query: the outbound policy's resolver (what webhook URLs resolve through) is swapped for
    a table. IP literals resolve to themselves (AI_NUMERICHOST: parsed, never looked up); the names below answer
    from the table, one answer per lookup, the last one repeating; any other name fails loudly, naming itself and
    this table (as a gaierror, so the code under test answers as it would for a name that does not exist: a fuzz
    run's random host names get their 422, never a DNS query).
    Ray's worker processes do not see this swap: a job that runs on Ray names its webhook by IP literal.
    Yields the table and the names looked up in vain, for tests that need a fresh answer sequence (monkeypatch
    ``answers``)."""
    import socket
    import types

    from service.jobs import outbound

    public = "8.8.8.8"  # global, so the policy lets it through; only checked, never connected to
    dns = types.SimpleNamespace(public=public, unknown=[], answers={
        "localhost": [["127.0.0.1"]],
        "hooks.internal.test": [["10.0.0.5"]],
        "metadata.test": [["169.254.169.254"]],
        "public.test": [[public]],
        "mixed.test": [[public, "10.0.0.5"]],
        "rebind.test": [[public], ["127.0.0.1"]],
    })

    def resolve(host: str) -> list[str]:
        try:
            return [info[4][0] for info in socket.getaddrinfo(host, None, flags=socket.AI_NUMERICHOST)]
        except (socket.gaierror, UnicodeError):
            pass
        answers = dns.answers.get(host.lower().rstrip("."))
        if answers is None:
            dns.unknown.append(host)
            raise socket.gaierror(socket.EAI_NONAME, f"tests never resolve names: {host!r} is not in "
                                                     "tests/conftest.py's stub_dns table")
        return list(answers.pop(0) if len(answers) > 1 else answers[0])

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(outbound, "resolve_name", resolve)
        yield dns
