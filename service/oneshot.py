"""One-shot compression of a whole model: recipe stages run block by block through the pipeline.

Two entry points share the same stage runner:
- `compress_checkpoint`: a Hugging Face directory in, a compressed directory out, streaming one block at a time
  from the safetensors files to output shards (the CLI and the job service use it);
- `oneshot`: a model already in memory, compressed in place (the library and ModelOpt-style API use it).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from service.export import (
    AtomicDirectory, ShardWriter, copy_side_files, sparsity_config, write_json,
)
from service.model_source import StreamedModel, resolve_model_dir
from service.pipeline import (
    PIPELINES, BlockResult, InMemoryBlocks, Task, capture, find_blocks, module_tasks, run_blocks,
)
from service.recipe import load_recipe, recipe_summary

log = logging.getLogger(__name__)

DEFAULT_BATCH_TOKENS = 4096  # tokens per calibration batch: large enough for efficient matmuls, small for memory
Progress = Callable[[dict], None]


def execution_device(device: str | torch.device | None = None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for but torch sees no CUDA device; use --device cpu")
    return device


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

    def on_block(self, index: int, name: str, result: BlockResult, seconds: float) -> None:
        pruned = total = 0
        for module_name, entry in result.modules.items():
            if "shape" not in entry:
                continue
            numel = entry["shape"][0] * entry["shape"][1]
            total += numel
            pruned += round(entry["sparsity"] * numel)
            self.modules[module_name] = {"layer": index, **entry}
            log.info(
                "%s: %s samples, loss %s, %.2f s, %.0f MB", module_name, entry.get("samples", "-"),
                f"{entry['loss']:.4g}" if "loss" in entry else "-", entry["seconds"], entry["memory_mb"],
            )
        layer = {"index": index, "name": name, "seconds": seconds, "sparsity": pruned / total if total else 0.0,
                 "params": total}
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
    from service.owl import owl_sparsities
    from service.pruning_modifiers import OutlierProbe

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
        if _quantizes(modifier) and modifier.groups and modifier.groups[0].weights is not None:
            return modifier.groups[0].weights
    return None


# ------------------------------------------------------------------------------------------- streamed checkpoints


class StreamedBlocks:
    """Block weights read from the source checkpoint onto the device, written to an output shard, then freed.

    With ``quantized_format``, every quantized Linear is written in the compressed-tensors layout (packed
    integers, scales, zero points) instead of its fake-quantized weight, and its scheme is kept (``quantized``,
    by module name) for config.json's ``quantization_config``; the other Linears are listed in ``unquantized``.
    """

    def __init__(self, source: StreamedModel, writer: ShardWriter | None, *, quantized_format: bool = False,
                 rotation=None):
        self.source = source
        self.writer = writer
        self.quantized_format = quantized_format
        self.rotation = rotation  # a SpinQuantPlan: each block is rotated as it is loaded
        self.quantized: dict[str, nn.Module] = {}
        self.unquantized: list[str] = []
        self.online: dict[str, dict] = {}  # online rotations written: {"R3"|"R4": {module name: spec}}

    def load(self, index, name, block, device):
        self.source.load(self.source.parameter_names(name), device)
        if self.rotation is not None:
            from service.spinquant import rotate_block

            rotate_block(block, name, index, self.rotation)

    def store(self, index, name, block, *, changed):
        names = self.source.parameter_names(name)
        if self.writer is not None:
            tensors = {n: self.source.model.get_parameter(n) for n in names}
            if self.quantized_format:
                tensors = self._compressed(name, block, tensors)
            if self.rotation is not None:
                tensors.update(self._online(name, block))
            self.writer.write(index + 1, tensors)
        if self.rotation is not None:
            from service.rotations import detach_online

            detach_online(block)  # the block's hooks go with its weights; a later load rotates it afresh
        self.source.release(names)

    def _online(self, name: str, block: nn.Module) -> dict:
        from service.rotations import online_transforms_description
        from service.transform_export import transform_tensors

        description = online_transforms_description(block, prefix=name)
        for key, entries in description.items():
            self.online.setdefault(key, {}).update(entries)
        return transform_tensors(description)

    def _compressed(self, name: str, block: nn.Module, tensors: dict) -> dict:
        from service.quantized_export import compress_quantized_tensors, is_quantized, scheme_carrier
        from service.targets import COMPRESSIBLE

        for sub, module in block.named_modules(prefix=name):
            if is_quantized(module):
                for param in ("weight", "bias"):
                    tensors.pop(f"{sub}.{param}", None)
                tensors.update(compress_quantized_tensors(sub, module))
                self.quantized[sub] = scheme_carrier(module)
            elif isinstance(module, COMPRESSIBLE):
                self.unquantized.append(sub)
        return tensors


def _stream_stage(
    source_dir: Path, target_dir: Path, modifiers, tokens, device, *, mode, trust_remote_code, batch_size,
    report: ReportBuilder, on_shard: Callable[[Path, str], None] | None = None, quantized_format: bool = False,
) -> dict:
    """One recipe stage from the checkpoint in ``source_dir`` to shards in ``target_dir``; what config.json must
    change: ``quantization_config`` (with ``quantized_format``, when something was quantized),
    ``tie_word_embeddings`` (when a rotation untied the head)."""
    source = StreamedModel(source_dir, trust_remote_code=trust_remote_code)
    model = source.model
    block_names = [name for name, _ in stage_blocks(model, modifiers)]
    outside = [n for n in source.keys if not any(n.startswith(b + ".") for b in block_names)]
    writer = ShardWriter(target_dir, num_shards=len(block_names) + 1, on_written=on_shard)
    source.load(outside, "cpu")  # embeddings, final norm, head: needed to capture the first block's inputs
    config_changes: dict = {}
    rotation = _streaming_rotation(model, modifiers)
    untied: list[str] = []
    if rotation is not None:
        from service.spinquant import rotate_outside

        if rotate_outside(model, rotation)["untied"]:
            untied, source.tied = list(source.tied), {}  # the head has its own weight now: never re-tie it
            config_changes["tie_word_embeddings"] = False

    def write_outside(blocks) -> None:
        names = [*outside, *untied]
        writer.write(0, {n: model.get_parameter(n) for n in names if n not in source.tied})
        source.release(names)  # not needed while the blocks stream

    batches = token_batches(tokens, batch_size) if tokens is not None else None
    store = StreamedBlocks(source, writer, quantized_format=quantized_format, rotation=rotation)
    run_stage(model, modifiers, batches, store, device, mode=mode, report=report,
              before_blocks=write_outside, probe_store=StreamedBlocks(source, None, rotation=rotation))
    writer.finish()
    if store.online:
        from service.transform_export import DESCRIPTION_KEY, transform_config

        config_changes[DESCRIPTION_KEY] = store.online
        config_changes["transform_config"] = transform_config(store.online)
    if not store.quantized:
        return config_changes
    from service.quantized_export import quantization_config
    from service.targets import COMPRESSIBLE

    heads = [n for n, m in model.named_modules()
             if isinstance(m, COMPRESSIBLE) and not any(n.startswith(b + ".") for b in block_names)]
    config = quantization_config(list(store.quantized.items()), ignore=[*heads, *store.unquantized])
    groups = config["config_groups"]
    if len(groups) == 1 and not store.unquantized:  # one scheme on every block Linear: say so, not 100 names
        next(iter(groups.values()))["targets"] = ["Linear"]
    if "transform_config" in config_changes:  # compressed-tensors keeps it inside the quantization config
        config["transform_config"] = config_changes.pop("transform_config")
    return {**config_changes, "quantization_config": config}


def _streaming_rotation(model: nn.Module, modifiers):
    """The SpinQuantPlan of the stage's SpinQuantModifier, if any, for rotating block by block as they stream.

    R1 and R2 are fused into the weights; R3 and R4 run online, and each block's transform tensors go to its shard
    (see service.transform_export). Learned rotations need the whole model at once: the library's ``oneshot``.
    """
    from service.spinquant import SpinQuantModifier, infer_mappings, spinquant_plan

    spin = [m for m in modifiers if isinstance(m, SpinQuantModifier)]
    if not spin:
        return None
    if len(spin) > 1:
        raise ValueError("recipe: one SpinQuantModifier per stage")
    modifier = spin[0]
    if modifier.learnable:
        raise ValueError("SpinQuantModifier.learnable: learning rotations needs the whole model in memory; the "
                         "streaming path (CLI, job service) takes fixed rotations: use service.oneshot.oneshot")
    mapping, norms = infer_mappings(model)
    plan = spinquant_plan(model.config, modifier, modifier.mappings or mapping, modifier.norm_mappings or norms)
    if plan.r3 is not None:
        from service.rotations import enable_r3_attention

        enable_r3_attention(model)  # blocks are marked as they load (rotate_block)
    return plan


@dataclass
class EvalSet:
    name: str
    source: str | Path
    max_tokens: int | None = None


def compress_checkpoint(
    model: str | Path,
    recipe: Any,
    output: str | Path,
    *,
    dataset: str | Path | None = None,
    num_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    sampling: str = "head",
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    pipeline: str = "two_pass",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    revision: str | None = None,
    evals: Sequence[EvalSet] = (),
    eval_seq_len: int = 512,
    overwrite: bool = False,
    on_progress: Progress | None = None,
    on_shard: Callable[[Path, str], None] | None = None,
) -> dict:
    """Compress the checkpoint `model` with `recipe` into the directory `output`; returns the report.

    The output directory appears complete or not at all: config.json (with a `sparsity_config` when the recipe
    prunes), sharded safetensors and their index, tokenizer and generation files, recipe.yaml and
    compression_report.json.
    `on_shard(path, name)` is called with each weight shard of the output as soon as it is complete (`path` is in
    a temporary folder that is renamed at the end: take the file at once, e.g. by a hard link).
    """
    from service.calibration_data import calibration_tokens
    from service.text_data import load_tokenizer

    started = time.perf_counter()
    progress = on_progress or (lambda event: None)
    progress({"stage": "loading", "fraction": 0.0})
    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline must be one of {PIPELINES}; got {pipeline!r}")
    recipe = load_recipe(recipe)
    device = execution_device(device)
    model_dir = resolve_model_dir(model, revision=revision, allow_pickle=allow_pickle)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    tokens = None
    if needs_data(recipe.modifiers()):
        if dataset is None:
            raise ValueError("dataset: this recipe calibrates on data; give --dataset")
        tokens = calibration_tokens(dataset, tokenizer, num_samples, seq_len, seed=seed, sampling=sampling)

    for stage in recipe.stages[:-1]:
        # A later stage streams the checkpoint this one writes, which holds neither quantization nor online
        # rotations in a form it reads back: both belong to the output, so to the last stage.
        final_only = [type(m).__name__ for m in stage.modifiers
                      if _quantizes(m) or set(getattr(m, "rotations", ())) & {"R3", "R4"}]
        if final_only:
            raise ValueError(f"recipe: {', '.join(final_only)} in stage {stage.name!r} must be in the last stage: "
                             "quantization and online rotations (R3, R4) are the final checkpoint's format")

    config_changes: dict = {}
    with AtomicDirectory(output, overwrite=overwrite) as out:
        source_dir = _safetensors_source(model_dir, out.tmp, allow_pickle, trust_remote_code)
        parts: list[ReportBuilder] = []
        for k, stage in enumerate(recipe.stages):
            last = k == len(recipe.stages) - 1
            target = out.tmp if last else out.tmp / f".stage-{k}"
            part = ReportBuilder(progress, stage="compressing")
            changes = _stream_stage(source_dir, target, stage.modifiers, tokens, device, mode=pipeline,
                                    trust_remote_code=trust_remote_code, batch_size=batch_size, report=part,
                                    on_shard=on_shard if last else None, quantized_format=last)
            config_changes.update(changes)
            if source_dir.parent == out.tmp and source_dir.name.startswith(".stage-"):
                shutil.rmtree(source_dir)
            if not last:
                _finish_directory(model_dir, target, extra_config=config_changes)
            source_dir = target
            parts.append(part)
        report = merge_reports(parts)
        report.update(
            recipe=recipe_summary(recipe),
            source={"model": str(model), "directory": str(model_dir)},
            calibration=None if tokens is None else {
                "dataset": str(dataset), "num_samples": num_samples, "seq_len": seq_len, "seed": seed,
                "sampling": sampling,
            },
            pipeline=pipeline, device=str(device),
        )
        if any(hasattr(m, "mask_structure") for m in recipe.modifiers()):  # only a recipe that prunes is sparse
            config_changes = {**config_changes, "sparsity_config": sparsity_config(report, recipe.modifiers())}
        _finish_directory(model_dir, out.tmp, config_changes)
        (out.tmp / "recipe.yaml").write_text(recipe.to_yaml())
        if evals:
            progress({"stage": "evaluating", "fraction": 1.0})
            report["perplexity"] = evaluate_pair(model_dir, out.tmp, tokenizer, evals, eval_seq_len, device,
                                                 trust_remote_code)
        report["totals"]["wall_seconds"] = time.perf_counter() - started
        write_json(out.tmp / "compression_report.json", report)
        progress({"stage": "publishing", "fraction": 1.0})
        report["output"] = str(out.publish())
    return report


def _quantizes(modifier) -> bool:
    from service.quantization_modifiers import QuantizationModifierBase

    return isinstance(modifier, QuantizationModifierBase)


def _safetensors_source(model_dir: Path, workdir: Path, allow_pickle: bool, trust_remote_code: bool) -> Path:
    """model_dir itself, or (only when allowed) a safetensors copy of a pickle-only checkpoint."""
    from service.model_source import CheckpointError, SafetensorsCheckpoint

    try:
        SafetensorsCheckpoint(model_dir)
        return model_dir
    except CheckpointError:
        if not allow_pickle or not list(model_dir.glob("pytorch_model*.bin")):
            raise
    from service.model_source import load_config, model_class

    log.warning("loading pickle checkpoint %s because allow_pickle was given", model_dir)
    config = load_config(model_dir, trust_remote_code=trust_remote_code)
    dense = model_class(config).from_pretrained(str(model_dir), use_safetensors=False,
                                                trust_remote_code=trust_remote_code)
    converted = workdir / ".stage-source"
    dense.save_pretrained(str(converted), safe_serialization=True)
    return converted


def _finish_directory(model_dir: Path, target: Path, extra_config: dict) -> None:
    import json

    config = json.loads((model_dir / "config.json").read_text())
    config.update(extra_config)
    write_json(target / "config.json", config)
    copy_side_files(model_dir, target)


def load_dense(model_dir: Path, device: torch.device, trust_remote_code: bool = False) -> nn.Module:
    from service.model_source import load_config, model_class

    config = load_config(model_dir, trust_remote_code=trust_remote_code)
    cls = model_class(config, trust_remote_code=trust_remote_code)
    return cls.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code).to(device).eval()


def load_output(directory: str | Path, *, trust_remote_code: bool = False) -> nn.Module:
    """A compressed output as the model it computes: a quantized one decompressed by compressed-tensors, online
    rotations (R3/R4) re-attached from the checkpoint's description. On CPU, in eval mode."""
    import json

    from service.rotations import attach_online_transforms
    from service.transform_export import DESCRIPTION_KEY

    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    if "quantization_config" in config:
        from service.quantized_export import load_quantized

        model = load_quantized(directory)
    else:
        model = load_dense(directory, torch.device("cpu"), trust_remote_code)
    if DESCRIPTION_KEY in config:
        attach_online_transforms(model, config[DESCRIPTION_KEY])
    return model.eval()


def evaluate_pair(before_dir: Path, after_dir: Path, tokenizer, evals: Sequence[EvalSet], seq_len: int,
                  device: torch.device, trust_remote_code: bool = False) -> dict:
    """Perplexity of the dense and the compressed model on each evaluation text, each streamed block by block
    (evaluation needs no more memory than compression), quantized and online-rotated outputs included."""
    from service.perplexity import perplexity_streamed
    from service.text_data import read_texts, tokenize

    results: dict[str, dict] = {}
    for e in evals:
        ids = tokenize(tokenizer, read_texts(e.source), max_tokens=e.max_tokens)
        entry = results[e.name] = {"source": str(e.source), "tokens": int(len(ids))}
        for key, directory in (("before", before_dir), ("after", after_dir)):
            entry[key] = perplexity_streamed(directory, ids, seq_len=seq_len, device=device,
                                             trust_remote_code=trust_remote_code).ppl
        entry["ratio"] = entry["after"] / entry["before"]
    return results
