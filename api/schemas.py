"""The HTTP contract: request and response bodies of the job API, with the examples the OpenAPI document shows.

These models say what a caller may send and will get back; the checks that need the engine (the recipe parses, a
location is inside the artifacts folder, ranges) are ``service.jobs.request.JobRequest``'s, which the body becomes,
and the API turns its OptionsError into a 422 naming the field. A dataset here is the engine's ``Calibration``
(``service.engine.options``) as far as the service exposes it, and ``resources`` the job request's own
``Resources`` (``service.jobs.request``): their defaults and descriptions are read from there.
Responses are built from the stored job with the webhook secret removed (``service.jobs.webhook.webhook_payload``)
and then pass through these models, so a field that is not declared here never reaches a caller.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from service.engine.options import Calibration
from service.jobs.request import MAX_CPUS_PER_WORKER, MAX_WORKERS, Resources

_CALIBRATION = Calibration.model_fields
_RESOURCES = Resources.model_fields

JobStatus = Literal["queued", "running", "uploading", "succeeded", "failed", "cancelled"]

RECIPE_YAML_EXAMPLE = """\
sparsity_stage:
  sparsity_modifiers:
    SparseGPTModifier:
      sparsity: 0.5
      mask_structure: "2:4"
      targets: ["Linear"]
      ignore: ["re:.*lm_head"]
"""

JOB_CREATE_EXAMPLE = {
    "model": "s3://models/stories260K",
    "recipe": RECIPE_YAML_EXAMPLE,
    "dataset": {"source": "s3://datasets/wikitext-2/valid.txt", "num_samples": 128, "seq_len": 256, "seed": 0},
    "output": "s3://releases/stories260K-2of4/",
    "eval": {"source": "s3://datasets/wikitext-2/test.txt", "max_ppl_ratio": 1.5},
    "labels": {"team": "release", "model": "stories260K"},
    "webhook": {"url": "https://ci.example.com/hooks/llmpress", "secret": "whsec_change_me"},
}

_REQUEST_VIEW_EXAMPLE = {**JOB_CREATE_EXAMPLE, "webhook": {"url": "https://ci.example.com/hooks/llmpress"}}
_REQUEST_VIEW_EXAMPLE.pop("labels")

MANIFEST_EXAMPLE = {
    "uri": "s3://releases/stories260K-2of4",
    "key": "manifest.json",
    "created_at": "2025-01-01T12:03:10+00:00",
    "total_size": 1123456,
    "files": [
        {"key": "model.safetensors", "size": 1049000, "sha256": "9f2c" + "0" * 60},
        {"key": "config.json", "size": 612, "sha256": "4be1" + "0" * 60},
    ],
    "extra": {"job_id": "k3v9x0q2m1ab", "recipe": "SparseGPTModifier(sparsity=0.5, 2:4)"},
}

JOB_EXAMPLE = {
    "id": "k3v9x0q2m1ab",
    "owner": "release-pipeline",
    "status": "running",
    "created_at": "2025-01-01T12:00:00+00:00",
    "started_at": "2025-01-01T12:00:01+00:00",
    "finished_at": None,
    "updated_at": "2025-01-01T12:01:30+00:00",
    "attempt": 1,
    "cancel_requested": False,
    "request": _REQUEST_VIEW_EXAMPLE,
    "labels": {"team": "release", "model": "stories260K"},
    "progress": {"stage": "compressing", "layer": 3, "layers": 5, "fraction": 0.6,
                 "workers": [{"rank": 0, "node_id": "5f1c" + "0" * 52, "node_ip": "10.0.0.12", "cpus": 1, "gpus": 0}]},
    "metrics": {
        "layers": {"2": {"name": "model.layers.2", "sparsity": 0.5, "seconds": 0.41}},
        "modules": {"model.layers.2.mlp.down_proj": {"layer": 2, "sparsity": 0.5, "loss": 0.0123, "seconds": 0.08}},
    },
    "report": None,
    "artifacts": None,
    "error": None,
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Request(BaseModel):
    # A field the service does not know is refused (a typo must not be silently ignored).
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------------------------------- requests


class DatasetSpec(_Request):
    """Calibration text: samples of ``seq_len`` tokens drawn from ``source``."""

    source: str = Field(description="A .txt or .jsonl (with a 'text' field) file: s3://bucket/key or a local path "
                                    "under the service's artifacts folder.",
                        examples=["s3://datasets/wikitext-2/valid.txt"])
    # The engine's own defaults and descriptions (service.engine.options.Calibration); the checks are its too.
    num_samples: int = Field(_CALIBRATION["num_samples"].default, description=_CALIBRATION["num_samples"].description)
    seq_len: int = Field(_CALIBRATION["seq_len"].default, description=_CALIBRATION["seq_len"].description)
    seed: int = Field(_CALIBRATION["seed"].default, description=_CALIBRATION["seed"].description)


class EvalGate(_Request):
    """The quality gate: perplexity before and after on ``source``; the job fails when after/before exceeds
    ``max_ppl_ratio``, and nothing is published."""

    source: str = Field(description="Evaluation text: s3://bucket/key or a local path under the artifacts folder.",
                        examples=["s3://datasets/wikitext-2/test.txt"])
    max_ppl_ratio: float = Field(description="Largest accepted compressed/dense perplexity ratio, > 0.",
                                 examples=[1.5])
    max_tokens: int | None = Field(None, description="Evaluate on at most this many tokens (default: all).")


class WebhookSpec(_Request):
    """Where to POST the job on every terminal state, signed ``X-Llmpress-Signature: sha256=<HMAC-SHA256 of the
    body keyed with secret>``. The secret is never returned by the API."""

    url: str = Field(description="https:// URL whose host resolves to public addresses only (http:// and private "
                                 "networks only where the server's LLMPRESS_WEBHOOK_ALLOW* settings allow them); "
                                 "checked at submit and again before each delivery, redirects not followed.",
                     examples=["https://ci.example.com/hooks/llmpress"])
    secret: str = Field(description="HMAC key, 1 to 1024 characters; write-only.", examples=["whsec_change_me"])


def _integer(low: int, high: int):
    """An integer from ``low`` to ``high`` in the document, taken as sent: JobRequest's ``Resources`` checks it,
    so a 422 says "resources.workers must be >= 1, got 0" (and a JSON true is no integer, as there)."""
    return Annotated[Any, WithJsonSchema({"type": "integer", "minimum": low, "maximum": high})]


class ResourcesSpec(_Request):
    """The Ray workers the job runs on: ``workers`` of them at once, each taking ``cpus_per_worker`` CPUs and
    ``gpus_per_worker`` GPUs on one node. A request the cluster's nodes could never hold (more workers than fit, a
    worker larger than any node, a GPU on a cluster without one) is a 422 naming the field."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"workers": 2, "cpus_per_worker": 4}]})

    workers: _integer(1, MAX_WORKERS) = Field(_RESOURCES["workers"].default,
                                              description=_RESOURCES["workers"].description, examples=[2])
    gpus_per_worker: _integer(0, 1) | None = Field(_RESOURCES["gpus_per_worker"].default,
                                                   description=_RESOURCES["gpus_per_worker"].description,
                                                   examples=[0])
    cpus_per_worker: _integer(1, MAX_CPUS_PER_WORKER) = Field(_RESOURCES["cpus_per_worker"].default,
                                                              description=_RESOURCES["cpus_per_worker"].description,
                                                              examples=[4])


