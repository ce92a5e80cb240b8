"""Webhooks: the job, signed, POSTed to the URL its request names when it reaches a terminal state.

``notify`` tries WEBHOOK_ATTEMPTS times with backoff and never changes the job; the body is the job without the
webhook secret (``webhook_payload``, which the API's responses use too), signed ``X-Llmpress-Signature:
sha256=<HMAC-SHA256 of the body keyed with the secret>``. Redirects are not followed (they would re-send a signed
body somewhere the submitter did not name), and logs show only scheme://host[:port] of the URL.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from urllib.parse import urlsplit

from service.jobs.job_store import Job, canonical_json

log = logging.getLogger(__name__)

WEBHOOK_ATTEMPTS = 3
WEBHOOK_TIMEOUT_S = 5.0
WEBHOOK_BACKOFF_S = 1.0  # waits 1 s, then 2 s between attempts
SIGNATURE_HEADER = "X-Llmpress-Signature"
EVENT_HEADER = "X-Llmpress-Event"


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


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # A redirect would re-send a signed body somewhere the submitter did not name.
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


def _safe_url(url: str) -> str:
    """scheme://host[:port] only: paths and queries of webhook URLs often hold tokens."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}/..."


def notify(job: Job) -> bool:
    """POST the job to its webhook, if it has one: WEBHOOK_ATTEMPTS tries with backoff; True when delivered.
    Failures are logged and never change the job."""
    hook = (job.request or {}).get("webhook")
    if not isinstance(hook, Mapping) or not hook.get("url") or not hook.get("secret"):
        return False
    url, secret = hook["url"], hook["secret"]
    body = canonical_json(webhook_payload(job)).encode()
    headers = {"Content-Type": "application/json", "User-Agent": "llmpress-webhook",
               SIGNATURE_HEADER: signature(secret, body), EVENT_HEADER: f"job.{job.status}"}
    opener = urllib.request.build_opener(_NoRedirect)
    for attempt in range(1, WEBHOOK_ATTEMPTS + 1):
        try:
            with opener.open(urllib.request.Request(url, data=body, headers=headers, method="POST"),
                             timeout=WEBHOOK_TIMEOUT_S) as response:
                response.read()
            log.info("job %s: webhook %s delivered (job.%s)", job.id, _safe_url(url), job.status)
            return True
        except urllib.error.HTTPError as exc:
            why = f"HTTP {exc.code}"
            if 400 <= exc.code < 500 and exc.code not in (408, 429):
                log.warning("job %s: webhook %s refused the delivery (%s); not retrying", job.id, _safe_url(url), why)
                return False
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            why = f"{type(reason).__name__}: {reason}"
        log.warning("job %s: webhook %s attempt %d/%d failed (%s)", job.id, _safe_url(url), attempt,
                    WEBHOOK_ATTEMPTS, why)
        if attempt < WEBHOOK_ATTEMPTS:
            time.sleep(WEBHOOK_BACKOFF_S * 2 ** (attempt - 1))
    return False
