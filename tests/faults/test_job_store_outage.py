"""The job store unreachable for a while: PostgreSQL (tests/postgres.py) stopped mid-job (``pg_ctl stop -m
fast``: sessions ended, socket gone) until the worker has tried to reach it, then started again. (The test knows the
worker tried because it listens on the server's socket path meanwhile and answers the first connection by closing
it, as a server going down would.)

What is right: a database restart of a few seconds costs the job a pause, not the job. The worker cannot record
anything while the store is down, but nothing it did is lost either: it waits for the store to answer again and
carries on, and the job succeeds exactly once with a correct manifest. (Ending it ``failed`` is not possible while
the store is down, and raising out of the worker would leave it ``running`` with no worker until the API restarts.)

The worker is ``run_job`` in a thread of this process, on its own PostgreSQL connection pool; every wait is
bounded.
"""

from __future__ import annotations

import os
import pwd
import socket
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from service.jobs.job_runner import run_job
from service.jobs.job_store import TERMINAL, JobStore
from service.jobs.settings import Settings
from tests.faults.outcome import check_local_output, finished_once
from tests.fixture_paths import FIXTURES, STORIES, WIKI_VALID
from tests.postgres import PORT, _run, create_database, find_bin_dir, missing_reason, postgres_server
from tests.tiny_models import RECIPE_2OF4

LAYERS = 5
STAY_DOWN = 3.0  # seconds the store stays down after the worker first tried to reach it


class Postgres:
    """Stop and start the server of a ``postgres_server()`` URL (its data folder is beside the socket)."""

    def __init__(self, url: str):
        self.root = Path(make_url(url).query["host"])
        self.bin = find_bin_dir()
        self.user = pwd.getpwnam("nobody") if os.geteuid() == 0 else None

    def pg_ctl(self, *args: str) -> None:
        _run([str(self.bin / "pg_ctl"), "-D", str(self.root / "data"), *args], self.user, self.root)

    def stop(self) -> None:
        self.pg_ctl("-m", "fast", "-w", "-t", "60", "stop")

    def refuse_one_connection(self, timeout: float) -> None:
        """While the server is down: wait for a client to connect to its socket path, close that connection at
        once, and take the path away again (the server must find it free when it starts)."""
        path = self.root / f".s.PGSQL.{PORT}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(str(path))
            try:
                listener.listen()
                listener.settimeout(timeout)
                connection, _ = listener.accept()
                connection.close()
            finally:
                path.unlink()

    def start(self) -> None:
        # restart reuses the options the server was first started with (postmaster.opts): socket folder and all.
        self.pg_ctl("-l", str(self.root / "server.log"), "-w", "-t", "60", "restart")


@pytest.fixture
def server():
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    with postgres_server() as url:
        yield url


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} not within {timeout:.0f} s")


def test_a_job_store_restart_mid_job_costs_a_pause_and_the_job_succeeds_once(server, tmp_path):
    url = create_database(server)
    postgres = Postgres(server)
    worker_store, store = JobStore(url), JobStore(url)  # the worker's pool, and the test's own
    settings = Settings(database_url=url, artifacts_root=str(tmp_path / "artifacts"), hub_offline=True)
    job, _ = store.create_job("alice", {
        "model": str(STORIES), "recipe": RECIPE_2OF4, "output": "runs/outage",
        # 256 x 128 tokens: a layer takes a second or more, so the job is mid-way when the store goes.
        "dataset": {"source": str(WIKI_VALID), "num_samples": 256, "seq_len": 128},
    })
    ended, raised = [], []

    def worker():
        try:
            ended.append(run_job(worker_store, job.id, settings, workdir=tmp_path / "work",
                                 input_roots=[FIXTURES]))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            raised.append(exc)

    thread = threading.Thread(target=worker, name="job-worker", daemon=True)
    thread.start()
    try:
        layer = wait_for(lambda: store.get(job.id).progress.get("layer"), 120, "the job's first layer")
        assert layer < LAYERS, "the job was nearly done before the store went away: calibrate on more tokens"
        postgres.stop()
        try:
            postgres.refuse_one_connection(timeout=120)  # the worker's next store call, at its next layer
            time.sleep(STAY_DOWN)
        finally:
            postgres.start()
        thread.join(180)
        assert not thread.is_alive(), "the worker did not end within 180 s of the store coming back"
        assert not raised, (f"the worker raised instead of ending the job, which it leaves "
                            f"{store.get(job.id).status}: {raised[0]!r}")
        assert ended[0].status in TERMINAL
        job_now = finished_once(store, job.id, "succeeded")
        assert job_now.attempt == 1
        assert job_now.progress.get("stage") == "uploading"
        check_local_output(tmp_path / "artifacts" / "runs" / "outage", job.id)
    finally:
        thread.join(60)
        worker_store.close()
        store.close()
