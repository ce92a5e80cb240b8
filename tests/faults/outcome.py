"""How a job hit by a fault must end: in the right terminal state, exactly once, and with its output either
complete (a manifest listing exactly the files present, every sha256 matching) or absent (no manifest, and none of
its files but the shards of the blocks it finished, kept, unpublished, for a retry to resume from: each one what
its checkpoint in the job store recorded)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from service.jobs.job_store import TERMINAL, Job, JobStore
from service.jobs.storage import MANIFEST_NAME


def statuses(store: JobStore, job_id: str) -> list[str]:
    """The job's status events, oldest first."""
    return [e.data["status"] for e in store.events(job_id) if e.type == "status"]


def finished_once(store: JobStore, job_id: str, status: str) -> Job:
    """The job, after checking that it is ``status`` and that its events end it exactly once, with that status."""
    job = store.get(job_id)
    seen = statuses(store, job_id)
    assert job.status == status, (job.status, job.error, seen)
    assert [s for s in seen if s in TERMINAL] == [status], seen
    assert seen[-1] == status, seen
    return job


def local_files(folder: Path) -> set[str]:
    """Every file under ``folder`` (relative, '/'-separated); empty when the folder does not exist."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} if folder.exists() else set()


def check_local_output(folder: Path, job_id: str) -> dict:
    """The manifest of the job's output in ``folder``, after checking it lists exactly the files there."""
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["extra"]["job_id"] == job_id
    assert local_files(folder) - {MANIFEST_NAME} == {f["key"] for f in manifest["files"]}
    for f in manifest["files"]:
        data = (folder / f["key"]).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (f["size"], f["sha256"]), f["key"]
    return manifest


def s3_keys(s3, bucket: str, prefix: str) -> set[str]:
    """Every key under ``prefix`` (a folder, ending in '/'), relative to it."""
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"][len(prefix):] for page in pages for o in page.get("Contents", [])}


def check_s3_output(s3, bucket: str, prefix: str, job_id: str) -> dict:
    """The same for an output under ``s3://bucket/prefix`` (``s3`` a client of the server itself)."""
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=prefix + MANIFEST_NAME)["Body"].read())
    assert manifest["extra"]["job_id"] == job_id
    assert s3_keys(s3, bucket, prefix) - {MANIFEST_NAME} == {f["key"] for f in manifest["files"]}
    for f in manifest["files"]:
        data = s3.get_object(Bucket=bucket, Key=prefix + f["key"])["Body"].read()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (f["size"], f["sha256"]), f["key"]
    return manifest


def kept_for_retry(store: JobStore, job_id: str, read) -> set[str]:
    """The shards a failed job keeps for a retry (its block checkpoints), after checking that each is there with
    the sha256 recorded; ``read(key)`` gives a stored file's bytes."""
    kept = set()
    for checkpoint in store.checkpoints(job_id):
        data = read(checkpoint["shard"])
        assert hashlib.sha256(data).hexdigest() == checkpoint["sha256"], checkpoint["shard"]
        kept.add(checkpoint["shard"])
    return kept
