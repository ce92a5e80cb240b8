"""Run one queued job to a terminal state: fetch inputs, compress, gate on quality, publish, notify.

One job, followed forward::

    (accepted: the API checked the request and the job store claimed its output folder for it)
    queued -> running      (compare-and-set: only one worker ever gets past this line)
      validate the request again, refuse a location that already holds a manifest (unless this job took over its
      tenant's own succeeded output with overwrite), fetch S3 inputs into the work folder
      compress_checkpoint into <workdir>/<job id>/output, progress and metrics to the store after every layer,
      stopping between layers when a cancel was requested; each weight shard is uploaded (in the background)
      as soon as it is written
      quality gate (eval.max_ppl_ratio)
    running -> uploading -> the other files, then the manifest (last) -> succeeded
    any error -> failed (a message a person can act on: a full or read-only disk names the file and the place);
    a cancel -> cancelled; either gives the output folder up
    the work folder is removed; the webhook, if any, is told about the terminal state

The manifest is written last (a conditional create), and the job's Publisher deletes what it wrote itself when
anything fails or the job is cancelled, so a failed or cancelled job never leaves a manifest behind (nor, as far as
deletes succeed, shards) and never deletes what another writer put there.
Every store write after the job is taken names the attempt it was taken as (a fencing token), so a worker that was
presumed lost changes nothing once the job was re-queued. This module knows nothing of Ray or HTTP: ``workers/``
calls :func:`run_job`; the request's checks are ``service.jobs.request`` (the API's 422s), the webhook's
``service.jobs.webhook``.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from service.engine.model_source import HUB_ID, CheckpointError
from service.engine.data_parallel import WorkerLost, WorkerPool
from service.jobs.checkpoints import JobCheckpoints
from service.jobs.job_store import Job, JobStore
from service.jobs.request import EVAL_NAME, JobRequest, local_input
from service.jobs.request import input_roots as request_input_roots
from service.jobs.settings import Settings
from service.jobs.storage import LocalStore, Publisher, fetch
from service.jobs.webhook import notify

log = logging.getLogger(__name__)

_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.py"]


# Makes the workers a job asked for (request.resources; None: one worker, in this process). The Ray layer gives one
# (workers.ray_workers); the job runner itself knows nothing of Ray.
WorkerPools = Callable[[Any], "WorkerPool | None"]


class JobCancelled(Exception):
    """Raised from the progress callback to stop the engine between layers."""


class QualityGateFailed(ValueError):
    """The compressed model's perplexity ratio is above the request's eval.max_ppl_ratio; carries the report."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


# ------------------------------------------------------------------------------------------------- inputs


def _fetch_input(uri: str, dest: Path, field: str, roots: list[Path]) -> Path:
    """A local path for an input: S3 downloaded into ``dest``, a local path only inside one of ``roots``."""
    if uri.lower().startswith("s3:"):
        return fetch(uri, dest, field=field)
    root, _ = local_input(uri, field, roots)
    return fetch(uri, dest, field=field, local_root=root, confine=True)


def _resolve_model(model: str, dest: Path, roots: list[Path], settings: Settings):
    """``(local model directory, reader of its tensors or None)``: a model on S3 is read in place, tensor by tensor
    with ranged GETs (service.jobs.s3_checkpoint), and only its small files (config, tokenizer) are downloaded; a
    folder under the input roots or a Hub snapshot is read from its own files."""
    if model.lower().startswith("s3:"):
        from service.jobs.s3_checkpoint import S3Checkpoint, fetch_side_files

        checkpoint = S3Checkpoint(model)
        return fetch_side_files(model, dest), checkpoint
    if not model.lower().startswith("file:") and HUB_ID.match(model) and not os.path.isabs(model):
        if not any((root / model).exists() for root in roots):
            return _hub_snapshot(model, settings), None
    path = _fetch_input(model, dest, "model", roots)
    if not path.is_dir():
        raise CheckpointError(f"model: '{model}' is a file; give the model's folder (config.json and weights)")
    return path, None


def _hub_snapshot(repo_id: str, settings: Settings) -> Path:
    from service.engine.model_source import resolve_model_dir

    if not settings.hub_offline:
        return resolve_model_dir(repo_id)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, local_files_only=True))
    except Exception:
        raise CheckpointError(
            f"model: '{repo_id}' is not a folder the service can read and looks like a Hugging Face Hub id, but "
            "the service runs offline (LLMPRESS_HUB_OFFLINE / HF_HUB_OFFLINE) and the model is not in its Hub "
            "cache; upload the model to S3 or the artifacts folder and pass that location"
        ) from None


