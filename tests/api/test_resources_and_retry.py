"""One job over several Ray workers, the request and API side: the ``resources`` field (checked, stored only when
given, documented as it is checked), the cluster feasibility check at submit (``cluster_fits``, through a stand-in
dispatcher that has a pretend cluster), ``POST /v1/jobs/{id}/retry`` with the client and the CLI, and the worker
fields of a job's progress passed through to the response.

The app is served by uvicorn on 127.0.0.1 over a real SQLite store; the dispatcher is ``tests.api_server.NoWorkers``,
so no Ray starts and no job runs: the tests move jobs through the store themselves.
"""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from api import cli
from api.app import create_app
from api.client import ApiError, Client
from api.schemas import JobCreate, ResourcesSpec
from service.engine.options import FieldError, OptionsError
from service.jobs.job_store import JobStore, request_sha256
from service.jobs.request import (
    MAX_WORKERS,
    REQUEST_FIELDS,
    JobRequest,
    Resources,
    cluster_fits,
)
from service.jobs.settings import Settings
from tests.api_server import NoWorkers, Server
from tests.fixture_paths import REPO

KEYS = {"alice": "alice-secret-1", "bob": "bob-secret-2"}
RECIPE_YAML = (REPO / "service" / "recipes" / "sparsegpt_2of4.yaml").read_text()
# A pretend cluster: two nodes of 2 CPUs, one of them with a GPU.
NODES = [{"CPU": 2.0, "memory": 8e9}, {"CPU": 2.0, "GPU": 1.0}]


def job_body(**overrides) -> dict:
    body = {"model": "s3://models/stories260K", "recipe": RECIPE_YAML,
            "dataset": {"source": "s3://data/calib.txt", "num_samples": 8, "seq_len": 64},
            "output": f"s3://out/{uuid.uuid4().hex}/"}
    body.update(overrides)
    return body


def auth(name: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[name]}"}


class FailingSubmit(NoWorkers):
    """A dispatcher whose workers cannot take a job once ``broken`` is set."""

    broken = False

    def submit(self, job_id):
        if self.broken:
            raise ConnectionError("Ray is gone")
        super().submit(job_id)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("resources")
    (root / "artifacts").mkdir()
    settings = Settings(api_keys=",".join(f"{k}:{v}" for k, v in KEYS.items()), admin_keys="",
                        database_url=f"sqlite:///{root / 'jobs.db'}", artifacts_root=str(root / "artifacts"),
                        hub_offline=True)
    store = JobStore(settings.database_url)
    dispatcher = FailingSubmit(nodes=NODES)
    try:
        with Server(create_app(settings, store, dispatcher)) as url, httpx.Client(base_url=url, timeout=30) as http:
            yield type("Env", (), {"url": url, "http": http, "store": store, "dispatcher": dispatcher})
    finally:
        store.close()


def create(env, who="alice", **overrides) -> dict:
    response = env.http.post("/v1/jobs", json=job_body(**overrides), headers=auth(who))
    assert response.status_code == 201, response.text
    return response.json()


# ------------------------------------------------------------------------------------------------- the field


@pytest.mark.parametrize("resources, loc, message", [
    ({"workers": 0}, ["body", "resources", "workers"], "resources.workers must be >= 1, got 0"),
    ({"workers": MAX_WORKERS + 1}, ["body", "resources", "workers"],
     f"resources.workers must be <= {MAX_WORKERS}, got {MAX_WORKERS + 1}"),
    ({"workers": True}, ["body", "resources", "workers"], "resources.workers must be an integer, got bool"),
    ({"gpus_per_worker": 2}, ["body", "resources", "gpus_per_worker"], "resources.gpus_per_worker must be <= 1"),
    ({"cpus_per_worker": 0}, ["body", "resources", "cpus_per_worker"], "resources.cpus_per_worker must be >= 1"),
    ({"cpus_per_worker": 257}, ["body", "resources", "cpus_per_worker"], "resources.cpus_per_worker must be <= 256"),
])
def test_bad_resources_are_422_naming_the_field(env, resources, loc, message):
    before = sum(env.store.counts_by_status().values())
    response = env.http.post("/v1/jobs", json=job_body(resources=resources), headers=auth("alice"))
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == loc and error["msg"].startswith(message), error
    assert sum(env.store.counts_by_status().values()) == before


def test_unknown_resources_keys_are_refused():
    with pytest.raises(OptionsError) as info:
        JobRequest.parse(job_body(resources={"workers": 2, "nodes": 3}))
    assert info.value.loc == ("resources",)
    assert str(info.value) == ("resources: unknown field(s) 'nodes' (allowed: workers, gpus_per_worker, "
                               "cpus_per_worker)")


