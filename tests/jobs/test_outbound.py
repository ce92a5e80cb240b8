"""service/jobs/outbound.py: the server calls only URLs whose every address is allowed, and connects to the
address it checked. Names resolve through tests/conftest.py's ``stub_dns`` table, never DNS; every receiver runs
on 127.0.0.1, and a guard fails any test whose code tries to connect anywhere else."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import hmac
import http.server
import ipaddress
import re
import socket
import ssl
import threading

import httpx
import pytest

from api.app import create_app
from service.engine.options import OptionsError
from service.jobs import outbound, webhook
from service.jobs.job_store import JobStore
from service.jobs.outbound import Policy, Refused, Unresolved, allow_entry, check_url, ipv4_literal
from service.jobs.request import JobRequest
from service.jobs.settings import Settings
from tests.api_server import NoWorkers, Server
from tests.jobs.bodies import SECRET
from tests.tiny_models import RECIPE_2OF4

LOOPBACK_HOOKS = Policy(allow_http=True, networks=(ipaddress.ip_network("127.0.0.1/32"),))


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Every connection http.client (and so the webhook sender) opens: recorded, and refused unless it is to a
    loopback address, so a bug here can never reach the public address the test DNS hands out."""
    opened: list[tuple[str, int]] = []
    real = socket.create_connection

    def create_connection(address, *args, **kwargs):
        host, port = address[0], address[1]
        if not ipaddress.ip_address(host.split("%", 1)[0]).is_loopback:
            raise AssertionError(f"a test tried to connect to {host}:{port}")
        opened.append((host, port))
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", create_connection)
    return opened


@contextlib.contextmanager
def receiver(status: int = 204, headers: dict[str, str] | None = None, tls: ssl.SSLContext | None = None):
    """An http.server on 127.0.0.1 answering every request with ``status``; yields (port, requests it got)."""
    got: list[dict] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            got.append({"headers": dict(self.headers), "body": body, "path": self.path})
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], got
    finally:
        server.shutdown()
        server.server_close()


def job_with(store: JobStore, url: str):
    job, _ = store.create_job("alice", {"model": "m", "webhook": {"url": url, "secret": SECRET}})
    return dataclasses.replace(job, status="succeeded")


@pytest.fixture
def store(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    yield store
    store.close()


def hooks_settings(**webhook_settings) -> Settings:
    return Settings(database_url="sqlite://", **webhook_settings)


# ------------------------------------------------------------------------------------------- the address forms


@pytest.mark.parametrize("host, kind", [
    ("127.0.0.1", "loopback"), ("127.1", "loopback"), ("0x7f000001", "loopback"), ("2130706433", "loopback"),
    ("0177.0.0.1", "loopback"), ("0x7f.0.0.1", "loopback"), ("127.0.0.1.", "loopback"), ("[::1]", "loopback"),
    ("[::ffff:127.0.0.1]", "loopback"), ("[::ffff:7f00:1]", "loopback"), ("[::127.0.0.1]", "loopback"),
    ("[2002:7f00:1::]", "loopback"),  # 6to4 of 127.0.0.1
    ("0.0.0.0", "unspecified"), ("0", "unspecified"), ("[::]", "unspecified"),
    ("169.254.169.254", "link-local"), ("[::ffff:169.254.169.254]", "link-local"), ("[fe80::1]", "link-local"),
    ("[64:ff9b::a9fe:a9fe]", "link-local"),  # NAT64 of 169.254.169.254
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("172.31.255.254", "private"), ("192.168.1.1", "private"),
    ("[fc00::1]", "private"), ("[fd12:3456::1]", "private"), ("[2002:a00:1::]", "private"),
    ("100.64.0.1", "shared"), ("100.100.100.200", "shared"), ("[fd00:ec2::254]", "metadata"),
    ("224.0.0.1", "multicast"), ("239.255.255.250", "multicast"), ("[ff02::1]", "multicast"),
    ("240.0.0.1", "reserved"), ("255.255.255.255", "reserved"), ("[fec0::1]", "reserved"),
    ("203.0.113.7", "special-purpose"), ("192.0.0.8", "special-purpose"), ("198.18.0.1", "special-purpose"),
    ("[2001:db8::1]", "special-purpose"), ("[2001::1]", "special-purpose"),  # documentation, Teredo
    ("localhost", "loopback"), ("LocalHost.", "loopback"), ("ｌｏｃａｌｈｏｓｔ", "loopback"),  # fullwidth: IDNA folds it
    ("hooks.internal.test", "private"), ("metadata.test", "link-local"), ("mixed.test", "private"),
])
def test_every_non_public_form_is_refused_by_default(host, kind):
    url = f"https://{host}:8443/hooks/llmpress?token=s3cr3t"
    with pytest.raises(Refused) as info:
        check_url(url)
    message = str(info.value)
    assert re.search(f" is an? {kind} address", message), message
    assert "token" not in message and "hooks/llmpress" not in message  # scheme://host[:port] only
    # The same form never gets through the allowed path either: it is an address, whatever the spelling.
    assert not isinstance(info.value, Unresolved)


def test_a_zone_id_is_refused_even_where_private_addresses_are_allowed():
    for url in ("https://[fe80::1%25eth0]/h", "https://[fe80::1%eth0]/h"):
        with pytest.raises(Refused, match="zone"):
            check_url(url, Policy(allow_private=True))


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1", "0x7f000001", "2130706433", "0177.0.0.1", "0x7f.1",
                                  "10.0.1", "0", "1.2.3.4.5", "256.0.0.1", "08.0.0.1", "0x", "1..1", "4294967296"])