def _check_text(path: Path, field: str) -> None:
    """Read the head of a text source now, so an unreadable one fails before any work with its field named."""
    from service.engine.text_data import read_texts

    try:
        next(iter(read_texts(path)), None)
    except UnicodeDecodeError:
        raise ValueError(f"{field}: '{path.name}' is not UTF-8 text") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{field}: cannot read '{path.name}': {exc}") from None


# ---------------------------------------------------------------------------------------------------- progress


def _finite(value: Any) -> Any:
    """JSON-safe copy: NaN and infinities become None (the store refuses them; JSON cannot carry them)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _progress_callback(store: JobStore, job_id: str, attempt: int, extra: dict | None = None):
    """on_progress for compress_checkpoint: record progress and per-layer/per-module metrics, and stop the run
    (between layers) when the job was cancelled or is no longer ours. ``extra`` (filled in as the run goes: its
    workers, where it resumed) is part of every progress record."""

    def on_progress(event: dict) -> None:
        progress = {k: event[k] for k in ("stage", "layer", "layers", "fraction") if k in event}
        progress.update(extra or {})
        delta = None
        if "block" in event:
            block = dict(event["block"])
            # Metrics are keyed by block index (0-based, as in the report); progress["layer"] counts from 1.
            delta = {"layers": {str(block.pop("index")): block},
                     "modules": {name: {k: v for k, v in entry.items() if k != "memory_mb"}
                                 for name, entry in event.get("modules", {}).items()}}
        if not store.set_progress(job_id, _finite(progress), _finite(delta) if delta else None, attempt=attempt):
            raise JobCancelled("the job is no longer running")
        if store.cancel_requested(job_id):
            raise JobCancelled("cancel requested")

    return on_progress


# ------------------------------------------------------------------------------------------------------- a job


# What a person can do about an OS error, by errno; the others are reported as internal errors.
_OS_REMEDIES = {
    errno.ENOSPC: "free space there or choose another {place}",
    errno.EDQUOT: "the disk quota is used up: raise it or choose another {place}",
    errno.EROFS: "the file system is mounted read-only: choose another {place}",
    errno.EACCES: "the service may not write there: fix the folder's permissions or choose another {place}",
    errno.EPERM: "the service may not write there: fix the folder's permissions or choose another {place}",
    errno.EFBIG: "the file is larger than the file system allows: choose another {place}",
}


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**27 else f"{nbytes / 2**20:.1f} MiB"


def _free_space(path: Path) -> int | None:
    for folder in (path, *path.parents):
        try:
            return shutil.disk_usage(folder).free
        except OSError:
            continue
    return None


def _os_error_message(exc: OSError, folder: Path, output: str | None) -> str | None:
    """``no space left on device while writing model-00003-of-00006.safetensors to runs/x (12.0 MiB free there):
    free space there or choose another output; nothing was published``. None for an OS error a person cannot act
    on, or one that names no file (left to the internal-error message)."""
    remedy = _OS_REMEDIES.get(exc.errno)
    if remedy is None or not exc.filename:
        return None
    path = Path(os.fsdecode(exc.filename))
    if path.is_relative_to(folder):
        # The worker's scratch space, where shards are written before upload: the operator's to fix.
        where, place = f"the worker's work folder {folder.parent}", "work folder (the workers' TMPDIR)"
    else:
        where, place = output or path.parent.as_uri(), "output"
    free = _free_space(path.parent) if exc.errno in (errno.ENOSPC, errno.EDQUOT) else None
    left = f" ({_size(free)} free there)" if free is not None else ""
    reason = (exc.strerror or os.strerror(exc.errno)).lower()
    # A permission error may come from opening an input as well as from a write.
    doing = f"opening {path.name} in" if exc.errno in (errno.EACCES, errno.EPERM) else f"writing {path.name} to"
    return f"{reason} while {doing} {where}{left}: {remedy.format(place=place)}; nothing was published"


def _error_message(exc: BaseException, job_id: str, folder: Path, output: str | None) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, FileExistsError):
        message = _os_error_message(exc, folder, output)
        if message is not None:
            return message
    if isinstance(exc, (ValueError, FileExistsError)):  # ours: StorageError, CheckpointError, RecipeError, ...
        return str(exc) or type(exc).__name__
    return (f"internal error while running the job ({type(exc).__name__}); the worker log has the details "
            f"under job {job_id}")


def _gate(report: dict, gate) -> None:
    entry = report["perplexity"][EVAL_NAME]
    ratio = entry.get("ratio")  # None when a perplexity was not finite: that fails the gate too
    if ratio is not None and ratio <= gate.max_ppl_ratio:
        return

    def show(x):
        return "not finite" if x is None else f"{x:.4f}"

    raise QualityGateFailed(
        f"quality gate failed: perplexity ratio {show(ratio)} (compressed {show(entry.get('after'))} / dense "
        f"{show(entry.get('before'))} on {gate.source}) exceeds eval.max_ppl_ratio {gate.max_ppl_ratio:g}; "
        "nothing was published", report
    )


def _manifest_extra(job_id: str, report: dict) -> dict:
    extra = {"job_id": job_id, "recipe": report.get("recipe"), "totals": report.get("totals")}
    if "perplexity" in report:
        extra["perplexity"] = {k: {m: v.get(m) for m in ("before", "after", "ratio")}
                               for k, v in report["perplexity"].items()}
    return _finite(extra)


def _execute(store: JobStore, job: Job, settings: Settings, folder: Path, input_roots: list[Path],
             workers: WorkerPools | None = None) -> bool:
    """Everything between running and succeeded; raises on any failure or on a cancel. False when the job was
    ended elsewhere during the upload (its output is then removed again)."""
    # The webhook is checked again where it is used (notify, before each delivery): a DNS hiccup now must not
    # fail a job whose webhook was accepted at submit.
    request = JobRequest.parse({k: v for k, v in job.request.items() if k != "webhook"}, settings)
    extra: dict = {}
    on_progress = _progress_callback(store, job.id, job.attempt, extra)
    on_progress({"stage": "fetching", "fraction": 0.0})

    # Opening the publisher refuses a taken or unreachable output location now, not after the compression.
    # Each weight shard is uploaded as soon as it is written, while the next layer is compressed; leaving the
    # `with` on any error or cancel deletes what was uploaded. The manifest goes last, in finish().
    # Only a job that took over its tenant's own succeeded output (overwrite, checked when the job was accepted)
    # may replace a manifest it finds there.
    claim = store.output_claim(job.id)
    overwrite = bool(request.overwrite and claim is not None and claim[1] is not None)
    with Publisher(request.output, staging=folder / "staging", field="output", overwrite=overwrite,
                   local_root=Path(settings.artifacts_root), confine=True) as publisher:
        checkpoints = JobCheckpoints(store, job.id, job.attempt, publisher)
        try:
            return _compress_and_publish(store, job, request, publisher, folder, input_roots, on_progress, settings,
                                         checkpoints=checkpoints, workers=workers, extra=extra)
        except (JobCancelled, QualityGateFailed):
            # Nothing of this job's run is worth keeping: no later attempt may reuse its blocks.
            publisher.abort(discard_kept=True)
            checkpoints.discard()
            raise


def _compress_and_publish(store: JobStore, job: Job, request: JobRequest, publisher: Publisher, folder: Path,
                          input_roots: list[Path], on_progress, settings: Settings, *,
                          checkpoints: JobCheckpoints | None = None, workers: WorkerPools | None = None,
                          extra: dict | None = None) -> bool:
    from service.engine.compress import compress_checkpoint

    job_id = job.id
    inputs = folder / "inputs"
    model_dir, checkpoint = _resolve_model(request.model, inputs / "model", input_roots, settings)
    dataset_path = eval_path = None
    if request.dataset is not None:
        dataset_path = _fetch_input(request.dataset.source, inputs / "dataset", "dataset.source", input_roots)
        _check_text(dataset_path, "dataset.source")
    gate = request.eval
    if gate is not None:
        eval_path = _fetch_input(gate.source, inputs / "eval", "eval.source", input_roots)
        _check_text(eval_path, "eval.source")

    output_dir = folder / "output"
    options = request.compression_options(model=model_dir, dataset=dataset_path, eval_source=eval_path,
                                          output=output_dir)
    extra = extra if extra is not None else {}
    pool = workers(request.resources) if workers is not None else None

    def progress(event: dict) -> None:
        # Where the workers run, once the blocks start (the pool is open by then): asking before would wait for
        # worker processes that are still starting while this one could be setting up.
        if pool is not None and "workers" not in extra and "layer" in event:
            extra["workers"] = pool.describe()
        on_progress(event)

    try:
        if checkpoints is not None:
            checkpoints.on_resumed = lambda resumed: extra.update(resumed=resumed)
        report = compress_checkpoint(options, on_progress=progress, workers=pool, checkpoint=checkpoint,
                                     checkpoints=checkpoints,
                                     on_shard=lambda path, name: _hand_over(publisher, path, name),
                                     after_checkpoint=lambda: _published_shards(publisher))
    finally:
        if pool is not None:
            pool.close()
    report.pop("output", None)  # the work folder, about to be removed
    report["source"] = {"model": request.model}
    if request.dataset is not None and report.get("calibration"):
        report["calibration"]["dataset"] = request.dataset.source
    if gate is not None:
        report["perplexity"][EVAL_NAME]["source"] = gate.source
        report["quality_gate"] = {"max_ppl_ratio": gate.max_ppl_ratio,
                                  "passed": bool(report["perplexity"][EVAL_NAME]["ratio"] <= gate.max_ppl_ratio)}
    report = _finite(report)
    if gate is not None:
        _gate(report, gate)

    if store.cancel_requested(job_id):
        raise JobCancelled("cancel requested")
    if not store.transition(job_id, ["running"], "uploading", attempt=job.attempt, report=report):
        raise JobCancelled("the job is no longer running")
    # From here the job runs to the end: publishing cleans up after itself only when it fails.
    store.set_progress(job_id, _finite({"stage": "uploading", "fraction": 1.0, **extra}), attempt=job.attempt)
    manifest = publisher.finish(output_dir, _manifest_extra(job_id, report))
    report["output"] = manifest.uri
    artifacts = {"uri": manifest.uri, "manifest": manifest.to_dict()}
    if not store.transition(job_id, ["uploading"], "succeeded", attempt=job.attempt, artifacts=artifacts,
                            report=report):
        now = store.get(job_id)
        if now is not None and now.attempt != job.attempt:
            # This worker was presumed lost and the job re-queued: the output location belongs to the new attempt.
            log.warning("job %s was taken over by attempt %d during this upload; leaving its output", job_id,
                        now.attempt)
            return False
        # Someone else ended the job while we uploaded: the output must not outlive it.
        log.warning("job %s ended elsewhere during upload; removing its published output", job_id)
        publisher.abort(discard_kept=True)
        return False
    if checkpoints is not None:
        checkpoints.discard()  # published: the output is complete, no block is ever computed again
    return True


def _hand_over(publisher: Publisher, path: Path, name: str) -> None:
    """Give a finished shard to the publisher, which holds it (a hard link in its staging folder) until it is
    uploaded, and drop the work folder's copy: a job's disk then holds the shards not yet uploaded, about one block,
    however large the model. The evaluation reads the uploaded copies (``_published_shards``)."""
    publisher.add(path, name)
    Path(path).unlink()


def _published_shards(publisher: Publisher):
    """A reader of the output's weight shards where they were uploaded, once all are: ranged GETs on S3, the
    folder itself for a local output."""
    from service.engine.model_source import SafetensorsCheckpoint
    from service.jobs.s3_checkpoint import S3Checkpoint

    publisher.wait()
    if isinstance(publisher.store, LocalStore):
        return SafetensorsCheckpoint(publisher.store.root)
    return S3Checkpoint(publisher.store.uri())


# How long a worker waits for a job store it cannot reach (a database restart or fail-over) before it gives up.
STORE_OUTAGE_SECONDS = 300.0


def _unreachable(exc: BaseException) -> bool:
    """Whether a job-store error says the database could not be reached (worth waiting for), not a bad statement."""
    from sqlalchemy.exc import DBAPIError, OperationalError

    return isinstance(exc, OperationalError) or (isinstance(exc, DBAPIError) and exc.connection_invalidated)


class _PatientStore:
    """The job store as a running job uses it: a call that fails because the database cannot be reached is tried
    again, with backoff, until the database answers or ``STORE_OUTAGE_SECONDS`` have passed, so a database restart
    costs the job a pause (between layers, or before a status change) instead of leaving it ``running`` with no
    worker. A status change tried again may have been committed before the connection broke: a False is then
    checked against the job as stored, so a lost reply is not taken for "another worker has the job"."""

    def __init__(self, store: JobStore, seconds: float = STORE_OUTAGE_SECONDS):
        self._store, self._seconds = store, seconds

    def __getattr__(self, name: str):
        method = getattr(self._store, name)
        if not callable(method):
            return method

        def patiently(*args, **kwargs):
            deadline, delay, retried = time.monotonic() + self._seconds, 0.2, False
            while True:
                try:
                    result = method(*args, **kwargs)
                except Exception as exc:
                    if not _unreachable(exc) or time.monotonic() + delay > deadline:
                        raise
                    log.warning("job store unreachable (%s); trying %s again in %.1f s", type(exc).__name__, name,
                                delay)
                    time.sleep(delay)
                    delay, retried = min(delay * 2, 5.0), True
                    continue
                if name == "transition" and result is False and retried:
                    return self._landed(*args, **kwargs)
                return result

        return patiently

    def _landed(self, job_id: str, from_statuses, to_status: str, *, attempt: int | None = None, **fields) -> bool:
        job = self._store.get(job_id)
        return (job is not None and job.status == to_status and (attempt is None or job.attempt == attempt)
                and fields.get("worker_ref", job.worker_ref) == job.worker_ref)


def run_job(store: JobStore, job_id: str, settings: Settings, *, workdir: Path | None = None,
            worker_ref: str | None = None, input_roots: Sequence[str | Path] = (),
            workers: WorkerPools | None = None) -> Job | None:
    """Run the queued job ``job_id`` to succeeded, failed or cancelled, exactly once; the job as it ends up.

    If the job is not queued (another worker has it, it was cancelled, it is finished) nothing is done and the job
    is returned as it is (None if there is no such job). Local inputs must lie under ``settings.artifacts_root`` or
    one of ``input_roots``; local outputs under ``settings.artifacts_root``. The work folder is
    ``workdir/<job id>`` (default: the system temporary folder), removed at the end whatever happened.

    A KeyboardInterrupt or SystemExit (the worker being stopped) leaves a job without a cancel request in its
    status for recovery to re-queue, and is re-raised. A job store that cannot be reached is waited for (see
    ``_PatientStore``). ``workers(resources)`` makes the workers the job asked for; a worker lost mid-run
    (``WorkerLost``) puts the job back in the queue (attempt + 1) for the caller to run again: it resumes from
    its per-block checkpoints.
    """
    store = _PatientStore(store)
    if not store.transition(job_id, ["queued"], "running", worker_ref=worker_ref):
        return store.get(job_id)
    folder = Path(workdir if workdir is not None else Path(tempfile.gettempdir()) / "llmpress-work") / job_id
    shutil.rmtree(folder, ignore_errors=True)  # a previous attempt's leftovers
    folder.mkdir(parents=True)
    started = time.perf_counter()
    job = store.get(job_id)
    ended = None
    try:
        if input_roots:  # the request is checked again against the roots this worker may read
            settings = settings.model_copy(
                update={"input_roots": (*settings.input_roots, *(str(root) for root in input_roots))})
        if _execute(store, job, settings, folder, request_input_roots(settings), workers):
            ended = "succeeded"
    except WorkerLost as exc:
        log.warning("job %s: %s; queued again to resume from its checkpoints", job_id, exc)
        store.add_event(job_id, "worker_lost", {"attempt": job.attempt, "error": str(exc)[:500]})
        if store.cancel_requested(job_id):
            if store.transition(job_id, ["running", "uploading"], "cancelled", attempt=job.attempt):
                ended = "cancelled"
        else:
            store.transition(job_id, ["running", "uploading"], "queued", attempt=job.attempt)
    except JobCancelled as exc:
        log.info("job %s stopped: %s", job_id, exc)
        if store.transition(job_id, ["running", "uploading"], "cancelled", attempt=job.attempt):
            ended = "cancelled"
    except Exception as exc:
        if isinstance(exc, (ValueError, FileExistsError)):
            log.info("job %s failed: %s", job_id, exc)
        else:
            log.exception("job %s failed with an unexpected error", job_id)
        output = (job.request or {}).get("output")
        fields = {"error": _error_message(exc, job_id, folder, output if isinstance(output, str) else None)}
        if isinstance(exc, QualityGateFailed):
            fields["report"] = exc.report
        if store.transition(job_id, ["running", "uploading"], "failed", attempt=job.attempt, **fields):
            ended = "failed"
    except BaseException:
        if store.cancel_requested(job_id):
            store.transition(job_id, ["running", "uploading"], "cancelled", attempt=job.attempt)
        raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    job = store.get(job_id)
    log.info("job %s %s after %.1f s", job_id, job.status, time.perf_counter() - started)
    if ended is not None:
        notify(job, settings)
    return job