def test_resources_are_stored_only_when_given_and_old_requests_hash_the_same():
    # A body without resources is stored (and hashed for idempotency) exactly as before the field existed.
    body = job_body(output="s3://out/x/")
    plain = JobRequest.parse(body).to_dict()
    assert list(plain) == ["model", "recipe", "dataset", "output"]
    assert JobRequest.parse({**body, "resources": None}).to_dict() == plain
    given = JobRequest.parse({**body, "resources": {"workers": 2}}).to_dict()
    assert given == {**plain, "resources": {"workers": 2, "cpus_per_worker": 1}}  # gpus: the cluster's choice
    assert JobRequest.parse(given).to_dict() == given  # the worker parses the stored request again
    assert request_sha256(given) != request_sha256(plain)


def test_the_http_schema_declares_what_the_request_takes():
    assert set(JobCreate.model_fields) == set(REQUEST_FIELDS)
    assert tuple(ResourcesSpec.model_fields) == tuple(Resources.model_fields)
    for name, field in Resources.model_fields.items():
        assert ResourcesSpec.model_fields[name].default == field.default, name
        assert ResourcesSpec.model_fields[name].description == field.description, name


def test_the_document_states_the_bounds_the_request_checks(env):
    spec = env.http.get("/openapi.json").json()
    schema = spec["components"]["schemas"]["ResourcesSpec"]
    assert schema["additionalProperties"] is False and schema["examples"]
    integers = {name: next(s for s in prop.get("anyOf", [prop]) if s.get("type") == "integer")
                for name, prop in schema["properties"].items()}
    # (FastAPI's OpenAPI models write the bounds as numbers: 1.0)
    bounds = {name: (int(integer["minimum"]), int(integer["maximum"])) for name, integer in integers.items()}
    assert bounds == {"workers": (1, MAX_WORKERS), "gpus_per_worker": (0, 1), "cpus_per_worker": (1, 256)}
    for name, (low, high) in bounds.items():  # the edges pass, one past each is refused
        for value, ok in ((low, True), (high, True), (low - 1, False), (high + 1, False)):
            try:
                Resources.parse({name: value})
                assert ok, (name, value)
            except OptionsError:
                assert not ok, (name, value)
    operation = spec["paths"]["/v1/jobs/{job_id}/retry"]["post"]
    assert {"200", "400", "401", "404", "409", "413", "422", "503"} <= set(operation["responses"])
    assert set(operation["responses"]["409"]["content"]["application/json"]["examples"]) == {
        "not-retryable", "output-claimed", "resources"}


# ------------------------------------------------------------------------------------------- feasibility


@pytest.mark.parametrize("resources, nodes", [
    (None, NODES),
    ({"workers": 4, "gpus_per_worker": 0}, NODES),
    ({"workers": 2, "cpus_per_worker": 2, "gpus_per_worker": 0}, NODES),
    ({"workers": 1, "gpus_per_worker": 1}, NODES),
    (None, [{"CPU": 1.0}]),  # no GPU: gpus_per_worker left out means none
    ({"workers": 3, "cpus_per_worker": 3}, [{"CPU": 9.0}, {"CPU": 2.0}]),
])
def test_cluster_fits(resources, nodes):
    cluster_fits(Resources.parse(resources) if resources else None, nodes)


@pytest.mark.parametrize("resources, nodes, field, message", [
    ({"workers": 3}, [{"CPU": 1.0}, {"CPU": 1.0}], "resources.workers",
     "resources.workers: 3 workers of 1 CPU each were asked for, but the cluster's nodes can hold at most 2 at once"),
    # A bundle lives on one node: two nodes of 3 CPUs hold one worker of 2 CPUs each, not three.
    ({"workers": 3, "cpus_per_worker": 2}, [{"CPU": 3.0}, {"CPU": 3.0}], "resources.workers",
     "resources.workers: 3 workers of 2 CPUs each were asked for, but the cluster's nodes can hold at most 2 at once"),
    ({"gpus_per_worker": 1}, [{"CPU": 8.0}], "resources.gpus_per_worker",
     "resources.gpus_per_worker: 1 GPU per worker was asked for, but the cluster has no GPU; use 0 or leave it out"),
    ({"cpus_per_worker": 8}, [{"CPU": 4.0}, {"CPU": 6.0}], "resources.cpus_per_worker",
     ("resources.cpus_per_worker: workers of 8 CPUs each were asked for, but no node of the cluster has that much "
      "by itself (a worker runs on one node; a node has at most 6 CPUs)")),
    # gpus_per_worker left out on a GPU cluster: a GPU each, and the message says how to run on CPUs instead.
    ({"workers": 2}, NODES, "resources.workers",
     ("resources.workers: 2 workers of 1 CPU and 1 GPU each were asked for, but the cluster's nodes can hold at most "
      "1 at once; set gpus_per_worker to 0 to run the workers on CPUs")),
    ({"cpus_per_worker": 4, "gpus_per_worker": 1}, [{"CPU": 2.0, "GPU": 2.0}, {"CPU": 16.0}],
     "resources.cpus_per_worker",
     ("resources.cpus_per_worker: workers of 4 CPUs and 1 GPU each were asked for, but no node of the cluster has "
      "that much by itself (a worker runs on one node; a node with a GPU has at most 2 CPUs)")),
    (None, [], "resources.workers",
     "resources.workers: 1 worker of 1 CPU each was asked for, but the cluster's nodes can hold at most 0 at once"),
])
def test_cluster_fits_refuses_naming_the_field(resources, nodes, field, message):
    with pytest.raises(FieldError) as info:
        cluster_fits(Resources.parse(resources) if resources else None, nodes)
    assert info.value.field == field and str(info.value) == message


