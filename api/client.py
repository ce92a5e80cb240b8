"""A small client of the job API for scripts and release pipelines (standard library HTTP, pydantic models back).

    client = Client("http://127.0.0.1:8000", api_key)
    job = client.submit(model="s3://models/m", recipe=open("recipe.yaml").read(), output="s3://out/m-2of4/",
                        dataset={"source": "s3://data/calib.txt"}, eval={"source": "s3://data/test.txt",
                        "max_ppl_ratio": 1.2})
    job = client.wait(job.id, on_progress=lambda j: print(j.status, j.progress.fraction))
    assert job.status == "succeeded"
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote, urlencode

from api.schemas import ArtifactsResponse, Event, Job, JobList

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


class ApiError(Exception):
    """The server answered with an error: ``status`` (HTTP code) and ``detail`` (its message, or the 422 list)."""

    def __init__(self, status: int, detail: Any):
        self.status = status
        self.detail = detail
        super().__init__(f"HTTP {status}: {_describe(detail)}")


def _describe(detail: Any) -> str:
    if not isinstance(detail, list):
        return str(detail)
    parts = []
    for entry in detail:
        if not isinstance(entry, dict):
            parts.append(str(entry))
            continue
        field, message = ".".join(map(str, entry.get("loc", [])[1:])), str(entry.get("msg", ""))
        parts.append(message if not field or message.startswith(field) else f"{field}: {message}")
    return "; ".join(parts)


class Client:
    def __init__(self, server: str, api_key: str | None, timeout: float = 30.0):
        self.server = server.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    def _call(self, method: str, path: str, body: Any = None, headers: dict | None = None,
              query: dict | None = None) -> Any:
        url = self.server + path
        if query:
            url += "?" + urlencode({k: v for k, v in query.items() if v is not None}, doseq=True)
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method, headers={"Accept": "application/json"})
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                detail = json.loads(raw).get("detail", raw.decode(errors="replace"))
            except (ValueError, AttributeError):
                detail = raw.decode(errors="replace") or exc.reason
            raise ApiError(exc.code, detail) from None

    def submit(self, model: str, recipe: str | list[dict], output: str, dataset: dict | None = None,
               eval: dict | None = None, labels: dict[str, str] | None = None, webhook: dict | None = None,
               idempotency_key: str | None = None, overwrite: bool = False, resources: dict | None = None) -> Job:
        """Create a job (POST /v1/jobs); the same ``idempotency_key`` and arguments return the same job.
        ``overwrite`` replaces the output of your own succeeded job at exactly ``output`` (else that is a 409);
        ``resources`` (``{"workers": 2, "cpus_per_worker": 4}``) runs it on several Ray workers."""
        body = {"model": model, "recipe": recipe, "output": output, "dataset": dataset, "eval": eval,
                "labels": labels, "webhook": webhook, "overwrite": True if overwrite else None,
                "resources": resources}
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return Job.model_validate(self._call("POST", "/v1/jobs", {k: v for k, v in body.items() if v is not None},
                                             headers))

    def get(self, job_id: str) -> Job:
        return Job.model_validate(self._call("GET", f"/v1/jobs/{quote(job_id, safe='')}"))

    def list(self, status: str | Sequence[str] | None = None, label: str | Sequence[str] | None = None,
             limit: int = 50, cursor: str | None = None) -> JobList:
        """One page, newest first; pass ``next_cursor`` back as ``cursor`` for the next."""
        query = {"status": [status] if isinstance(status, str) else status,
                 "label": [label] if isinstance(label, str) else label, "limit": limit, "cursor": cursor}
        return JobList.model_validate(self._call("GET", "/v1/jobs", query=query))

    def cancel(self, job_id: str) -> Job:
        return Job.model_validate(self._call("POST", f"/v1/jobs/{quote(job_id, safe='')}/cancel"))

    def retry(self, job_id: str) -> Job:
        """Queue a failed or cancelled job again as its next attempt (POST /v1/jobs/{id}/retry)."""
        return Job.model_validate(self._call("POST", f"/v1/jobs/{quote(job_id, safe='')}/retry"))

    def events(self, job_id: str, after: int = 0) -> list[Event]:
        data = self._call("GET", f"/v1/jobs/{quote(job_id, safe='')}/events", query={"after": after})
        return [Event.model_validate(e) for e in data]

    def artifacts(self, job_id: str) -> ArtifactsResponse:
        return ArtifactsResponse.model_validate(self._call("GET", f"/v1/jobs/{quote(job_id, safe='')}/artifacts"))

    def wait(self, job_id: str, on_progress: Callable[[Job], None] | None = None, poll: float = 1.0,
             timeout: float | None = None) -> Job:
        """Poll until the job is succeeded, failed or cancelled and return it; ``on_progress(job)`` is called
        whenever its status or progress changed. TimeoutError after ``timeout`` seconds (None: no limit)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        seen = None
        while True:
            job = self.get(job_id)
            state = (job.status, job.progress.model_dump_json())
            if on_progress is not None and state != seen:
                on_progress(job)
            seen = state
            if job.status in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.status} after {timeout} s")
            time.sleep(poll)
