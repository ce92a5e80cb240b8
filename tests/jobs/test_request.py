"""service/jobs/request.py: a job request is checked once, typed, stored with its defaults, and becomes the
engine's CompressionOptions without its options being listed again on the way."""

from __future__ import annotations

import pytest

from service.engine.options import Calibration, CompressionOptions, OptionsError
from service.jobs.request import DATASET_FIELDS, EVAL_NAME, REQUEST_FIELDS, JobRequest
from service.jobs.settings import Settings
from tests.fixture_paths import FIXTURES, STORIES, WIKI_VALID
from tests.jobs.bodies import SECRET, request
from tests.tiny_models import RECIPE_2OF4


def test_a_request_is_stored_with_its_defaults_filled_in():
    body = JobRequest.parse({"model": "models/m", "recipe": [{"MagnitudePruningModifier": {"sparsity": 0.5}}],
                             "output": "s3://bucket/out"}).to_dict()
    assert body == {"model": "models/m", "recipe": [{"MagnitudePruningModifier": {"sparsity": 0.5}}],
                    "output": "s3://bucket/out"}
    body = JobRequest.parse(request("runs/x", dataset={"source": "d.txt"})).to_dict()
    assert body["dataset"] == {"source": "d.txt", "num_samples": 128, "seq_len": 512, "seed": 0}


@pytest.mark.parametrize("overrides, message", [
    ({"model": ""}, "model must be a non-empty string"),
    ({"recipe": "sparsity_stage: [unclosed"}, "recipe: malformed YAML"),
    ({"recipe": str(FIXTURES / "SOURCE.md")}, "recipe: give the recipe's YAML or JSON text, not a file path"),
    ({"recipe": 3}, "recipe must be YAML text"),
    ({"dataset": {"source": "d.txt", "num_samples": 0}}, "dataset.num_samples must be >= 1"),
    ({"dataset": {"source": "d.txt", "seq_len": True}}, "dataset.seq_len must be an integer"),
    ({"dataset": {"source": "d.txt", "seed": -1}}, "dataset.seed must be >= 0"),
    ({"dataset": {"num_samples": 4}}, "dataset.source is required"),
    ({"dataset": None}, "dataset is required"),
    ({"output": "../up"}, "output: '../up' contains a '..' segment"),
    ({"output": "/etc/llmpress"}, "output: '/etc/llmpress' resolves outside the artifacts folder"),
    ({"output": "gs://b/x"}, "output: scheme 'gs:' is not supported"),
    ({"eval": {"source": "e.txt", "max_ppl_ratio": 0}}, "eval.max_ppl_ratio must be a finite number > 0"),
    ({"eval": {"source": "e.txt"}}, "eval.max_ppl_ratio is required"),
    ({"webhook": {"url": "ftp://x/y", "secret": SECRET}}, "webhook.url must be an http:// or https:// URL"),
    ({"webhook": {"url": "https://public.test/y", "secret": ""}}, "webhook.secret must be a non-empty string"),
    ({"webhook": {"url": "https://127.0.0.1/y", "secret": SECRET}}, "webhook.url: https://127.0.0.1 is a loopback"),
    ({"evaluation": {}}, "unknown field(s) 'evaluation'"),
])
def test_a_bad_request_is_refused_naming_the_field(overrides, message):
    with pytest.raises(ValueError) as info:
        JobRequest.parse(request(**overrides))
    assert message in str(info.value)
    assert SECRET not in str(info.value)


def test_the_error_carries_the_field_as_a_location():
    with pytest.raises(OptionsError) as info:
        JobRequest.parse(request(dataset={"source": "d.txt", "seq_len": 1}))
    assert info.value.loc == ("dataset", "seq_len")
    with pytest.raises(OptionsError) as info:
        JobRequest.parse(request(dataset=None))
    assert info.value.loc == ("dataset",) and str(info.value).startswith("dataset is required: SparseGPTModifier")
    with pytest.raises(OptionsError) as info:
        JobRequest.parse(request(recipe="sparsity_stage: [unclosed"))
    assert info.value.loc == ("recipe",)


def test_local_locations_are_confined_to_the_artifacts_folder_of_the_settings(tmp_path):
    settings = Settings(artifacts_root=str(tmp_path / "artifacts"), input_roots=(str(FIXTURES),))
    inside = JobRequest.parse(request(output=str(tmp_path / "artifacts" / "runs" / "y")), settings)
    assert inside.output.endswith("runs/y")
    with pytest.raises(OptionsError, match="output: .* resolves outside the artifacts folder"):
        JobRequest.parse(request(output=str(tmp_path / "elsewhere")), settings)


