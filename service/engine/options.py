"""What a compression run is asked to do: one typed object from whoever asks (the CLI, the job runner, a library
caller) to the engine.

``CompressionOptions`` is every option of ``service.engine.compress.compress_checkpoint``; ``Calibration`` the
calibration data and how it is cut into samples; ``Evaluation`` one text to measure perplexity on before and
after. A new option is a field here and flows forward from there: the CLI makes a flag of it
(``service.engine.cli.add_option_flags``), a job request carries it when the service exposes it
(``service.jobs.request``), and the engine reads it. Each field checks its own value; ``parse`` turns the first
failure into an ``OptionsError`` (a ValueError) whose message starts with the field's dotted name, e.g.
``dataset.num_samples must be >= 1, got 0``, and whose ``loc`` is that name as a tuple.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_NUM_SAMPLES = 128
DEFAULT_SEQ_LEN = 512
MAX_NUM_SAMPLES = 65_536
MAX_SEQ_LEN = 131_072
MAX_SEED = 2**63 - 1
MAX_EVAL_TOKENS = 2**40
PIPELINES = ("one_pass", "two_pass")  # the pipeline modes (service.engine.pipeline)
SAMPLING = ("head", "random")  # how calibration windows are drawn (service.engine.calibration_data)


class FieldError(ValueError):
    """A check's failure, with the field it is about when that is not the one being validated (a check that
    spans fields). Messages read after the field's name: "must be ...", "is required", or ": <detail>"."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


MAX_ERROR_CHARS = 1_000  # of an OptionsError's message: every 422 carries one, and none may echo a whole input


class OptionsError(ValueError):
    """Invalid options: ``str(error)`` starts with the field's dotted name; ``loc`` is that name as a tuple.
    A message longer than ``MAX_ERROR_CHARS`` is cut there, saying how long it was."""

    def __init__(self, message: str, loc: tuple[str, ...] = ()):
        if len(message) > MAX_ERROR_CHARS:
            message = f"{message[:MAX_ERROR_CHARS - 40]}... (cut from {len(message)} characters)"
        super().__init__(message)
        self.loc = loc


# ------------------------------------------------------------------------------------------------- value checks


def _integer(low: int, high: int | None = None):
    def check(value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int):
            raise FieldError(f"must be an integer, got {type(value).__name__}")
        if value < low:
            raise FieldError(f"must be >= {low}, got {value}")
        if high is not None and value > high:
            raise FieldError(f"must be <= {high}, got {value}")
        return value

    return BeforeValidator(check)


def _nonempty(value: Any) -> Any:
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise FieldError("must be a non-empty string")
    return value


def _choice(*allowed: str):
    def check(value: Any) -> Any:
        if value not in allowed:
            raise FieldError(f"must be one of {', '.join(allowed)}, got {value!r}")
        return value

    return BeforeValidator(check)


def _finite_positive(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise FieldError(f"must be a finite number > 0, got {value!r}")
    return float(value)


NonEmpty = Annotated[str, BeforeValidator(_nonempty)]
PathLike = NonEmpty  # a local path (a Path is taken too) or a URI, kept as a string as the caller wrote it
NumSamples = Annotated[int, _integer(1, MAX_NUM_SAMPLES)]
SeqLen = Annotated[int, _integer(2, MAX_SEQ_LEN)]
Seed = Annotated[int, _integer(0, MAX_SEED)]
EvalTokens = Annotated[int, _integer(2, MAX_EVAL_TOKENS)]
PositiveRatio = Annotated[float, BeforeValidator(_finite_positive)]


# ----------------------------------------------------------------------------------------------------- the base


def _message(error: dict) -> tuple[str, tuple[str, ...]]:
    """One pydantic error as (message starting with the dotted field name, loc)."""
    loc = tuple(str(part) for part in error["loc"])
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError) and cause.field is not None:
        loc = tuple(cause.field.split("."))
    path = ".".join(loc)
    if error["type"] == "missing":
        return f"{path} is required", loc
    text = str(cause) if isinstance(cause, Exception) else error["msg"][:1].lower() + error["msg"][1:]
    if not path or text.startswith(path + ":") or text.startswith(path + " "):
        return text, loc  # the check named the field itself (a storage or recipe error)
    if text.startswith(("must ", "is ")):
        return f"{path} {text}", loc
    return f"{path}: {text}", loc


def refuse_unknown(data: Mapping, allowed: tuple[str, ...]) -> None:
    """A misspelt field must not be ignored: FieldError listing the unknown ones and the allowed ones."""
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise FieldError(f"unknown field(s) {', '.join(map(repr, unknown))} (allowed: {', '.join(allowed)})")


