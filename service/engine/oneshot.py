"""One-shot compression: a recipe's stages run block by block through the pipeline, and the report they build.

``run_stage`` is the stage runner both entry points share; ``oneshot`` compresses a model already in memory, in
place (the library and the ModelOpt-style API use it). A checkpoint streamed from disk to disk is
``service.engine.compress.compress_checkpoint``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from service.engine.pipeline import (
    PIPELINES, BlockResult, InMemoryBlocks, Task, capture, execution_device, module_tasks, run_blocks,
)
from service.recipes.recipe import load_recipe, recipe_summary
from service.recipes.targets import find_blocks

log = logging.getLogger(__name__)

DEFAULT_BATCH_TOKENS = 4096  # tokens per calibration batch: large enough for efficient matmuls, small for memory
Progress = Callable[[dict], None]


def token_batches(tokens: torch.Tensor, batch_size: int | None = None) -> list[dict]:
    """[num_samples, seq_len] token ids -> model-input batches of batch_size samples."""
    if batch_size is None:
        batch_size = max(1, DEFAULT_BATCH_TOKENS // tokens.shape[1])
    return [{"input_ids": tokens[i : i + batch_size]} for i in range(0, tokens.shape[0], batch_size)]


def stage_blocks(model: nn.Module, modifiers: Sequence[Any]) -> list[tuple[str, nn.Module]]:
    """The blocks a stage streams: the first modifier's sequential_targets if one names them, else the model's."""
    sequential = next((m.sequential_targets for m in modifiers if getattr(m, "sequential_targets", None)), None)
    return find_blocks(model, sequential)


def needs_data(modifiers: Sequence[Any]) -> bool:
    return any(getattr(m, "statistic", None) is not None or getattr(m, "sparsity_profile", None) for m in modifiers)


# ------------------------------------------------------------------------------------------------------- reports


class ReportBuilder:
    """Collects per-module and per-block figures as blocks finish."""

    def __init__(self, on_progress: Progress | None = None, stage: str = "", total_blocks: int = 0):
        self.modules: dict[str, dict] = {}
        self.layers: list[dict] = []
        self.on_progress = on_progress
        self.stage = stage
        self.total_blocks = total_blocks
        self.started = time.perf_counter()

    @staticmethod
    def layer_entry(index: int, name: str, result: BlockResult, seconds: float) -> dict:
        """The report's entry for one block: its time, and the sparsity over its compressed modules."""
        pruned = total = 0
        for entry in result.modules.values():
            if "shape" in entry:
                numel = entry["shape"][0] * entry["shape"][1]
                total += numel
                pruned += round(entry["sparsity"] * numel)
        return {"index": index, "name": name, "seconds": seconds, "sparsity": pruned / total if total else 0.0,
                "params": total}

    def on_block(self, index: int, name: str, result: BlockResult, seconds: float) -> None:
        for module_name, entry in result.modules.items():
            if "shape" not in entry:
                continue
            self.modules[module_name] = {"layer": index, **entry}
            log.info(
                "%s: %s samples, loss %s, %.2f s, %.0f MB", module_name, entry.get("samples", "-"),
                f"{entry['loss']:.4g}" if "loss" in entry else "-", entry["seconds"], entry["memory_mb"],
            )
        layer = self.layer_entry(index, name, result, seconds)
        self.layers.append(layer)
        if self.on_progress is not None:
            self.on_progress({"stage": self.stage or "compressing", "layer": index + 1, "layers": self.total_blocks,
                              "fraction": (index + 1) / max(1, self.total_blocks), "block": layer,
                              "modules": {k: v for k, v in self.modules.items() if v["layer"] == index}})

    def totals(self) -> dict:
        params = sum(layer["params"] for layer in self.layers)
        pruned = sum(layer["sparsity"] * layer["params"] for layer in self.layers)
        losses = [m["loss"] for m in self.modules.values() if "loss" in m]
        return {
            "sparsity": pruned / params if params else 0.0,
            "params_targeted": params,
            "params_pruned": round(pruned),
            "loss": sum(losses) if losses else None,
            "seconds": time.perf_counter() - self.started,
        }


def merge_reports(parts: list[ReportBuilder]) -> dict:
    """One report over all stages; a module compressed in several stages keeps its last entry."""
    modules: dict[str, dict] = {}
    layers: dict[int, dict] = {}
    for part in parts:
        modules.update(part.modules)
        for layer in part.layers:
            layers[layer["index"]] = layer
    last = parts[-1] if parts else ReportBuilder()
    report = {"modules": modules, "layers": [layers[i] for i in sorted(layers)], "totals": last.totals()}
    report["totals"]["seconds"] = sum(p.totals()["seconds"] for p in parts)
    return report


# ------------------------------------------------------------------------------------------------------- a stage