class JobCreate(_Request):
    """A compression job: which model, which recipe, calibrated on what, published where, gated how."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [JOB_CREATE_EXAMPLE]})

    model: str = Field(description="The model: s3://bucket/prefix, a local folder under the artifacts folder, or "
                                   "a Hugging Face Hub id (when the service is online).",
                       examples=["s3://models/stories260K"])
    recipe: str | list[dict[str, Any]] = Field(
        description="The recipe in llm-compressor's format: YAML (or JSON) text, or a list of modifier objects "
                    'such as [{"SparseGPTModifier": {"sparsity": 0.5, "mask_structure": "2:4"}}].',
        examples=[RECIPE_YAML_EXAMPLE],
    )
    dataset: DatasetSpec | None = Field(None, description="Calibration data. Required when the recipe calibrates "
                                                          "on data: SparseGPT, Wanda, OWL sparsity profiles, GPTQ "
                                                          "(without it the request is a 422 `dataset is required`); "
                                                          "optional for data-free recipes (magnitude pruning, "
                                                          "round-to-nearest QuantizationModifier).")
    output: str = Field(description="Where the compressed model is published: a folder s3://bucket/prefix/ (not a "
                                    "whole bucket), or a relative path or file:// URI inside the artifacts folder. "
                                    "The job claims the folder when it is accepted: a folder another job claims "
                                    "(the same, one inside it or one around it) is a 409, and a failed or "
                                    "cancelled job gives its folder up again.",
                        examples=["s3://releases/stories260K-2of4/"])
    overwrite: bool = Field(False, description="Replace the output of your own succeeded job at exactly this "
                                               "location (the old manifest is removed first). Never takes over "
                                               "a location another tenant's job, or a job still in flight, holds.")
    eval: EvalGate | None = Field(None, description="Optional quality gate.")
    # The limits are the job store's (service.jobs.job_store._check_labels, a 422 naming `labels`); stated in the
    # document so that a client (and the contract test) knows them.
    labels: dict[str, str] | None = Field(None, description="Free-form string labels, filterable in GET /v1/jobs "
                                                            "(at most 64; keys of 1 to 128 characters without '=' "
                                                            "or ',', values of at most 256).",
                                          examples=[{"team": "release"}],
                                          json_schema_extra={"maxProperties": 64,
                                                             "propertyNames": {"pattern": "^[^=,]{1,128}$"},
                                                             "additionalProperties": {"type": "string",
                                                                                      "maxLength": 256}})
    webhook: WebhookSpec | None = Field(None, description="Optional webhook notified on every terminal state.")
    resources: ResourcesSpec | None = Field(None, description="The Ray workers the job runs on (default: one "
                                                              "worker of 1 CPU, with a GPU when the cluster has "
                                                              "one).")


# -------------------------------------------------------------------------------------------------- responses


class WorkerView(_Model):
    """One Ray worker of a job, as it started."""

    rank: int = Field(description="0 to workers - 1.", examples=[0])
    node_id: str | None = Field(None, description="The Ray node it runs on (hex).", examples=["a1b2c3" + "0" * 50])
    node_ip: str | None = Field(None, description="That node's address.", examples=["10.0.0.12"])
    cpus: int | float | None = Field(None, description="CPUs it holds.", examples=[1])
    gpus: int | float | None = Field(None, description="GPUs it holds.", examples=[0])
    device: str | None = Field(None, description="The torch device it computes on.", examples=["cuda"])


class Resumed(_Model):
    """This attempt went on from a per-layer checkpoint: ``layer`` is the first layer computed again (from 1)."""

    layer: int = Field(examples=[3])
    layers: int = Field(examples=[5])


class Progress(_Model):
    """Where a running job is: ``layer`` counts blocks from 1 to ``layers``; ``fraction`` goes 0 to 1."""

    stage: str | None = Field(None, examples=["compressing"])
    layer: int | None = Field(None, examples=[3])
    layers: int | None = Field(None, examples=[5])
    fraction: float | None = Field(None, examples=[0.6])
    workers: list[WorkerView] | None = Field(None, description="The job's Ray workers, while it runs and after.")
    resumed: Resumed | None = Field(None, description="Set when this attempt resumed from a per-layer checkpoint.")
    waiting: str | None = Field(None, description="What a queued job waits for.",
                                examples=["2 workers of 1 CPU each: 1 CPU free in the cluster"])


class WebhookView(_Model):
    url: str


class EvalView(_Model):
    source: str
    max_ppl_ratio: float
    max_tokens: int | None = None


class JobRequestView(_Model):
    """The request as the service accepted it, defaults filled in, the webhook secret left out."""

    model: str
    recipe: str | list[dict[str, Any]]
    dataset: DatasetSpec | None = None
    output: str
    eval: EvalView | None = None
    webhook: WebhookView | None = None
    resources: ResourcesSpec | None = None


class FileEntry(_Model):
    key: str = Field(description="Path relative to the output location.", examples=["model.safetensors"])
    size: int = Field(description="Bytes.", examples=[1049000])
    sha256: str = Field(description="Lower-case hex sha256 of the file's bytes.")


class Manifest(_Model):
    """A published output, as its manifest.json (written last) records it."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [MANIFEST_EXAMPLE]})

    uri: str = Field(description="The output location.")
    key: str = Field(description="The manifest's own key under it.")
    created_at: str = ""
    total_size: int = Field(description="Bytes, all files together.")
    files: list[FileEntry]
    extra: dict[str, Any] = Field(default_factory=dict, description="Job id, recipe, totals and perplexities.")


