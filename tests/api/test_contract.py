"""The HTTP contract: the live app answers only what its OpenAPI document says, and the document lists every status.

Schemathesis generates requests from the document (seeded, a bounded number per operation, every check it has on)
and sends them to the real app: uvicorn on 127.0.0.1 in a thread of this process, so tests/conftest.py's DNS table
answers the host names of the webhook URLs it makes up (an unknown name is the webhook policy's 422), over a real
SQLite store and the real ``workers.dispatch.RayDispatcher`` on one local Ray whose one CPU is held, as in
tests/api/test_app.py: the jobs the fuzzing creates wait in Ray's queue and are cancelled afterwards, none runs.
Every response the server sends, check probes included, is tallied by ``Tally``; the plain tests below send what
schemathesis does not (malformed bodies and framing) and check the document lists each status with its body.

``LLMPRESS_CONTRACT_EXAMPLES`` sets the examples per operation (bench/contract_fuzz.py runs 1,000) and
``LLMPRESS_CONTRACT_REPORT`` a file the tally is written to as JSON when the module ends.
"""

from __future__ import annotations

import collections
import copy
import json
import os
import re
import socket
import tempfile
import uuid
from pathlib import Path

import httpx
import hypothesis
import pytest
import schemathesis

from api.app import create_app
from service.jobs.job_store import JobStore
from service.jobs.settings import Settings
from tests.api_server import Server, local_ray, ray_cpu_taken
from tests.fixture_paths import REPO

KEYS = {"alice": "alice-secret-1"}
MAX_BODY = 64 * 1024
SEED = 20250101
EXAMPLES = int(os.environ.get("LLMPRESS_CONTRACT_EXAMPLES", "8"))
STATEFUL_EXAMPLES = max(3, EXAMPLES // 4)
REPORT = os.environ.get("LLMPRESS_CONTRACT_REPORT")
RECIPE_YAML = (REPO / "service" / "recipes" / "sparsegpt_2of4.yaml").read_text()


def settings_for(root: Path) -> Settings:
    return Settings(api_keys=",".join(f"{k}:{v}" for k, v in KEYS.items()), admin_keys="",
                    database_url=f"sqlite:///{root / 'jobs.db'}", artifacts_root=str(root / "artifacts"),
                    hub_offline=True, max_request_bytes=MAX_BODY)


def _document() -> dict:
    """The OpenAPI document, from an app that is never served (schemathesis collects its tests at import; the
    live app below must serve this same document)."""
    with tempfile.TemporaryDirectory(prefix="llmpress-contract-") as tmp:
        (Path(tmp) / "artifacts").mkdir()
        settings = settings_for(Path(tmp))
        store = JobStore(settings.database_url)
        try:
            return create_app(settings, store, dispatcher=None).openapi()
        finally:
            store.close()


DOCUMENT = _document()
# Statuses schemathesis's positive_data_acceptance takes for a schema-valid request (its defaults), and where
# the schema cannot say what is valid, 422 too: a recipe is YAML text the engine parses, and model, dataset and
# output are locations the service checks (inside the artifacts folder, an s3:// URI, an allowed webhook host).
ACCEPTED = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]
CONFIG = schemathesis.Config.from_dict({
    "seed": SEED,
    "generation": {"max-examples": EXAMPLES, "database": "none"},
    "request-timeout": 30,
    # alice's key on every request; schemathesis leaves it out of the cases it makes negative by dropping the
    # Authorization header, and its ignored_auth check sends each accepted request again without it and with a
    # wrong one: the 401 path (test_every_operation_without_a_key_is_a_documented_401 covers every route too).
    "auth": {"openapi": {"ApiKey": {"bearer": KEYS["alice"]}}},
    "operations": [
        {"include-path": "/v1/jobs", "include-method": "POST",
         "checks": {"positive_data_acceptance": {"expected-statuses": [*ACCEPTED, "422"]}}},
        # The cursor is opaque: any string but a next_cursor of a previous page is a 422.
        {"include-path": "/v1/jobs", "include-method": "GET",
         "checks": {"positive_data_acceptance": {"expected-statuses": [*ACCEPTED, "422"]}}},
    ],
})
schema = schemathesis.openapi.from_dict(copy.deepcopy(DOCUMENT), config=CONFIG)  # it resolves references in place


def auth(who: str) -> dict:
    return {"Authorization": f"Bearer {KEYS.get(who, 'no-such-key')}"}


def job_body() -> dict:
    """A job the service accepts (its inputs do not exist, and it never runs), with an output of its own."""
    return {"model": "s3://models/stories260K", "recipe": RECIPE_YAML,
            "dataset": {"source": "s3://data/calib.txt", "num_samples": 8, "seq_len": 64},
            "output": f"s3://out/{uuid.uuid4().hex}/"}