def test_ipv4_literals_read_as_the_c_library_reads_them(host):
    try:  # AI_NUMERICHOST: the C library parses, it never looks anything up
        expected = ipaddress.ip_address(socket.getaddrinfo(host, None, flags=socket.AI_NUMERICHOST)[0][4][0])
    except (socket.gaierror, UnicodeError):
        expected = None
    assert ipv4_literal(host) == expected


@pytest.mark.parametrize("url, why", [
    ("ftp://public.test/x", "must be an http:// or https:// URL"),
    ("http://public.test/x", "must be an https:// URL"),
    ("https://user:pa55word@public.test/x", "must not contain a user name or password"),
    ("https://pa55word@public.test/x", "must not contain a user name or password"),
    ("https:///x", "must name a host"),
    ("https://public.test:0/x", "must not name port 0"),
    ("https://public.test:99999/x", "must be a valid URL"),
    ("https://%31%32%37.0.0.1/x", "must name a valid host"),  # percent-encoded 127: never handed to a resolver
    ("https://1.2.3.4.5/x", "must name a valid host or IP address"),
    ("https://256.0.0.1/x", "must name a valid host or IP address"),
    ("https://public.test/a b", "must not contain spaces or control characters"),
    ("https://public.test/a\r\nX-Injected: 1", "must not contain spaces or control characters"),
])
def test_malformed_or_insecure_urls_are_refused(url, why):
    with pytest.raises(Refused, match=why) as info:
        check_url(url)
    assert "pa55word" not in str(info.value)


def test_public_addresses_pass_with_the_addresses_to_connect_to(stub_dns):
    public = ipaddress.ip_address(stub_dns.public)
    named = check_url("https://Public.Test/hooks/llmpress?token=t#frag")
    assert named.addresses == (public,) and named.host == "public.test" and named.port == 443
    assert (named.host_header, named.server_name, named.target) == ("public.test", "public.test",
                                                                    "/hooks/llmpress?token=t")
    assert named.origin == "https://public.test"
    assert check_url("https://[::ffff:8.8.8.8]:8443").addresses == (ipaddress.ip_address("8.8.8.8"),)
    literal = check_url("https://[2001:4860:4860::8888]:8443/h")
    assert literal.host_header == "[2001:4860:4860::8888]:8443" and literal.target == "/h"
    assert check_url("https://134744072/").host == "8.8.8.8"  # a literal is sent in its canonical form


def test_a_name_is_refused_when_any_of_its_addresses_is(stub_dns):
    assert stub_dns.answers["mixed.test"][0][0] == stub_dns.public
    with pytest.raises(Refused, match="mixed.test resolves to 10.0.0.5, which is a private address"):
        check_url("https://mixed.test/")


def test_unknown_names_fail_loudly_and_never_reach_dns(stub_dns):
    with pytest.raises(Unresolved, match="tests never resolve names: 'ci.example.com'"):
        check_url("https://ci.example.com/hook")
    assert "ci.example.com" in stub_dns.unknown


# -------------------------------------------------------------------------------------------------- the policy


def test_http_needs_its_setting():
    with pytest.raises(Refused, match="https://"):
        check_url("http://public.test/")
    assert check_url("http://public.test/", Policy(allow_http=True)).port == 80


def test_networks_allow_what_lies_in_them_whatever_it_is():
    policy = Policy.from_settings(hooks_settings(webhook_allow="127.0.0.1,169.254.169.254/32, 10.0.0.0/8"))
    for url in ("https://127.0.0.1:9/h", "https://0x7f000001:9/h", "https://[::ffff:127.0.0.1]:9/h",
                "https://localhost:9/h", "https://metadata.test/", "https://hooks.internal.test/"):
        check_url(url, policy)
    for url in ("https://127.0.0.2/", "https://[::1]/", "https://192.168.0.1/"):
        with pytest.raises(Refused):
            check_url(url, policy)