def test_a_request_the_cluster_cannot_hold_is_a_422_and_nothing_is_stored(env):
    before, submitted = sum(env.store.counts_by_status().values()), list(env.dispatcher.submitted)
    for resources, loc, start in (
        ({"workers": 5, "gpus_per_worker": 0}, ["body", "resources", "workers"],
         "resources.workers: 5 workers of 1 CPU each were asked for"),
        ({"workers": 1, "cpus_per_worker": 4}, ["body", "resources", "cpus_per_worker"], "resources.cpus_per_worker:"),
    ):
        response = env.http.post("/v1/jobs", json=job_body(resources=resources), headers=auth("alice"))
        assert response.status_code == 422, response.text
        assert response.json()["detail"] == [{"loc": loc, "msg": response.json()["detail"][0]["msg"],
                                              "type": "value_error"}]
        assert response.json()["detail"][0]["msg"].startswith(start)
    assert sum(env.store.counts_by_status().values()) == before and env.dispatcher.submitted == submitted
    job = create(env, resources={"workers": 4, "gpus_per_worker": 0})
    assert job["request"]["resources"] == {"workers": 4, "gpus_per_worker": 0, "cpus_per_worker": 1}
    assert env.dispatcher.submitted[-1] == job["id"]


def test_worker_progress_passes_through_to_the_response(env):
    job = create(env)
    workers = [{"rank": r, "node_id": f"{r:02x}" * 28, "node_ip": "127.0.0.1", "cpus": 1, "gpus": 0} for r in (0, 1)]
    env.store.transition(job["id"], ["queued"], "running")
    env.store.set_progress(job["id"], {"stage": "compressing", "layer": 3, "layers": 5, "fraction": 0.4,
                                       "workers": workers, "resumed": {"layer": 3, "layers": 5}})
    progress = env.http.get(f"/v1/jobs/{job['id']}", headers=auth("alice")).json()["progress"]
    assert progress["workers"] == [{**w, "device": None} for w in workers] and progress["resumed"] == {"layer": 3, "layers": 5}
    assert progress["waiting"] is None


# ------------------------------------------------------------------------------------------------- retry


def test_retry_queues_a_failed_job_again_as_its_next_attempt(env):
    job = create(env)
    env.store.transition(job["id"], ["queued"], "running")
    env.store.set_progress(job["id"], {"stage": "compressing", "layer": 2, "layers": 5},
                           {"layers": {"1": {"sparsity": 0.5}}})
    env.store.transition(job["id"], ["running"], "failed", error="the worker's node went away")
    # Failed: its folder is free, and another tenant takes it meanwhile; then the retry is a 409.
    other = create(env, "bob", output=job["request"]["output"])
    refused = env.http.post(f"/v1/jobs/{job['id']}/retry", headers=auth("alice"))
    assert refused.status_code == 409
    assert refused.json()["detail"].startswith("output: another job publishes to this location")
    assert "bob" not in refused.json()["detail"] and env.store.get(job["id"]).status == "failed"
    assert env.http.post(f"/v1/jobs/{other['id']}/cancel", headers=auth("bob")).json()["status"] == "cancelled"

    retried = env.http.post(f"/v1/jobs/{job['id']}/retry", headers=auth("alice"))
    assert retried.status_code == 200, retried.text
    body = retried.json()
    assert body["status"] == "queued" and body["attempt"] == 2 and body["error"] is None
    assert body["finished_at"] is None and body["started_at"] is None and not body["cancel_requested"]
    assert body["metrics"] == {"layers": {"1": {"sparsity": 0.5}}} and body["progress"]["stage"] is None
    assert env.dispatcher.submitted[-1] == job["id"]
    events = env.http.get(f"/v1/jobs/{job['id']}/events", headers=auth("alice")).json()
    assert [(e["type"], e["data"]) for e in events[-2:]] == [("status", {"status": "queued"}),
                                                            ("retried", {"attempt": 2})]
    # It holds its folder again: bob cannot take it now.
    assert env.http.post("/v1/jobs", json=job_body(output=job["request"]["output"]),
                         headers=auth("bob")).status_code == 409
    # Queued now: not retried again.
    again = env.http.post(f"/v1/jobs/{job['id']}/retry", headers=auth("alice"))
    assert again.status_code == 409 and again.json()["detail"].startswith(f"job {job['id']} is queued")


