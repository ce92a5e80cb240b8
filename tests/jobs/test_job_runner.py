"""run_job end to end with real parts: a SQLite job store, the bundled stories260K model, wikitext-2 text, a moto S3
server and an http.server webhook receiver, all on loopback."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import threading
import time
import uuid
from pathlib import Path

import pytest

from service.jobs import webhook
from service.jobs.job_runner import run_job
from service.jobs.job_store import JobStore
from service.jobs.settings import Settings
from service.jobs.storage import MANIFEST_NAME
from tests.fixture_paths import FIXTURES, STORIES, WIKI_VALID
from tests.jobs.bodies import SECRET, request

LAYERS = 5  # stories260K's decoder blocks


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def env(tmp_path):
    """Store, settings (artifacts folder in tmp_path, offline) and a work folder; the fixtures are a readable root."""
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    settings = Settings(artifacts_root=str(tmp_path / "artifacts"), hub_offline=True)
    yield store, settings, tmp_path / "work"
    store.close()


def run(store, settings, workdir, body, **kwargs):
    job, _ = store.create_job("alice", body)
    return run_job(store, job.id, settings, workdir=workdir, input_roots=[FIXTURES], **kwargs)


def statuses(store, job_id) -> list[str]:
    return [e.data["status"] for e in store.events(job_id) if e.type == "status"]


# ------------------------------------------------------------------------------------------------ local output


def test_local_job_succeeds_with_progress_metrics_report_and_manifest(env):
    store, settings, workdir = env
    job = run(store, settings, workdir, request("runs/first", eval={"source": str(WIKI_VALID), "max_ppl_ratio": 50,
                                                                   "max_tokens": 2048}), worker_ref="w-1")
    assert job.status == "succeeded", job.error
    assert job.error is None and job.worker_ref == "w-1"
    assert statuses(store, job.id) == ["queued", "running", "uploading", "succeeded"]

    out = Path(settings.artifacts_root).resolve() / "runs" / "first"
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert job.artifacts["uri"] == out.as_uri() and job.artifacts["manifest"]["files"]
    listed = {f["key"]: f for f in manifest["files"]}
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {MANIFEST_NAME}
    assert set(listed) == on_disk and "config.json" in listed
    for path, entry in listed.items():
        data = (out / path).read_bytes()
        assert (entry["size"], entry["sha256"]) == (len(data), sha256(data))
    assert manifest["extra"]["job_id"] == job.id and "SparseGPTModifier" in manifest["extra"]["recipe"]

    assert job.progress == {"stage": "uploading", "fraction": 1.0}
    progress = [e.data["progress"] for e in store.events(job.id) if e.type == "progress"]
    assert {"stage": "compressing", "layer": LAYERS, "layers": LAYERS, "fraction": 1.0} in progress
    assert [p["layer"] for p in progress if p["stage"] == "compressing"] == list(range(1, LAYERS + 1))
    assert sorted(job.metrics["layers"]) == [str(i) for i in range(LAYERS)]
    assert 0.45 < job.metrics["layers"]["2"]["sparsity"] <= 0.5
    q_proj = job.metrics["modules"]["model.layers.4.self_attn.q_proj"]
    assert q_proj["layer"] == 4 and q_proj["sparsity"] == pytest.approx(0.5) and q_proj["loss"] >= 0

    assert 0.45 < job.report["totals"]["sparsity"] <= 0.5
    ppl = job.report["perplexity"]["eval"]
    assert 1 < ppl["ratio"] <= 50 and ppl["after"] == pytest.approx(ppl["before"] * ppl["ratio"])
    assert job.report["quality_gate"] == {"max_ppl_ratio": 50.0, "passed": True}
    assert not (workdir / job.id).exists()


def test_failed_quality_gate_keeps_the_report_and_publishes_nothing(env):
    store, settings, workdir = env
    job = run(store, settings, workdir, request("runs/gated", eval={"source": str(WIKI_VALID), "max_ppl_ratio": 1.0001,
                                                                   "max_tokens": 2048}))
    assert job.status == "failed"
    ratio = job.report["perplexity"]["eval"]["ratio"]
    assert ratio > 1.0001
    assert f"{ratio:.4f}" in job.error and "max_ppl_ratio 1.0001" in job.error and "quality gate" in job.error
    assert job.report["quality_gate"]["passed"] is False and job.artifacts is None
    assert not (Path(settings.artifacts_root) / "runs" / "gated").exists()
    assert not (workdir / job.id).exists()
    assert statuses(store, job.id) == ["queued", "running", "failed"]


class CancelAtLayer(JobStore):
    """A store whose progress path requests a cancel once the given layer is reported (as the API would)."""

    cancel_at = 2

    def set_progress(self, job_id, progress, metrics_delta=None, **kwargs):
        ok = super().set_progress(job_id, progress, metrics_delta, **kwargs)
        if progress.get("stage") == "compressing" and progress.get("layer") == self.cancel_at:
            self.request_cancel(job_id)
        return ok


def test_cancel_stops_between_layers_and_cleans_up(tmp_path):
    store = CancelAtLayer(f"sqlite:///{tmp_path / 'jobs.db'}")
    settings = Settings(artifacts_root=str(tmp_path / "artifacts"))
    job = run(store, settings, tmp_path / "work", request("runs/cancelled"))
    assert job.status == "cancelled" and job.error is None and job.artifacts is None
    assert sorted(job.metrics["layers"]) == ["0", "1"]  # stopped after the second block, before the third
    assert job.progress["layer"] == 2
    # The shards uploaded while it ran were deleted again, their folder with them.
    assert not (Path(settings.artifacts_root) / "runs" / "cancelled").exists()
    assert not [p for p in Path(settings.artifacts_root).rglob("*") if p.is_file()]
    assert not (tmp_path / "work" / job.id).exists()
    assert statuses(store, job.id) == ["queued", "running", "cancelled"]
    store.close()


class EndedDuringUpload(JobStore):
    """A store in which the job is cancelled elsewhere just as its worker finishes uploading."""

    def transition(self, job_id, from_statuses, to_status, **fields):
        if to_status == "succeeded":
            super().transition(job_id, ["uploading"], "cancelled")
        return super().transition(job_id, from_statuses, to_status, **fields)


def test_an_output_whose_job_ended_elsewhere_during_upload_is_taken_back(tmp_path):
    store = EndedDuringUpload(f"sqlite:///{tmp_path / 'jobs.db'}")
    settings = Settings(artifacts_root=str(tmp_path / "artifacts"))
    job = run(store, settings, tmp_path / "work", request("runs/taken-back"))
    assert job.status == "cancelled" and job.artifacts is None
    assert not [p for p in Path(settings.artifacts_root).rglob("*") if p.is_file()]
    store.close()


def test_a_job_runs_once_however_often_it_is_started(env):
    store, settings, workdir = env
    job, _ = store.create_job("alice", request("runs/once"))
    first = run_job(store, job.id, settings, workdir=workdir, input_roots=[FIXTURES])
    events = len(store.events(job.id))
    second = run_job(store, job.id, settings, workdir=workdir, input_roots=[FIXTURES], worker_ref="late")
    assert first.status == second.status == "succeeded"
    assert second.worker_ref is None and len(store.events(job.id)) == events
    assert statuses(store, job.id).count("succeeded") == 1

    # Two workers handed the same job at once: one runs it, the other returns at once.
    raced, _ = store.create_job("alice", request("runs/raced"))
    results = []
    threads = [threading.Thread(target=lambda ref=ref: results.append(
        run_job(store, raced.id, settings, workdir=workdir, input_roots=[FIXTURES], worker_ref=ref)))
        for ref in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses(store, raced.id) == ["queued", "running", "uploading", "succeeded"]
    assert store.get(raced.id).worker_ref in ("a", "b")

    cancelled, _ = store.create_job("alice", request("runs/never"))
    store.request_cancel(cancelled.id)
    assert run_job(store, cancelled.id, settings, workdir=workdir).status == "cancelled"
    assert not (Path(settings.artifacts_root) / "runs" / "never").exists()
    assert run_job(store, "nosuchjob", settings, workdir=workdir) is None


@pytest.mark.parametrize("overrides, expected", [
    ({"model": str(FIXTURES / "models" / "no-such-model")}, "model: '"),
    ({"model": "some-org/some-model"}, "offline"),
    ({"model": "/etc"}, "outside the folders jobs may read"),
    ({"dataset": {"source": str(STORIES / "model.safetensors"), "num_samples": 4, "seq_len": 32}},
     "dataset.source: cannot read"),
    ({"dataset": {"source": "data/wikitext-2/missing.txt", "num_samples": 4, "seq_len": 32}}, "does not exist"),
    ({"dataset": {"source": str(WIKI_VALID), "num_samples": 10_000, "seq_len": 4096}}, "not enough text"),
    ({"output": "../escape"}, "output: '../escape' contains a '..' segment"),
])
def test_bad_inputs_fail_the_job_with_a_clear_error(env, overrides, expected):
    store, settings, workdir = env
    job = run(store, settings, workdir, request(**{"output": "runs/bad", **overrides}))
    assert job.status == "failed"
    assert expected in job.error
    assert "internal error" not in job.error
    assert not (Path(settings.artifacts_root) / "runs").exists()
    assert not (workdir / job.id).exists()


def test_unreadable_binary_dataset(env, tmp_path):
    store, settings, workdir = env
    binary = Path(settings.artifacts_root) / "data" / "corrupt.txt"
    binary.parent.mkdir(parents=True)
    binary.write_bytes(b"\xff\xfe\x00\x81" * 1000)
    job = run(store, settings, workdir, request("runs/bad", dataset={"source": "data/corrupt.txt"}))
    assert job.status == "failed" and job.error == "dataset.source: 'corrupt.txt' is not UTF-8 text"


def test_an_unexpected_error_gets_a_generic_message(env, monkeypatch, caplog):
    store, settings, workdir = env

    def broken(*args, **kwargs):
        raise RuntimeError("tensor shapes (3, 4) and (5, 6) clash")

    monkeypatch.setattr("service.engine.compress.compress_checkpoint", broken)
    job = run(store, settings, workdir, request("runs/broken"))
    assert job.status == "failed"
    assert "RuntimeError" in job.error and "clash" not in job.error and job.id in job.error
    assert "clash" in caplog.text  # the traceback is in the log


# ---------------------------------------------------------------------------------------------------------- S3


@pytest.fixture
def bucket(s3) -> str:
    name = f"llmpress-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    for path in STORIES.iterdir():
        s3.upload_file(str(path), name, f"models/stories260K/{path.name}")
    s3.upload_file(str(WIKI_VALID), name, "data/valid.txt")
    return name


def keys(s3, bucket: str, prefix: str = "") -> list[str]:
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []))


def test_s3_job_reads_and_publishes_through_s3(env, s3, bucket):
    store, settings, workdir = env
    body = request(f"s3://{bucket}/jobs/one/", model=f"s3://{bucket}/models/stories260K",
                   dataset={"source": f"s3://{bucket}/data/valid.txt", "num_samples": 16, "seq_len": 64})
    job = run(store, settings, workdir, body)
    assert job.status == "succeeded", job.error
    assert job.artifacts["uri"] == f"s3://{bucket}/jobs/one/"
    published = keys(s3, bucket, "jobs/one/")
    files = {f"jobs/one/{f['key']}": f for f in job.artifacts["manifest"]["files"]}  # keys are relative to the output
    assert published == sorted([*files, f"jobs/one/{MANIFEST_NAME}"])
    for key, entry in files.items():
        data = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert (entry["size"], entry["sha256"]) == (len(data), sha256(data))
    assert job.report["source"]["model"] == f"s3://{bucket}/models/stories260K"
    assert job.report["calibration"]["dataset"] == f"s3://{bucket}/data/valid.txt"
    assert not (workdir / job.id).exists()


class WatchUploads(JobStore):
    """A store that, each time a layer is reported done, lists what the output prefix already holds on S3."""

    s3 = bucket = prefix = None
    seen: list

    def set_progress(self, job_id, progress, metrics_delta=None, **kwargs):
        if progress.get("stage") == "compressing" and progress.get("layer"):
            time.sleep(0.3)  # the background upload of the shard just written
            self.seen.append((progress["layer"], keys(self.s3, self.bucket, self.prefix)))
        return super().set_progress(job_id, progress, metrics_delta, **kwargs)


def test_s3_shards_are_uploaded_while_the_job_runs_and_the_manifest_last(tmp_path, s3, bucket):
    store = WatchUploads(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.s3, store.bucket, store.prefix, store.seen = s3, bucket, "jobs/streamed/", []
    settings = Settings(artifacts_root=str(tmp_path / "artifacts"), hub_offline=True)
    job = run(store, settings, tmp_path / "work", request(f"s3://{bucket}/jobs/streamed/"))
    assert job.status == "succeeded", job.error
    # Layer i (1-based) done: shard i (block i-1) is on S3 already, and no manifest yet.
    for layer, present in store.seen:
        assert f"jobs/streamed/model-{layer + 1:05d}-of-00006.safetensors" in present, (layer, present)
        assert f"jobs/streamed/{MANIFEST_NAME}" not in present
    assert [layer for layer, _ in store.seen] == [1, 2, 3, 4, 5]
    assert f"jobs/streamed/{MANIFEST_NAME}" in keys(s3, bucket, "jobs/streamed/")
    store.close()


def test_s3_failures_name_the_bucket_and_publish_nothing(env, s3, bucket):
    store, settings, workdir = env
    missing = f"llmpress-missing-{uuid.uuid4().hex[:8]}"
    job = run(store, settings, workdir, request(f"s3://{bucket}/jobs/x/", model=f"s3://{missing}/models/m"))
    assert job.status == "failed" and f"bucket '{missing}' does not exist" in job.error
    assert job.error.startswith("model: ")
    job = run(store, settings, workdir, request(f"s3://{missing}/jobs/x/"))
    assert job.status == "failed" and job.error.startswith("output: ") and missing in job.error
    job = run(store, settings, workdir, request(f"s3://{bucket}/jobs/x/", model=f"s3://{bucket}/models/nothing"))
    assert job.status == "failed" and job.error.startswith("model: nothing found")
    assert keys(s3, bucket, "jobs/") == []


def test_a_published_location_is_refused_before_any_work(env, s3, bucket):
    store, settings, workdir = env
    assert run(store, settings, workdir, request(f"s3://{bucket}/jobs/taken/")).status == "succeeded"
    before = keys(s3, bucket, "jobs/taken/")
    job = run(store, settings, workdir, request(f"s3://{bucket}/jobs/taken/"))
    assert job.status == "failed" and "already holds a published output" in job.error
    assert job.metrics == {}  # refused before compressing
    assert keys(s3, bucket, "jobs/taken/") == before


# ------------------------------------------------------------------------------------------------------ webhook


@pytest.fixture
def receiver():
    """An http.server on 127.0.0.1 that records every POST."""
    received: list[dict] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append({"headers": dict(self.headers), "body": body, "path": self.path})
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hooks/llmpress?token=abc", received
    server.shutdown()
    server.server_close()


def loopback_hooks(settings: Settings) -> Settings:
    """``settings`` letting webhooks reach the test's receiver on 127.0.0.1 over http (refused by default)."""
    return settings.model_copy(update={"webhook_allow": ("127.0.0.1",), "webhook_allow_http": True})


