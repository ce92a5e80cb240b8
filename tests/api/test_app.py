"""The HTTP job API over loopback: a real uvicorn server in a background thread, a real SQLite job store.

Every test goes through the real ``workers.dispatch.RayDispatcher`` on one real local Ray (one CPU) shared by the
module. The tests of HTTP itself (validation, auth, idempotency, paging, events, health, OpenAPI) hold Ray's CPU,
so their jobs wait in Ray's own queue and are cancelled afterwards; the Python client, the CLI and
``test_ray_end_to_end`` run real stories260K jobs (SparseGPT 2:4).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from api.app import create_app
from api.client import ApiError, Client
from service.jobs.job_store import JobStore
from service.jobs.settings import Settings
from tests.api_server import Server, local_ray as local_ray_session, ray_cpu_taken
from tests.fixture_paths import FIXTURES, REPO, STORIES

RECIPE_YAML = (REPO / "service" / "recipes" / "sparsegpt_2of4.yaml").read_text()
CALIB = FIXTURES / "data" / "wikitext-2" / "valid.txt"
EVAL_TEXT = FIXTURES / "data" / "tinystories" / "valid-subset.txt"
KEYS = {"alice": "alice-secret-1", "bob": "bob-secret-2", "ops": "ops-secret-3"}
WEBHOOK_SECRET = "whsec-TOPSECRET-4242"
MAX_BODY = 64 * 1024


def job_body(output: str | None = None, **overrides) -> dict:
    body = {
        "model": "s3://models/stories260K",
        "recipe": RECIPE_YAML,
        "dataset": {"source": "s3://data/calib.txt", "num_samples": 8, "seq_len": 64},
        "output": output or f"s3://out/{uuid.uuid4().hex}/",
    }
    body.update(overrides)
    return body


def auth(name: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[name]}"}


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (Ray is initialised once per process). Every RayDispatcher here finds it
    running, uses it and leaves it up; it is shut down after the module so that other test modules can start
    their own. One CPU: jobs run one at a time, and ``ray_cpu_taken`` can keep a submitted job queued."""
    with local_ray_session():
        yield


@contextlib.contextmanager
def api_env(root: Path, **settings):
    """The API with the real RayDispatcher on the module's Ray, its own SQLite store and artifacts folder in
    ``root``; yields an object with url, http (a client), store, dispatcher, settings and root."""
    from workers.dispatch import RayDispatcher

    settings = Settings(
        api_keys=",".join(f"{k}:{v}" for k, v in KEYS.items()), admin_keys="ops",
        database_url=f"sqlite:///{root / 'jobs.db'}", artifacts_root=str(root / "artifacts"), hub_offline=True,
        input_roots=(str(FIXTURES),), **settings,
    )
    (root / "artifacts").mkdir()
    store = JobStore(settings.database_url)
    dispatcher = RayDispatcher(store, settings, input_roots=(FIXTURES,))
    try:
        with Server(create_app(settings, store, dispatcher)) as url, httpx.Client(base_url=url, timeout=30) as http:
            yield type("Env", (), {"url": url, "http": http, "store": store, "dispatcher": dispatcher,
                                   "settings": settings, "root": root})
    finally:
        store.close()


@pytest.fixture(scope="module")
def env_server(local_ray, tmp_path_factory):
    """For the tests of HTTP itself (validation, auth, idempotency, paging, events, health, OpenAPI): their jobs
    are handed to Ray but never run (see ``env``)."""
    # Webhooks may reach 127.0.0.1 only (an IP literal: Ray's workers do not see tests/conftest.py's test DNS).
    with api_env(tmp_path_factory.mktemp("api"), max_request_bytes=MAX_BODY, webhook_allow="127.0.0.1") as env:
        yield env


@pytest.fixture
def env(env_server):
    """``env_server`` with Ray's one CPU taken for the test: what the API hands to Ray waits in Ray's own queue
    (these jobs name S3 inputs that do not exist). Afterwards every job still queued is cancelled, which also
    takes its work off Ray's queue, before the CPU is given back."""
    with ray_cpu_taken():
        yield env_server
        for job in env_server.store.recoverable():
            env_server.dispatcher.cancel(job.id)


