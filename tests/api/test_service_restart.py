"""The service as it is deployed: `llmpress serve` in its own process (its local Ray, SQLite, local artifacts).

Stop the API while a job runs and start it again: the job finishes exactly once. Stopping the API ends its local
Ray and with it the worker; the restarted API finds the job ``running`` under a worker that is gone, queues it
again (attempt 2) and runs it to ``succeeded`` once, with one manifest whose checksums hold.

Also `llmpress demo`, the README's main command, end to end: the service in-process, a job over REST.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.jobs.job_store import JobStore
from tests.fixture_paths import FIXTURES, REPO, STORIES
from tests.tiny_models import RECIPE_2OF4

pytest.importorskip("ray")

CALIB = FIXTURES / "data" / "wikitext-2" / "valid.txt"
KEY = "restart-secret"
AUTH = {"Authorization": f"Bearer {KEY}"}


def is_ready(url: str) -> bool:
    """Whether the llmpress API at ``url`` answers ready (its own JSON, not just any 200 from whatever listens)."""
    try:
        response = httpx.get(f"{url}/readyz", timeout=2)
        return response.status_code == 200 and response.json().get("status") == "ready"
    except (httpx.HTTPError, ValueError):
        return False


def service_env(root: Path) -> dict:
    env = dict(os.environ)
    env.update(LLMPRESS_DATABASE_URL=f"sqlite:///{root / 'jobs.db'}", LLMPRESS_ARTIFACTS_ROOT=str(root / "artifacts"),
               LLMPRESS_API_KEYS=f"alice:{KEY}", LLMPRESS_INPUT_ROOTS=str(FIXTURES), LLMPRESS_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p))
    env.pop("RAY_ADDRESS", None)
    return env


LISTENING = re.compile(rb"llmpress serve: listening on (http://\S+)")


class Serve:
    """`python -m api.cli serve` as a child process, up when /readyz answers that it is ready.

    Port 0 (the default): the service takes a free port itself, before it starts its local Ray, and names it in its
    log; a port picked here and handed over could be taken meanwhile by one of the many processes Ray starts."""

    def __init__(self, root: Path, port: int = 0, *, timeout: float = 120.0, new_session: bool = False,
                 env: dict | None = None):
        """``new_session``: the service leads a session of its own, so all it starts can be found by session id.
        ``env``: more environment variables (RAY_ADDRESS: join that cluster instead of starting a local Ray)."""
        self.root = root
        self.log = open(root / f"serve-{time.monotonic_ns()}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "api.cli", "serve", "--port", str(port)], cwd=root,
                                     env={**service_env(root), **(env or {})}, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=new_session)
        deadline = time.monotonic() + timeout
        self.url = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode}: {self.output()}")
            if self.url is None and (found := LISTENING.search(Path(self.log.name).read_bytes())):
                self.url = found.group(1).decode()
                self.port = int(self.url.rsplit(":", 1)[1])
            if self.url is not None and is_ready(self.url):
                return
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"serve did not become ready: {self.output()}")

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-3000:]

    def stop(self) -> bool:
        """SIGTERM, as a process manager stops the API; whether it shut down cleanly. uvicorn re-raises the signal
        once its graceful shutdown is done, into Ray's handler, which exits with status 15 (SIGTERM's number)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode in (0, signal.SIGTERM, -signal.SIGTERM) and \
            "Application shutdown complete" in self.output()


def get_job(url: str, job_id: str) -> dict:
    response = httpx.get(f"{url}/v1/jobs/{job_id}", headers=AUTH, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def wait_job(url: str, job_id: str, done, timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = get_job(url, job_id)
        if done(job):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {job['status']} {job['progress']} after {timeout} s")


def test_stopping_the_api_mid_job_and_starting_it_again_finishes_the_job_once(tmp_path):
    first = Serve(tmp_path)
    try:
        response = httpx.post(f"{first.url}/v1/jobs", headers=AUTH, timeout=30, json={
            "model": str(STORIES), "recipe": RECIPE_2OF4, "output": "runs/restarted",
            # Enough calibration that the job is still running when the API is stopped.
            "dataset": {"source": str(CALIB), "num_samples": 512, "seq_len": 128},
        })
        assert response.status_code == 201, response.text
        job_id = response.json()["id"]
        running = wait_job(first.url, job_id,
                           lambda j: j["status"] == "running" and (j["progress"].get("layer") or 0) >= 1)
        assert running["attempt"] == 1
    finally:
        assert first.stop(), first.output()

    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    try:
        assert store.get(job_id).status == "running"  # stopped mid-job: nothing finished it
        assert not (tmp_path / "artifacts" / "runs" / "restarted" / "manifest.json").exists()

        second = Serve(tmp_path)  # a port of its own: the job store is what carries the job over
        try:
            done = wait_job(second.url, job_id, lambda j: j["status"] in ("succeeded", "failed", "cancelled"))
            assert done["status"] == "succeeded", done["error"]
            time.sleep(1.0)  # anything that would run it a second time has had its chance
            assert get_job(second.url, job_id)["status"] == "succeeded"
        finally:
            assert second.stop(), second.output()

        job = store.get(job_id)
        statuses = [e.data["status"] for e in store.events(job_id) if e.type == "status"]
        assert job.attempt == 2
        assert statuses == ["queued", "running", "queued", "running", "uploading", "succeeded"]
        assert statuses.count("succeeded") == 1
    finally:
        store.close()

    folder = tmp_path / "artifacts" / "runs" / "restarted"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["extra"]["job_id"] == job_id
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {"manifest.json"}
    assert on_disk == {f["key"] for f in manifest["files"]}
    for f in manifest["files"]:
        assert hashlib.sha256((folder / f["key"]).read_bytes()).hexdigest() == f["sha256"], f["key"]


def test_the_readme_demo_runs_a_job_through_the_service(tmp_path):
    env = service_env(tmp_path)
    env.pop("LLMPRESS_API_KEYS")
    env.pop("LLMPRESS_INPUT_ROOTS")  # the demo allows the bundled fixtures itself
    result = subprocess.run([sys.executable, "-m", "api.cli", "demo"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "POST http://127.0.0.1:" in out and "/v1/jobs" in out
    assert "perplexity eval: " in out and "artifacts: " in out
    uri = out.split("artifacts: ", 1)[1].split(" ", 1)[0]
    folder = Path(uri.removeprefix("file://"))
    assert (folder / "manifest.json").is_file() and folder.is_relative_to(tmp_path / "artifacts")


def test_a_port_in_use_is_an_error_at_once_before_ray_starts(tmp_path):
    """The port is taken first: a port in use fails the start, naming the address, with no local Ray started."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "api.cli", "serve", "--port", str(port)], cwd=tmp_path,
                              env=service_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert f"llmpress serve: error: cannot listen on 127.0.0.1:{port}: Address already in use" in done.stderr
    assert "Ray" not in done.stdout + done.stderr.replace("llmpress serve: error", "")
