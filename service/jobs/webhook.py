"""Webhooks: the job, signed, POSTed to the URL its request names when it reaches a terminal state.

``notify`` tries WEBHOOK_ATTEMPTS times with backoff and never changes the job; the body is the job without the
webhook secret (``webhook_payload``, which the API's responses use too), signed ``X-Llmpress-Signature:
sha256=<HMAC-SHA256 of the body keyed with the secret>``. Before each try the URL goes through the outbound
policy again (``service.jobs.outbound``: DNS can answer differently than at submit) and the request goes to the
addresses that check returned, with the URL's Host and, for https, its host name for SNI and the certificate; a
refused URL is logged and not retried. Redirects are not followed (they would re-send a signed body somewhere the
submitter did not name, unchecked), and logs show only scheme://host[:port] of the URL.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import logging
import ssl
import time
from collections.abc import Mapping

from service.jobs.job_store import Job, canonical_json
from service.jobs.outbound import Destination, Policy, Refused, Unresolved, check_url, safe_origin
from service.jobs.settings import Settings

log = logging.getLogger(__name__)

WEBHOOK_ATTEMPTS = 3
WEBHOOK_TIMEOUT_S = 5.0
WEBHOOK_BACKOFF_S = 1.0  # waits 1 s, then 2 s between attempts
SIGNATURE_HEADER = "X-Llmpress-Signature"
EVENT_HEADER = "X-Llmpress-Event"
MAX_RESPONSE_BYTES = 64 * 1024


def webhook_payload(job: Job) -> dict:
    """The job as the webhook receives it: every field, the webhook secret left out."""
    body = job.to_dict()
    request = dict(body.get("request") or {})
    if isinstance(request.get("webhook"), Mapping):
        request["webhook"] = {k: v for k, v in request["webhook"].items() if k != "secret"}
    body["request"] = request
    return body


def signature(secret: str, body: bytes) -> str:
    """The X-Llmpress-Signature value: ``sha256=<hex HMAC-SHA256 of the body keyed with the secret>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def tls_context() -> ssl.SSLContext:
    """Certificates verified against the system's CAs, for the URL's host name (tests trust their own CA here)."""
    return ssl.create_default_context()


class _PinnedHTTPS(http.client.HTTPSConnection):
    """TLS to an address already checked, with SNI and certificate verification for the URL's host name (the
    stock connection would use the address it was given for both)."""

    def __init__(self, address: str, port: int, server_name: str, timeout: float, context: ssl.SSLContext):
        super().__init__(address, port, timeout=timeout, context=context)
        self._server_name = server_name

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self._server_name)


def _connect(destination: Destination) -> http.client.HTTPConnection:
    """A connection to the first of the checked addresses that answers (never a new DNS lookup)."""
    error: OSError | None = None
    for address in destination.addresses:
        if destination.scheme == "https":
            connection = _PinnedHTTPS(str(address), destination.port, destination.server_name, WEBHOOK_TIMEOUT_S,
                                      tls_context())
        else:
            connection = http.client.HTTPConnection(str(address), destination.port, timeout=WEBHOOK_TIMEOUT_S)
        try:
            connection.connect()
            return connection
        except OSError as exc:
            connection.close()
            error = exc
    raise error or OSError("no address")


def _post(destination: Destination, body: bytes, headers: dict[str, str]) -> int:
    """POST ``body`` once; the response's status. http.client follows no redirect: a 3xx is just a status."""
    connection = _connect(destination)
    try:
        connection.request("POST", destination.target, body=body,
                           headers={**headers, "Host": destination.host_header})
        response = connection.getresponse()
        response.read(MAX_RESPONSE_BYTES)  # the receiver's answer is not used: never read an unbounded one
        return response.status
    finally:
        connection.close()


def notify(job: Job, settings: Settings | None) -> bool:
    """POST the job to its webhook, if it has one: WEBHOOK_ATTEMPTS tries with backoff; True when delivered.
    Before each try the URL is checked again with the outbound policy of ``settings`` (None: the strict
    defaults) and the connection goes to the addresses just checked. Failures are logged and never change the job."""
    hook = (job.request or {}).get("webhook")
    if not isinstance(hook, Mapping) or not hook.get("url") or not hook.get("secret"):
        return False
    url, secret = hook["url"], hook["secret"]
    policy = Policy.from_settings(settings)
    body = canonical_json(webhook_payload(job)).encode()
    headers = {"Content-Type": "application/json", "User-Agent": "llmpress-webhook",
               SIGNATURE_HEADER: signature(secret, body), EVENT_HEADER: f"job.{job.status}"}
    for attempt in range(1, WEBHOOK_ATTEMPTS + 1):
        try:
            status = _post(check_url(url, policy), body, headers)
            if 200 <= status < 300:
                log.info("job %s: webhook %s delivered (job.%s)", job.id, safe_origin(url), job.status)
                return True
            why = f"HTTP {status}"
            if 300 <= status < 400 or (400 <= status < 500 and status not in (408, 429)):
                log.warning("job %s: webhook %s refused the delivery (%s%s); not retrying", job.id,
                            safe_origin(url), why, ", a redirect, not followed" if status < 400 else "")
                return False
        except Unresolved as exc:  # DNS may answer on the next try
            why = str(exc)
        except Refused as exc:
            log.warning("job %s: webhook %s not sent: %s", job.id, safe_origin(url), exc)
            return False
        except (OSError, http.client.HTTPException, ValueError) as exc:
            why = f"{type(exc).__name__}: {exc}"
        log.warning("job %s: webhook %s attempt %d/%d failed (%s)", job.id, safe_origin(url), attempt,
                    WEBHOOK_ATTEMPTS, why)
        if attempt < WEBHOOK_ATTEMPTS:
            time.sleep(WEBHOOK_BACKOFF_S * 2 ** (attempt - 1))
    return False