def test_a_host_name_entry_allows_that_name_private_addresses_only(stub_dns, monkeypatch):
    policy = Policy.from_settings(hooks_settings(webhook_allow="Hooks.Internal.Test,metadata.test,localhost"))
    assert check_url("https://hooks.internal.test/h", policy).addresses == (ipaddress.ip_address("10.0.0.5"),)
    with pytest.raises(Refused, match="private"):  # only the name listed: not its address written out
        check_url("https://10.0.0.5/h", policy)
    for url, kind in (("https://metadata.test/", "link-local"), ("https://localhost/", "loopback")):
        with pytest.raises(Refused, match=kind):  # loopback and metadata need a network entry
            check_url(url, policy)
    monkeypatch.setitem(stub_dns.answers, "hooks.internal.test", [["100.100.100.200"]])
    with pytest.raises(Refused, match="shared"):
        check_url("https://hooks.internal.test/h", policy)


def test_allow_private_allows_every_address():
    policy = Policy.from_settings(hooks_settings(webhook_allow_private=True))
    for url in ("https://127.0.0.1/", "https://[::1]/", "https://metadata.test/", "https://10.1.2.3/"):
        check_url(url, policy)
    with pytest.raises(Refused, match="https://"):  # but not plain http
        check_url("http://127.0.0.1/", policy)


@pytest.mark.parametrize("entry, parsed", [
    ("10.0.0.0/8", ipaddress.ip_network("10.0.0.0/8")), ("127.0.0.1", ipaddress.ip_network("127.0.0.1/32")),
    ("[::1]", ipaddress.ip_network("::1/128")), ("fc00::/7", ipaddress.ip_network("fc00::/7")),
    ("Hooks.Corp.", "hooks.corp"), ("0x7f000001", ipaddress.ip_network("127.0.0.1/32")),
])
def test_allow_entries(entry, parsed):
    assert allow_entry(entry) == parsed


@pytest.mark.parametrize("entry", ["10.0.0.1/8", "300.0.0.1", "http://hooks.corp/", "hooks corp", "fe80::1%eth0"])
def test_bad_allow_entries_are_refused(entry):
    with pytest.raises(ValueError):
        allow_entry(entry)


# ------------------------------------------------------------------------------------------ at submit, via parse


def test_job_requests_check_the_webhook_with_the_settings_policy():
    body = {"model": "Org/model", "recipe": [{"MagnitudePruningModifier": {"sparsity": 0.5}}],
            "output": "s3://bucket/out", "webhook": {"url": "http://127.0.0.1:9/h", "secret": SECRET}}
    for settings in (None, hooks_settings(), hooks_settings(webhook_allow_http=True)):
        with pytest.raises(OptionsError) as info:
            JobRequest.parse(body, settings)
        assert info.value.loc == ("webhook", "url") and str(info.value).startswith("webhook.url")
        assert SECRET not in str(info.value)
    allowed = hooks_settings(webhook_allow="127.0.0.1", webhook_allow_http=True)
    assert JobRequest.parse(body, allowed).webhook.url == "http://127.0.0.1:9/h"


# ----------------------------------------------------------------------------------------------- at send time


def test_delivery_connects_to_the_checked_address_with_the_urls_host(store, loopback_only):
    with receiver() as (port, got):
        url = f"http://localhost:{port}/hooks/llmpress?token=abc"
        job = job_with(store, url)
        settings = hooks_settings(webhook_allow="127.0.0.1", webhook_allow_http=True)
        assert webhook.notify(job, settings) is True
    assert loopback_only == [("127.0.0.1", port)]  # the address checked, not a fresh lookup of "localhost"
    [delivery] = got
    assert delivery["headers"]["Host"] == f"localhost:{port}" and delivery["path"] == "/hooks/llmpress?token=abc"
    expected = "sha256=" + hmac.new(SECRET.encode(), delivery["body"], hashlib.sha256).hexdigest()
    assert delivery["headers"]["X-Llmpress-Signature"] == expected
    assert delivery["headers"]["X-Llmpress-Event"] == "job.succeeded"


def test_a_name_that_rebinds_to_loopback_after_submit_is_never_called(store, stub_dns, monkeypatch, caplog,
                                                                      loopback_only):
    monkeypatch.setitem(stub_dns.answers, "rebind.test", [[stub_dns.public], ["127.0.0.1"]])
    settings = hooks_settings(webhook_allow_http=True)
    with receiver() as (port, got):
        url = f"http://rebind.test:{port}/hook?token=abc"
        body = {"model": "Org/model", "recipe": [{"MagnitudePruningModifier": {"sparsity": 0.5}}],
                "output": "s3://bucket/out", "webhook": {"url": url, "secret": SECRET}}
        JobRequest.parse(body, settings)  # at submit the name is public
        caplog.set_level("INFO")
        assert webhook.notify(job_with(store, url), settings) is False
    assert got == [] and loopback_only == []
    assert "127.0.0.1, which is a loopback address" in caplog.text and "attempt" not in caplog.text  # not retried
    assert "token=abc" not in caplog.text and SECRET not in caplog.text