def test_retry_refuses_what_it_cannot_retry(env):
    job = create(env)
    for who, job_id in (("bob", job["id"]), ("alice", "nosuchjob123")):
        response = env.http.post(f"/v1/jobs/{job_id}/retry", headers=auth(who))
        assert response.status_code == 404 and response.json() == {"detail": "job not found"}
    env.store.transition(job["id"], ["queued"], "running")
    running = env.http.post(f"/v1/jobs/{job['id']}/retry", headers=auth("alice"))
    assert running.status_code == 409 and "cancel it first" in running.json()["detail"]
    env.store.transition(job["id"], ["running"], "succeeded")
    done = env.http.post(f"/v1/jobs/{job['id']}/retry", headers=auth("alice"))
    assert done.status_code == 409 and done.json()["detail"] == (
        f"job {job['id']} succeeded; a succeeded job is not retried: submit a new job (with overwrite to replace "
        "its output)")
    assert env.store.get(job["id"]).attempt == 1


def test_retry_when_the_workers_cannot_take_the_job_is_a_503(env):
    job = create(env)
    env.http.post(f"/v1/jobs/{job['id']}/cancel", headers=auth("alice"))
    env.dispatcher.broken = True
    try:
        response = env.http.post(f"/v1/jobs/{job['id']}/retry", headers=auth("alice"))
    finally:
        env.dispatcher.broken = False
    assert response.status_code == 503 and response.json()["detail"].startswith(f"could not dispatch job {job['id']}")
    failed = env.store.get(job["id"])
    assert failed.status == "failed" and "retry it again" in failed.error and failed.attempt == 2
    assert env.http.post(f"/v1/jobs/{job['id']}/retry", headers=auth("alice")).json()["attempt"] == 3


def test_client_and_cli_retry_and_submit_with_workers(env, tmp_path, capsys, monkeypatch):
    client = Client(env.url, KEYS["alice"])
    job = client.submit(**job_body(resources={"workers": 2, "gpus_per_worker": 0}))
    assert job.request.resources.workers == 2
    with pytest.raises(ApiError) as info:
        client.retry(job.id)
    assert info.value.status == 409 and "is queued" in str(info.value)
    client.cancel(job.id)
    assert client.retry(job.id).attempt == 2

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE_YAML)
    monkeypatch.setenv("LLMPRESS_API_KEY", KEYS["alice"])
    common = ["submit", "--server", env.url, "--model", "s3://models/m", "--recipe", str(recipe),
              "--dataset", "s3://data/calib.txt"]
    assert cli.main([*common, "--output", f"s3://out/{uuid.uuid4().hex}/", "--workers", "3",
                     "--cpus-per-worker", "1", "--gpus-per-worker", "0"]) == 0
    job_id = capsys.readouterr().out.strip()
    assert env.store.get(job_id).request["resources"] == {"workers": 3, "gpus_per_worker": 0, "cpus_per_worker": 1}
    assert cli.main([*common, "--output", f"s3://out/{uuid.uuid4().hex}/"]) == 0
    assert "resources" not in env.store.get(capsys.readouterr().out.strip()).request
    assert cli.main([*common, "--output", f"s3://out/{uuid.uuid4().hex}/", "--workers", "9"]) == 2
    assert "resources.workers: 9 workers of 1 CPU and 1 GPU each" in capsys.readouterr().err

    assert cli.main(["retry", job_id, "--server", env.url]) == 2  # queued
    assert "is queued" in capsys.readouterr().err
    env.http.post(f"/v1/jobs/{job_id}/cancel", headers=auth("alice"))
    assert cli.main(["retry", job_id, "--server", env.url]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["id"] == job_id and printed["status"] == "queued" and printed["attempt"] == 2
