"""Run one queued job to a terminal state: fetch inputs, compress, gate on quality, publish, notify.

One job, followed forward::

    queued -> running      (compare-and-set: only one worker ever gets past this line)
      validate the request, refuse a location that is already published, fetch S3 inputs into the work folder
      compress_checkpoint into <workdir>/<job id>/output, progress and metrics to the store after every layer,
      stopping between layers when a cancel was requested; each weight shard is uploaded (in the background)
      as soon as it is written
      quality gate (eval.max_ppl_ratio)
    running -> uploading -> the other files, then the manifest (last) -> succeeded
    any error -> failed (a message a person can act on); a cancel -> cancelled
    the work folder is removed; the webhook, if any, is told about the terminal state

The manifest is written last, and the job's Publisher deletes what it uploaded when anything fails or the job is
cancelled, so a failed or cancelled job never leaves a manifest behind (nor, as far as deletes succeed, shards).
Every store write after the job is taken names the attempt it was taken as (a fencing token), so a worker that was
presumed lost changes nothing once the job was re-queued. This module knows nothing of Ray or HTTP: ``workers/``
calls :func:`run_job`, ``api/`` calls :func:`validate_request` to answer 422s.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from service.job_store import Job, JobStore, canonical_json
from service.model_source import CheckpointError
from service.recipe import RecipeError, load_recipe, recipe_summary
from service.settings import Settings
from service.storage import Publisher, StorageError, fetch, parse_uri

log = logging.getLogger(__name__)

REQUEST_FIELDS = ("model", "recipe", "dataset", "output", "eval", "webhook", "labels")
DEFAULT_NUM_SAMPLES = 128
DEFAULT_SEQ_LEN = 512
MAX_NUM_SAMPLES = 65_536
MAX_SEQ_LEN = 131_072
MAX_SECRET_CHARS = 1024
EVAL_NAME = "eval"

WEBHOOK_ATTEMPTS = 3
WEBHOOK_TIMEOUT_S = 5.0
WEBHOOK_BACKOFF_S = 1.0  # waits 1 s, then 2 s between attempts
SIGNATURE_HEADER = "X-Llmpress-Signature"
EVENT_HEADER = "X-Llmpress-Event"

# A Hugging Face Hub id: "name" or "owner/name" (as service.model_source accepts).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.py"]


class JobCancelled(Exception):
    """Raised from the progress callback to stop the engine between layers."""


class QualityGateFailed(ValueError):
    """The compressed model's perplexity ratio is above the request's eval.max_ppl_ratio; carries the report."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


# ------------------------------------------------------------------------------------------------ the request


def _mapping(value: Any, field: str) -> dict:
    if not isinstance(value, Mapping):
        raise ValueError(f"{field} must be an object, got {type(value).__name__}")
    return dict(value)


