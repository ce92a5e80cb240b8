"""An HTTP proxy on 127.0.0.1 in front of an S3 server (moto) that answers ``500 InternalError`` to chosen uploads.

Point a client's ``AWS_ENDPOINT_URL`` at ``proxy.url``: every request is forwarded to the upstream server as it
came, except the PUTs (object and part uploads) that the policy ``fails(n, path)`` picks by their number n (1, 2,
...) or path. Those get S3's own "try again" answer, either instead of reaching the server (the object is not
written) or, with ``reply_lost=True``, after the server stored the object (the reply is lost on the way back, as
when a connection breaks). Which PUTs fail is fixed by the policy, not by timing: ``share(0.3, seed=1)`` fails a
seeded pseudo-random 30 %; ``after(2)`` every PUT after the second; ``first_put_of("manifest.json")`` the first
PUT of that file only. Other methods (GET, HEAD, the POST of DeleteObjects) always go through, so a job can clean up.

The answer is a transient error, not a throttling one such as 503 SlowDown: botocore's standard mode waits up to
50 ms, 100 ms, 200 ms, ... before retrying those, against 1 s, 2 s, 4 s, ... after a throttle, which would cost a
test that exhausts the retries 7.5 s on average.
"""

from __future__ import annotations

import http.client
import http.server
import random
import threading
from collections.abc import Callable
from urllib.parse import urlsplit

Policy = Callable[[int, str], bool]  # (number of the PUT, its path) -> answer it with a 500

INTERNAL_ERROR = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code><Message>We encountered '
                  b'an internal error. Please try again (injected by the test fault proxy).</Message>'
                  b'<RequestId>fault-proxy</RequestId></Error>')
# Hop-by-hop headers (RFC 9110 7.6.1) and those this proxy rewrites: never forwarded as they came.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
              "expect", "content-length"}


def share(fraction: float, seed: int = 0) -> Policy:
    """Fail each PUT with probability ``fraction``, drawn from a generator seeded with ``seed`` (the n-th PUT's
    fate is the n-th draw, so a run is reproducible as long as the PUTs come in the same order)."""
    draws = random.Random(seed)
    fates: list[bool] = []

    def fails(n: int, path: str) -> bool:
        while len(fates) < n:
            fates.append(draws.random() < fraction)
        return fates[n - 1]

    return fails


def after(count: int) -> Policy:
    """Let the first ``count`` PUTs through and fail every later one."""
    return lambda n, path: n > count


def first_put_of(name: str) -> Policy:
    """Fail the first PUT of a key ending in ``/name``, and nothing else."""
    seen = []

    def fails(n: int, path: str) -> bool:
        if path.split("?", 1)[0].endswith("/" + name) and not seen:
            seen.append(n)
            return True
        return False

    return fails


class FaultProxy:
    """The proxy, serving from a daemon thread while used as a context manager. ``puts`` counts the PUTs seen;
    ``failed`` lists the paths of those answered with a 500 (a retried upload appears once per attempt), ``sent``
    those forwarded with their reply (``failed`` ones with ``reply_lost`` were forwarded too)."""

    def __init__(self, upstream: str, fails: Policy, *, reply_lost: bool = False):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.fails = fails
        self.reply_lost = reply_lost
        self.puts = 0
        self.failed: list[str] = []
        self.sent: list[str] = []
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-fault-proxy", daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def _inject(self, method: str, path: str) -> bool:
        if method != "PUT":
            return False
        with self._lock:
            self.puts += 1
            injected = self.fails(self.puts, path)
            (self.failed if injected else self.sent).append(path)
            return injected

    def _forward(self, method: str, path: str, headers, body: bytes | None) -> tuple[int, dict, bytes]:
        upstream = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            upstream.request(method, path, body=body,
                             headers={k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP})
            response = upstream.getresponse()
            data = response.read()
            kept = {k: v for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP}
            if method == "HEAD":  # no body, but the object's length
                kept["Content-Length"] = response.getheader("Content-Length", "0")
            return response.status, kept, data
        finally:
            upstream.close()

    def _handler(self):
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, and "Expect: 100-continue" answered before the body

            def log_message(self, *args) -> None:
                pass

            def _relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if proxy._inject(self.command, self.path):
                    if proxy.reply_lost:
                        proxy._forward(self.command, self.path, self.headers, body)
                    self._answer(500, {"Content-Type": "application/xml"}, INTERNAL_ERROR)
                    return
                status, headers, data = proxy._forward(self.command, self.path, self.headers, body)
                self._answer(status, headers, data, head=self.command == "HEAD")

            def _answer(self, status: int, headers: dict, body: bytes, head: bool = False) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                if not head:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        return Handler