def job_count(env) -> int:
    return sum(env.store.counts_by_status().values())


@pytest.fixture(scope="module")
def ray_env(local_ray, tmp_path_factory):
    """For the tests whose jobs run: the client, the CLI, bad inputs only a worker finds."""
    with api_env(tmp_path_factory.mktemp("api-ray")) as env:
        yield env


def create(env, who="alice", body=None, **headers):
    response = env.http.post("/v1/jobs", json=body or job_body(), headers={**auth(who), **headers})
    assert response.status_code == 201, response.text
    return response.json()


# ------------------------------------------------------------------------------------------------- jobs


def test_create_get_list_cancel_a_queued_job(env):
    job = create(env, body=job_body(labels={"team": "release"}))
    assert job["status"] == "queued" and job["owner"] == "alice" and job["labels"] == {"team": "release"}
    assert job["request"]["dataset"] == {"source": "s3://data/calib.txt", "num_samples": 8, "seq_len": 64,
                                         "seed": 0}
    assert env.dispatcher.handed_to_ray(job["id"])  # waiting in Ray's queue for the CPU
    got = env.http.get(f"/v1/jobs/{job['id']}", headers=auth("alice")).json()
    assert got["id"] == job["id"] and got["status"] == "queued"
    listed = env.http.get("/v1/jobs", params={"label": "team=release"}, headers=auth("alice")).json()
    assert job["id"] in [j["id"] for j in listed["items"]]
    cancelled = env.http.post(f"/v1/jobs/{job['id']}/cancel", headers=auth("alice"))
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert not env.dispatcher.handed_to_ray(job["id"])  # taken off Ray's queue
    queued = env.http.get("/v1/jobs", params={"status": "queued"}, headers=auth("alice")).json()["items"]
    assert job["id"] not in [j["id"] for j in queued]
    # A finished job is returned unchanged.
    again = env.http.post(f"/v1/jobs/{job['id']}/cancel", headers=auth("alice")).json()
    assert again["status"] == "cancelled" and again["finished_at"] == cancelled.json()["finished_at"]


def test_authentication_and_tenants(env):
    job = create(env, "alice")
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {KEYS['alice']}"}):
        response = env.http.get(f"/v1/jobs/{job['id']}", headers=headers)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert env.http.post("/v1/jobs", json=job_body(), headers=headers).status_code == 401
    for method, path in (("GET", ""), ("POST", "/cancel"), ("GET", "/events"), ("GET", "/artifacts")):
        response = env.http.request(method, f"/v1/jobs/{job['id']}{path}", headers=auth("bob"))
        assert response.status_code == 404, (path, response.text)
        assert response.json() == {"detail": "job not found"}
    assert env.store.get(job["id"]).status == "queued"  # bob's cancel did nothing
    bob_job = create(env, "bob")
    alice_ids = {j["id"] for j in env.http.get("/v1/jobs", headers=auth("alice")).json()["items"]}
    assert job["id"] in alice_ids and bob_job["id"] not in alice_ids
    admin_ids = {j["id"] for j in env.http.get("/v1/jobs", params={"limit": 500}, headers=auth("ops")).json()["items"]}
    assert {job["id"], bob_job["id"]} <= admin_ids
    assert env.http.get(f"/v1/jobs/{job['id']}", headers=auth("ops")).status_code == 200
    assert env.http.post(f"/v1/jobs/{bob_job['id']}/cancel", headers=auth("ops")).json()["status"] == "cancelled"


