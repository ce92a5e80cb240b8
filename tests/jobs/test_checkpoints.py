"""Per-block checkpoints and resume, through the job runner with a real job store, real local output folders and
the bundled stories260K: a run stopped after block k is taken up again at block k + 1 and publishes the very
bytes of an uninterrupted run; a changed fingerprint starts over and says which part changed; a retried failed
job resumes too; a cancel keeps nothing.

A run is stopped where a lost worker or a killed process stops it: between blocks, while reporting progress (the
store raises there). The Ray and whole-process versions of the same are tests/workers/test_cluster.py and
tests/faults/test_process_kills.py."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from sqlalchemy import update

from service.engine.data_parallel import LocalPool
from service.jobs.job_runner import run_job
from service.jobs.job_store import ACTIVE, JobRow, JobStore
from service.jobs.request import output_location
from service.jobs.settings import Settings
from service.jobs.storage import MANIFEST_NAME
from tests.fixture_paths import FIXTURES, RECIPES, STORIES, WIKI_VALID
from tests.tiny_models import RECIPE_2OF4

LAYERS = 5


class Stop(BaseException):
    """What a killed worker looks like to the code it was running: it never returns (a BaseException, as the
    KeyboardInterrupt or SystemExit of a stopped worker)."""


class StoppingStore(JobStore):
    """The job store, raising ``error`` from the progress write that reports layer ``at`` (once)."""

    def __init__(self, url: str, at: int, error: BaseException):
        super().__init__(url)
        self.at, self.error = at, error

    def set_progress(self, job_id, progress, *args, **kwargs):
        if self.error is not None and progress.get("layer") == self.at:
            error, self.error = self.error, None
            raise error
        return super().set_progress(job_id, progress, *args, **kwargs)


@pytest.fixture
def env(tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    settings = Settings(artifacts_root=str(tmp_path / "artifacts"), database_url=url, hub_offline=True)
    store = JobStore(url)
    yield store, settings, tmp_path
    store.close()


def request(output: str, model: Path = STORIES, recipe: str = RECIPE_2OF4, resources: dict | None = None) -> dict:
    body = {"model": str(model), "recipe": recipe, "output": output,
            "dataset": {"source": str(WIKI_VALID), "num_samples": 32, "seq_len": 64, "seed": 0}}
    return {**body, **({"resources": resources} if resources else {})}


def files(folder: Path) -> dict[str, str]:
    """sha256 of every published file but the manifest and the report (which holds timings)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.name not in (MANIFEST_NAME, "compression_report.json")}


def run(store, settings, job_id, roots=(FIXTURES,), workers=None):
    return run_job(store, job_id, settings, input_roots=roots, workers=workers)


def stop_at(env, body, at, error=None, roots=(FIXTURES,), workers=None):
    """Create the job and run it until the progress of layer ``at``; the job as the stop left it."""
    store, settings, tmp = env
    job, _ = store.create_job("alice", body)
    stopping = StoppingStore(settings.database_url, at, error or Stop())
    try:
        try:
            run(stopping, settings, job.id, roots, workers)
        except Stop:
            pass
    finally:
        stopping.close()
    return store.get(job.id)


def events(store, job_id, kind):
    return [e.data for e in store.events(job_id) if e.type == kind]


# GPTQ W4 with zero points in groups of 16 (packed int4, int8 zero points): the weights a resumed run propagates
# with are decompressed from the shard, and must be the very values the killed run had.
GPTQ_W4_ASYM = """\
quantization_stage:
  quantization_modifiers:
    GPTQModifier:
      ignore: [lm_head]
      config_groups:
        group_0:
          targets: [Linear]
          weights: {num_bits: 4, type: int, symmetric: false, strategy: group, group_size: 4}
"""


@pytest.mark.parametrize("recipe,workers", [
    (RECIPE_2OF4, None), (RECIPE_2OF4, 2), ((RECIPES / "spinquant_gptq_w4.yaml").read_text(), None),
    ((RECIPES / "spinquant_gptq_w4.yaml").read_text(), 2), (GPTQ_W4_ASYM, None),
], ids=["2of4-one-worker", "2of4-two-workers", "rotated-gptq-one-worker", "rotated-gptq-two-workers",
        "gptq-asym-one-worker"])
def test_a_run_stopped_after_block_2_resumes_at_block_3_with_the_same_bytes(env, recipe, workers):
    store, settings, tmp = env
    pools = (lambda resources: LocalPool(workers)) if workers else None
    whole, _ = store.create_job("alice", request("runs/whole", recipe=recipe))
    assert run(store, settings, whole.id, workers=pools).status == "succeeded"

    job = stop_at(env, request("runs/stopped", recipe=recipe), at=2, workers=pools)
    assert job.status == "running"  # a killed worker's job, until someone takes it back
    assert [c["block"] for c in store.checkpoints(job.id)] == [0, 1]
    out = tmp / "artifacts" / "runs" / "stopped"
    assert not (out / MANIFEST_NAME).exists() and len(list(out.glob("*.safetensors"))) >= 2  # kept, unpublished
    assert store.transition(job.id, sorted(ACTIVE), "queued", attempt=job.attempt)  # what recovery does

    job = run(store, settings, job.id, workers=pools)
    assert job.status == "succeeded", job.error
    assert events(store, job.id, "resumed") == [{"layer": 3, "layers": LAYERS}]
    assert job.progress["resumed"] == {"layer": 3, "layers": LAYERS}
    assert files(out) == files(tmp / "artifacts" / "runs" / "whole")
    assert len(job.report["layers"]) == LAYERS and len(job.metrics["layers"]) == LAYERS  # every block reported
    assert store.checkpoints(job.id) == []  # published: nothing more to resume


