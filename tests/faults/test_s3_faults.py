"""S3 failing (500 InternalError) during the upload of a job's output: the S3 endpoint the service uses
(AWS_ENDPOINT_URL) is a fault-injecting proxy (tests/s3_fault_proxy.py) in front of the module's moto server; what
was published is read from moto directly.

A low share of failed uploads is absorbed by boto3's retries (storage.RETRY_MODE, MAX_ATTEMPTS requests in all)
and the job succeeds with a correct manifest. An endpoint that fails every upload after the first few makes the
job fail naming the bucket and key, after MAX_ATTEMPTS tries of that one upload, and nothing stays published:
no manifest, and the shards that did land are deleted again. And a reply lost after S3 stored the manifest (the
retry finds it there already) still ends in one succeeded job with that manifest.

The job runs in this process through ``run_job`` with a SQLite job store (no API, no Ray: the fault is in the
upload path, which is the same code in a Ray worker).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.jobs.job_runner import run_job
from service.jobs.job_store import JobStore
from service.jobs.settings import Settings
from service.jobs.storage import MANIFEST_NAME, MAX_ATTEMPTS
from tests.faults.outcome import check_s3_output, finished_once, kept_for_retry, s3_keys
from tests.fixture_paths import FIXTURES, STORIES, WIKI_VALID
from tests.s3_fault_proxy import FaultProxy, after, first_put_of, share
from tests.tiny_models import RECIPE_2OF4

BUCKET = "llmpress-faults"


class Jobs:
    """A job store and settings; ``run(prefix, fails)`` runs a job that publishes to s3://BUCKET/<prefix> through a
    proxy failing the PUTs ``fails`` picks, and returns (the job as it ended, the proxy)."""

    def __init__(self, root: Path, monkeypatch):
        self.root, self.monkeypatch = root, monkeypatch
        self.store = JobStore(f"sqlite:///{root / 'jobs.db'}")
        self.settings = Settings(artifacts_root=str(root / "artifacts"), hub_offline=True)
        self.moto_url = os.environ["AWS_ENDPOINT_URL"]  # set by the s3 fixture

    def run(self, prefix: str, fails, **proxy_options):
        job, _ = self.store.create_job("alice", {
            "model": str(STORIES), "recipe": RECIPE_2OF4, "output": f"s3://{BUCKET}/{prefix}",
            "dataset": {"source": str(WIKI_VALID), "num_samples": 64, "seq_len": 128},
        })
        with FaultProxy(self.moto_url, fails, **proxy_options) as proxy:
            self.monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)  # the service's S3 client reads it per store
            try:
                ended = run_job(self.store, job.id, self.settings, workdir=self.root / "work",
                                input_roots=[FIXTURES])
            finally:
                self.monkeypatch.setenv("AWS_ENDPOINT_URL", self.moto_url)
        assert not list((self.root / "work").glob("*")), "the job's work folder was left behind"
        return ended, proxy


@pytest.fixture
def jobs(s3, tmp_path, monkeypatch):
    if BUCKET not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
        s3.create_bucket(Bucket=BUCKET)
    jobs = Jobs(tmp_path, monkeypatch)
    yield jobs
    jobs.store.close()


def test_a_low_share_of_failed_uploads_is_retried_and_the_job_succeeds(jobs, s3):
    job, proxy = jobs.run("out/flaky/", share(0.3, seed=0))
    assert job.status == "succeeded", job.error
    assert proxy.failed, "the proxy injected no fault: the test proves nothing"
    # Every file and the manifest sent once, and again after each 500.
    assert len(proxy.sent) == len(job.artifacts["manifest"]["files"]) + 1
    assert set(proxy.failed) <= set(proxy.sent)
    finished_once(jobs.store, job.id, "succeeded")
    manifest = check_s3_output(s3, BUCKET, "out/flaky/", job.id)
    assert any(f["key"].endswith(".safetensors") for f in manifest["files"])


def test_uploads_failing_for_good_fail_the_job_and_publish_nothing(jobs, s3):
    job, proxy = jobs.run("out/broken/", after(3))
    assert job.status == "failed"
    # The one upload that failed was tried MAX_ATTEMPTS times; once it failed nothing more was sent.
    failed_path = proxy.failed[0]
    assert proxy.failed == [failed_path] * MAX_ATTEMPTS and proxy.puts == 3 + MAX_ATTEMPTS, proxy.failed
    assert len(proxy.sent) == 3 and all(path.endswith(".safetensors") for path in proxy.sent), proxy.sent
    key = failed_path.split(f"/{BUCKET}/", 1)[1]
    assert f"s3://{BUCKET}/{key}" in job.error and "InternalError" in job.error, job.error
    finished_once(jobs.store, job.id, "failed")
    # No manifest; of the three shards that did land only the finished blocks' stay, for a retry to resume from.
    kept = kept_for_retry(jobs.store, job.id,
                          lambda key: s3.get_object(Bucket=BUCKET, Key="out/broken/" + key)["Body"].read())
    left = s3_keys(s3, BUCKET, "out/broken/")
    assert MANIFEST_NAME not in left and left == kept, f"left after the failure: {sorted(left)}"


def test_a_lost_reply_to_the_manifest_upload_still_publishes_once(jobs, s3):
    # The manifest reaches S3 but its reply is a 500: the retry sends it again onto the one already there (with a
    # conditional create it finds the key taken, and must see that it is its own write).
    job, proxy = jobs.run("out/lost-reply/", first_put_of(MANIFEST_NAME), reply_lost=True)
    assert [path.rsplit("/", 1)[1] for path in proxy.failed] == [MANIFEST_NAME]
    assert job.status == "succeeded", (job.error, "left in the bucket:", sorted(s3_keys(s3, BUCKET, "out/lost-reply/")))
    finished_once(jobs.store, job.id, "succeeded")
    check_s3_output(s3, BUCKET, "out/lost-reply/", job.id)