def test_webhook_is_signed_and_never_carries_the_secret(env, receiver, caplog):
    store, settings, workdir = env
    settings = loopback_hooks(settings)
    url, received = receiver
    caplog.set_level("DEBUG")
    ok = run(store, settings, workdir, request("runs/hooked", webhook={"url": url, "secret": SECRET}))
    failed = run(store, settings, workdir, request("runs/hooked2", model="models/none",
                                                   webhook={"url": url, "secret": SECRET}))
    assert (ok.status, failed.status) == ("succeeded", "failed")
    assert [r["headers"]["X-Llmpress-Event"] for r in received] == ["job.succeeded", "job.failed"]
    for delivery, job in zip(received, (ok, failed)):
        body = delivery["body"]
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(delivery["headers"]["X-Llmpress-Signature"], expected)
        assert SECRET.encode() not in body
        payload = json.loads(body)
        assert payload["id"] == job.id and payload["status"] == job.status
        assert payload["request"]["webhook"] == {"url": url}
        assert delivery["path"] == "/hooks/llmpress?token=abc"
    assert SECRET not in caplog.text and "token=abc" not in caplog.text


def test_webhook_failures_are_retried_then_only_logged(env, monkeypatch, caplog):
    store, settings, workdir = env
    settings = loopback_hooks(settings)
    monkeypatch.setattr(webhook, "WEBHOOK_BACKOFF_S", 0.01)
    closed = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    port = closed.server_address[1]
    closed.server_close()  # nothing listens there now
    job = run(store, settings, workdir, request("runs/unheard", webhook={"url": f"http://127.0.0.1:{port}/h",
                                                                        "secret": SECRET}))
    assert job.status == "succeeded" and job.error is None
    assert caplog.text.count("webhook") >= 3 and "attempt 3/3" in caplog.text
    assert SECRET not in caplog.text