@pytest.mark.parametrize("change, loc", [
    ({"recipe": "sparsity_stage:\n  sparsity_modifiers: [1"}, ["body", "recipe"]),
    ({"recipe": [{"NoSuchModifier": {}}]}, ["body", "recipe"]),
    ({"dataset": {"source": "s3://data/c.txt", "num_samples": 0}}, ["body", "dataset", "num_samples"]),
    ({"dataset": {"source": "s3://data/c.txt", "seq_len": 10**9}}, ["body", "dataset", "seq_len"]),
    ({"dataset": {"source": "s3://data/c.txt", "num_samples": "many"}}, ["body", "dataset", "num_samples"]),
    ({"output": "../escape"}, ["body", "output"]),
    ({"output": "runs/../../escape"}, ["body", "output"]),
    ({"eval": {"source": "s3://data/t.txt", "max_ppl_ratio": -1}}, ["body", "eval", "max_ppl_ratio"]),
    ({"webhook": {"url": "ftp://x", "secret": WEBHOOK_SECRET}}, ["body", "webhook", "url"]),
    ({"webhook": {"url": "https://metadata.test/latest", "secret": WEBHOOK_SECRET}}, ["body", "webhook", "url"]),
    ({"webhook": {"url": "https://10.0.0.5/hook", "secret": WEBHOOK_SECRET}}, ["body", "webhook", "url"]),
    ({"surprise": 1}, ["body", "surprise"]),
])
def test_invalid_requests_are_422_naming_the_field(env, change, loc):
    before = job_count(env)
    response = env.http.post("/v1/jobs", json=job_body(**change), headers=auth("alice"))
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert any(e["loc"] == loc for e in errors), errors
    assert WEBHOOK_SECRET not in response.text
    assert job_count(env) == before  # nothing stored, nothing handed to Ray


def test_oversized_body_is_413(env):
    big = job_body(labels={"pad": "x" * 200})
    big["recipe"] = RECIPE_YAML + "#" * MAX_BODY
    response = env.http.post("/v1/jobs", json=big, headers=auth("alice"))
    assert response.status_code == 413 and "larger than" in response.json()["detail"]
    # Chunked, no Content-Length: counted as it arrives.
    payload = json.dumps(big).encode()
    chunks = (payload[i:i + 8192] for i in range(0, len(payload), 8192))
    response = env.http.post("/v1/jobs", content=chunks, headers={**auth("alice"), "Content-Type": "application/json"})
    assert response.status_code == 413
    # Just under the limit still goes through (chunked bodies are replayed to the app).
    small = json.dumps(job_body()).encode()
    response = env.http.post("/v1/jobs", content=iter([small[:10], small[10:]]),
                             headers={**auth("alice"), "Content-Type": "application/json"})
    assert response.status_code == 201, response.text


def test_idempotency(env):
    key = f"release-{uuid.uuid4().hex}"
    body = job_body()
    first = env.http.post("/v1/jobs", json=body, headers={**auth("alice"), "Idempotency-Key": key})
    assert first.status_code == 201
    again = env.http.post("/v1/jobs", json=body, headers={**auth("alice"), "Idempotency-Key": key})
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert env.dispatcher.handed_to_ray(first.json()["id"])
    other = env.http.post("/v1/jobs", json=job_body(), headers={**auth("alice"), "Idempotency-Key": key})
    assert other.status_code == 409 and first.json()["id"] in other.json()["detail"]
    # Keys are per tenant (another output: alice's job holds this one).
    bobs = env.http.post("/v1/jobs", json=job_body(), headers={**auth("bob"), "Idempotency-Key": key})
    assert bobs.status_code == 201 and bobs.json()["id"] != first.json()["id"]


def test_an_output_belongs_to_the_job_that_claimed_it(env):
    folder = f"s3://out/{uuid.uuid4().hex}/"
    first = env.http.post("/v1/jobs", json=job_body(folder), headers=auth("alice"))
    assert first.status_code == 201
    before = job_count(env)
    for other in (folder, folder.rstrip("/"), folder + "inner/", "s3://out/"[:-1] + "/" + folder[9:] + "x/y/"):
        refused = env.http.post("/v1/jobs", json=job_body(other), headers=auth("bob"))
        assert refused.status_code == 409, (other, refused.text)
        detail = refused.json()["detail"]
        # Nothing about the other tenant: not its name, its job or where the folder lives.
        assert "alice" not in detail and first.json()["id"] not in detail and folder[5:-1] not in detail
        assert detail.startswith("output: another job publishes to this location")
    assert job_count(env) == before  # refused before anything was stored
    # The tenant's own job may be named.
    own = env.http.post("/v1/jobs", json=job_body(folder), headers=auth("alice"))
    assert own.status_code == 409 and first.json()["id"] in own.json()["detail"]
    # A cancelled (or failed) job gives its folder up.
    assert env.http.post(f"/v1/jobs/{first.json()['id']}/cancel", headers=auth("alice")).status_code == 200
    assert env.http.post("/v1/jobs", json=job_body(folder), headers=auth("bob")).status_code == 201


