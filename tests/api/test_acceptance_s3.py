"""Acceptance, end to end on loopback with real parts only: a real uvicorn server running the job API, a real
SQLite job store, a real local Ray behind the real ``workers.dispatch.RayDispatcher``, and a real S3-compatible
server (moto's threaded server, the ``s3`` fixture of conftest.py).

stories260K and the calibration and evaluation texts are uploaded to a bucket; a 2:4 SparseGPT job with a quality
gate is submitted over REST and polled to ``succeeded``; its artifacts are downloaded with boto3 and checked
against the manifest (size and sha256), loaded with transformers, and checked for 2:4 sparsity and for the
perplexity the job reported. The same through the CLI with a gate the model cannot pass: non-zero exit, the job
``failed`` naming the gate, and no manifest published.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import httpx
import pytest
import torch

from api.app import create_app
from service.jobs.job_store import JobStore
from service.jobs.settings import Settings
from tests.api_server import Server, local_ray as local_ray_session
from tests.fixture_paths import FIXTURES, REPO, STORIES

RECIPE_YAML = (REPO / "service" / "recipes" / "sparsegpt_2of4.yaml").read_text()
CALIB = FIXTURES / "data" / "wikitext-2" / "valid.txt"
EVAL_TEXT = FIXTURES / "data" / "tinystories" / "valid-subset.txt"
BUCKET = "llmpress-acceptance"
KEY_NAME, KEY = "release", "release-secret-s3"
MODEL_URI = f"s3://{BUCKET}/models/stories260K"
CALIB_URI = f"s3://{BUCKET}/data/wikitext-2/valid.txt"
EVAL_URI = f"s3://{BUCKET}/data/tinystories/valid-subset.txt"
EVAL_SEQ_LEN = 512  # the job's evaluation window (service.engine.options.CompressionOptions.eval_seq_len's default)


@pytest.fixture(scope="module")
def bucket(s3):
    """The bucket with stories260K and both texts uploaded, on the module's moto server."""
    s3.create_bucket(Bucket=BUCKET)
    for f in sorted(STORIES.iterdir()):
        if f.is_file():
            s3.upload_file(str(f), BUCKET, f"models/stories260K/{f.name}")
    s3.upload_file(str(CALIB), BUCKET, "data/wikitext-2/valid.txt")
    s3.upload_file(str(EVAL_TEXT), BUCKET, "data/tinystories/valid-subset.txt")
    return s3


@pytest.fixture(scope="module")
def local_ray(s3):
    """One local Ray for the module, started after the ``s3`` fixture so that its workers inherit the moto
    endpoint and credentials (Ray workers take the environment as it is when Ray starts); shut down after the
    module so that other test modules can start their own."""
    with local_ray_session():
        yield


@pytest.fixture(scope="module")
def service(local_ray, bucket, tmp_path_factory):
    """The API on loopback with the real RayDispatcher, its own SQLite store and artifacts folder."""
    from workers.dispatch import RayDispatcher

    root = tmp_path_factory.mktemp("acceptance-s3")
    settings = Settings(api_keys=f"{KEY_NAME}:{KEY}", database_url=f"sqlite:///{root / 'jobs.db'}",
                        artifacts_root=str(root / "artifacts"), hub_offline=True)
    (root / "artifacts").mkdir()
    store = JobStore(settings.database_url)
    dispatcher = RayDispatcher(store, settings)
    with Server(create_app(settings, store, dispatcher)) as url:
        with httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {KEY}"}) as http:
            yield type("Service", (), {"url": url, "http": http, "store": store, "s3": bucket})
    store.close()


def wait_for(http: httpx.Client, job_id: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        response = http.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        job = response.json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job['status']} after {timeout:.0f} s: {job}"
        time.sleep(0.2)


