"""The job store and API keys on real databases: a SQLite file and a throwaway PostgreSQL server."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timezone

import pytest
from sqlalchemy import select

from service.jobs.api_keys import KeyExists, KeyRing, create_key, list_keys, revoke
from service.jobs.job_store import (
    STATUSES,
    TERMINAL,
    TRANSITIONS,
    ApiKeyRow,
    JOB_ID_ALPHABET,
    IdempotencyConflict,
    InvalidCursor,
    InvalidTransition,
    JobNotFound,
    JobStore,
    NotRetryable,
    OutputClaimed,
)
from service.jobs.settings import Settings
from tests.postgres import create_database, missing_reason, postgres_server

REQUEST = {"model": "s3://models/stories260K", "recipe": "sparsegpt_2of4", "dataset": {"num_samples": 8}}


@pytest.fixture(scope="session")
def pg_server():
    reason = missing_reason()
    if reason is not None:
        pytest.skip(reason)
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    return create_database(request.getfixturevalue("pg_server"))


@pytest.fixture
def store(db_url):
    s = JobStore(db_url)
    yield s
    s.close()


def drive(store: JobStore, job_id: str, path: list[str]) -> None:
    """Walk a job through ``path`` (statuses after queued), checking every step."""
    current = "queued"
    for status in path:
        assert store.transition(job_id, [current], status), f"{current} -> {status}"
        current = status


# The shortest way from queued to each status.
PATH_TO = {
    "queued": [], "running": ["running"], "uploading": ["running", "uploading"],
    "succeeded": ["running", "succeeded"], "failed": ["failed"], "cancelled": ["cancelled"],
}


def test_create_and_get(store):
    job, created = store.create_job("alice", REQUEST, labels={"team": "nlp"})
    assert created and job.status == "queued" and job.owner == "alice" and job.attempt == 1
    assert job.request == REQUEST and job.labels == {"team": "nlp"} and job.progress == {} and job.metrics == {}
    assert len(job.id) == 12 and set(job.id) <= set(JOB_ID_ALPHABET)
    assert job.created_at.tzinfo == timezone.utc and job.started_at is None and job.finished_at is None
    again = store.get(job.id)
    assert again == job
    json.dumps(again.to_dict())  # JSON-ready
    assert again.to_dict()["created_at"] == job.created_at.isoformat()
    assert store.get("nosuchjob") is None
    assert [(e.type, e.data) for e in store.events(job.id)] == [("status", {"status": "queued"})]
    other, _ = store.create_job("alice", REQUEST)
    assert other.id != job.id


def test_idempotency(store):
    job, created = store.create_job("alice", REQUEST, labels={"a": "1"}, idempotency_key="k-1")
    assert created
    store.transition(job.id, ["queued"], "running")
    same, created = store.create_job("alice", dict(reversed(list(REQUEST.items()))), labels={"a": "1"},
                                     idempotency_key="k-1")
    assert not created and same.id == job.id and same.status == "running"  # key order does not matter
    with pytest.raises(IdempotencyConflict, match="k-1") as err:
        store.create_job("alice", {**REQUEST, "model": "other"}, labels={"a": "1"}, idempotency_key="k-1")
    assert err.value.job_id == job.id
    with pytest.raises(IdempotencyConflict):
        store.create_job("alice", REQUEST, labels={"a": "2"}, idempotency_key="k-1")  # labels are in the body
    # Keys are per owner, and no key means no deduplication.
    bobs, created = store.create_job("bob", REQUEST, labels={"a": "1"}, idempotency_key="k-1")
    assert created and bobs.id != job.id
    assert store.create_job("alice", REQUEST)[1] and store.create_job("alice", REQUEST)[1]
    assert len(store.list("alice")[0]) == 3


def test_idempotency_under_concurrency(store):
    barrier = threading.Barrier(8)

    def submit(_):
        barrier.wait()
        return store.create_job("alice", REQUEST, idempotency_key="same")

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(submit, range(8)))
    assert sum(created for _, created in results) == 1
    assert len({job.id for job, _ in results}) == 1
    assert len(store.list("alice")[0]) == 1


def test_cursor_pagination_stable_under_inserts(store):
    originals = [store.create_job("alice", {"n": i})[0].id for i in range(25)]
    seen, cursor, pages = [], None, 0
    while True:
        jobs, cursor = store.list("alice", limit=10, cursor=cursor)
        seen += [j.id for j in jobs]
        pages += 1
        # Newer jobs (and another owner's) arrive between pages; they must not shift what follows.
        for i in range(3):
            store.create_job("alice", {"late": pages, "i": i})
        store.create_job("bob", {"n": pages})
        if cursor is None:
            break
    assert pages == 3 and seen == originals[::-1]
    newest, _ = store.list("alice", limit=10)
    assert all(j.request.get("late") for j in newest[:9]) and newest[0].request == {"late": 3, "i": 2}
    jobs, cursor = store.list("alice", limit=34)
    assert len(jobs) == 34 and cursor is None
    with pytest.raises(InvalidCursor):
        store.list("alice", cursor="not-a-cursor")
    with pytest.raises(ValueError):
        store.list("alice", limit=0)


def test_status_and_label_filters(store):
    a = store.create_job("alice", REQUEST, labels={"team": "nlp", "env": "prod"})[0]
    b = store.create_job("alice", REQUEST, labels={"team": "nlp", "env": "dev"})[0]
    c = store.create_job("alice", REQUEST, labels={"team": "vision", "release.track": "a/b=c"})[0]
    store.create_job("bob", REQUEST, labels={"team": "nlp"})
    drive(store, b.id, ["running"])
    drive(store, c.id, ["running", "succeeded"])

    def ids(**kw):
        return {j.id for j in store.list("alice", **kw)[0]}

    assert ids(status="queued") == {a.id}
    assert ids(status=["running", "succeeded"]) == {b.id, c.id}
    assert ids(label="team=nlp") == {a.id, b.id}
    assert ids(label=["team=nlp", "env=dev"]) == {b.id}
    assert ids(label="release.track=a/b=c") == {c.id}  # dots in keys, '=' in values
    assert ids(label="team=nl") == set() and ids(label="missing=x") == set()
    assert ids(label="team=nlp", status="queued") == {a.id}
    with pytest.raises(ValueError, match="key=value"):
        store.list("alice", label="team")
    with pytest.raises(ValueError, match="unknown job status"):
        store.list("alice", status="done")
    with pytest.raises(ValueError, match="labels"):
        store.create_job("alice", REQUEST, labels={"a=b": "c"})


def test_owner_isolation(store):
    job = store.create_job("alice", REQUEST)[0]
    assert store.get(job.id, owner="bob") is None
    assert store.get(job.id, owner="alice").id == job.id
    assert store.list("bob") == ([], None)
    assert store.request_cancel(job.id, owner="bob") is None
    assert store.get(job.id).status == "queued" and not store.get(job.id).cancel_requested
    assert store.get(job.id, owner="bob", admin=True).id == job.id
    bobs = store.create_job("bob", REQUEST)[0]
    assert {j.id for j in store.list(admin=True)[0]} == {job.id, bobs.id}
    assert store.request_cancel(job.id, owner="bob", admin=True).status == "cancelled"
    with pytest.raises(ValueError, match="owner"):
        store.list()


def test_exactly_once_under_races(store):
    barrier = threading.Barrier(2)

    def finish(job_id):
        barrier.wait()
        return store.transition(job_id, ["running"], "succeeded", report={"ok": True})

    with ThreadPoolExecutor(2) as pool:
        for _ in range(50):
            job = store.create_job("alice", REQUEST)[0]
            assert store.transition(job.id, ["queued"], "running")
            wins = list(pool.map(finish, [job.id, job.id]))
            assert sorted(wins) == [False, True]
            assert store.get(job.id).status == "succeeded"
            assert [e.data["status"] for e in store.events(job.id)] == ["queued", "running", "succeeded"]


def test_finish_races_cancel(store):
    """A worker finishing and a user cancelling at once: one wins, and the job ends in the winner's state."""
    barrier = threading.Barrier(2)
    with ThreadPoolExecutor(2) as pool:
        for _ in range(10):
            job = store.create_job("alice", REQUEST)[0]
            drive(store, job.id, ["running", "uploading"])

            def finish():
                barrier.wait()
                return "succeeded" if store.transition(job.id, ["uploading"], "succeeded") else None

            def cancel():
                barrier.wait()
                return "cancelled" if store.transition(job.id, ["running", "uploading"], "cancelled") else None

            winners = [w for w in (pool.submit(finish), pool.submit(cancel)) if w.result()]
            assert len(winners) == 1
            assert store.get(job.id).status == winners[0].result()