def _string(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{field} must be a non-empty string")
    return value


def _integer(value: Any, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{field} must be an integer, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{field} must be >= {low}, got {value}")
    if value > high:
        raise ValueError(f"{field} must be <= {high}, got {value}")
    return value


def _unknown_keys(given: Mapping, allowed: Sequence[str], field: str) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        where = f"{field}: " if field else ""
        raise ValueError(f"{where}unknown field(s) {', '.join(map(repr, unknown))} (allowed: {', '.join(allowed)})")


def _recipe(value: Any):
    """The Recipe of a request's recipe field: YAML/JSON text, a list of modifier objects, or a mapping."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise ValueError("recipe must not be empty")
        # load_recipe reads a string naming a file; a request must not make the worker read its own files.
        if "\n" not in text and (os.path.exists(text) or text.endswith((".yaml", ".yml", ".json"))):
            raise ValueError("recipe: give the recipe's YAML or JSON text, not a file path")
    elif not isinstance(value, (list, Mapping)):
        raise ValueError(f"recipe must be YAML text or a list of modifier objects, got {type(value).__name__}")
    try:
        return load_recipe(value if not isinstance(value, Mapping) else dict(value))
    except RecipeError as exc:
        message = str(exc)
        raise RecipeError(message if message.startswith("recipe") else f"recipe: {message}") from None


def _location(value: Any, field: str, settings: Settings | None, *, confine: bool) -> str:
    value = _string(value, field)
    root = Path(settings.artifacts_root) if settings is not None else None
    parse_uri(value, field=field, local_root=root, confine=confine)  # StorageError names the field
    return value


def validate_request(request: Mapping[str, Any], settings: Settings | None = None) -> dict:
    """The request with defaults filled in, or ValueError naming the field (StorageError and RecipeError are
    ValueErrors too). Checks presence, types and ranges, parses the recipe and the output location; does not touch
    storage (existence of inputs is the worker's to find out). ``settings`` gives the artifacts folder that local
    outputs are confined to (default ``./artifacts``). Messages never contain the webhook secret."""
    request = _mapping(request, "request")
    _unknown_keys(request, REQUEST_FIELDS, "")
    for name in ("model", "recipe", "output"):
        if name not in request:
            raise ValueError(f"{name} is required")
    out: dict[str, Any] = {}

    model = _string(request["model"], "model")
    if model.lower().startswith(("s3:", "file:")) or not _HUB_ID.match(model):
        parse_uri(model, field="model", local_root=Path(settings.artifacts_root) if settings else None)
    out["model"] = model

    recipe = _recipe(request["recipe"])
    out["recipe"] = request["recipe"]

    dataset = request.get("dataset")
    if dataset is not None:
        dataset = _mapping(dataset, "dataset")
        _unknown_keys(dataset, ("source", "num_samples", "seq_len", "seed"), "dataset")
        if "source" not in dataset:
            raise ValueError("dataset.source is required")
        out["dataset"] = {
            "source": _location(dataset["source"], "dataset.source", settings, confine=False),
            "num_samples": _integer(dataset.get("num_samples", DEFAULT_NUM_SAMPLES), "dataset.num_samples",
                                    1, MAX_NUM_SAMPLES),
            "seq_len": _integer(dataset.get("seq_len", DEFAULT_SEQ_LEN), "dataset.seq_len", 2, MAX_SEQ_LEN),
            "seed": _integer(dataset.get("seed", 0), "dataset.seed", 0, 2**63 - 1),
        }
    else:
        from service.oneshot import needs_data

        if needs_data(recipe.modifiers()):
            raise ValueError(f"dataset is required: {recipe_summary(recipe)} calibrates on data")

    out["output"] = _location(request["output"], "output", settings, confine=True)

    if request.get("eval") is not None:
        gate = _mapping(request["eval"], "eval")
        _unknown_keys(gate, ("source", "max_ppl_ratio", "max_tokens"), "eval")
        for name in ("source", "max_ppl_ratio"):
            if name not in gate:
                raise ValueError(f"eval.{name} is required")
        ratio = gate["max_ppl_ratio"]
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio <= 0:
            raise ValueError(f"eval.max_ppl_ratio must be a finite number > 0, got {ratio!r}")
        out["eval"] = {"source": _location(gate["source"], "eval.source", settings, confine=False),
                       "max_ppl_ratio": float(ratio)}
        if gate.get("max_tokens") is not None:
            out["eval"]["max_tokens"] = _integer(gate["max_tokens"], "eval.max_tokens", 2, 2**40)

    if request.get("webhook") is not None:
        hook = _mapping(request["webhook"], "webhook")
        _unknown_keys(hook, ("url", "secret"), "webhook")
        url = _string(hook.get("url"), "webhook.url")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("webhook.url must be an http:// or https:// URL")
        secret = hook.get("secret")
        if not isinstance(secret, str) or not secret or len(secret) > MAX_SECRET_CHARS:
            raise ValueError(f"webhook.secret must be a non-empty string of at most {MAX_SECRET_CHARS} characters")
        out["webhook"] = {"url": url, "secret": secret}

    if request.get("labels") is not None:
        labels = _mapping(request["labels"], "labels")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise ValueError("labels must map strings to strings")
        out["labels"] = labels
    return out


# ------------------------------------------------------------------------------------------------- inputs


def _input_roots(settings: Settings, extra: Sequence[str | Path]) -> list[Path]:
    return [Path(settings.artifacts_root), *map(Path, settings.input_roots), *map(Path, extra)]


def _fetch_input(uri: str, dest: Path, field: str, roots: list[Path]) -> Path:
    """A local path for an input: S3 downloaded into ``dest``, a local path only inside one of ``roots``."""
    if uri.lower().startswith("s3:"):
        return fetch(uri, dest, field=field)
    inside, errors = [], []
    for root in roots:
        try:
            inside.append((root, Path(parse_uri(uri, field=field, local_root=root, confine=True)[1])))
        except StorageError as exc:
            errors.append(exc)
    if not inside:
        if len(roots) > 1 and all("outside" in str(e) for e in errors):
            raise StorageError(f"{field}: '{uri}' is outside the folders jobs may read "
                               f"({', '.join(str(r.resolve()) for r in roots)})")
        raise errors[0]
    # A relative path is looked up under each root in turn; otherwise the "does not exist" of the first.
    root = next((root for root, path in inside if path.exists()), inside[0][0])
    return fetch(uri, dest, field=field, local_root=root, confine=True)


def _resolve_model(model: str, dest: Path, roots: list[Path], settings: Settings) -> Path:
    """A local model directory: downloaded from S3, a folder under the input roots, or a Hub snapshot."""
    if not model.lower().startswith(("s3:", "file:")) and _HUB_ID.match(model) and not os.path.isabs(model):
        if not any((root / model).exists() for root in roots):
            return _hub_snapshot(model, settings)
    path = _fetch_input(model, dest, "model", roots)
    if not path.is_dir():
        raise CheckpointError(f"model: '{model}' is a file; give the model's folder (config.json and weights)")
    return path


def _hub_snapshot(repo_id: str, settings: Settings) -> Path:
    from service.model_source import resolve_model_dir

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
    from service.text_data import read_texts

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


def _progress_callback(store: JobStore, job_id: str, attempt: int):
    """on_progress for compress_checkpoint: record progress and per-layer/per-module metrics, and stop the run
    (between layers) when the job was cancelled or is no longer ours."""

    def on_progress(event: dict) -> None:
        progress = {k: event[k] for k in ("stage", "layer", "layers", "fraction") if k in event}
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


def _error_message(exc: BaseException, job_id: str) -> str:
    if isinstance(exc, (ValueError, FileExistsError)):  # ours: StorageError, CheckpointError, RecipeError, ...
        return str(exc) or type(exc).__name__
    return (f"internal error while running the job ({type(exc).__name__}); the worker log has the details "
            f"under job {job_id}")


def _gate(report: dict, gate: dict) -> None:
    entry = report["perplexity"][EVAL_NAME]
    ratio = entry.get("ratio")  # None when a perplexity was not finite: that fails the gate too
    if ratio is not None and ratio <= gate["max_ppl_ratio"]:
        return

    def show(x):
        return "not finite" if x is None else f"{x:.4f}"

    raise QualityGateFailed(
        f"quality gate failed: perplexity ratio {show(ratio)} (compressed {show(entry.get('after'))} / dense "
        f"{show(entry.get('before'))} on {gate['source']}) exceeds eval.max_ppl_ratio {gate['max_ppl_ratio']:g}; "
        "nothing was published", report
    )


def _manifest_extra(job_id: str, report: dict) -> dict:
    extra = {"job_id": job_id, "recipe": report.get("recipe"), "totals": report.get("totals")}
    if "perplexity" in report:
        extra["perplexity"] = {k: {m: v.get(m) for m in ("before", "after", "ratio")}
                               for k, v in report["perplexity"].items()}
    return _finite(extra)


def _execute(store: JobStore, job: Job, settings: Settings, folder: Path, input_roots: list[Path]) -> bool:
    """Everything between running and succeeded; raises on any failure or on a cancel. False when the job was
    ended elsewhere during the upload (its output is then removed again)."""
    job_id = job.id
    request = validate_request(job.request, settings)
    artifacts_root = Path(settings.artifacts_root)
    on_progress = _progress_callback(store, job_id, job.attempt)
    on_progress({"stage": "fetching", "fraction": 0.0})

    # Opening the publisher refuses a taken or unreachable output location now, not after the compression.
    # Each weight shard is uploaded as soon as it is written, while the next layer is compressed; leaving the
    # `with` on any error or cancel deletes what was uploaded. The manifest goes last, in finish().
    with Publisher(request["output"], staging=folder / "staging", field="output", local_root=artifacts_root,
                   confine=True) as publisher:
        return _compress_and_publish(store, job, request, publisher, folder, input_roots, on_progress, settings)


def _compress_and_publish(store: JobStore, job: Job, request: dict, publisher: Publisher, folder: Path,
                          input_roots: list[Path], on_progress, settings: Settings) -> bool:
    from service.oneshot import EvalSet, compress_checkpoint

    job_id = job.id

    inputs = folder / "inputs"
    model_dir = _resolve_model(request["model"], inputs / "model", input_roots, settings)
    dataset = request.get("dataset")
    dataset_path = None
    if dataset is not None:
        dataset_path = _fetch_input(dataset["source"], inputs / "dataset", "dataset.source", input_roots)
        _check_text(dataset_path, "dataset.source")
    evals = []
    gate = request.get("eval")
    if gate is not None:
        eval_path = _fetch_input(gate["source"], inputs / "eval", "eval.source", input_roots)
        _check_text(eval_path, "eval.source")
        evals = [EvalSet(EVAL_NAME, eval_path, gate.get("max_tokens"))]

    output_dir = folder / "output"
    report = compress_checkpoint(
        model_dir, request["recipe"], output_dir,
        dataset=dataset_path,
        num_samples=dataset["num_samples"] if dataset else DEFAULT_NUM_SAMPLES,
        seq_len=dataset["seq_len"] if dataset else DEFAULT_SEQ_LEN,
        seed=dataset["seed"] if dataset else 0,
        evals=evals, on_progress=on_progress, on_shard=lambda path, name: publisher.add(path, name),
    )
    report.pop("output", None)  # the work folder, about to be removed
    report["source"] = {"model": request["model"]}
    if dataset is not None and report.get("calibration"):
        report["calibration"]["dataset"] = dataset["source"]
    if gate is not None:
        report["perplexity"][EVAL_NAME]["source"] = gate["source"]
        report["quality_gate"] = {"max_ppl_ratio": gate["max_ppl_ratio"],
                                  "passed": bool(report["perplexity"][EVAL_NAME]["ratio"] <= gate["max_ppl_ratio"])}
    report = _finite(report)
    if gate is not None:
        _gate(report, gate)

    if store.cancel_requested(job_id):
        raise JobCancelled("cancel requested")
    if not store.transition(job_id, ["running"], "uploading", attempt=job.attempt, report=report):
        raise JobCancelled("the job is no longer running")
    # From here the job runs to the end: publishing cleans up after itself only when it fails.
    store.set_progress(job_id, {"stage": "uploading", "fraction": 1.0}, attempt=job.attempt)
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
        publisher.abort()
        return False
    return True


def run_job(store: JobStore, job_id: str, settings: Settings, *, workdir: Path | None = None,
            worker_ref: str | None = None, input_roots: Sequence[str | Path] = ()) -> Job | None:
    """Run the queued job ``job_id`` to succeeded, failed or cancelled, exactly once; the job as it ends up.

    If the job is not queued (another worker has it, it was cancelled, it is finished) nothing is done and the job
    is returned as it is (None if there is no such job). Local inputs must lie under ``settings.artifacts_root`` or
    one of ``input_roots``; local outputs under ``settings.artifacts_root``. The work folder is
    ``workdir/<job id>`` (default: the system temporary folder), removed at the end whatever happened.

    A KeyboardInterrupt or SystemExit (the worker being stopped) leaves a job without a cancel request in its
    status for recovery to re-queue, and is re-raised.
    """
    if not store.transition(job_id, ["queued"], "running", worker_ref=worker_ref):
        return store.get(job_id)
    folder = Path(workdir if workdir is not None else Path(tempfile.gettempdir()) / "llmpress-work") / job_id
    shutil.rmtree(folder, ignore_errors=True)  # a previous attempt's leftovers
    folder.mkdir(parents=True)
    started = time.perf_counter()
    job = store.get(job_id)
    ended = None
    try:
        if _execute(store, job, settings, folder, _input_roots(settings, input_roots)):
            ended = "succeeded"
    except JobCancelled as exc:
        log.info("job %s stopped: %s", job_id, exc)
        if store.transition(job_id, ["running", "uploading"], "cancelled", attempt=job.attempt):
            ended = "cancelled"
    except Exception as exc:
        if isinstance(exc, (ValueError, FileExistsError)):
            log.info("job %s failed: %s", job_id, exc)
        else:
            log.exception("job %s failed with an unexpected error", job_id)
        fields = {"error": _error_message(exc, job_id)}
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
        _notify(job)
    return job


# ------------------------------------------------------------------------------------------------------ webhook


def webhook_payload(job: Job) -> dict:
    """The job as the webhook receives it: every field, the webhook secret left out."""
    body = job.to_dict()
    request = dict(body.get("request") or {})
    if isinstance(request.get("webhook"), Mapping):
        request["webhook"] = {k: v for k, v in request["webhook"].items() if k != "secret"}
    body["request"] = request
    return body


def signature(secret: str, body: bytes) -> str:
    """The X-Llmpress-Signature value: ``sha256=<hex HMAC-SHA256 of the body keyed with the secret>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # A redirect would re-send a signed body somewhere the submitter did not name.
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


def _safe_url(url: str) -> str:
    """scheme://host[:port] only: paths and queries of webhook URLs often hold tokens."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}/..."


def _notify(job: Job) -> bool:
    """POST the job to its webhook, if it has one: WEBHOOK_ATTEMPTS tries with backoff; True when delivered.
    Failures are logged and never change the job."""
    hook = (job.request or {}).get("webhook")
    if not isinstance(hook, Mapping) or not hook.get("url") or not hook.get("secret"):
        return False
    url, secret = hook["url"], hook["secret"]
    body = canonical_json(webhook_payload(job)).encode()
    headers = {"Content-Type": "application/json", "User-Agent": "llmpress-webhook",
               SIGNATURE_HEADER: signature(secret, body), EVENT_HEADER: f"job.{job.status}"}
    opener = urllib.request.build_opener(_NoRedirect)
    for attempt in range(1, WEBHOOK_ATTEMPTS + 1):
        try:
            with opener.open(urllib.request.Request(url, data=body, headers=headers, method="POST"),
                             timeout=WEBHOOK_TIMEOUT_S) as response:
                response.read()
            log.info("job %s: webhook %s delivered (job.%s)", job.id, _safe_url(url), job.status)
            return True
        except urllib.error.HTTPError as exc:
            why = f"HTTP {exc.code}"
            if 400 <= exc.code < 500 and exc.code not in (408, 429):
                log.warning("job %s: webhook %s refused the delivery (%s); not retrying", job.id, _safe_url(url), why)
                return False
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            why = f"{type(reason).__name__}: {reason}"
        log.warning("job %s: webhook %s attempt %d/%d failed (%s)", job.id, _safe_url(url), attempt,
                    WEBHOOK_ATTEMPTS, why)
        if attempt < WEBHOOK_ATTEMPTS:
            time.sleep(WEBHOOK_BACKOFF_S * 2 ** (attempt - 1))
    return False
