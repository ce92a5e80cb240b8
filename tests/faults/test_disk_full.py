"""The disk filling up while a job writes: a tmpfs smaller than the output (about 1.1 MB) mounted as the
artifacts folder (the publish copies the shards there) or as the work folder (the engine writes the shards there,
and each goes as soon as it is uploaded: a work folder smaller than the output is enough, one smaller than a shard
is not).

Either way the job fails with a message a person can act on, naming "no space left on device", the file and the
place; nothing stays published (no manifest, none of the shards that did fit); the work folder is removed; and the
tmpfs is unmounted at the end whatever happened. Skipped where mounting is not allowed (not root, no
CAP_SYS_ADMIN). The job runs in this process through ``run_job`` with a SQLite job store.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from pathlib import Path

import pytest

from service.jobs.job_runner import run_job
from service.jobs.job_store import JobStore
from service.jobs.settings import Settings
from tests.faults.outcome import finished_once, kept_for_retry, local_files
from tests.fixture_paths import FIXTURES, STORIES, WIKI_VALID
from tests.tiny_models import RECIPE_2OF4

# Room for the first two shards (131 kB and 183 kB), not the rest (four more of 183 kB, tokenizer, config).
TMPFS_SIZE = "400k"
# A work folder holds only the shards not yet uploaded (about one block): room for the first shard, not the second.
WORK_TMPFS_SIZE = "150k"
SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


@contextlib.contextmanager
def tmpfs(folder: Path, size: str = TMPFS_SIZE):
    """A tmpfs of ``size`` mounted on ``folder`` (created) while the block runs; unmounted after it, also when
    it fails. Skips the test when this process may not mount."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root (or CAP_SYS_ADMIN); running as a normal user")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(folder)],
                             capture_output=True, text=True, timeout=30)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (no CAP_SYS_ADMIN?): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        unmounted = subprocess.run(["umount", str(folder)], capture_output=True, text=True, timeout=30)
        if unmounted.returncode != 0:  # still busy: detach it now, the kernel frees it when the last user goes
            subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=30, check=True)
        assert not os.path.ismount(folder)


def run(store: JobStore, settings: Settings, workdir: Path, output: str):
    job, _ = store.create_job("alice", {
        "model": str(STORIES), "recipe": RECIPE_2OF4, "output": output,
        "dataset": {"source": str(WIKI_VALID), "num_samples": 64, "seq_len": 128},
    })
    return run_job(store, job.id, settings, workdir=workdir, input_roots=[FIXTURES])


def check_disk_full_error(error: str, where: str) -> None:
    """The message says the disk is full, which file was being written, and where (as the user knows it)."""
    assert "no space left on device" in error.lower(), error
    assert SHARD.search(error), f"the message does not name the file: {error}"
    assert where in error, f"the message does not name where it was writing ({where}): {error}"


def test_a_full_artifacts_folder_fails_the_job_and_leaves_nothing_published(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    try:
        with tmpfs(tmp_path / "artifacts") as artifacts:
            settings = Settings(artifacts_root=str(artifacts), hub_offline=True)
            job = run(store, settings, tmp_path / "work", "runs/full")
            assert job.status == "failed", job.status
            check_disk_full_error(job.error, "runs/full")  # the output, as requested
            finished_once(store, job.id, "failed")
            # No manifest, no temporary file of the copy that did not fit, and of the shards that fitted only the
            # finished blocks' (kept for a retry).
            out = artifacts / "runs" / "full"
            kept = kept_for_retry(store, job.id, lambda key: (out / key).read_bytes())
            assert local_files(artifacts) == {f"runs/full/{key}" for key in kept}, sorted(local_files(artifacts))
        assert not local_files(tmp_path / "work")
    finally:
        store.close()


def test_a_full_work_folder_fails_the_job_and_leaves_nothing_published(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    artifacts = tmp_path / "artifacts"
    try:
        with tmpfs(tmp_path / "work", WORK_TMPFS_SIZE) as work:
            settings = Settings(artifacts_root=str(artifacts), hub_offline=True)
            job = run(store, settings, work, "runs/full")
            assert job.status == "failed", job.status
            check_disk_full_error(job.error, str(work))
            finished_once(store, job.id, "failed")
            assert not local_files(work), sorted(local_files(work))  # the work folder is removed
        # Of the shards uploaded before the disk filled up, only the finished blocks' stay (for a retry).
        out = artifacts / "runs" / "full"
        kept = kept_for_retry(store, job.id, lambda key: (out / key).read_bytes())
        assert local_files(artifacts) == {f"runs/full/{key}" for key in kept}, sorted(local_files(artifacts))
    finally:
        store.close()


def test_a_work_folder_smaller_than_the_output_is_enough(tmp_path):
    """The work folder holds a shard only until it is uploaded: 400 kB (two shards) for an output of about 1.1 MB."""
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    artifacts = tmp_path / "artifacts"
    try:
        with tmpfs(tmp_path / "work") as work:
            settings = Settings(artifacts_root=str(artifacts), hub_offline=True)
            job = run(store, settings, work, "runs/small-work")
            assert job.status == "succeeded", job.error
            assert not local_files(work)
        out = artifacts / "runs" / "small-work"
        shards = {f["key"] for f in job.artifacts["manifest"]["files"] if SHARD.fullmatch(f["key"])}
        assert len(shards) == 6 and sum((out / key).stat().st_size for key in shards) > 2 * 400_000
    finally:
        store.close()
