"""SIGKILL mid-job, of the Ray worker running the job and of `llmpress serve` itself (the deployed service: its
own process with SQLite, local artifacts and a local Ray, see tests/api/test_service_restart.py).

A killed worker: Ray runs the task again (max_retries), the retry finds the job still running under its own
worker_ref, re-queues it (attempt 2) and runs it to ``succeeded`` once. A killed service (SIGKILL to its process
group, the serve process, GCS, raylet and agents, and to Ray's workers, which have process groups of their own, as
when its machine goes down): nothing of its session is left.
The restarted service finds the job running under a worker that is gone, re-queues it (attempt 2), and it succeeds
once: it resumes after the blocks the killed attempt finished (their shards and checkpoints survive the kill) and
publishes the bytes of an uninterrupted run.

Both share one service (starting one costs 10-20 s here): the worker test runs on it, the service test kills it.
"""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from service.jobs.job_store import JobStore
from tests.api.test_service_restart import AUTH, CALIB, get_job, wait_job
from tests.faults.outcome import check_local_output, finished_once, statuses
from tests.faults.serve_session import ServeSession, alive
from tests.fixture_paths import STORIES
from tests.tiny_models import RECIPE_2OF4

pytest.importorskip("ray")

LAYERS = 5  # stories260K's decoder blocks
# Calibration samples of 128 tokens: with 128 (a layer in about 0.3 s in a warm worker) the job is still running
# when its worker is killed; with 512 (about 1 s a layer) the service's kill lands well within the job, and the
# restarted service has blocks to resume after.
WORKER_KILL_SAMPLES, SERVICE_KILL_SAMPLES = 128, 512
REQUEUED = ["queued", "running", "queued", "running", "uploading", "succeeded"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("process-kills")


@pytest.fixture(scope="module")
def service(root):
    """One `llmpress serve` for the module; whatever of its session is still alive at the end is ended."""
    serve = ServeSession(root)
    yield serve
    if serve.proc.poll() is None:
        serve.stop()
    assert not serve.reap(), "processes of the service outlived it"


@pytest.fixture(scope="module")
def store(root, service):
    store = JobStore(f"sqlite:///{root / 'jobs.db'}")
    yield store
    store.close()


def submit(url: str, output: str, num_samples: int) -> str:
    dataset = {"source": str(CALIB), "num_samples": num_samples, "seq_len": 128}
    response = httpx.post(f"{url}/v1/jobs", headers=AUTH, timeout=30,
                          json={"model": str(STORIES), "recipe": RECIPE_2OF4, "output": output, "dataset": dataset})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def running_at_layer(store: JobStore, job_id: str, layer: int, timeout: float = 120.0) -> int:
    """Wait until the job reports ``layer`` done; the layer it is at. Read from the store, not the API: the kill
    has to land within a layer of this (a layer takes about half a second in a warm worker)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = store.get(job_id)
        if job.status == "running" and (job.progress.get("layer") or 0) >= layer:
            return job.progress["layer"]
        assert job.status in ("queued", "running"), (job.status, job.error)
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not reach layer {layer} within {timeout:.0f} s")


def wait_done(url: str, job_id: str) -> dict:
    return wait_job(url, job_id, lambda j: j["status"] in ("succeeded", "failed", "cancelled"), timeout=180)


def layers_after_requeue(store: JobStore, job_id: str) -> list[int]:
    """The layers the job's progress events report after its (last) re-queue, in order."""
    events = store.events(job_id)
    requeued = max(i for i, e in enumerate(events) if e.type == "status" and e.data["status"] == "queued")
    return [e.data["progress"]["layer"] for e in events[requeued:]
            if e.type == "progress" and "layer" in e.data["progress"]]


def test_killing_the_worker_mid_job_has_ray_run_it_again_once(service, store, root):
    job_id = submit(service.url, "runs/worker-killed", WORKER_KILL_SAMPLES)
    running_at_layer(store, job_id, 1)
    # Ray titles the worker process after the task it runs: "ray::llmpress-job-<job id>" (workers.dispatch).
    workers = [pid for pid, cmd in service.processes().items() if cmd.startswith(f"ray::llmpress-job-{job_id}")]
    assert len(workers) == 1, service.processes()
    worker_ref = store.get(job_id).worker_ref
    os.kill(workers[0], signal.SIGKILL)

    done = wait_done(service.url, job_id)
    assert done["status"] == "succeeded", done["error"]
    time.sleep(1.0)  # anything that would run it a second time has had its chance
    job = finished_once(store, job_id, "succeeded")
    assert job.attempt == 2 and job.worker_ref == worker_ref  # Ray's retry of the same task took it again
    assert statuses(store, job_id) == REQUEUED
    assert layers_after_requeue(store, job_id) == list(range(1, LAYERS + 1))
    assert workers[0] not in service.processes()
    check_local_output(root / "artifacts" / "runs" / "worker-killed", job_id)


def test_killing_the_service_mid_job_and_starting_it_again_finishes_the_job_once(service, store, root):
    job_id = submit(service.url, "runs/service-killed", SERVICE_KILL_SAMPLES)
    running_at_layer(store, job_id, 2)  # blocks 0 and 1 done: their shards uploaded and checkpointed
    before = set(service.processes())
    assert any(cmd.startswith(f"ray::llmpress-job-{job_id}") for cmd in service.processes().values())
    left = service.kill()  # kill -9 of the process group
    assert not left, f"still alive after the service was killed: {left}"
    assert not alive(before), "a process of the service left its session and outlived it"

    folder = root / "artifacts" / "runs" / "service-killed"
    job = store.get(job_id)
    assert job.status == "running" and job.attempt == 1  # killed mid-job: nothing finished it
    assert not (folder / "manifest.json").exists()
    left_at = job.progress["layer"]  # where the killed attempt got to

    second = ServeSession(root)
    try:
        # Recovery ran before the service answered ready: the job is queued again, attempt 2, and its progress is
        # the new attempt's (nothing yet, or its first layers), not the killed one's.
        first_seen = store.get(job_id)
        assert first_seen.attempt == 2 and first_seen.status in ("queued", "running"), first_seen
        assert (first_seen.progress.get("layer") or 0) < left_at, (first_seen.progress, left_at)
        done = wait_done(second.url, job_id)
        assert done["status"] == "succeeded", done["error"]
        time.sleep(1.0)
        assert get_job(second.url, job_id)["status"] == "succeeded"
        # The same request, uninterrupted, for the bytes to compare with.
        reference = submit(second.url, "runs/service-reference", SERVICE_KILL_SAMPLES)
        assert wait_done(second.url, reference)["status"] == "succeeded"
    finally:
        assert second.stop(), second.output()

    job = finished_once(store, job_id, "succeeded")
    assert job.attempt == 2
    assert statuses(store, job_id) == REQUEUED
    # The new attempt took up the killed one's finished blocks (replayed, not compressed again) and reported
    # every layer, in order.
    resumed = [e.data for e in store.events(job_id) if e.type == "resumed"]
    assert len(resumed) == 1 and 3 <= resumed[0]["layer"] <= left_at + 1, (resumed, left_at)
    assert layers_after_requeue(store, job_id) == list(range(1, LAYERS + 1))
    manifest = check_local_output(folder, job_id)
    expected = check_local_output(root / "artifacts" / "runs" / "service-reference", reference)
    weights = {f["key"]: f["sha256"] for f in manifest["files"] if f["key"].endswith(".safetensors")}
    assert weights == {f["key"]: f["sha256"] for f in expected["files"] if f["key"].endswith(".safetensors")}

