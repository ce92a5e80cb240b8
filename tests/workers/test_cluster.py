"""One job over several Ray workers on a real multi-node cluster: Ray's own ``ray.cluster_utils.Cluster`` on
127.0.0.1 (a head with no CPUs, so no work runs there, and three worker nodes of 1 CPU each, each its own raylet),
and `llmpress serve` joined to it through RAY_ADDRESS, driven over REST.

A job with ``resources.workers: 2`` gets a placement group of two 1-CPU bundles: its own process (rank 0) and one
worker actor (rank 1), on two different nodes. Killing the node of rank 1 mid-job (SIGKILL to its raylet and the
processes it started) loses that worker: the job is queued again (attempt 2), its placement group's lost bundle is
placed on the spare node, and the job resumes from its per-block checkpoints, finishing once with the very bytes
of an uninterrupted run. Killing the node of rank 0 (the job's own process, a detached actor) does the same: Ray
restarts the actor in the re-placed bundle, and the restarted actor takes its job up itself.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest

ray = pytest.importorskip("ray")

from ray.cluster_utils import Cluster  # noqa: E402

from service.jobs.job_store import JobStore  # noqa: E402
from tests.api.test_service_restart import AUTH, CALIB, Serve, wait_job  # noqa: E402
from tests.fixture_paths import STORIES  # noqa: E402
from tests.tiny_models import RECIPE_2OF4  # noqa: E402

LAYERS = 5  # stories260K's decoder blocks
# 256 samples of 256 tokens: a block takes seconds on two 1-CPU workers, time to kill a node between blocks.
SAMPLES, SEQ_LEN = 256, 256


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(3):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("cluster")


@pytest.fixture(scope="module")
def service(cluster, root):
    serve = Serve(root, env={"RAY_ADDRESS": cluster.address})
    yield serve
    serve.stop()


def submit(url: str, output: str, **resources) -> dict:
    body = {"model": str(STORIES), "recipe": RECIPE_2OF4, "output": output,
            "dataset": {"source": str(CALIB), "num_samples": SAMPLES, "seq_len": SEQ_LEN, "seed": 0}}
    if resources:
        body["resources"] = resources
    response = httpx.post(f"{url}/v1/jobs", json=body, headers=AUTH, timeout=30)
    return response


def shards(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.suffix == ".safetensors" or p.name.endswith(".index.json")}


def test_a_two_worker_job_runs_on_two_nodes(service, root):
    response = submit(service.url, "runs/two", workers=2)
    assert response.status_code == 201, response.text
    job = wait_job(service.url, response.json()["id"], lambda j: j["status"] in ("succeeded", "failed"), 300)
    assert job["status"] == "succeeded", job["error"]
    workers = job["progress"]["workers"]
    assert [w["rank"] for w in workers] == [0, 1]
    assert len({w["node_id"] for w in workers}) == 2  # one per node: the 1-CPU nodes leave no other choice
    assert all(w["node_ip"] == "127.0.0.1" for w in workers)
    assert len(shards(root / "artifacts" / "runs" / "two")) == LAYERS + 2


def test_what_the_cluster_can_never_hold_is_refused_at_submit(service):
    for resources, field, words in (
        ({"workers": 4}, "workers", "at most 3"),
        ({"workers": 2, "cpus_per_worker": 2}, "cpus_per_worker", "no node"),
        ({"workers": 2, "gpus_per_worker": 1}, "gpus_per_worker", "no GPU"),
        ({"workers": 0}, "workers", ">= 1"),
    ):
        response = submit(service.url, "runs/refused", **resources)
        assert response.status_code == 422, response.text
        detail = response.json()["detail"][0]
        assert detail["loc"] == ["body", "resources", field] and words in detail["msg"], detail


def test_killing_a_worker_node_mid_job_resumes_on_the_others_with_the_same_bytes(service, cluster, root):
    response = submit(service.url, "runs/killed", workers=2)
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    job = wait_job(service.url, job_id, lambda j: (j["progress"].get("layer") or 0) >= 2 or j["status"] != "running"
                   and j["status"] != "queued", 300)
    assert job["status"] == "running", job
    rank1 = next(w for w in job["progress"]["workers"] if w["rank"] == 1)
    node = next(n for n in cluster.worker_nodes if n.node_id == rank1["node_id"])
    cluster.remove_node(node, allow_graceful=False)  # SIGKILL to its raylet and everything it runs
    job = wait_job(service.url, job_id, lambda j: j["status"] in ("succeeded", "failed", "cancelled"), 300)
    assert job["status"] == "succeeded", job["error"]
    events = httpx.get(f"{service.url}/v1/jobs/{job_id}/events", headers=AUTH, timeout=10).json()
    assert job["attempt"] == 2, [(e["type"], e["data"]) for e in events if e["type"] != "progress"]
    events = httpx.get(f"{service.url}/v1/jobs/{job_id}/events", headers=AUTH, timeout=10).json()
    resumed = [e["data"] for e in events if e["type"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["layers"] == LAYERS and resumed[0]["layer"] >= 3, events
    assert job["progress"]["resumed"] == resumed[0]
    nodes = {w["node_id"] for w in job["progress"]["workers"]}
    assert rank1["node_id"] not in nodes and len(nodes) == 2
    statuses = [e["data"]["status"] for e in events if e["type"] == "status"]
    assert statuses == ["queued", "running", "queued", "running", "uploading", "succeeded"]
    assert shards(root / "artifacts" / "runs" / "killed") == shards(root / "artifacts" / "runs" / "two")
    store = JobStore(f"sqlite:///{root / 'jobs.db'}")
    try:
        assert store.checkpoints(job_id) == []  # published: nothing is kept for a resume any more
    finally:
        store.close()


def test_killing_the_node_of_the_jobs_own_process_resumes_it_elsewhere(service, cluster, root):
    """Rank 0 is the job's own process (the detached JobActor in cluster mode): its node lost, Ray starts the actor
    again where the placement group's bundle is placed anew (a fresh node joins for it), and the job resumes."""
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    response = submit(service.url, "runs/rank0-killed", workers=2)
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    job = wait_job(service.url, job_id, lambda j: (j["progress"].get("layer") or 0) >= 2 or j["status"] != "running"
                   and j["status"] != "queued", 300)
    assert job["status"] == "running", job
    rank0 = next(w for w in job["progress"]["workers"] if w["rank"] == 0)
    node = next(n for n in cluster.worker_nodes if n.node_id == rank0["node_id"])
    cluster.remove_node(node, allow_graceful=False)
    job = wait_job(service.url, job_id, lambda j: j["status"] in ("succeeded", "failed", "cancelled"), 300)
    events = httpx.get(f"{service.url}/v1/jobs/{job_id}/events", headers=AUTH, timeout=10).json()
    assert job["status"] == "succeeded", (job["error"], [(e["type"], e["data"]) for e in events
                                                         if e["type"] != "progress"])
    assert job["attempt"] >= 2
    resumed = [e["data"] for e in events if e["type"] == "resumed"]
    assert resumed and resumed[-1]["layer"] >= 3, events
    assert rank0["node_id"] not in {w["node_id"] for w in job["progress"]["workers"]}
    statuses = [e["data"]["status"] for e in events if e["type"] == "status"]
    assert [s for s in statuses if s in ("succeeded", "failed", "cancelled")] == ["succeeded"]
    assert shards(root / "artifacts" / "runs" / "rank0-killed") == shards(root / "artifacts" / "runs" / "two")
