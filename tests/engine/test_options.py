"""service/engine/options.py: one typed object from the caller to the engine. Its checks name the field, and the
CLI takes its flags from its fields, so a new option is added in one place."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from pydantic import Field

from service.engine.cli import CALIBRATION_FLAGS, OPTION_FLAGS, add_option_flags, build_parser, compression_options
from service.engine.options import Calibration, CompressionOptions, Evaluation, OptionsError

BASE = {"model": "m", "recipe": "r.yaml", "output": "o"}


@pytest.mark.parametrize("changes, message, loc", [
    ({"model": ""}, "model must be a non-empty string", ("model",)),
    ({"recipe": " "}, "recipe must not be empty", ("recipe",)),
    ({"output": None}, "output must be a non-empty string", ("output",)),
    ({"dataset": {"source": "d.txt", "num_samples": 0}}, "dataset.num_samples must be >= 1, got 0",
     ("dataset", "num_samples")),
    ({"dataset": {"source": "d.txt", "seq_len": True}}, "dataset.seq_len must be an integer, got bool",
     ("dataset", "seq_len")),
    ({"dataset": {"source": "d.txt", "seed": 2**63}}, "dataset.seed must be <= 9223372036854775807",
     ("dataset", "seed")),
    ({"dataset": {"source": "d.txt", "sampling": "tail"}}, "dataset.sampling must be one of head, random, got 'tail'",
     ("dataset", "sampling")),
    ({"dataset": {"source": "d.txt", "batch_size": 0}}, "dataset.batch_size must be >= 1", ("dataset", "batch_size")),
    ({"dataset": {"num_samples": 4}}, "dataset.source is required", ("dataset", "source")),
    ({"dataset": 7}, "dataset must be an object, got int", ("dataset",)),
    ({"dataset": {"source": "d.txt", "rows": 4}}, "dataset: unknown field(s) 'rows' (allowed: source, num_samples",
     ("dataset",)),
    ({"evals": [{"name": "e", "source": "e.txt", "max_tokens": 1}]}, "evals.0.max_tokens must be >= 2",
     ("evals", "0", "max_tokens")),
    ({"eval_seq_len": 1}, "eval_seq_len must be >= 2, got 1", ("eval_seq_len",)),
    ({"device": "gpu"}, "device must be auto or a torch device such as cpu, cuda or cuda:1, got 'gpu'", ("device",)),
    ({"pipeline": "three_pass"}, "pipeline must be one of one_pass, two_pass, got 'three_pass'", ("pipeline",)),
    ({"num_samples": 4}, "unknown field(s) 'num_samples' (allowed: model, recipe, output, dataset", ()),
])
def test_a_bad_option_is_refused_naming_the_field(changes, message, loc):
    with pytest.raises(OptionsError) as info:
        CompressionOptions.parse({**BASE, **changes})
    assert str(info.value).startswith(message) and info.value.loc == loc


def test_defaults_paths_and_a_bare_dataset():
    options = CompressionOptions.parse({**BASE, "model": Path("/models/m"), "dataset": Path("calib.txt")})
    assert options.model == "/models/m"
    assert options.dataset == Calibration(source="calib.txt")
    assert (options.dataset.num_samples, options.dataset.seq_len, options.dataset.seed) == (128, 512, 0)
    assert (options.dataset.sampling, options.dataset.batch_size) == ("head", None)
    assert (options.device, options.pipeline, options.eval_seq_len, options.evals) == ("auto", "two_pass", 512, ())
    assert not (options.trust_remote_code or options.allow_pickle or options.overwrite)
    assert CompressionOptions.parse(options) is options
    with pytest.raises(Exception):
        options.device = "cpu"  # frozen: what the engine was asked stays what it was asked


def test_the_compress_command_has_a_flag_for_every_option():
    """Every field of CompressionOptions and Calibration reaches the CLI: the structural ones by their own flags,
    every other one by the flag add_option_flags made of it, with the field's default."""
    compress = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["compress"]
    flags = {a.dest: a for a in compress._actions}
    for name in (*OPTION_FLAGS, *CALIBRATION_FLAGS):
        assert name in flags, f"llmpress compress has no flag for {name}"
        field = (CompressionOptions.model_fields.get(name) or Calibration.model_fields[name])
        assert flags[name].default == field.default and flags[name].help == field.description, name
    structural = {"model", "recipe", "output", "dataset", "evals"}
    assert set(CompressionOptions.model_fields) == structural | set(OPTION_FLAGS)
    assert set(Calibration.model_fields) == {"source", *CALIBRATION_FLAGS}
    assert flags["pipeline"].choices == ["one_pass", "two_pass"] and flags["sampling"].choices == ["head", "random"]


def test_a_command_line_becomes_the_options():
    args = build_parser().parse_args([
        "compress", "--model", "m", "--recipe", "r.yaml", "--output", "o", "--dataset", "d.txt", "--num-samples", "4",
        "--seq-len", "64", "--seed", "9", "--sampling", "random", "--batch-size", "2", "--eval", "x/e.txt",
        "--eval-max-tokens", "100", "--eval-seq-len", "128", "--device", "cpu", "--pipeline", "one_pass",
        "--trust-remote-code", "--allow-pickle", "--revision", "main", "--overwrite"])
    assert compression_options(args) == CompressionOptions(
        model="m", recipe=Path("r.yaml"), output="o",  # a Path: the recipe is read from that file, never as text
        dataset=Calibration(source="d.txt", num_samples=4, seq_len=64, seed=9, sampling="random", batch_size=2),
        evals=(Evaluation(name="e", source="x/e.txt", max_tokens=100),), eval_seq_len=128, device="cpu",
        pipeline="one_pass", trust_remote_code=True, allow_pickle=True, revision="main", overwrite=True)
    plain = compression_options(build_parser().parse_args(["compress", "--model", "m", "--recipe", "r", "--output",
                                                           "o"]))
    assert plain == CompressionOptions(model="m", recipe=Path("r"), output="o")


def test_a_new_field_becomes_a_flag_with_its_type_choices_and_default():
    from typing import Literal

    class Extended(CompressionOptions):
        group_factor: int = Field(3, description="a new integer option")
        order: Literal["a", "b"] = Field("a", description="a new choice")
        verbose_solve: bool = Field(False, description="a new switch")
        damp: float = Field(0.01, description="a new fraction")
        fused: bool = Field(True, description="a switch that is on by default")

    names = ("group_factor", "order", "verbose_solve", "damp", "fused")
    parser = argparse.ArgumentParser()
    add_option_flags(parser, Extended, names)
    assert vars(parser.parse_args([])) == {"group_factor": 3, "order": "a", "verbose_solve": False, "damp": 0.01,
                                           "fused": True}
    given = parser.parse_args(["--group-factor", "5", "--order", "b", "--verbose-solve", "--damp", "0.1", "--no-fused"])
    assert vars(given) == {"group_factor": 5, "order": "b", "verbose_solve": True, "damp": 0.1, "fused": False}
    assert Extended.parse({**BASE, **vars(given)}).damp == 0.1
    with pytest.raises(SystemExit):
        parser.parse_args(["--order", "c"])
    unset = argparse.ArgumentParser()
    add_option_flags(unset, Extended, ("group_factor",), defaults=False)
    assert unset.parse_args([]).group_factor is None