@pytest.mark.parametrize("from_status", STATUSES)
def test_transition_matrix(store, from_status):
    for to_status in STATUSES:
        job = store.create_job("alice", REQUEST)[0]
        drive(store, job.id, PATH_TO[from_status])
        if to_status in TRANSITIONS[from_status]:
            assert store.transition(job.id, [from_status], to_status)
            assert store.get(job.id).status == to_status
        else:
            with pytest.raises(InvalidTransition) as err:
                store.transition(job.id, [from_status], to_status)
            assert repr(from_status) in str(err.value) and repr(to_status) in str(err.value)
            assert store.get(job.id).status == from_status
    if from_status in TERMINAL:
        assert TRANSITIONS[from_status] == frozenset()


def test_a_worker_presumed_lost_is_fenced_out_by_its_attempt(store):
    job = store.create_job("alice", REQUEST)[0]
    assert store.transition(job.id, ["queued"], "running", worker_ref="old")
    first = store.get(job.id).attempt
    assert store.transition(job.id, ["running"], "queued", attempt=first)  # recovery: its worker looked gone
    assert store.transition(job.id, ["queued"], "running", worker_ref="new")
    second = store.get(job.id).attempt
    assert second == first + 1
    # The old worker was alive after all: nothing it does reaches the job any more.
    assert not store.set_progress(job.id, {"stage": "compressing", "layer": 3}, attempt=first)
    assert not store.transition(job.id, ["running"], "uploading", attempt=first)
    assert not store.transition(job.id, ["running"], "failed", attempt=first, error="stale")
    assert store.get(job.id).status == "running" and store.get(job.id).worker_ref == "new"
    assert store.set_progress(job.id, {"stage": "compressing", "layer": 1}, attempt=second)
    assert store.transition(job.id, ["running"], "uploading", attempt=second)