def test_pagination_newest_first(env):
    batch = uuid.uuid4().hex
    ids = [create(env, body=job_body(labels={"batch": batch}))["id"] for _ in range(5)]
    seen, cursor, pages = [], None, 0
    while True:
        params = {"label": f"batch={batch}", "limit": 2, **({"cursor": cursor} if cursor else {})}
        page = env.http.get("/v1/jobs", params=params, headers=auth("alice")).json()
        seen += [j["id"] for j in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3 and seen == ids[::-1]
    bad = env.http.get("/v1/jobs", params={"cursor": "garbage"}, headers=auth("alice"))
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["query", "cursor"]
    bad = env.http.get("/v1/jobs", params={"status": "sleeping"}, headers=auth("alice"))
    assert bad.status_code == 422


def test_events_polling_and_sse(env):
    job = create(env)
    events = env.http.get(f"/v1/jobs/{job['id']}/events", headers=auth("alice")).json()
    assert [(e["type"], e["data"]) for e in events] == [("status", {"status": "queued"})]

    def worker():
        time.sleep(0.3)
        env.store.transition(job["id"], ["queued"], "running")
        env.store.set_progress(job["id"], {"stage": "compressing", "layer": 1, "layers": 1, "fraction": 1.0})
        time.sleep(0.3)
        env.store.transition(job["id"], ["running"], "failed", error="the model folder has no config.json")

    thread = threading.Thread(target=worker)
    thread.start()
    streamed = []
    headers = {**auth("alice"), "Accept": "text/event-stream"}
    with env.http.stream("GET", f"/v1/jobs/{job['id']}/events", headers=headers, timeout=20) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                streamed.append(json.loads(line[len("data: "):]))
    thread.join()
    # The stream followed the job and ended by itself at the terminal state.
    assert [e["type"] for e in streamed] == ["status", "status", "progress", "status"]
    assert streamed[-1]["data"] == {"status": "failed", "error": "the model folder has no config.json"}
    after = env.http.get(f"/v1/jobs/{job['id']}/events", params={"after": streamed[1]["id"]},
                         headers=auth("alice")).json()
    assert [e["id"] for e in after] == [e["id"] for e in streamed[2:]]
    # Resuming with Last-Event-ID after the last event of a finished job: an empty stream that ends.
    resumed = env.http.get(f"/v1/jobs/{job['id']}/events",
                           headers={**headers, "Last-Event-ID": str(streamed[-1]["id"])})
    assert resumed.status_code == 200 and "data:" not in resumed.text


def test_health_readiness_and_metrics(env):
    assert env.http.get("/healthz").json() == {"status": "ok"}
    ready = env.http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"store": "ok", "workers": "ok"}
    # Ray gone: test_readyz_when_ray_is_gone, the module's last test.
    create(env)
    text = env.http.get("/metrics").text
    counts = env.store.counts_by_status()
    for status, count in counts.items():
        assert f'llmpress_jobs{{status="{status}"}} {float(count)}' in text
    assert f"llmpress_queue_depth {float(counts['queued'])}" in text
    assert "llmpress_layers_compressed_total" in text and "llmpress_job_duration_seconds" in text


def test_openapi_documents_every_route_with_examples(env):
    spec = env.http.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["ApiKey"] == {
        "type": "http", "scheme": "bearer", "description": spec["components"]["securitySchemes"]["ApiKey"]["description"]}
    routes = {("post", "/v1/jobs"), ("get", "/v1/jobs"), ("get", "/v1/jobs/{job_id}"),
              ("post", "/v1/jobs/{job_id}/cancel"), ("post", "/v1/jobs/{job_id}/retry"),
              ("get", "/v1/jobs/{job_id}/events"),
              ("get", "/v1/jobs/{job_id}/artifacts"), ("get", "/healthz"), ("get", "/readyz"), ("get", "/metrics")}
    documented = {(m, p) for p, ops in spec["paths"].items() for m in ops}
    assert routes <= documented
    for method, path in routes:
        op = spec["paths"][path][method]
        assert op["summary"] and op["description"], path
        ok = op["responses"]["201" if method == "post" and path == "/v1/jobs" else "200"]
        assert any("example" in media for media in ok["content"].values()), path
        assert (op.get("security") == [{"ApiKey": []}]) == path.startswith("/v1"), path
    schemas = spec["components"]["schemas"]
    for name in ("JobCreate", "Job", "JobList", "Event", "Manifest", "ArtifactsResponse", "ResourcesSpec"):
        assert schemas[name].get("examples"), name