def test_a_retried_failed_job_resumes_from_its_checkpoints(env):
    store, settings, tmp = env
    job = stop_at(env, request("runs/retried"), at=3, error=OSError("the disk went away"))
    assert job.status == "failed" and job.attempt == 1
    assert [c["block"] for c in store.checkpoints(job.id)] == [0, 1, 2]  # a failure keeps the finished blocks
    job = store.retry(job.id, "alice", output_location=output_location(job.request["output"], settings))
    job = run(store, settings, job.id)
    assert job.status == "succeeded" and job.attempt == 2, job.error
    assert events(store, job.id, "resumed") == [{"layer": 4, "layers": LAYERS}]


def test_a_changed_recipe_starts_over_and_says_so(env):
    store, settings, tmp = env
    job = stop_at(env, request("runs/changed"), at=2)
    other = (RECIPES / "sparsegpt_50.yaml").read_text()
    with store.session() as s:  # the recipe changed under the same job id
        s.execute(update(JobRow).where(JobRow.id == job.id).values(request={**job.request, "recipe": other}))
    store.transition(job.id, sorted(ACTIVE), "queued", attempt=job.attempt)
    job = run(store, settings, job.id)
    assert job.status == "succeeded", job.error
    assert events(store, job.id, "resumed") == []
    assert events(store, job.id, "checkpoint") == [
        {"resumed": False, "reason": "started over: the recipe changed since the checkpoints were made"}]
    assert "resumed" not in job.progress
    assert job.report["totals"]["sparsity"] == pytest.approx(0.5)


def test_changed_model_files_start_over_and_say_so(env):
    store, settings, tmp = env
    model = tmp / "inputs" / "stories260K"
    shutil.copytree(STORIES, model)
    job = stop_at(env, request("runs/model", model=model), at=2, roots=(tmp / "inputs", FIXTURES))
    weights = next(model.glob("*.safetensors"))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # rewritten (a new upload of the model)
    store.transition(job.id, sorted(ACTIVE), "queued", attempt=job.attempt)
    job = run(store, settings, job.id, roots=(tmp / "inputs", FIXTURES))
    assert job.status == "succeeded", job.error
    assert events(store, job.id, "checkpoint") == [
        {"resumed": False, "reason": "started over: the model files changed since the checkpoints were made"}]


def test_a_shard_changed_in_the_output_is_computed_again(env):
    store, settings, tmp = env
    whole, _ = store.create_job("alice", request("runs/whole"))
    assert run(store, settings, whole.id).status == "succeeded"
    job = stop_at(env, request("runs/tampered"), at=3)
    shard = tmp / "artifacts" / "runs" / "tampered" / store.checkpoints(job.id)[1]["shard"]
    shard.write_bytes(shard.read_bytes()[:-1] + b"\0")
    store.transition(job.id, sorted(ACTIVE), "queued", attempt=job.attempt)
    job = run(store, settings, job.id)
    assert job.status == "succeeded", job.error
    assert events(store, job.id, "resumed") == [{"layer": 2, "layers": LAYERS}]  # block 1 is done again
    assert [e["block"] for e in events(store, job.id, "checkpoint")] == [1]
    assert files(tmp / "artifacts" / "runs" / "tampered") == files(tmp / "artifacts" / "runs" / "whole")


def test_a_cancelled_job_keeps_no_checkpoint_and_no_file(env):
    store, settings, tmp = env

    class Cancelling(JobStore):
        def set_progress(self, job_id, progress, *args, **kwargs):
            if progress.get("layer") == 2:
                self.request_cancel(job_id)
            return super().set_progress(job_id, progress, *args, **kwargs)

    job, _ = store.create_job("alice", request("runs/cancelled"))
    cancelling = Cancelling(settings.database_url)
    try:
        assert run(cancelling, settings, job.id).status == "cancelled"
    finally:
        cancelling.close()
    assert store.checkpoints(job.id) == []
    out = tmp / "artifacts" / "runs" / "cancelled"
    assert not out.exists() or not any(out.iterdir())


def test_a_recipe_that_cannot_resume_yet_starts_over_and_says_why(env):
    store, settings, tmp = env
    recipe = (RECIPES / "sparsegpt_2of4_gptq_w4.yaml").read_text()
    job = stop_at(env, request("runs/quantized", recipe=recipe), at=2)
    assert store.checkpoints(job.id) == []  # nothing recorded that could not be resumed from
    store.transition(job.id, sorted(ACTIVE), "queued", attempt=job.attempt)
    job = run(store, settings, job.id)
    assert job.status == "succeeded", job.error
    assert events(store, job.id, "resumed") == []