def documented(method: str, path: str) -> tuple[str, dict] | None:
    """The operation of ``DOCUMENT`` a request to ``path`` reaches: (template, operation), or None."""
    for template, item in DOCUMENT["paths"].items():
        pattern = re.sub(r"\{key\}", r".+", re.sub(r"\{(?!key\})[^}]+\}", r"[^/]+", template))
        if re.fullmatch(pattern, path) and method.lower() in item:
            return template, item[method.lower()]
    return None


class Tally:
    """ASGI wrapper that counts every response the app sends by (method, documented path, status); a request
    that reaches no documented operation counts under path None: a method the document does not list for the
    path (schemathesis tries them: 405), or a path no template matches (a path parameter holding a '/': 404).
    ``cases`` counts the requests schemathesis generated (the rest are its checks' probes), by operation."""

    def __init__(self, app):
        self.app = app
        self.seen: collections.Counter = collections.Counter()
        self.cases: collections.Counter = collections.Counter()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted(message):
            if message["type"] == "http.response.start":
                operation = documented(scope["method"], scope["path"])
                self.seen[(scope["method"], operation and operation[0], message["status"])] += 1
            await send(message)

        return await self.app(scope, receive, counted)

    def summary(self) -> dict:
        """Requests, 5xx and undocumented statuses (a documented operation answering a status it does not list)."""
        undocumented, unrouted, by_status = collections.Counter(), collections.Counter(), collections.Counter()
        for (method, path, status), count in self.seen.items():
            by_status[str(status)] += count
            if path is None:
                unrouted[f"{method} {status}"] += count
            elif str(status) not in DOCUMENT["paths"][path][method.lower()]["responses"]:
                undocumented[f"{method} {path} {status}"] += count
        return {
            "cases": sum(self.cases.values()),
            "cases_by_operation": dict(sorted(self.cases.items())),
            "requests": sum(self.seen.values()),
            "server_errors": sum(c for (_, _, status), c in self.seen.items() if status >= 500),
            "undocumented": dict(undocumented),
            "no_documented_operation": dict(unrouted),
            "by_status": dict(sorted(by_status.items())),
        }


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """The live app (see the module docstring); yields an object with url, store and tally."""
    from workers.dispatch import RayDispatcher

    root = tmp_path_factory.mktemp("contract")
    (root / "artifacts").mkdir()
    settings = settings_for(root)
    store = JobStore(settings.database_url)
    with pytest.MonkeyPatch.context() as mp:
        # Nothing runs, but should a job ever start, its S3 and Hub reads go nowhere: a closed loopback port.
        mp.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        mp.setenv("HF_HUB_OFFLINE", "1")
        with local_ray(), ray_cpu_taken():
            dispatcher = RayDispatcher(store, settings)
            tally = Tally(create_app(settings, store, dispatcher))
            with Server(tally) as url:
                yield type("Live", (), {"url": url, "store": store, "tally": tally})
                for job in store.recoverable():  # before the CPU is given back: none may start
                    dispatcher.cancel(job.id)
    store.close()
    if REPORT:
        Path(REPORT).write_text(json.dumps(tally.summary(), indent=1) + "\n")


# ------------------------------------------------------------------------------------------------- fuzzing


@schema.parametrize()
def test_the_app_keeps_its_documented_contract(case, live):
    live.tally.cases[case.operation.label] += 1
    case.call_and_validate(base_url=live.url)


def test_workflows_keep_the_documented_contract(live):
    """Sequences of calls along the links schemathesis infers (POST /v1/jobs 201 -> GET, cancel, events,
    artifacts of that job): what the single-call checks cannot see (ensure_resource_availability: a job just
    created can be read; use_after_free). A made-up recipe never parses, so each POST /v1/jobs of a workflow
    sends a valid job (a new output each time) and the calls after it reach a real, queued job.

    Hypothesis requires the same choices to lead to the same steps, so no step may depend on what earlier
    workflows left on the server: GET /v1/jobs (its page grows with every job) is left out, and so is the
    Idempotency-Key of POST /v1/jobs (a key drawn twice would answer 409, the second body having a new output);
    the single-call fuzzing above covers both."""

    class Workflow(schema.exclude(method="GET", path="/v1/jobs").as_state_machine()):
        def before_call(self, case):
            live.tally.cases[f"workflow: {case.operation.label}"] += 1
            if case.operation.label == "POST /v1/jobs":
                case.body = job_body()
                for name in [name for name in case.headers or {} if name.lower() == "idempotency-key"]:
                    del case.headers[name]

        def get_call_kwargs(self, case):
            return {"base_url": live.url}

    Workflow.run(settings=hypothesis.settings(max_examples=STATEFUL_EXAMPLES, stateful_step_count=6,
                                              derandomize=True, database=None, deadline=None,
                                              suppress_health_check=list(hypothesis.HealthCheck)))