def test_webhook_secret_never_in_a_response(env):
    body = job_body(webhook={"url": "https://127.0.0.1:9/hook", "secret": WEBHOOK_SECRET})
    key = uuid.uuid4().hex
    texts = []
    response = env.http.post("/v1/jobs", json=body, headers={**auth("alice"), "Idempotency-Key": key})
    assert response.status_code == 201
    job_id = response.json()["id"]
    assert response.json()["request"]["webhook"] == {"url": "https://127.0.0.1:9/hook"}
    texts.append(response.text)
    texts.append(env.http.post("/v1/jobs", json=body, headers={**auth("alice"), "Idempotency-Key": key}).text)
    texts.append(env.http.get(f"/v1/jobs/{job_id}", headers=auth("alice")).text)
    texts.append(env.http.get(f"/v1/jobs/{job_id}", headers=auth("ops")).text)
    texts.append(env.http.get("/v1/jobs", params={"limit": 500}, headers=auth("ops")).text)
    texts.append(env.http.post(f"/v1/jobs/{job_id}/cancel", headers=auth("alice")).text)
    texts.append(env.http.get(f"/v1/jobs/{job_id}/events", headers=auth("alice")).text)
    texts.append(env.http.get(f"/v1/jobs/{job_id}/events",
                              headers={**auth("alice"), "Accept": "text/event-stream"}).text)
    bad = dict(body, dataset={"source": "s3://data/x", "num_samples": -1})
    texts.append(env.http.post("/v1/jobs", json=bad, headers=auth("alice")).text)
    texts.append(env.http.post("/v1/jobs", json={"webhook": WEBHOOK_SECRET}, headers=auth("alice")).text)
    assert env.store.get(job_id).request["webhook"]["secret"] == WEBHOOK_SECRET  # kept for signing
    for text in texts:
        assert WEBHOOK_SECRET not in text


# ------------------------------------------------------------------------------ client, CLI, artifacts


def test_python_client_and_artifacts(ray_env):
    env = ray_env
    client = Client(env.url, KEYS["alice"])
    with ray_cpu_taken():
        queued = client.submit(model="s3://models/x", recipe=RECIPE_YAML, output="s3://outs/x/",
                               dataset={"source": "s3://data/x"})
        with pytest.raises(ApiError) as err:
            client.artifacts(queued.id)
        assert err.value.status == 409 and "queued" in str(err.value)
        assert client.cancel(queued.id).status == "cancelled"
    assert client.get(queued.id).status == "cancelled" and client.get(queued.id).started_at is None

    job = client.submit(model=str(STORIES), recipe=RECIPE_YAML, output="client-run",
                        dataset={"source": str(CALIB), "num_samples": 8, "seq_len": 64},
                        eval={"source": str(EVAL_TEXT), "max_ppl_ratio": 50.0, "max_tokens": 4096},
                        labels={"via": "client"})
    assert job.status == "queued"
    seen = []
    done = client.wait(job.id, on_progress=seen.append, poll=0.05, timeout=120)
    assert done.status == "succeeded", done.error
    assert done.report["quality_gate"]["passed"] and done.progress.fraction == 1.0
    assert "running" in {j.status for j in seen} and done.metrics["layers"]["1"]["sparsity"] == 0.5
    assert [j.id for j in client.list(label="via=client").items] == [job.id]
    assert [e.type for e in client.events(job.id)][:2] == ["status", "status"]

    artifacts = client.artifacts(job.id)
    folder = Path(env.settings.artifacts_root) / "client-run"
    keys = {f.key for f in artifacts.files}
    assert "config.json" in keys and any(key.endswith(".safetensors") for key in keys)
    for entry in artifacts.files:
        data = (folder / entry.key).read_bytes()
        assert entry.size == len(data) and entry.sha256 == hashlib.sha256(data).hexdigest()
        assert entry.url is None  # presigned URLs only for S3 outputs
    assert (folder / artifacts.manifest_key).exists()
    metrics = env.http.get("/metrics").text
    assert "llmpress_layers_compressed_total 0.0" not in metrics
    assert 'llmpress_job_duration_seconds_count{status="succeeded"}' in metrics

    with pytest.raises(ApiError) as err:
        client.submit(model="s3://models/x", recipe=RECIPE_YAML, output="../x", dataset={"source": "s3://data/x"})
    assert err.value.status == 422 and "output" in str(err.value)
    with pytest.raises(ApiError) as err:
        Client(env.url, "wrong").get(job.id)
    assert err.value.status == 401