def test_transition_fields_and_timestamps(store):
    job = store.create_job("alice", REQUEST)[0]
    assert not store.transition(job.id, ["running"], "succeeded")  # valid pair, but the job is queued
    assert not store.transition("nosuchjob", ["queued"], "running")
    assert store.transition(job.id, ["queued"], "running", worker_ref="llmpress-job-1")
    running = store.get(job.id)
    assert running.worker_ref == "llmpress-job-1" and running.started_at >= job.created_at
    # A lost worker: back to the queue for another attempt.
    assert store.transition(job.id, ["running"], "queued")
    requeued = store.get(job.id)
    assert requeued.attempt == 2 and requeued.worker_ref is None and requeued.started_at is None
    drive(store, job.id, ["running", "uploading"])
    assert store.transition(job.id, ["uploading"], "failed", error="bucket missing", report={"k": 1},
                            artifacts={"uri": "s3://b/p/"})
    failed = store.get(job.id)
    assert failed.error == "bucket missing" and failed.report == {"k": 1} and failed.artifacts == {"uri": "s3://b/p/"}
    assert failed.finished_at >= failed.started_at and failed.terminal
    assert store.events(job.id)[-1].data == {"status": "failed", "error": "bucket missing"}
    with pytest.raises(TypeError, match="owner"):
        store.transition(job.id, ["queued"], "running", owner="mallory")
    with pytest.raises(ValueError, match="unknown job status"):
        store.transition(job.id, ["queued"], "done")


