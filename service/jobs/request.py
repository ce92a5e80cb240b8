"""A job request, typed: what a tenant asked the service to compress, checked before it is stored.

``JobRequest.parse(body, settings)`` is the one check of a request, for the API (which answers a 422 naming the
field) and again for the worker that runs the stored job. Its calibration is the engine's own ``Calibration``
(the fields the HTTP contract exposes, ``DATASET_FIELDS``), its quality gate carries an evaluation's bounds, and
``compression_options`` turns it, once the inputs are fetched, into the ``CompressionOptions`` the engine takes:
no option is listed again between the request and the engine. ``to_dict`` is the form the job store keeps and the
API shows back (defaults filled in). ``Resources`` says how many Ray workers a job runs on and what each takes;
``cluster_fits`` is the one check of whether a cluster could ever hold them, for every dispatcher.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, ValidationInfo, field_validator, model_validator

from service.engine.model_source import HUB_ID
from service.engine.oneshot import needs_data
from service.engine.options import (
    Calibration, CompressionOptions, EvalTokens, Evaluation, FieldError, NonEmpty, Options, PositiveRatio,
    _integer, refuse_unknown,
)
from service.jobs.outbound import Policy, Refused, check_url
from service.jobs.settings import Settings
from service.jobs.storage import StorageError, location_key, parse_uri
from service.recipes.recipe import RecipeError, load_recipe, recipe_summary

# The calibration fields a job sets (the HTTP contract's DatasetSpec); sampling and batch size stay the engine's
# defaults for service jobs.
DATASET_FIELDS = ("source", "num_samples", "seq_len", "seed")
MAX_SECRET_CHARS = 1024
EVAL_NAME = "eval"
MAX_WORKERS = 64
MAX_CPUS_PER_WORKER = 256


def _settings(info: ValidationInfo) -> Settings | None:
    return info.context if isinstance(info.context, Settings) else None


def _location(value: str, field: str, info: ValidationInfo, *, confine: bool, folder: bool = False) -> str:
    """Refuse a location that could escape (StorageError names the field); local ones under the artifacts
    folder of ``settings`` (default ``./artifacts``)."""
    settings = _settings(info)
    parse_uri(value, field=field, local_root=Path(settings.artifacts_root) if settings else None, confine=confine,
              folder=folder)
    return value


def input_roots(settings: Settings) -> list[Path]:
    """The folders a job may read local inputs from: the artifacts folder, then LLMPRESS_INPUT_ROOTS."""
    return [Path(settings.artifacts_root), *map(Path, settings.input_roots)]


def local_input(uri: str, field: str, roots: Sequence[Path]) -> tuple[Path, Path]:
    """``(root, path)`` for a local input inside one of ``roots``: a relative path is looked up under each root
    in turn (the first where it exists, else the first it fits); StorageError naming the field otherwise."""
    inside, errors = [], []
    for root in roots:
        try:
            inside.append((root, Path(parse_uri(uri, field=field, local_root=root, confine=True)[1])))
        except StorageError as exc:
            errors.append(exc)
    if not inside:
        if len(roots) > 1 and all("outside" in str(e) for e in errors):
            raise StorageError(f"{field}: '{uri}' is outside the folders jobs may read "
                               f"({', '.join(str(r.resolve()) for r in roots)}); upload it there or to S3")
        raise errors[0]
    return next(((root, path) for root, path in inside if path.exists()), inside[0])


def _input(value: str, field: str, info: ValidationInfo) -> str:
    """An input location: S3 as it is; a local one only inside the folders jobs may read, when settings say which
    (the worker would refuse it later, after the job was accepted: refuse it now, naming the field)."""
    settings = _settings(info)
    try:
        if settings is None or value.lower().startswith("s3:"):
            return _location(value, field, info, confine=False)
        local_input(value, field, input_roots(settings))
    except StorageError as exc:  # with the field it names, also when checked from the enclosing object
        raise FieldError(str(exc), field=field) from None
    return value


def _secret(value: Any) -> Any:
    if not isinstance(value, str) or not value or len(value) > MAX_SECRET_CHARS:
        raise FieldError(f"must be a non-empty string of at most {MAX_SECRET_CHARS} characters")
    return value


class QualityGate(Options):
    """Perplexity before and after on ``source``; the job fails when after/before exceeds ``max_ppl_ratio``."""

    source: NonEmpty
    max_ppl_ratio: PositiveRatio
    max_tokens: EvalTokens | None = None

    @field_validator("source")
    @classmethod
    def _readable(cls, value: str, info: ValidationInfo) -> str:
        return _input(value, "eval.source", info)


class Webhook(Options):
    url: NonEmpty
    secret: Annotated[str, BeforeValidator(_secret)]

    @field_validator("url")
    @classmethod
    def _allowed(cls, value: str, info: ValidationInfo) -> str:
        """A URL the outbound policy of ``settings`` lets the server call (defaults: https, public addresses only);
        ``webhook.notify`` checks it again before each delivery, since DNS answers can change."""
        try:
            check_url(value, Policy.from_settings(_settings(info)))
        except Refused as exc:
            raise FieldError(str(exc)) from None
        return value


class Resources(Options):
    """The Ray workers one job runs on: ``workers`` bundles of ``cpus_per_worker`` CPUs and ``gpus_per_worker``
    GPUs, each bundle on one node."""

    workers: Annotated[int, _integer(1, MAX_WORKERS)] = Field(
        1, description=f"Ray workers the job runs on at once, 1 to {MAX_WORKERS}.")
    gpus_per_worker: Annotated[int, _integer(0, 1)] | None = Field(
        None, description="GPUs each worker takes, 0 or 1 (default: 1 when the cluster has a GPU, else 0).")
    cpus_per_worker: Annotated[int, _integer(1, MAX_CPUS_PER_WORKER)] = Field(
        1, description=f"CPUs each worker takes, 1 to {MAX_CPUS_PER_WORKER}.")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def cluster_fits(resources: Resources | None, nodes: Sequence[Mapping[str, float]]) -> None:
    """Whether a cluster whose alive nodes have these total resources (``{"CPU": 8.0, "GPU": 1.0, ...}`` each, as
    ``ray.nodes()[i]["Resources"]``) could ever hold the job's workers at once: each worker's bundle {CPU:
    cpus_per_worker, GPU: gpus_per_worker} must fit on one node by itself, and the nodes together must hold
    ``workers`` such bundles. None is the default request (one worker). Raises FieldError with ``field`` set
    (``resources.workers``, ``resources.gpus_per_worker`` or ``resources.cpus_per_worker``) and a message that
    starts with it, says what was asked for and what the cluster can hold; returns None when it fits."""
    resources = resources or Resources()
    has_gpu = any(node.get("GPU", 0) >= 1 for node in nodes)
    gpus = resources.gpus_per_worker if resources.gpus_per_worker is not None else int(has_gpu)
    cpus, workers = resources.cpus_per_worker, resources.workers
    if gpus and not has_gpu:
        field = "resources.gpus_per_worker"
        raise FieldError(f"{field}: {_plural(gpus, 'GPU')} per worker was asked for, but the cluster has no GPU; "
                         "use 0 or leave it out", field=field)
    bundle = _plural(cpus, "CPU") + (f" and {_plural(gpus, 'GPU')}" if gpus else "")
    # How many bundles each node holds by itself (a node without GPUs holds any number of GPU-less ones).
    held = [min(int(node.get("CPU", 0) // cpus), int(node.get("GPU", 0) // gpus) if gpus else workers)
            for node in nodes]
    # gpus_per_worker left out on a GPU cluster means a GPU each: say how to run on CPUs instead.
    hint = "; set gpus_per_worker to 0 to run the workers on CPUs" if gpus and resources.gpus_per_worker is None else ""
    if nodes and not any(held):
        field = "resources.cpus_per_worker"
        largest = max(node.get("CPU", 0) for node in nodes if not gpus or node.get("GPU", 0) >= gpus)
        where = "a node with a GPU" if gpus else "a node"
        raise FieldError(f"{field}: workers of {bundle} each were asked for, but no node of the cluster has that "
                         f"much by itself (a worker runs on one node; {where} has at most {largest:g} CPUs){hint}",
                         field=field)
    if sum(held) < workers:
        field = "resources.workers"
        asked = f"{_plural(workers, 'worker')} of {bundle} each {'was' if workers == 1 else 'were'} asked for"
        raise FieldError(f"{field}: {asked}, but the cluster's nodes can hold at most {sum(held)} at once{hint}",
                         field=field)


class JobRequest(Options):
    """A compression job: which model, which recipe, calibrated on what, published where, gated how."""

    model: NonEmpty
    recipe: Any
    dataset: Calibration | None = None
    output: NonEmpty
    eval: QualityGate | None = None
    webhook: Webhook | None = None
    labels: dict[str, str] | None = None
    overwrite: bool = False
    resources: Resources | None = None

    @field_validator("model")
    @classmethod
    def _model(cls, value: str, info: ValidationInfo) -> str:
        if value.lower().startswith(("s3:", "file:")) or not HUB_ID.match(value):
            return _input(value, "model", info)
        settings = _settings(info)
        if settings is not None and not os.path.isabs(value) and value.count("/") <= 1:
            # A Hub id, unless a folder of that name lies under an input root (the worker's order): check that one.
            roots = [root for root in input_roots(settings) if (root / value).exists()]
            if roots:
                local_input(value, "model", roots)
        return value

    @field_validator("recipe", mode="before")
    @classmethod
    def _recipe_text(cls, value: Any) -> Any:
        """YAML/JSON text, a list of modifier objects, or a mapping, kept as sent (parsed once all fields are)."""
        if isinstance(value, str):
            text = value.strip()
            if not text:
                raise FieldError("must not be empty")
            # load_recipe reads a string naming a file; a request must not make the worker read its own files.
            if "\n" not in text and (os.path.exists(text) or text.endswith((".yaml", ".yml", ".json"))):
                raise FieldError("give the recipe's YAML or JSON text, not a file path")
        elif not isinstance(value, (list, Mapping)):
            raise FieldError(f"must be YAML text or a list of modifier objects, got {type(value).__name__}")
        return value

    @field_validator("dataset", mode="before")
    @classmethod
    def _job_dataset(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            refuse_unknown(value, DATASET_FIELDS)
        return value

    @field_validator("dataset")
    @classmethod
    def _dataset_source(cls, value: Calibration | None, info: ValidationInfo) -> Calibration | None:
        if value is not None:
            _input(value.source, "dataset.source", info)
        return value

    @field_validator("output")
    @classmethod
    def _output(cls, value: str, info: ValidationInfo) -> str:
        return _location(value, "output", info, confine=True, folder=True)

    @field_validator("labels", mode="before")
    @classmethod
    def _labels(cls, value: Any) -> Any:
        if value is not None and (not isinstance(value, Mapping)
                                  or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())):
            raise FieldError("must map strings to strings")
        return value

    @model_validator(mode="after")
    def _parsed_recipe(self) -> JobRequest:
        """Parse the recipe (refused now, not in the worker), and require calibration data when it needs some."""
        try:
            recipe = load_recipe(self.recipe if not isinstance(self.recipe, Mapping) else dict(self.recipe))
        except RecipeError as exc:
            message = str(exc)
            raise FieldError(message if message.startswith("recipe") else f"recipe: {message}", field="recipe") \
                from None
        if self.dataset is None and needs_data(recipe.modifiers()):
            raise FieldError(f"is required: {recipe_summary(recipe)} calibrates on data", field="dataset")
        return self

    @classmethod
    def parse(cls, data: Any, settings: Settings | None = None) -> JobRequest:  # type: ignore[override]
        """``data`` checked, or OptionsError (a ValueError) naming the field; never echoes the webhook secret.
        ``settings`` gives the artifacts folder local locations are confined to (default ``./artifacts``); whether
        inputs exist is the worker's to find out."""
        return super().parse(data, context=settings)

    def output_location(self, settings: Settings) -> str:
        """The output folder as the job store's claims spell it (``storage.location_key``)."""
        return output_location(self.output, settings)

    def to_dict(self) -> dict:
        """The request as the job store keeps it and the API shows it: defaults filled in, absent fields left out."""
        out = self.model_dump(exclude_none=True, exclude={"dataset"} | ({"overwrite"} if not self.overwrite else set()))
        out["recipe"] = self.recipe  # as sent (text, or modifier objects)
        if self.dataset is not None:
            out["dataset"] = self.dataset.model_dump(include=set(DATASET_FIELDS))
        return {name: out[name] for name in type(self).model_fields if name in out}

    def compression_options(self, *, model: Path, dataset: Path | None, eval_source: Path | None,
                            output: Path) -> CompressionOptions:
        """What the engine is asked to do, with the inputs fetched to local paths and the work folder's output."""
        calibration = None
        if self.dataset is not None:
            calibration = self.dataset.model_copy(update={"source": str(dataset)})
        evals = ()
        if self.eval is not None:
            evals = (Evaluation(name=EVAL_NAME, source=eval_source, max_tokens=self.eval.max_tokens),)
        return CompressionOptions(model=model, recipe=self.recipe, output=output, dataset=calibration, evals=evals)


def output_location(output: str, settings: Settings) -> str:
    """``output`` (a request's, as stored) as the job store's claims spell it: what a retried job claims again."""
    return location_key(output, field="output", local_root=Path(settings.artifacts_root), confine=True)


def stored_resources(request: Mapping[str, Any]) -> Resources | None:
    """The resources of a stored request (``JobRequest.to_dict``), None when it asked for none."""
    value = request.get("resources")
    return Resources.parse(value) if value is not None else None


REQUEST_FIELDS = tuple(JobRequest.model_fields)
