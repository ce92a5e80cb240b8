"""Data-parallel calibration (service.engine.data_parallel) against one worker: the same output from 2 and 3
workers as from 1, for every kind of solve (SparseGPT in both pipeline modes, Wanda, OWL, GPTQ), on the bundled
stories260K with real text. The workers run in this process (``LocalPool``: each its own copy of every tensor, as
through Ray's object store); the same computation on Ray actors across nodes is tests/workers/test_cluster.py.

Same output means the very same bytes: every batch's Hessian term is computed alike on whichever worker holds it and
summed in fp64 (service.algorithms.hessian), so neither the partition into workers nor the order of the merge shows
in the fp32 statistic; masks, weights, quantized values and perplexity are those of one worker."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from service.engine.compress import compress_checkpoint
from service.engine.data_parallel import LocalPool, assign_owners, split_batches
from service.engine.pipeline import Task
from tests.fixture_paths import RECIPES, STORIES, WIKI_TEST, WIKI_VALID


def compress(tmp_path, recipe: str, workers: int, pipeline: str = "two_pass", evals: bool = False):
    out = tmp_path / f"{recipe}-{pipeline}-{workers}"
    options = {"model": str(STORIES), "recipe": str(RECIPES / f"{recipe}.yaml"), "output": str(out),
               "dataset": {"source": str(WIKI_VALID), "num_samples": 32, "seq_len": 64, "batch_size": 8},
               "pipeline": pipeline, "device": "cpu"}
    if evals:
        options["evals"] = [{"name": "wiki", "source": str(WIKI_TEST), "max_tokens": 8192}]
    report = compress_checkpoint(options, workers=LocalPool(workers) if workers > 1 else None)
    tensors = {}
    for shard in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors, report


def assert_same(one: dict, many: dict) -> None:
    assert one.keys() == many.keys()
    for key, a in one.items():
        b = many[key]
        assert a.dtype == b.dtype and a.shape == b.shape, key
        if a.is_floating_point():
            assert torch.equal(a == 0, b == 0), f"{key}: masks differ"
        assert torch.equal(a, b), key


@pytest.mark.parametrize("recipe,pipeline", [
    ("sparsegpt_2of4", "two_pass"), ("sparsegpt_2of4", "one_pass"), ("wanda_50", "two_pass"),
    ("sparsegpt_owl_70", "two_pass"), ("spinquant_gptq_w4", "two_pass"), ("sparsegpt_2of4_gptq_w4", "one_pass"),
])
def test_two_and_three_workers_give_the_output_of_one(tmp_path, recipe, pipeline):
    # Perplexity and two worker counts for the first case; three workers (batches shared 2, 1, 1) for the others.
    first = (recipe, pipeline) == ("sparsegpt_2of4", "two_pass")
    one, report_one = compress(tmp_path, recipe, 1, pipeline, evals=first)
    for n in (2, 3) if first else (3,):
        many, report = compress(tmp_path, recipe, n, pipeline, evals="perplexity" in report_one)
        assert_same(one, many)
        if "perplexity" in report_one:
            assert report["perplexity"]["wiki"]["after"] == report_one["perplexity"]["wiki"]["after"]
        assert report["totals"]["sparsity"] == report_one["totals"]["sparsity"]
        assert report["modules"].keys() == report_one["modules"].keys()


def test_batches_are_cut_into_contiguous_runs_in_rank_order():
    assert split_batches(list(range(8)), 3) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert split_batches(list(range(2)), 2) == [[0], [1]]


def test_solves_are_balanced_by_cost_and_always_the_same():
    def task(name, rows, columns):
        return Task(name, torch.nn.Linear(columns, rows, bias=False, device="meta"),
                    type("Hessian", (), {"statistic": "hessian"})(), 0.5)

    groups = {"q": [task("q", 64, 64), task("k", 64, 64), task("v", 64, 64)], "o": [task("o", 64, 64)],
              "gate": [task("gate", 172, 64), task("up", 172, 64)], "down": [task("down", 64, 172)]}
    owners = assign_owners(groups, 2)
    assert owners == assign_owners(groups, 2)  # a re-run places every solve where it was
    assert owners["down"] != owners["gate"]  # the two largest go to different workers
    assert set(owners.values()) == {0, 1}


def test_more_workers_than_calibration_samples_is_refused_naming_the_field(tmp_path):
    options = {"model": str(STORIES), "recipe": str(RECIPES / "sparsegpt_2of4.yaml"), "output": str(tmp_path / "o"),
               "dataset": {"source": str(WIKI_VALID), "num_samples": 2, "seq_len": 64}, "device": "cpu"}
    with pytest.raises(ValueError, match=r"resources.workers: 3 workers need at least 3 calibration samples"):
        compress_checkpoint(options, workers=LocalPool(3))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("pipeline", ["two_pass", "one_pass"])
def test_each_block_books_the_bytes_it_moved(tmp_path, monkeypatch, pipeline):
    """The coordinator's per-block timing counts the partial statistics sent to their owners and the solved
    modules sent back, in both modes: exactly (workers - 1) copies of rank 0's own statistics and solved weights."""
    from service.engine import data_parallel

    made = []
    init = data_parallel.Coordinator.__init__

    def recording(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(data_parallel.Coordinator, "__init__", recording)
    compress(tmp_path, "sparsegpt_2of4", 2, pipeline)
    timings = made[0].timings
    assert len(timings) == 5  # stories260K's blocks
    hidden, kv, intermediate = 64, 32, 172  # 8 heads of 8, 4 key/value heads
    # Hessians (fp64) of the block's four module inputs, and the block's seven weights (fp32), one copy each way.
    statistics = 8 * (3 * hidden**2 + intermediate**2)
    weights = 4 * (2 * hidden * hidden + 2 * kv * hidden + 3 * hidden * intermediate)
    for t in timings:
        assert t.calibrate > 0 and t.solve > 0 and t.propagate > 0
        assert t.statistics_bytes >= statistics, (t.statistics_bytes, statistics)
        assert weights <= t.states_bytes < 2 * weights, (t.states_bytes, weights)