def test_progress_and_metrics(store):
    job = store.create_job("alice", REQUEST)[0]
    assert not store.set_progress(job.id, {"stage": "compress"})  # not running yet
    drive(store, job.id, ["running"])
    assert store.set_progress(job.id, {"stage": "compress", "layer": 1, "layers": 2, "fraction": 0.5},
                              {"layers": {"0": {"sparsity": 0.5, "seconds": 1.5}}})
    assert store.set_progress(job.id, {"stage": "compress", "layer": 2, "layers": 2, "fraction": 1.0},
                              {"layers": {"1": {"sparsity": 0.5}}, "modules": {"l1.q": {"loss": 0.1}}})
    now = store.get(job.id)
    assert now.progress == {"stage": "compress", "layer": 2, "layers": 2, "fraction": 1.0}
    assert now.metrics == {"layers": {"0": {"sparsity": 0.5, "seconds": 1.5}, "1": {"sparsity": 0.5}},
                           "modules": {"l1.q": {"loss": 0.1}}}
    progress = [e for e in store.events(job.id) if e.type == "progress"]
    assert [e.data["progress"]["layer"] for e in progress] == [1, 2]
    assert progress[1].data["metrics"] == {"layers": {"1": {"sparsity": 0.5}}, "modules": {"l1.q": {"loss": 0.1}}}
    assert store.transition(job.id, ["running"], "cancelled")
    assert not store.set_progress(job.id, {"stage": "late"})  # a worker that missed the cancel learns here
    assert store.get(job.id).progress["stage"] == "compress"


def test_events_after_id(store):
    job = store.create_job("alice", REQUEST)[0]
    other = store.create_job("alice", REQUEST)[0]
    first = store.events(job.id)[0]
    added = [store.add_event(job.id, "log", {"i": i}) for i in range(5)]
    store.add_event(other.id, "log", {"other": True})
    assert [e.id for e in added] == sorted(e.id for e in added) and added[0].id > first.id
    assert [e.data for e in store.events(job.id, after_id=added[1].id)] == [{"i": 2}, {"i": 3}, {"i": 4}]
    assert [e.data for e in store.events(job.id, after_id=first.id, limit=2)] == [{"i": 0}, {"i": 1}]
    assert store.events(job.id, after_id=added[-1].id) == []
    assert store.events("nosuchjob") == []
    with pytest.raises(JobNotFound):
        store.add_event("nosuchjob", "log", {})
    assert json.dumps(added[0].to_dict())


def test_request_cancel(store):
    queued = store.create_job("alice", REQUEST)[0]
    cancelled = store.request_cancel(queued.id, owner="alice")
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    assert not store.transition(queued.id, ["queued"], "running")  # a late dispatch cannot start it

    running = store.create_job("alice", REQUEST)[0]
    drive(store, running.id, ["running"])
    assert not store.cancel_requested(running.id)
    after = store.request_cancel(running.id, owner="alice")
    assert after.status == "running" and after.cancel_requested and store.cancel_requested(running.id)
    store.request_cancel(running.id, owner="alice")  # twice: one event
    assert [e.type for e in store.events(running.id)].count("cancel_requested") == 1
    assert store.transition(running.id, ["running", "uploading"], "cancelled")

    done = store.create_job("alice", REQUEST)[0]
    drive(store, done.id, ["running", "succeeded"])
    assert store.request_cancel(done.id, owner="alice").status == "succeeded"
    assert store.request_cancel("nosuchjob", owner="alice") is None


def test_restart_keeps_everything(db_url):
    first = JobStore(db_url)
    job = first.create_job("alice", REQUEST, labels={"team": "nlp"}, idempotency_key="k")[0]
    drive(first, job.id, ["running"])
    first.set_progress(job.id, {"stage": "compress", "layer": 1, "layers": 4, "fraction": 0.25}, {"layers": {"0": {}}})
    before = first.get(job.id)
    last_event = first.events(job.id)[-1].id
    first.close()

    second = JobStore(db_url)  # the API restarted
    assert second.get(job.id) == before
    assert second.create_job("alice", REQUEST, labels={"team": "nlp"}, idempotency_key="k") == (before, False)
    assert [j.id for j in second.recoverable()] == [job.id]
    assert second.transition(job.id, ["running"], "succeeded")
    assert not second.transition(job.id, ["running"], "succeeded")
    assert second.events(job.id, after_id=last_event)[0].data == {"status": "succeeded"}
    second.close()


def test_recoverable(store):
    jobs = {name: store.create_job("alice", {"name": name})[0] for name in
            ("queued", "running", "uploading", "succeeded", "failed", "cancelled", "queued2")}
    for name, job in jobs.items():
        drive(store, job.id, PATH_TO[name.rstrip("2")])
    store.request_cancel(jobs["running"].id)
    recoverable = store.recoverable()
    assert [j.id for j in recoverable] == [jobs[n].id for n in ("queued", "running", "uploading", "queued2")]
    assert next(j for j in recoverable if j.id == jobs["running"].id).cancel_requested
    assert store.transition(jobs["uploading"].id, ["uploading"], "succeeded")
    assert jobs["uploading"].id not in {j.id for j in store.recoverable()}