class Artifacts(_Model):
    uri: str = Field(description="The output location.")
    manifest: Manifest


class Job(_Model):
    """A job as the API shows it. ``status`` moves queued -> running -> uploading -> succeeded, or ends failed or
    cancelled; a succeeded job never changes again, and a failed or cancelled one only when it is retried."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [JOB_EXAMPLE]})

    id: str = Field(description="12 lower-case letters and digits.", examples=["k3v9x0q2m1ab"])
    owner: str = Field(description="The API key name (tenant) that submitted the job.")
    status: JobStatus
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime
    attempt: int = Field(1, description="1, plus one each time a lost worker's job was queued again or the job "
                                        "was retried.")
    cancel_requested: bool = False
    request: JobRequestView
    labels: dict[str, str] = Field(default_factory=dict)
    progress: Progress = Field(default_factory=Progress)
    metrics: dict[str, Any] = Field(default_factory=dict,
                                    description="Per-layer ('layers', by block index) and per-module ('modules') "
                                                "figures: sparsity, loss, seconds.")
    report: dict[str, Any] | None = Field(None, description="The compression report once the engine finished: "
                                                            "totals, per-layer figures, perplexities and the "
                                                            "quality_gate when eval was set.")
    artifacts: Artifacts | None = Field(None, description="Set when the job succeeded.")
    error: str | None = Field(None, description="What went wrong, for a person to act on (failed jobs).")


class JobList(_Model):
    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [{"items": [JOB_EXAMPLE],
                                                                               "next_cursor": "WyIyMDI1LTAx"}]})

    items: list[Job] = Field(description="Newest first.")
    next_cursor: str | None = Field(None, description="Pass as ?cursor= for the next page; null on the last page.")


class Event(_Model):
    """One entry of a job's event stream: ``status`` changes, ``progress`` (with per-layer metrics), and
    ``cancel_requested``. Ids increase; poll with ?after=<last id>."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [
        {"id": 7, "job_id": "k3v9x0q2m1ab", "created_at": "2025-01-01T12:01:30+00:00", "type": "progress",
         "data": {"progress": {"stage": "compressing", "layer": 3, "layers": 5, "fraction": 0.6}}},
    ]})

    id: int
    job_id: str
    created_at: datetime
    type: str = Field(examples=["progress"])
    data: dict[str, Any]