def run_cli(env, *args, key="alice", extra_env=None):
    environment = {**os.environ, "LLMPRESS_API_KEY": KEYS.get(key, key), "PYTHONPATH": str(REPO),
                   **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", "api.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env=environment, timeout=120)


@pytest.mark.parametrize("change, expected", [
    ({"model": str(FIXTURES / "models" / "no-such-model")}, "model: '"),
    ({"model": "some-org/some-model"}, "offline"),
    ({"dataset": {"source": str(STORIES / "model.safetensors"), "num_samples": 4, "seq_len": 32}},
     "dataset.source: cannot read"),
])
def test_bad_inputs_through_rest_fail_the_job_with_a_clear_error(ray_env, change, expected):
    """What only the worker can find out (the model or the text is not there or not readable, the Hub is out of
    reach): the job is created, then ends ``failed`` with an error a person can act on, and publishes nothing.
    (A missing S3 bucket, the same through moto's S3: tests/jobs/test_job_runner.py.)"""
    env = ray_env
    client = Client(env.url, KEYS["alice"])
    body = {"model": str(STORIES), "recipe": RECIPE_YAML, "output": f"bad-{uuid.uuid4().hex[:8]}",
            "dataset": {"source": str(CALIB), "num_samples": 4, "seq_len": 32}, **change}
    job = client.wait(client.submit(**body).id, poll=0.05, timeout=120)
    assert job.status == "failed" and expected in job.error, job.error
    assert "internal error" not in job.error and job.artifacts is None
    assert not (env.root / "artifacts" / body["output"]).exists()