# ------------------------------------------------------------------------------------- owned outputs, OS errors


def submit(store, settings, owner, body):
    """As the API does it: the request checked, the job created with its output claimed."""
    from service.jobs.request import JobRequest

    parsed = JobRequest.parse(body, settings.model_copy(update={"input_roots": (str(FIXTURES),)}))
    job, _ = store.create_job(owner, parsed.to_dict(), output_location=parsed.output_location(settings),
                              overwrite=parsed.overwrite)
    return job


def test_overwrite_replaces_the_tenants_own_output_and_nothing_else(env):
    store, settings, workdir = env
    first = submit(store, settings, "alice", request("runs/model"))
    assert run_job(store, first.id, settings, workdir=workdir, input_roots=[FIXTURES]).status == "succeeded"
    folder = Path(settings.artifacts_root) / "runs" / "model"
    assert json.loads((folder / MANIFEST_NAME).read_text())["extra"]["job_id"] == first.id

    second = submit(store, settings, "alice", request("runs/model", overwrite=True))
    done = run_job(store, second.id, settings, workdir=workdir, input_roots=[FIXTURES])
    assert done.status == "succeeded", done.error
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["extra"]["job_id"] == second.id
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {MANIFEST_NAME}
    assert on_disk == {f["key"] for f in manifest["files"]}

    # overwrite without a claim taken over (here: a manifest nobody's claim covers) replaces nothing.
    (Path(settings.artifacts_root) / "runs" / "legacy").mkdir(parents=True)
    (Path(settings.artifacts_root) / "runs" / "legacy" / MANIFEST_NAME).write_text('{"files": []}')
    legacy = submit(store, settings, "bob", request("runs/legacy", overwrite=True))
    failed = run_job(store, legacy.id, settings, workdir=workdir, input_roots=[FIXTURES])
    assert failed.status == "failed" and "already holds a published output" in failed.error
    assert (Path(settings.artifacts_root) / "runs" / "legacy" / MANIFEST_NAME).read_text() == '{"files": []}'
    assert settings.artifacts_root not in failed.error  # no server path in what the tenant reads


def test_a_full_disk_is_a_message_a_person_can_act_on(env, tmp_path):
    import subprocess

    store, settings, workdir = env
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN)")
    try:
        settings = settings.model_copy(update={"artifacts_root": str(small)})
        job = submit(store, settings, "alice", request("runs/full"))
        done = run_job(store, job.id, settings, workdir=workdir, input_roots=[FIXTURES])
        assert done.status == "failed"
        assert done.error.startswith("no space left on device while writing "), done.error
        assert ".safetensors to runs/full (" in done.error and "choose another output" in done.error
        assert "nothing was published" in done.error and "internal error" not in done.error
        assert store.output_claim(job.id) is None  # the folder is free again
        assert [p.name for p in small.rglob("*") if p.is_file()] == []  # nothing half-published
    finally:
        subprocess.run(["umount", str(small)], check=True)