def test_counts_and_durations(store):
    for path in (["running", "succeeded"], ["running", "succeeded"], ["failed"], ["running"], []):
        drive(store, store.create_job("alice", REQUEST)[0].id, path)
    assert store.counts_by_status() == {"queued": 1, "running": 1, "uploading": 0, "succeeded": 2, "failed": 1,
                                        "cancelled": 0}
    durations = store.durations()
    assert sorted(s for s, _ in durations) == ["succeeded", "succeeded"]  # the failed one never started
    assert all(0 <= seconds < 10 for _, seconds in durations)
    store.ping()


def test_concurrent_writers(store):
    """The API and several worker threads writing at once: nothing is lost, nothing times out."""

    def worker(n):
        for i in range(10):
            job = store.create_job(f"owner{n}", {"i": i})[0]
            assert store.transition(job.id, ["queued"], "running")
            for layer in range(3):
                assert store.set_progress(job.id, {"layer": layer}, {"layers": {str(layer): {"n": n}}})
            assert store.transition(job.id, ["running"], "succeeded")
            store.list(f"owner{n}")
        return n

    with ThreadPoolExecutor(4) as pool:
        assert sorted(pool.map(worker, range(4))) == [0, 1, 2, 3]
    assert store.counts_by_status()["succeeded"] == 40
    job = store.list("owner2", limit=1)[0][0]
    assert store.get(job.id).metrics == {"layers": {"0": {"n": 2}, "1": {"n": 2}, "2": {"n": 2}}}


# --- API keys -----------------------------------------------------------------------------------------------------


def test_api_keys_stored_hashed(store):
    secret = create_key(store, "ci-bot")
    admin_secret = create_key(store, "ops", admin=True)
    assert secret.startswith("lp_") and len(secret) > 40 and secret != admin_secret
    ring = KeyRing(store)
    assert ring.verify(secret).name == "ci-bot" and not ring.verify(secret).admin
    assert ring.verify(admin_secret).admin and ring.verify(admin_secret).source == "store"
    for wrong in (secret[:-1] + ("A" if secret[-1] != "A" else "B"), "lp_", "", None, "lp_abc.def", admin_secret + "x"):
        assert ring.verify(wrong) is None
    with store.session(write=False) as s:
        rows = s.scalars(select(ApiKeyRow)).all()
        stored = json.dumps([[str(getattr(r, c.name)) for c in ApiKeyRow.__table__.columns] for r in rows])
    token = secret.split(".", 1)[1]
    assert token not in stored and secret not in stored
    with pytest.raises(KeyExists):
        create_key(store, "ci-bot")
    with pytest.raises(ValueError, match="key name"):
        create_key(store, "no spaces")
    assert [(k.name, k.admin) for k in list_keys(store)] == [("ci-bot", False), ("ops", True)]
    assert revoke(store, "ci-bot") and not revoke(store, "ci-bot")
    assert ring.verify(secret) is None and ring.verify(admin_secret).name == "ops"
    rotated = create_key(store, "ci-bot")  # the name is free again; the old secret stays dead
    assert ring.verify(rotated).name == "ci-bot" and ring.verify(secret) is None
    with store.session() as s:  # inside a caller's transaction
        in_tx = create_key(s, "in-tx")
    assert ring.verify(in_tx).name == "in-tx"


def test_api_keys_from_environment(store):
    settings = Settings(api_keys="alice:alice-secret,root:root-secret", admin_keys="root,ops")
    ops_secret = create_key(store, "ops")
    ring = KeyRing.from_settings(store, settings)
    assert ring.verify("alice-secret").name == "alice" and not ring.verify("alice-secret").admin
    assert ring.verify("root-secret").admin and ring.verify("root-secret").source == "environment"
    assert ring.verify(ops_secret).admin  # admin by name for stored keys too
    assert ring.verify("alice-secre") is None and ring.verify("alice-secret ") is None
    names = [(k.name, k.source, k.admin) for k in list_keys(store, settings)]
    assert names == [("alice", "environment", False), ("ops", "store", True), ("root", "environment", True)]
    assert "alice-secret" not in repr(ring.__dict__)


