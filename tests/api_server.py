"""Servers the API tests start themselves: uvicorn on a free loopback port, and a local Ray."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import uvicorn


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


class Server:
    """A uvicorn server for ``app`` on a free loopback port, in a background thread."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the API server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