def test_no_server_error_and_no_undocumented_status(live):
    """What the server answered, schemathesis's own probes included (after the fuzzing above)."""
    summary = live.tally.summary()
    assert summary["requests"] > 0
    assert summary["server_errors"] == 0, summary
    assert summary["undocumented"] == {}, summary


# ------------------------------------------------------------------------------------------ the document


def test_the_live_app_serves_the_document_the_fuzzing_used(live):
    served = httpx.get(f"{live.url}/openapi.json").json()
    assert {**served, "servers": None} == {**DOCUMENT, "servers": None}


def _operations():
    for path, item in DOCUMENT["paths"].items():
        for method, operation in item.items():
            yield method.upper(), path, operation


def _schema_of(response: dict, media: str = "application/json") -> dict:
    schema = response["content"][media]["schema"]
    name = schema["$ref"].rsplit("/", 1)[-1]
    return DOCUMENT["components"]["schemas"][name]


@pytest.mark.parametrize("method, path, operation", list(_operations()),
                         ids=[f"{method} {path}" for method, path, _ in _operations()])
def test_every_status_is_documented_with_its_body(method, path, operation):
    responses = operation["responses"]
    statuses = set(responses)
    # Every route: 400 for a request the server cannot read, in JSON (the app) or plain text (uvicorn).
    assert "400" in statuses
    assert _schema_of(responses["400"])["title"] == "ErrorDetail"
    assert responses["400"]["content"]["text/plain"]["schema"] == {"type": "string"}
    if path.startswith("/v1/"):
        assert {"401", "422"} <= statuses
        assert _schema_of(responses["401"])["title"] == "ErrorDetail"
        assert responses["401"]["headers"]["WWW-Authenticate"]["required"]
        validation = _schema_of(responses["422"])
        assert validation["title"] == "ValidationErrors"
        item = DOCUMENT["components"]["schemas"]["InvalidField"]
        assert set(item["required"]) == {"loc", "msg", "type"}
    if "{job_id}" in path:
        assert _schema_of(responses["404"])["title"] == "ErrorDetail"
    if method == "POST":  # BodyLimit reads POST bodies
        assert _schema_of(responses["413"])["title"] == "ErrorDetail"
    for status in statuses - {"200", "201", "307"}:
        assert "application/json" in responses[status]["content"], (status, responses[status])


def test_create_documents_both_conflicts_and_its_headers():
    responses = DOCUMENT["paths"]["/v1/jobs"]["post"]["responses"]
    assert set(responses) == {"200", "201", "400", "401", "409", "413", "422", "503"}
    conflict = responses["409"]["content"]["application/json"]
    assert set(conflict["examples"]) == {"idempotency", "output-claimed"}
    claimed = conflict["examples"]["output-claimed"]["value"]["detail"]
    assert claimed.startswith("output: another job publishes to this location")
    assert responses["201"]["headers"]["Location"]["required"]
    assert responses["200"]["headers"]["Idempotent-Replayed"]["required"]
    artifacts = DOCUMENT["paths"]["/v1/jobs/{job_id}/artifacts"]["get"]["responses"]
    assert {"409", "502"} <= set(artifacts)


def test_no_parameter_is_documented_nullable():
    """HTTP has no null: an optional parameter is left out, never sent as the text "null"."""
    for _, _, operation in _operations():
        for parameter in operation.get("parameters", []):
            assert "null" not in json.dumps(parameter["schema"]), parameter


def test_dataset_says_when_it_is_required():
    dataset = DOCUMENT["components"]["schemas"]["JobCreate"]["properties"]["dataset"]["description"]
    assert "Required when the recipe calibrates" in dataset and "SparseGPT" in dataset and "GPTQ" in dataset
    assert "optional for data-free" in dataset and "magnitude" in dataset


# ------------------------------------------------------------------------------------------ malformed requests