# --- output claims ----------------------------------------------------------------------------------------------


def claim(store: JobStore, owner: str, location: str, **kwargs):
    return store.create_job(owner, REQUEST, output_location=location, **kwargs)[0]


def test_an_output_folder_is_claimed_by_one_job_and_the_refusal_names_nobody(store):
    first = claim(store, "alice", "s3://releases/run-1/")
    for location in ("s3://releases/run-1/",  # the same folder
                     "s3://releases/run-1/shards/",  # inside it: the second job's files would mix with the first's
                     "s3://releases/"):  # around it: the same, the other way
        with pytest.raises(OutputClaimed) as info:
            claim(store, "bob", location)
        message = str(info.value)
        assert message.startswith("output: another job") and "alice" not in message and first.id not in message
        assert "releases" not in message  # no location, not even the tenant's own spelling of it
    assert [j.id for j in store.list(admin=True)[0]] == [first.id]  # no job was created by the refusals
    # A folder whose name merely starts with the same characters is another folder; so is another bucket.
    claim(store, "bob", "s3://releases/run-10/")
    claim(store, "bob", "s3://releases-2/run-1/")
    # LIKE wildcards in a location are characters, not patterns.
    claim(store, "carol", "file:///srv/a_b/")
    claim(store, "carol", "file:///srv/aXb/c/")
    assert store.output_claim(first.id) == ("s3://releases/run-1/", None)


def test_a_failed_or_cancelled_job_gives_its_folder_up_and_a_succeeded_one_keeps_it(store):
    failed = claim(store, "alice", "s3://b/x/")
    drive(store, failed.id, ["running", "failed"])
    assert store.output_claim(failed.id) is None
    cancelled = claim(store, "bob", "s3://b/x/")  # free again
    store.request_cancel(cancelled.id, owner="bob")
    running = claim(store, "carol", "s3://b/x/")
    drive(store, running.id, ["running"])
    store.request_cancel(running.id, owner="carol")
    assert store.output_claim(running.id) is not None  # cancel requested: the worker still owns the folder
    assert store.transition(running.id, ["running"], "cancelled")
    requeued = claim(store, "dave", "s3://b/x/")
    drive(store, requeued.id, ["running", "queued"])  # a lost worker: the job keeps its folder for attempt 2
    assert store.output_claim(requeued.id) == ("s3://b/x/", None)
    drive(store, requeued.id, ["running", "uploading", "succeeded"])
    with pytest.raises(OutputClaimed):
        claim(store, "erin", "s3://b/x/")


def test_overwrite_takes_over_only_the_same_tenants_succeeded_output(store):
    done = claim(store, "alice", "s3://b/model/")
    with pytest.raises(OutputClaimed) as info:  # the tenant's own job may be named: it tells nobody else's
        claim(store, "alice", "s3://b/model/")
    assert done.id in str(info.value) and "overwrite" in str(info.value)
    with pytest.raises(OutputClaimed):  # still queued: nothing to replace yet
        claim(store, "alice", "s3://b/model/", overwrite=True)
    drive(store, done.id, ["running", "uploading", "succeeded"])
    with pytest.raises(OutputClaimed) as info:  # another tenant's, even with overwrite
        claim(store, "bob", "s3://b/model/", overwrite=True)
    assert done.id not in str(info.value)
    with pytest.raises(OutputClaimed):  # only exactly that folder, not one inside it
        claim(store, "alice", "s3://b/model/v2/", overwrite=True)
    again = claim(store, "alice", "s3://b/model/", overwrite=True)
    assert store.output_claim(again.id) == ("s3://b/model/", done.id)
    assert store.output_claim(done.id) is None
    with pytest.raises(OutputClaimed):  # the replacing job holds it now
        claim(store, "alice", "s3://b/model/", overwrite=True)


def test_concurrent_claims_of_one_folder_create_exactly_one_job(store):
    owners = [f"tenant-{i}" for i in range(8)]
    barrier = threading.Barrier(len(owners))

    def attempt(owner):
        barrier.wait()
        try:
            return claim(store, owner, "s3://b/race/" if owner[-1] in "0246" else "s3://b/race/inner/").id
        except OutputClaimed:
            return None

    with ThreadPoolExecutor(len(owners)) as pool:
        created = [job for job in pool.map(attempt, owners) if job is not None]
    assert len(created) == 1
    assert len(store.list(admin=True)[0]) == 1