def _owl_profile(modifier, blocks, hidden, calls, store, device) -> list[float]:
    """OWL: outlier ratio of every block on the dense model, turned into per-block sparsities."""
    from service.algorithms.owl import owl_sparsities
    from service.recipes.pruning_modifiers import OutlierProbe

    probe = OutlierProbe(modifier)
    ratios: list[float] = []

    def plan(i, name, block) -> list[Task]:
        return module_tasks(block, name, i, [probe])

    def collect(i, name, result, seconds) -> None:
        ratios.append(probe.take_block_ratio())

    log.info("OWL: measuring outlier ratios of %d blocks on the dense model", len(blocks))
    run_blocks(blocks, list(hidden), calls, plan, store, device, mode="two_pass", on_block=collect, progress=False)
    sparsities = owl_sparsities(ratios, modifier.target_sparsity, modifier.owl_lmbda)
    log.info("OWL: outlier ratios %s -> sparsities %s", [round(r, 4) for r in ratios], [round(s, 4) for s in sparsities])
    return sparsities


def run_stage(
    model: nn.Module,
    modifiers: Sequence[Any],
    batches: Iterable[dict] | None,
    store,
    device: torch.device,
    *,
    mode: str = "two_pass",
    report: ReportBuilder | None = None,
    before_blocks: Callable[[list[tuple[str, nn.Module]]], None] | None = None,
    probe_store=None,
) -> ReportBuilder:
    """Run one recipe stage over the model's blocks. `store` loads and stores block weights;
    `before_blocks(blocks)` runs after calibration inputs are captured (the streaming path writes and frees the
    non-block weights there); `probe_store` is the store for OWL's dense pass (which must not write)."""
    if mode not in PIPELINES:
        raise ValueError(f"pipeline must be one of {PIPELINES}; got {mode!r}")
    blocks = stage_blocks(model, modifiers)
    names = [name for name, _ in blocks]
    for modifier in modifiers:
        modifier.check_layers(names)
    report = report or ReportBuilder()
    report.total_blocks = len(blocks)
    hidden, calls = [], [[] for _ in blocks]
    if needs_data(modifiers):
        if batches is None:
            raise ValueError(
                f"dataset: {', '.join(type(m).__name__ for m in modifiers)} needs calibration data; give a dataset"
            )
        hidden, calls = capture(model, blocks, batches, device)
        if not hidden:
            raise ValueError("dataset: the calibration data yielded no batches")
    if before_blocks is not None:
        before_blocks(blocks)
    for modifier in modifiers:
        if getattr(modifier, "sparsity_profile", None) == "owl":
            modifier.set_layer_sparsities(_owl_profile(modifier, blocks, hidden, calls, probe_store or store, device))

    def plan(i, name, block) -> list[Task]:
        return module_tasks(block, name, i, modifiers)

    run_blocks(blocks, hidden, calls, plan, store, device, mode=mode, on_block=report.on_block)
    return report


# --------------------------------------------------------------------------------------------- in-memory models


def oneshot(
    model: nn.Module,
    recipe: Any,
    *,
    batches: Iterable[dict] | None = None,
    device: str | torch.device | None = None,
    pipeline: str = "two_pass",
    keep_masks: bool = False,
    on_progress: Progress | None = None,
) -> dict:
    """Compress an in-memory model in place; each block visits the execution device once. Returns the report.

    If it fails part-way, the blocks already done stay pruned: work on a copy when that matters.
    """
    recipe = load_recipe(recipe)
    device = execution_device(device)
    if batches is not None:
        batches = list(batches)
    from service.engine.moe import unfuse_experts

    unfuse_experts(model)  # fused MoE experts become one Linear per expert, so targets see them (service.engine.moe)
    parts, transforms = [], []
    # Calibrate in eval mode (dropout would add noise to the Hessians), then give back each module's mode.
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        for stage in recipe.stages:
            for modifier in stage.modifiers:
                if keep_masks and hasattr(modifier, "keep_masks"):
                    modifier.keep_masks()
                if hasattr(modifier, "prepare_model"):  # SpinQuantModifier: rotate before the stage calibrates
                    transforms.append(modifier.prepare_model(model, batches, quant_args=_weight_args(stage.modifiers)))
            parts.append(run_stage(model, stage.modifiers, batches, InMemoryBlocks(), device, mode=pipeline,
                                   report=ReportBuilder(on_progress, stage.name)))
    finally:
        for module, mode in training.items():
            module.training = mode
    report = merge_reports(parts)
    report["recipe"] = recipe_summary(recipe)
    if transforms:
        report["transforms"] = transforms
    return report


def _weight_args(modifiers):
    """The weight quantization of a stage's first quantization modifier (what learned rotations optimise for)."""
    for modifier in modifiers:
        if quantizes(modifier) and modifier.groups and modifier.groups[0].weights is not None:
            return modifier.groups[0].weights
    return None


def quantizes(modifier) -> bool:
    from service.recipes.quantization_modifiers import QuantizationModifierBase

    return isinstance(modifier, QuantizationModifierBase)