class ArtifactFile(FileEntry):
    url: str | None = Field(None, description="A presigned GET URL (S3 outputs), valid for `expires_in` seconds.")


class ArtifactsResponse(_Model):
    """A succeeded job's published files, each with its size and sha256, and presigned URLs for S3 outputs."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [{
        "job_id": "k3v9x0q2m1ab", "uri": MANIFEST_EXAMPLE["uri"], "manifest_key": "manifest.json",
        "manifest_url": "https://releases.s3.amazonaws.com/stories260K-2of4/manifest.json?X-Amz-Signature=...",
        "created_at": MANIFEST_EXAMPLE["created_at"], "total_size": MANIFEST_EXAMPLE["total_size"],
        "expires_in": 3600,
        "files": [{**f, "url": f"https://releases.s3.amazonaws.com/stories260K-2of4/{f['key']}?X-Amz-Signature=..."}
                  for f in MANIFEST_EXAMPLE["files"]],
        "extra": MANIFEST_EXAMPLE["extra"],
    }]})

    job_id: str
    uri: str
    manifest_key: str
    manifest_url: str | None = None
    created_at: str = ""
    total_size: int
    expires_in: int | None = Field(None, description="Seconds the URLs stay valid; null when there are none.")
    files: list[ArtifactFile]
    extra: dict[str, Any] = Field(default_factory=dict)


class Health(_Model):
    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [{"status": "ok"}]})

    status: str


class Readiness(_Model):
    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [
        {"status": "ready", "checks": {"store": "ok", "workers": "ok"}}]})

    status: Literal["ready", "not ready"]
    checks: dict[str, str] = Field(description="Each dependency: 'ok' or what is wrong.")


class ErrorDetail(_Model):
    """Every refusal but invalid input: ``detail`` says what is wrong, for a person to act on."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [{"detail": "job not found"}]})

    detail: str | list[dict[str, Any]]


class InvalidField(_Model):
    loc: list[str | int] = Field(description="Where: 'body', 'query', 'header' or 'path', then the field's path "
                                             "(a number: a list index, or the character offset of a JSON error).",
                                 examples=[["body", "dataset", "num_samples"]])
    msg: str = Field(description="What is wrong with it; the input itself is never echoed.")
    type: str = Field(description="The kind of error, e.g. value_error, missing, json_invalid.")


class ValidationErrors(_Model):
    """422: the request was read but is not valid; one entry per problem, each naming its field."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [{"detail": [
        {"loc": ["body", "dataset", "num_samples"], "msg": "dataset.num_samples must be >= 1, got 0",
         "type": "value_error"}]}]})

    detail: list[InvalidField]
