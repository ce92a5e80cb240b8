"""Servers the API tests start themselves: uvicorn on a free loopback port, and a local Ray."""

from __future__ import annotations

import contextlib

import pytest

from api.embedded import EmbeddedServer


@contextlib.contextmanager
def local_ray():
    """One local Ray with one CPU, as RayDispatcher would start it; shut down on exit so that other test modules
    can start their own (Ray is initialised once per process)."""
    ray = pytest.importorskip("ray")
    from workers.dispatch import NAMESPACE, worker_runtime_env

    assert not ray.is_initialized()
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, namespace=NAMESPACE,
             runtime_env=worker_runtime_env())
    try:
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def ray_cpu_taken():
    """Take the local Ray's one CPU with an idle actor: a job submitted meanwhile is handed to Ray by the real
    RayDispatcher and waits, queued, in Ray's own queue until the CPU frees (deterministic, unlike racing a job)."""
    import ray

    @ray.remote(num_cpus=1)
    class CpuHolder:
        def ready(self) -> bool:
            return True

    holder = CpuHolder.remote()
    assert ray.get(holder.ready.remote(), timeout=60)
    try:
        yield
    finally:
        ray.kill(holder)


class NoWorkers:
    """The dispatcher of an API whose jobs must never run (tests of what the API refuses before anything is stored
    or handed on): it keeps the ids it is handed, so a test can assert that none was.

    ``nodes`` (the total resources of each node of a pretend cluster, ``[{"CPU": 2.0, "GPU": 0.0}, ...]`` as Ray's
    ``ray.nodes()`` gives them) makes it check a request's resources as RayDispatcher does, with the same
    ``cluster_fits``; without it every request fits."""

    def __init__(self, nodes: list[dict[str, float]] | None = None):
        self.submitted: list[str] = []
        self.nodes = nodes

    def check_resources(self, resources):
        from service.jobs.request import cluster_fits

        if self.nodes is not None:
            cluster_fits(resources, self.nodes)

    def start(self):
        pass

    def stop(self):
        pass

    def ready(self):
        return True

    def submit(self, job_id):
        self.submitted.append(job_id)

    def cancel(self, job_id):
        pass


class Server(EmbeddedServer):
    """The API on a free loopback port, in a background thread of the test process."""