def test_cli_submit_wait_jobs_and_keys(ray_env, tmp_path):
    env = ray_env
    layers = json.loads((STORIES / "config.json").read_text())["num_hidden_layers"]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE_YAML)
    common = ["submit", "--server", env.url, "--model", str(STORIES), "--recipe", str(recipe),
              "--dataset", str(CALIB), "--seq-len", "64", "--eval", str(EVAL_TEXT)]
    # 32 samples make each layer take long enough for --wait's polling to see the compressing stage.
    ok = run_cli(env, *common, "--num-samples", "32", "--output", "cli-ok", "--max-ppl-ratio", "50", "--wait",
                 "--poll", "0.05")
    assert ok.returncode == 0, ok.stderr
    job_id = ok.stdout.strip()
    assert env.store.get(job_id).status == "succeeded", ok.stderr
    assert re.search(rf"{job_id} running compressing layer [1-{layers}]/{layers} \(\d+%\)", ok.stderr), ok.stderr
    progress = [e.data["progress"] for e in env.store.events(job_id) if e.type == "progress"]
    assert [p["layer"] for p in progress if p.get("stage") == "compressing"][-1] == layers  # every layer done

    # A real gate: 2:4 sparsity raises stories260K's perplexity by far more than 0.01 %.
    gated = run_cli(env, *common, "--num-samples", "8", "--output", "cli-gated", "--max-ppl-ratio", "1.0001",
                    "--wait", "--poll", "0.05")
    assert gated.returncode == 1 and "quality gate failed" in gated.stderr, gated.stderr
    failed = env.store.get(gated.stdout.strip())
    assert failed.status == "failed" and not failed.report["quality_gate"]["passed"]
    assert not (Path(env.settings.artifacts_root) / "cli-gated").exists()

    bad = run_cli(env, *common, "--num-samples", "8", "--output", "../out", "--max-ppl-ratio", "1.5")
    assert bad.returncode == 2 and "output" in bad.stderr and not bad.stdout

    listed = run_cli(env, "jobs", "list", "--server", env.url, "--json")
    assert listed.returncode == 0 and job_id in {j["id"] for j in json.loads(listed.stdout)["items"]}
    got = run_cli(env, "jobs", "get", job_id, "--server", env.url)
    assert json.loads(got.stdout)["status"] == "succeeded"
    assert run_cli(env, "jobs", "get", job_id, "--server", env.url, key="bob").returncode == 2

    with ray_cpu_taken():  # the job waits in Ray's queue until the CLI cancels it
        queued = run_cli(env, *common, "--num-samples", "8", "--output", "cli-cancel",
                         "--max-ppl-ratio", "1.5").stdout.strip()
        cancelled = run_cli(env, "jobs", "cancel", queued, "--server", env.url)
        assert json.loads(cancelled.stdout)["status"] == "cancelled"
    assert env.store.get(queued).status == "cancelled" and env.store.get(queued).started_at is None

    # A key created with the CLI is stored hashed in the job store and accepted by the running server.
    name = f"carol-{uuid.uuid4().hex[:8]}"
    created = run_cli(env, "keys", "create", "--name", name,
                      extra_env={"LLMPRESS_DATABASE_URL": env.settings.database_url})
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert secret.startswith("lp_")
    assert env.http.get("/v1/jobs", headers={"Authorization": f"Bearer {secret}"}).json()["items"] == []
    assert env.http.get(f"/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {secret}"}).status_code == 404


# ----------------------------------------------------------------------------------- real Ray, end to end


def test_ray_end_to_end(local_ray, tmp_path):
    from workers.dispatch import RayDispatcher

    settings = Settings(api_keys="alice:alice-secret-1", database_url=f"sqlite:///{tmp_path / 'jobs.db'}",
                        artifacts_root=str(tmp_path / "artifacts"), input_roots=(str(FIXTURES),))
    (tmp_path / "artifacts").mkdir()
    store = JobStore(settings.database_url)
    dispatcher = RayDispatcher(store, settings, input_roots=(FIXTURES,))
    with Server(create_app(settings, store, dispatcher)) as url:
        client = Client(url, KEYS["alice"])
        assert httpx.get(f"{url}/readyz").status_code == 200
        job = client.submit(
            model=str(FIXTURES / "models" / "stories260K"), recipe=RECIPE_YAML, output="ray-run",
            dataset={"source": str(FIXTURES / "data" / "wikitext-2" / "valid.txt"), "num_samples": 8,
                     "seq_len": 64},
            eval={"source": str(FIXTURES / "data" / "tinystories" / "valid-subset.txt"), "max_ppl_ratio": 50.0,
                  "max_tokens": 4096},
        )
        done = client.wait(job.id, poll=0.2, timeout=240)
        assert done.status == "succeeded", done.error
        assert done.report["quality_gate"]["passed"] and done.progress.fraction == 1.0
        artifacts = client.artifacts(job.id)
        folder = tmp_path / "artifacts" / "ray-run"
        for entry in artifacts.files:
            assert hashlib.sha256((folder / entry.key).read_bytes()).hexdigest() == entry.sha256
        assert any(f.key.endswith(".safetensors") for f in artifacts.files) and done.metrics["layers"]
        assert "llmpress_layers_compressed_total 0.0" not in httpx.get(f"{url}/metrics").text
    store.close()


def test_readyz_when_ray_is_gone(env_server):
    """Last in the module (it stops the module's Ray): with Ray unreachable the API still answers, /healthz is
    ok and /readyz says the workers are not ready."""
    import ray

    ray.shutdown()
    assert env_server.http.get("/healthz").json() == {"status": "ok"}
    not_ready = env_server.http.get("/readyz")
    assert not_ready.status_code == 503 and not_ready.json()["checks"] == {"store": "ok", "workers": "not ready"}