class Options(BaseModel):
    """Frozen, unknown fields refused with the allowed ones listed; ``parse`` names the field of a failure."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        if isinstance(data, BaseModel):
            return data
        if not isinstance(data, Mapping):
            raise FieldError(f"must be an object, got {type(data).__name__}")
        refuse_unknown(data, tuple(cls.model_fields))
        return data

    @classmethod
    def parse(cls, data: Any, *, context: Any = None):
        """``data`` (a mapping, or already one of these) validated, or OptionsError naming the first bad field."""
        if isinstance(data, cls):
            return data
        try:
            return cls.model_validate(data, context=context)
        except ValidationError as exc:
            message, loc = _message(exc.errors()[0])
            raise OptionsError(message, loc) from None


# --------------------------------------------------------------------------------------------------- the options


class Calibration(Options):
    """Calibration text and how it is cut into ``num_samples`` windows of ``seq_len`` tokens."""

    source: PathLike = Field(description="calibration text: .txt, .jsonl with a 'text' field, or a saved datasets "
                                         "folder")
    num_samples: NumSamples = Field(DEFAULT_NUM_SAMPLES,
                                    description=f"Calibration samples, 1 to {MAX_NUM_SAMPLES}.")
    seq_len: SeqLen = Field(DEFAULT_SEQ_LEN, description=f"Tokens per sample, 2 to {MAX_SEQ_LEN}.")
    seed: Seed = Field(0, description="Seed for drawing the samples, >= 0.")
    sampling: Annotated[Literal[SAMPLING], _choice(*SAMPLING)] = Field(
        "head", description="calibration windows from the start of the text, or drawn at random with --seed")
    batch_size: Annotated[int, _integer(1)] | None = Field(
        None, description="calibration samples per batch (default: ~4096 tokens)")
    moe_calibrate_all_experts: bool = Field(
        False, description="mixture-of-experts models: calibrate every expert on all tokens, not only the ones its "
                           "router sends it (the output still combines the routed experts only)")


class Evaluation(Options):
    """A text to measure perplexity on, before and after, in non-overlapping windows."""

    name: NonEmpty
    source: PathLike
    max_tokens: EvalTokens | None = None


class CompressionOptions(Options):
    """Everything ``compress_checkpoint`` is asked to do: a checkpoint in, a recipe, a directory out."""

    model: PathLike = Field(description="model directory (or a Hub id, downloaded when online)")
    recipe: Any = Field(description="recipe: a YAML or JSON file, YAML text, modifiers or a parsed Recipe")
    output: PathLike = Field(description="output directory (published atomically)")
    dataset: Calibration | None = Field(None, description="calibration data; recipes that calibrate need it")
    evals: tuple[Evaluation, ...] = Field((), description="texts to measure perplexity on, before and after")
    eval_seq_len: SeqLen = Field(512, description="tokens per evaluation window")
    device: str = Field("auto", description="cpu, cuda, cuda:N, or auto (cuda when torch sees one)")
    pipeline: Annotated[Literal[PIPELINES], _choice(*PIPELINES)] = Field(
        "two_pass", description="two_pass: calibrate on the dense block (SparseGPT paper, llm-compressor); "
                                "one_pass: true sequential, one forward per block")
    trust_remote_code: bool = Field(False, description="run Python code shipped with the model (off by default)")
    allow_pickle: bool = Field(False, description="accept pickle (.bin) checkpoints, which can run code when "
                                                  "loaded (off by default)")
    revision: str | None = Field(None, description="the Hub revision (branch, tag or commit) of a Hub id")
    overwrite: bool = Field(False, description="replace an existing output directory")

    @field_validator("recipe", mode="before")
    @classmethod
    def _some_recipe(cls, value: Any) -> Any:
        if value is None or (isinstance(value, str) and not value.strip()):
            raise FieldError("must not be empty")
        return value

    @field_validator("dataset", mode="before")
    @classmethod
    def _source_alone(cls, value: Any) -> Any:
        return {"source": str(value)} if isinstance(value, (str, Path)) else value  # dataset="calib.txt"

    @field_validator("device", mode="before")
    @classmethod
    def _device(cls, value: Any) -> Any:
        if value is None:
            return "auto"
        value = str(value)
        if value != "auto":
            import torch  # here, not at the top: the CLI builds its flags from these options before torch is needed

            try:
                torch.device(value)
            except (RuntimeError, ValueError):
                raise FieldError(f"must be auto or a torch device such as cpu, cuda or cuda:1, got {value!r}") from None
        return value