def test_a_new_attempt_starts_with_its_own_progress(store):
    job = claim(store, "alice", "s3://b/p/")
    drive(store, job.id, ["running"])
    store.set_progress(job.id, {"stage": "compressing", "layer": 4, "layers": 5, "fraction": 0.8},
                       {"layers": {"3": {"sparsity": 0.5}}})
    assert store.transition(job.id, ["running"], "queued")
    again = store.get(job.id)
    assert again.attempt == 2 and again.progress == {} and again.metrics == {}


# --- retry --------------------------------------------------------------------------------------------------------


def test_retry_queues_a_failed_or_cancelled_job_again_and_it_claims_its_folder(store):
    job = claim(store, "alice", "s3://b/retry/")
    drive(store, job.id, ["running"])
    store.set_progress(job.id, {"stage": "compressing", "layer": 2, "layers": 5}, {"layers": {"1": {"loss": 0.1}}})
    store.request_cancel(job.id, owner="alice")
    assert store.transition(job.id, ["running"], "failed", error="the node went away", report={"totals": {}})
    # Failed: the folder is free; another tenant takes it, and the retry is refused without changing the job.
    taken = claim(store, "bob", "s3://b/retry/inner/")
    with pytest.raises(OutputClaimed) as info:
        store.retry(job.id, owner="alice", output_location="s3://b/retry/")
    assert "bob" not in str(info.value) and taken.id not in str(info.value)
    assert store.get(job.id).status == "failed" and store.get(job.id).attempt == 1
    store.request_cancel(taken.id, owner="bob")

    retried = store.retry(job.id, owner="alice", output_location="s3://b/retry/")
    assert (retried.status, retried.attempt, retried.error, retried.report) == ("queued", 2, None, None)
    assert retried.started_at is None and retried.finished_at is None and retried.worker_ref is None
    assert not retried.cancel_requested and retried.progress == {}
    assert retried.metrics == {"layers": {"1": {"loss": 0.1}}}  # kept: a new attempt may resume from them
    assert store.get(job.id) == retried
    assert [(e.type, e.data) for e in store.events(job.id)][-2:] == [("status", {"status": "queued"}),
                                                                    ("retried", {"attempt": 2})]
    assert store.output_claim(job.id) == ("s3://b/retry/", None)
    with pytest.raises(OutputClaimed):
        claim(store, "bob", "s3://b/retry/")
    # The new attempt runs as any other: a worker of attempt 1 is fenced out.
    assert not store.transition(job.id, ["queued"], "running", attempt=1)
    assert store.transition(job.id, ["queued"], "running", attempt=2)
    assert store.transition(job.id, ["running"], "cancelled")
    assert store.retry(job.id, admin=True).attempt == 3  # a cancelled one too; without a location, no claim


@pytest.mark.parametrize("status", ["queued", "running", "uploading", "succeeded"])
def test_only_a_failed_or_cancelled_job_is_retried(store, status):
    job = claim(store, "alice", f"s3://b/{status}/")
    drive(store, job.id, PATH_TO[status])
    with pytest.raises(NotRetryable) as info:
        store.retry(job.id, owner="alice", output_location=f"s3://b/{status}/")
    assert info.value.status == status and job.id in str(info.value)
    if status == "succeeded":
        assert str(info.value) == (f"job {job.id} succeeded; a succeeded job is not retried: submit a new job "
                                   "(with overwrite to replace its output)")
    assert store.get(job.id).status == status and store.get(job.id).attempt == 1


def test_retry_of_another_tenants_job_or_none_is_not_found(store):
    job = claim(store, "alice", "s3://b/mine/")
    drive(store, job.id, ["failed"])
    for job_id, owner in ((job.id, "bob"), ("nosuchjob123", "alice")):
        with pytest.raises(JobNotFound):
            store.retry(job_id, owner=owner)
    assert store.get(job.id).status == "failed"
    assert store.retry(job.id, owner="ops", admin=True).status == "queued"