def _raw(url: str, request: bytes) -> tuple[int, str, str]:
    """Send ``request`` as-is over one connection: (status, content type, body)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(request)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
    return int(lines[0].split()[1]), content_type.split(";")[0], body.decode("utf-8", "replace")


def _post(path: str, body: bytes, *, length: bytes | None = None, who: str = "alice") -> bytes:
    length = str(len(body)).encode() if length is None else length
    return (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Authorization: Bearer " + KEYS[who].encode() + b"\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + length + b"\r\n\r\n" + body)


MALFORMED = {
    "invalid JSON": lambda path: _post(path, b'{"model": "s3://models/m", "recipe": '),
    "not UTF-8": lambda path: _post(path, b'{"model": "\xff\xfe"}'),
    "nested too deeply": lambda path: _post(path, b"[" * 60_000),  # under MAX_BODY: the parser gives up
    "nested past the limit": lambda path: _post(path, b"[" * 100_000),
    "Content-Length not a number": lambda path: _post(path, b"{}", length=b"twelve"),
    "negative Content-Length": lambda path: _post(path, b"{}", length=b"-1"),
    "Content-Length over the limit": lambda path: _post(path, b"{}", length=str(MAX_BODY + 1).encode()),
    "body over the limit": lambda path: _post(path, json.dumps({"recipe": "#" * MAX_BODY}).encode()),
    "chunked over the limit": lambda path: (
        b"POST " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nAuthorization: Bearer "
        + KEYS["alice"].encode() + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n" % (MAX_BODY + 10) + b"[" * (MAX_BODY + 10) + b"\r\n0\r\n\r\n"),
}


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/jobs/k3v9x0q2m1ab/cancel"])
@pytest.mark.parametrize("kind", list(MALFORMED))
def test_a_malformed_body_gets_a_documented_status(live, kind, path):
    status, content_type, body = _raw(live.url, MALFORMED[kind](path))
    assert status < 500, (status, body)
    responses = documented("POST", path)[1]["responses"]
    assert str(status) in responses, (kind, status, body)
    assert content_type in responses[str(status)]["content"], (kind, status, content_type)
    if content_type == "application/json":
        assert "detail" in json.loads(body)
    if path == "/v1/jobs":  # a body the route reads
        expected = {"invalid JSON": 422, "not UTF-8": 400, "nested too deeply": 400}.get(kind, None)
        assert expected is None or status == expected, (kind, status, body)
    if "limit" in kind:
        assert status == 413 and "larger than" in json.loads(body)["detail"]


def test_a_malformed_request_line_on_a_get_route_is_a_documented_400(live):
    request = (b"GET /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nAuthorization: Bearer "
               + KEYS["alice"].encode() + b"\r\nContent-Length: twelve\r\n\r\n")
    status, content_type, _ = _raw(live.url, request)
    assert status == 400 and content_type in DOCUMENT["paths"]["/v1/jobs"]["get"]["responses"]["400"]["content"]


def test_every_operation_without_a_key_is_a_documented_401(live):
    for method, path, operation in _operations():
        if not operation.get("security"):
            continue
        url = live.url + path.replace("{job_id}", "k3v9x0q2m1ab").replace("{key}", "model.safetensors")
        for headers in ({}, auth("nobody"), {"Authorization": f"Basic {KEYS['alice']}"}):
            response = httpx.request(method, url, headers=headers, json={} if method == "POST" else None)
            assert response.status_code == 401, (method, path, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.json() == {"detail": "missing or invalid API key"}


def test_another_method_is_a_405_that_names_every_method_of_the_path(live):
    response = httpx.request("OPTIONS", f"{live.url}/v1/jobs")
    assert response.status_code == 405
    assert set(response.headers["allow"].split(", ")) == {"GET", "POST"}
    response = httpx.request("DELETE", f"{live.url}/v1/jobs/k3v9x0q2m1ab", headers=auth("alice"))
    assert response.status_code == 405 and response.headers["allow"] == "GET"


def test_a_pruning_recipe_without_dataset_is_the_documented_422(live):
    body = job_body()
    del body["dataset"]
    response = httpx.post(f"{live.url}/v1/jobs", json=body, headers=auth("alice"))
    assert response.status_code == 422
    assert any(e["loc"] == ["body", "dataset"] and "is required" in e["msg"] for e in response.json()["detail"])


def test_an_event_id_past_the_store_s_integers_is_a_422(live):
    """Found by the workflows: `after` beyond a 64-bit integer reached the database (OverflowError, a 500)."""
    job = httpx.post(f"{live.url}/v1/jobs", json=job_body(), headers=auth("alice")).json()
    events = f"{live.url}/v1/jobs/{job['id']}/events"
    assert httpx.get(events, params={"after": 2**63 - 1}, headers=auth("alice")).json() == []
    response = httpx.get(events, params={"after": 2**63}, headers=auth("alice"))
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["query", "after"]
    response = httpx.get(events, headers={**auth("alice"), "Accept": "text/event-stream", "Last-Event-ID": str(2**63)})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["header", "last-event-id"]
