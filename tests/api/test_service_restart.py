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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_env(root: Path) -> dict:
    env = dict(os.environ)
    env.update(LLMPRESS_DATABASE_URL=f"sqlite:///{root / 'jobs.db'}", LLMPRESS_ARTIFACTS_ROOT=str(root / "artifacts"),
               LLMPRESS_API_KEYS=f"alice:{KEY}", LLMPRESS_INPUT_ROOTS=str(FIXTURES), LLMPRESS_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p))
    env.pop("RAY_ADDRESS", None)
    return env


class Serve:
    """`python -m api.cli serve` as a child process, up when /readyz answers 200."""

    def __init__(self, root: Path, port: int, *, timeout: float = 120.0, new_session: bool = False,
                 env: dict | None = None):
        """``new_session``: the service leads a session of its own, so all it starts can be found by session id.
        ``env``: more environment variables (RAY_ADDRESS: join that cluster instead of starting a local Ray)."""
        self.root, self.port = root, port
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(root / f"serve-{time.monotonic_ns()}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "api.cli", "serve", "--port", str(port)], cwd=root,
                                     env={**service_env(root), **(env or {})}, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=new_session)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode}: {self.output()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
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
    port = free_port()
    first = Serve(tmp_path, port)
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

        second = Serve(tmp_path, port)
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