@pytest.mark.parametrize("field", ["model", "dataset.source", "eval.source"])
def test_local_inputs_outside_the_input_folders_are_refused_at_submit(field, tmp_path):
    # Before, these were accepted (201) and failed only later in the worker.
    settings = Settings(artifacts_root=str(tmp_path / "artifacts"))  # the fixtures are not an input root
    outside = {"model": {"model": str(STORIES)},
               "dataset.source": {"model": "runs/m", "dataset": {"source": str(WIKI_VALID)}},
               "eval.source": {"model": "runs/m", "dataset": {"source": "runs/d.txt"},
                               "eval": {"source": "/etc/passwd", "max_ppl_ratio": 2.0}}}[field]
    with pytest.raises(OptionsError) as info:
        JobRequest.parse(request(**outside), settings)
    assert info.value.loc == tuple(field.split("."))
    assert "outside the artifacts folder" in str(info.value)
    allowed = Settings(artifacts_root=str(tmp_path / "artifacts"), input_roots=(str(FIXTURES),))
    if field != "eval.source":
        JobRequest.parse(request(**outside), allowed)  # the same input inside LLMPRESS_INPUT_ROOTS is fine
    # S3 inputs and Hub ids are not local files: nothing to confine.
    JobRequest.parse(request(model="Org/model-7b", dataset={"source": "s3://texts/valid.txt"}), settings)


def test_an_output_is_a_folder_never_a_whole_bucket():
    for uri in ("s3://releases", "s3://releases/", "s3://Releases/x", "s3://rel_eases/x"):
        with pytest.raises(OptionsError) as info:
            JobRequest.parse(request(output=uri))
        assert info.value.loc == ("output",), uri
    assert JobRequest.parse(request(output="s3://releases/run-1")).output == "s3://releases/run-1"


def test_a_request_becomes_the_engines_options_with_its_inputs_fetched(tmp_path):
    body = request(eval={"source": "s3://texts/test.txt", "max_ppl_ratio": 1.5, "max_tokens": 4096},
                   dataset={"source": "s3://texts/valid.txt", "num_samples": 8, "seq_len": 32, "seed": 3})
    job = JobRequest.parse(body)
    assert isinstance(job.dataset, Calibration) and job.dataset.source == "s3://texts/valid.txt"
    options = job.compression_options(model=tmp_path / "m", dataset=tmp_path / "d.txt",
                                      eval_source=tmp_path / "e.txt", output=tmp_path / "out")
    assert isinstance(options, CompressionOptions)
    assert options.model == str(tmp_path / "m") and options.output == str(tmp_path / "out")
    assert options.recipe == RECIPE_2OF4
    assert options.dataset == Calibration(source=str(tmp_path / "d.txt"), num_samples=8, seq_len=32, seed=3)
    assert [(e.name, e.source, e.max_tokens) for e in options.evals] == [(EVAL_NAME, str(tmp_path / "e.txt"), 4096)]
    assert job.to_dict()["dataset"] == {"source": "s3://texts/valid.txt", "num_samples": 8, "seq_len": 32, "seed": 3}


def test_the_stored_form_reads_back_as_the_same_request():
    body = request(eval={"source": "e.txt", "max_ppl_ratio": 2}, labels={"team": "release"},
                   webhook={"url": "https://public.test/hook", "secret": SECRET})
    stored = JobRequest.parse(body).to_dict()
    assert list(stored) == ["model", "recipe", "dataset", "output", "eval", "webhook", "labels"]
    assert stored["eval"] == {"source": "e.txt", "max_ppl_ratio": 2.0}
    assert JobRequest.parse(stored).to_dict() == stored


def test_what_a_job_sets_of_the_calibration_is_what_the_http_contract_exposes():
    """The HTTP DatasetSpec declares the calibration fields a tenant may set; they are the engine's own fields,
    with the engine's defaults, so a new calibration option is exposed by one line in the contract."""
    from api.schemas import DatasetSpec, JobCreate

    assert tuple(DatasetSpec.model_fields) == DATASET_FIELDS
    for name in DATASET_FIELDS:
        assert name in Calibration.model_fields
        if name != "source":
            assert DatasetSpec.model_fields[name].default == Calibration.model_fields[name].default, name
            assert DatasetSpec.model_fields[name].description == Calibration.model_fields[name].description, name
    assert set(JobCreate.model_fields) == set(REQUEST_FIELDS)
    with pytest.raises(OptionsError, match=r"dataset: unknown field\(s\) 'sampling' \(allowed: source, num_samples"):
        JobRequest.parse(request(dataset={"source": "d.txt", "sampling": "random"}))


def test_a_job_on_a_hub_id_is_not_taken_for_a_path():
    assert JobRequest.parse(request(model="someone/some-model")).model == "someone/some-model"
    with pytest.raises(OptionsError, match="model: '../up' contains a '..' segment"):
        JobRequest.parse(request(model="../up"))