def keys_under(s3, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_rest_job_on_s3_end_to_end(service, tmp_path):
    from transformers import AutoModelForCausalLM

    from service.engine.perplexity import perplexity
    from service.engine.text_data import load_tokenizer, read_texts, tokenize

    body = {
        "model": MODEL_URI,
        "recipe": RECIPE_YAML,
        "dataset": {"source": CALIB_URI, "num_samples": 16, "seq_len": 64},
        "output": f"s3://{BUCKET}/out/job1/",
        "eval": {"source": EVAL_URI, "max_ppl_ratio": 50},
    }
    created = service.http.post("/v1/jobs", json=body)
    assert created.status_code == 201, created.text
    job = wait_for(service.http, created.json()["id"])
    assert job["status"] == "succeeded", job.get("error")
    report = job["report"]
    assert report["quality_gate"] == {"max_ppl_ratio": 50, "passed": True}

    # The artifacts: every file downloaded with boto3 matches the manifest's size and sha256.
    response = service.http.get(f"/v1/jobs/{job['id']}/artifacts")
    assert response.status_code == 200, response.text
    artifacts = response.json()
    assert artifacts["uri"].rstrip("/") == f"s3://{BUCKET}/out/job1"
    files = artifacts["files"]
    assert any(f["key"].endswith(".safetensors") for f in files) and any(f["key"] == "config.json" for f in files)
    assert artifacts["total_size"] == sum(f["size"] for f in files)
    published = set(keys_under(service.s3, "out/job1/"))
    assert f"out/job1/{artifacts['manifest_key']}" in published
    assert {f"out/job1/{f['key']}" for f in files} <= published
    manifest_object = service.s3.get_object(Bucket=BUCKET, Key=f"out/job1/{artifacts['manifest_key']}")
    manifest = json.loads(manifest_object["Body"].read())
    # The manifest.json in the bucket (written last) lists the same files as the API's manifest.
    assert sorted((f["key"], f["size"], f["sha256"]) for f in manifest["files"]) == \
        sorted((f["key"], f["size"], f["sha256"]) for f in files)
    assert manifest["extra"]["job_id"] == job["id"]
    model_dir = tmp_path / "model"
    for f in files:
        target = model_dir / f["key"]
        target.parent.mkdir(parents=True, exist_ok=True)
        service.s3.download_file(BUCKET, f"out/job1/{f['key']}", str(target))
        data = target.read_bytes()
        assert len(data) == f["size"], f["key"]
        assert hashlib.sha256(data).hexdigest() == f["sha256"], f["key"]

    # 2:4 sparsity: at least 2 zeros in every group of 4 along the input dimension of every decoder Linear.
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    decoder = {name: m for name, m in linears.items() if ".layers." in name}
    assert decoder and len(decoder) == len(linears) - 1, sorted(linears)
    for name, m in decoder.items():
        w = m.weight.detach()
        assert w.shape[1] % 4 == 0, name
        zeros = (w.reshape(w.shape[0], -1, 4) == 0).sum(dim=-1)
        assert bool((zeros >= 2).all()), f"{name}: a group of 4 has fewer than 2 zeros"
    head = model.get_output_embeddings().weight.detach()
    assert (head == 0).float().mean().item() < 0.01  # lm_head stays dense

    # Its TinyStories perplexity is the one the job reported, and within the gate.
    tokenizer = load_tokenizer(model_dir)
    ids = tokenize(tokenizer, read_texts(EVAL_TEXT))
    measured = perplexity(model, ids, seq_len=EVAL_SEQ_LEN).ppl
    entry = report["perplexity"]["eval"]
    assert measured == pytest.approx(entry["after"], rel=1e-4)
    assert entry["after"] / entry["before"] == pytest.approx(entry["ratio"], rel=1e-6)
    assert entry["ratio"] <= 50 and entry["ratio"] > 1  # 2:4 pruning costs something, but passes the gate

    # The same through the release-pipeline CLI, with a gate 2:4 pruning cannot pass.
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE_YAML)
    cli = subprocess.run(
        [sys.executable, "-m", "api.cli", "submit", "--server", service.url, "--api-key", KEY,
         "--model", MODEL_URI, "--recipe", str(recipe), "--dataset", CALIB_URI, "--num-samples", "16",
         "--seq-len", "64", "--output", f"s3://{BUCKET}/out/job2/", "--eval", EVAL_URI,
         "--max-ppl-ratio", "1.0001", "--wait", "--poll", "0.2"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120,
    )
    assert cli.returncode != 0, (cli.stdout, cli.stderr)
    job_id = cli.stdout.strip()
    assert job_id, cli.stderr
    failed = service.http.get(f"/v1/jobs/{job_id}").json()
    assert failed["status"] == "failed", failed
    assert "quality gate failed" in failed["error"] and "max_ppl_ratio 1.0001" in failed["error"], failed["error"]
    assert "quality gate failed" in cli.stderr
    assert not failed["report"]["quality_gate"]["passed"]
    assert not any(k.endswith("manifest.json") for k in keys_under(service.s3, "out/job2/"))
    assert service.http.get(f"/v1/jobs/{job_id}/artifacts").status_code != 200
