"""A job request, typed: what a tenant asked the service to compress, checked before it is stored.

``JobRequest.parse(body, settings)`` is the one check of a request, for the API (which answers a 422 naming the
field) and again for the worker that runs the stored job. Its calibration is the engine's own ``Calibration``
(the fields the HTTP contract exposes, ``DATASET_FIELDS``), its quality gate carries an evaluation's bounds, and
``compression_options`` turns it, once the inputs are fetched, into the ``CompressionOptions`` the engine takes:
no option is listed again between the request and the engine. ``to_dict`` is the form the job store keeps and the
API shows back (defaults filled in).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import BeforeValidator, ValidationInfo, field_validator, model_validator

from service.engine.model_source import HUB_ID
from service.engine.oneshot import needs_data
from service.engine.options import (
    Calibration, CompressionOptions, EvalTokens, Evaluation, FieldError, NonEmpty, Options, PositiveRatio,
    refuse_unknown,
)
from service.jobs.settings import Settings
from service.jobs.storage import parse_uri
from service.recipes.recipe import RecipeError, load_recipe, recipe_summary

# The calibration fields a job sets (the HTTP contract's DatasetSpec); sampling and batch size stay the engine's
# defaults for service jobs.
DATASET_FIELDS = ("source", "num_samples", "seq_len", "seed")
MAX_SECRET_CHARS = 1024
EVAL_NAME = "eval"



def _settings(info: ValidationInfo) -> Settings | None:
    return info.context if isinstance(info.context, Settings) else None


def _location(value: str, field: str, info: ValidationInfo, *, confine: bool) -> str:
    """Refuse a location that could escape (StorageError names the field); local ones under the artifacts
    folder of ``settings`` (default ``./artifacts``)."""
    settings = _settings(info)
    parse_uri(value, field=field, local_root=Path(settings.artifacts_root) if settings else None, confine=confine)
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
        return _location(value, "eval.source", info, confine=False)


class Webhook(Options):
    url: NonEmpty
    secret: Annotated[str, BeforeValidator(_secret)]

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise FieldError("must be an http:// or https:// URL")
        return value


class JobRequest(Options):
    """A compression job: which model, which recipe, calibrated on what, published where, gated how."""

    model: NonEmpty
    recipe: Any
    dataset: Calibration | None = None
    output: NonEmpty
    eval: QualityGate | None = None
    webhook: Webhook | None = None
    labels: dict[str, str] | None = None

    @field_validator("model")
    @classmethod
    def _model(cls, value: str, info: ValidationInfo) -> str:
        if value.lower().startswith(("s3:", "file:")) or not HUB_ID.match(value):
            _location(value, "model", info, confine=False)
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
            _location(value.source, "dataset.source", info, confine=False)
        return value

    @field_validator("output")
    @classmethod
    def _output(cls, value: str, info: ValidationInfo) -> str:
        return _location(value, "output", info, confine=True)

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

    def to_dict(self) -> dict:
        """The request as the job store keeps it and the API shows it: defaults filled in, absent fields left out."""
        out = self.model_dump(exclude_none=True, exclude={"dataset"})
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


REQUEST_FIELDS = tuple(JobRequest.model_fields)