def test_a_redirect_is_not_followed(store, caplog):
    with receiver() as (elsewhere, second), \
            receiver(302, {"Location": f"http://127.0.0.1:{elsewhere}/stolen"}) as (port, first):
        caplog.set_level("INFO")
        settings = hooks_settings(webhook_allow="127.0.0.1", webhook_allow_http=True)
        assert webhook.notify(job_with(store, f"http://127.0.0.1:{port}/hook"), settings) is False
    assert len(first) == 1 and second == []  # not followed, and not retried either
    assert "HTTP 302, a redirect, not followed" in caplog.text


def test_a_name_that_does_not_resolve_at_send_is_retried(store, monkeypatch, caplog):
    monkeypatch.setattr(webhook, "WEBHOOK_BACKOFF_S", 0.001)
    caplog.set_level("INFO")
    assert webhook.notify(job_with(store, "https://gone.test/h"), hooks_settings()) is False
    assert "attempt 3/3" in caplog.text and "cannot resolve https://gone.test" in caplog.text


def _tls_files(tmp_path):
    """A test CA, and a certificate it signed for the name localhost only (no IP address)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject, key, issuer, issuer_key, ca, extra=()):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(hours=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                                  critical=False))
        for extension in extra:
            builder = builder.add_extension(extension, critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "llmpress test CA")])
    ca = certificate(ca_name, ca_key, ca_name, ca_key, True,
                     [x509.KeyUsage(False, False, False, False, False, True, True, False, False)])
    leaf = certificate(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]), leaf_key, ca_name,
                       ca_key, False, [x509.SubjectAlternativeName([x509.DNSName("localhost")])])
    pem = serialization.Encoding.PEM
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(pem))
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(pem) + leaf_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return tmp_path / "ca.pem", tmp_path / "leaf.pem"


def test_https_verifies_the_certificate_for_the_urls_host_name(store, tmp_path, monkeypatch, loopback_only):
    ca, leaf = _tls_files(tmp_path)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(leaf)
    names: list[str | None] = []
    server_context.sni_callback = lambda sock, name, context: names.append(name)
    monkeypatch.setattr(webhook, "tls_context", lambda: ssl.create_default_context(cafile=str(ca)))
    monkeypatch.setattr(webhook, "WEBHOOK_BACKOFF_S", 0.001)
    settings = hooks_settings(webhook_allow="127.0.0.1")
    with receiver(tls=server_context) as (port, got):
        assert webhook.notify(job_with(store, f"https://localhost:{port}/h"), settings) is True
        assert names == ["localhost"] and got[0]["headers"]["Host"] == f"localhost:{port}"
        # The same server by address: its certificate does not name 127.0.0.1, so nothing is sent.
        assert webhook.notify(job_with(store, f"https://127.0.0.1:{port}/h"), settings) is False
    assert len(got) == 1 and {address for address, _ in loopback_only} == {"127.0.0.1"}


# ------------------------------------------------------------------------------------------- through the API


@pytest.mark.parametrize("webhook_settings", [{}, {"webhook_allow_http": True}])
def test_the_api_refuses_a_webhook_to_loopback_naming_the_field(tmp_path, webhook_settings):
    settings = Settings(api_keys="alice:alice-secret", database_url=f"sqlite:///{tmp_path / 'jobs.db'}",
                        artifacts_root=str(tmp_path / "artifacts"), **webhook_settings)
    store, workers = JobStore(settings.database_url), NoWorkers()
    try:
        with receiver() as (port, got), Server(create_app(settings, store, workers)) as api:
            body = {"model": "s3://models/m", "recipe": RECIPE_2OF4, "output": "s3://out/run-1/",
                    "dataset": {"source": "s3://data/calib.txt", "num_samples": 8, "seq_len": 64},
                    "webhook": {"url": f"http://127.0.0.1:{port}/hook?token=abc", "secret": SECRET}}
            response = httpx.post(f"{api}/v1/jobs", json=body, headers={"Authorization": "Bearer alice-secret"})
        assert response.status_code == 422, response.text
        [error] = response.json()["detail"]
        assert error["loc"] == ["body", "webhook", "url"] and error["msg"].startswith("webhook.url")
        assert "token=abc" not in response.text and SECRET not in response.text
        assert got == [] and workers.submitted == [] and sum(store.counts_by_status().values()) == 0
    finally:
        store.close()


def test_the_resolver_tests_swap_is_the_one_the_policy_uses():
    assert outbound.resolve_name.__module__ == "tests.conftest"
