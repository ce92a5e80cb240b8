"""workers.dispatch on a real local Ray (2 CPUs, started once for the module) with a SQLite job store in tmp_path
and the bundled stories260K model."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil
import pytest
import ray

from service.jobs.job_store import JobStore
from service.jobs.settings import Settings
from service.jobs.storage import MANIFEST_NAME
from tests.fixture_paths import FIXTURES, STORIES, WIKI_VALID
from tests.tiny_models import RECIPE_2OF4
from workers.dispatch import TASK_PREFIX, RayDispatcher

RECIPE_24 = RECIPE_2OF4


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="llmpress")
    yield
    ray.shutdown()


@pytest.fixture
def env(local_ray, tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    settings = Settings(artifacts_root=str(tmp_path / "artifacts"), database_url=f"sqlite:///{tmp_path / 'jobs.db'}",
                        hub_offline=True)
    dispatcher = RayDispatcher(store, settings, input_roots=[FIXTURES])
    dispatcher.start()
    yield store, settings, dispatcher
    dispatcher.stop()
    store.close()


def request(output: str, num_samples: int = 16) -> dict:
    return {"model": str(STORIES), "recipe": RECIPE_24,
            "dataset": {"source": str(WIKI_VALID), "num_samples": num_samples, "seq_len": 64, "seed": 0},
            "output": output}


def wait_for(store, job_id, done=lambda job: job.terminal, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = store.get(job_id)
        if done(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {store.get(job_id).status} after {timeout} s")


def statuses(store, job_id) -> list[str]:
    return [e.data["status"] for e in store.events(job_id) if e.type == "status"]


def test_a_submitted_job_runs_on_ray_and_publishes(env):
    store, settings, dispatcher = env
    job, _ = store.create_job("alice", request("runs/one"))
    started = time.monotonic()
    dispatcher.submit(job.id)
    assert time.monotonic() - started < 1.0  # submit does not wait for the job
    job = wait_for(store, job.id)
    assert job.status == "succeeded", job.error
    assert job.worker_ref.startswith(TASK_PREFIX) and job.attempt == 1
    assert (Path(settings.artifacts_root) / "runs" / "one" / MANIFEST_NAME).is_file()
    assert statuses(store, job.id) == ["queued", "running", "uploading", "succeeded"]


def test_jobs_beyond_the_free_slots_wait_on_rays_scheduler(env):
    store, _, dispatcher = env
    jobs = [store.create_job("alice", request(f"runs/many-{i}"))[0] for i in range(3)]
    for job in jobs:
        dispatcher.submit(job.id)
    finished = [wait_for(store, job.id, timeout=90) for job in jobs]
    assert [job.status for job in finished] == ["succeeded"] * 3, [job.error for job in finished]
    assert len({job.worker_ref for job in finished}) == 3


def test_cancel_a_running_job_stops_it_between_layers(env):
    store, settings, dispatcher = env
    job, _ = store.create_job("alice", request("runs/slow", num_samples=512))
    dispatcher.submit(job.id)
    wait_for(store, job.id, lambda j: j.status == "running" and j.progress.get("layer", 0) >= 1)
    dispatcher.cancel(job.id)
    job = wait_for(store, job.id)
    assert job.status == "cancelled" and job.artifacts is None
    assert job.progress["layer"] < 5  # stopped before the last layer
    assert not (Path(settings.artifacts_root) / "runs" / "slow").exists()


def test_cancel_a_job_that_waits_for_a_slot_takes_it_off_rays_queue(env):
    store, _, dispatcher = env
    busy = [store.create_job("alice", request(f"runs/busy-{i}", num_samples=512))[0] for i in range(2)]
    waiting, _ = store.create_job("alice", request("runs/waiting"))
    for job in (*busy, waiting):
        dispatcher.submit(job.id)
    for job in busy:  # both CPUs taken: the third task waits in Ray's queue
        wait_for(store, job.id, lambda j: j.status == "running")
    task = dispatcher._tasks[waiting.id]
    dispatcher.cancel(waiting.id)
    with pytest.raises(ray.exceptions.TaskCancelledError):
        ray.get(task, timeout=10)
    for job in busy:
        dispatcher.cancel(job.id)
    assert wait_for(store, waiting.id).status == "cancelled"
    assert store.get(waiting.id).started_at is None
    assert [wait_for(store, job.id).status for job in busy] == ["cancelled"] * 2


def test_a_restarted_dispatcher_requeues_a_lost_running_job_and_runs_it_once(env):
    store, settings, _ = env
    job, _ = store.create_job("alice", request("runs/lost"))
    assert store.transition(job.id, ["queued"], "running", worker_ref=TASK_PREFIX + "deadbeef")
    queued, _ = store.create_job("alice", request("runs/left-queued"))

    fresh = RayDispatcher(store, settings, input_roots=[FIXTURES])
    fresh.start()  # recovers
    job, queued = wait_for(store, job.id), wait_for(store, queued.id)
    assert (job.status, queued.status) == ("succeeded", "succeeded"), (job.error, queued.error)
    assert job.attempt == 2 and queued.attempt == 1
    assert statuses(store, job.id) == ["queued", "running", "queued", "running", "uploading", "succeeded"]
    fresh.recover()  # again: nothing left to take up
    time.sleep(0.5)
    assert statuses(store, job.id).count("succeeded") == 1 and store.get(job.id).attempt == 2


def test_ray_retries_a_job_whose_worker_died_and_it_runs_once(env):
    store, _, dispatcher = env
    job, _ = store.create_job("alice", request("runs/crashed", num_samples=256))
    dispatcher.submit(job.id)
    running = wait_for(store, job.id, lambda j: j.status == "running" and j.progress.get("layer", 0) >= 1)
    workers = [p for p in psutil.process_iter(["cmdline"])
               if any(f"llmpress-job-{job.id}" in part for part in p.info["cmdline"] or [])]
    assert len(workers) == 1, workers
    workers[0].send_signal(signal.SIGKILL)
    job = wait_for(store, job.id)
    assert job.status == "succeeded", job.error
    assert job.attempt == 2 and job.worker_ref == running.worker_ref  # Ray's retry keeps the task id
    assert statuses(store, job.id) == ["queued", "running", "queued", "running", "uploading", "succeeded"]


def test_on_a_cluster_a_restarted_dispatcher_reattaches_to_the_detached_actor(env):
    store, _, _ = env
    settings = Settings(artifacts_root=env[1].artifacts_root, database_url=env[1].database_url, ray_address="auto")
    first = RayDispatcher(store, settings, input_roots=[FIXTURES])
    first.start()  # Ray already joined: uses it
    job, _ = store.create_job("alice", request("runs/detached", num_samples=256))
    first.submit(job.id)
    running = wait_for(store, job.id, lambda j: j.status == "running" and j.progress.get("layer", 0) >= 1)
    assert running.worker_ref == f"llmpress-job-{job.id}"

    RayDispatcher(store, settings, input_roots=[FIXTURES]).start()  # the API restarted: the actor is still there
    job = wait_for(store, job.id)
    assert job.status == "succeeded" and job.attempt == 1, job.error
    assert statuses(store, job.id).count("running") == 1
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the actor ends itself after its job
        try:
            ray.get_actor(job.worker_ref, namespace="llmpress")
        except ValueError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the job's actor is still alive")


def test_a_job_lost_while_uploading_is_queued_again_and_published_once(env):
    store, settings, dispatcher = env
    job, _ = store.create_job("alice", request("runs/upload-lost"))
    store.transition(job.id, ["queued"], "running", worker_ref=TASK_PREFIX + "deadbeef")
    store.transition(job.id, ["running"], "uploading")
    dispatcher.recover()
    job = wait_for(store, job.id)
    assert job.status == "succeeded" and job.attempt == 2, job.error
    assert statuses(store, job.id) == ["queued", "running", "uploading", "queued", "running", "uploading", "succeeded"]
    assert (Path(settings.artifacts_root) / "runs/upload-lost" / MANIFEST_NAME).is_file()


def test_start_ready_and_stop_own_a_local_ray(tmp_path, local_ray):
    ray.shutdown()  # the module's Ray: this dispatcher starts its own, as `llmpress serve` does
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    dispatcher = RayDispatcher(store, Settings(artifacts_root=str(tmp_path / "a"),
                                               database_url=f"sqlite:///{tmp_path / 'jobs.db'}"))
    assert not dispatcher.ready()
    dispatcher.start()
    assert dispatcher.ready()
    dispatcher.stop()
    assert not ray.is_initialized() and not dispatcher.ready()
    store.close()


def test_an_in_memory_database_is_refused():
    with pytest.raises(ValueError, match="in-memory SQLite"):
        RayDispatcher(JobStore("sqlite://"), Settings(database_url="sqlite://"))


def test_a_job_waiting_for_its_workers_stays_queued_with_a_reason_and_runs_once_they_free(env):
    store, settings, dispatcher = env
    first, _ = store.create_job("alice", {**request("runs/gang-1", num_samples=256), "resources": {"workers": 2}})
    dispatcher.submit(first.id)
    wait_for(store, first.id, lambda j: j.status == "running")
    second, _ = store.create_job("alice", {**request("runs/gang-2"), "resources": {"workers": 2}})
    dispatcher.submit(second.id)  # both CPUs are held by the first job's placement group
    waiting = store.get(second.id)
    assert waiting.status == "queued"
    assert waiting.progress["waiting"].startswith("waiting for 2 workers of 1 CPU to be free at once"), waiting.progress
    first = wait_for(store, first.id, timeout=180)
    assert first.status == "succeeded", first.error
    assert [w["rank"] for w in first.progress["workers"]] == [0, 1]
    # The first job's placement group went with it: the second gets both CPUs and runs.
    second = wait_for(store, second.id, timeout=120)
    assert second.status == "succeeded", second.error
    assert statuses(store, second.id) == ["queued", "running", "uploading", "succeeded"]
