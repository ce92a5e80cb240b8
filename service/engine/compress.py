"""A checkpoint in, a compressed checkpoint out: ``compress_checkpoint`` streams the recipe's stages block by block
from the safetensors files to output shards (what the CLI and the job service run).

What to do comes in one ``CompressionOptions`` (service.engine.options); the stages run through the same stage
runner as the in-memory ``oneshot`` (service.engine.oneshot). The output directory appears complete or not at all.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from service.engine.export import (
    AtomicDirectory, ShardWriter, copy_side_files, shard_name, sparsity_config, write_json,
)
from service.engine.model_source import StreamedModel, resolve_model_dir
from service.engine.block_checkpoints import BlockCheckpoints, FinishedBlock, model_files_fingerprint, run_fingerprint
from service.engine.data_parallel import WorkerPool
from service.engine.oneshot import (
    Progress, ReportBuilder, merge_reports, needs_data, quantizes, stage_blocks, token_batches,
)
from service.engine.options import CompressionOptions, Evaluation
from service.engine.pipeline import BlockResult, execution_device
from service.recipes.recipe import load_recipe, recipe_summary

log = logging.getLogger(__name__)


class StreamedBlocks:
    """Block weights, once compressed, written to an output shard, then freed (the coordinator reads them from the
    source checkpoint onto the device; service.engine.data_parallel rotates them).

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

    def store(self, index, name, block, *, changed) -> dict:
        """Write the block's shard and free it; returns how its shard is laid out ({"quantized": {module: its
        schemes' QuantArgs as dicts}, "unquantized": [modules]}, empty for a plain shard), what a run that resumes
        after this block needs to read the shard back (``restore``)."""
        names = self.source.parameter_names(name)
        layout: dict = {}
        if self.writer is not None:
            tensors = {n: self.source.model.get_parameter(n) for n in names}
            if self.quantized_format:
                tensors, layout = self._compressed(name, block, tensors)
            if self.rotation is not None:
                tensors.update(self._online(name, block))
            self.writer.write(index + 1, tensors)
        if self.rotation is not None:
            from service.recipes.online_rotations import detach_online

            detach_online(block)  # the block's hooks go with its weights; a later load rotates it afresh
        self.source.release(names)
        return layout

    def restore(self, tensors: dict[str, torch.Tensor], layout: dict) -> dict[str, torch.Tensor]:
        """A finished block's parameters from its shard's ``tensors`` as ``store`` laid them out (``layout``): each
        quantized module's weight decompressed to the very values the run propagated with, and the module's scheme
        taken into this stage's ``quantized`` as if the block had been compressed again."""
        from types import SimpleNamespace

        from service.algorithms.quantization import QuantArgs
        from service.engine.quantized_export import compressed_modules, decompress_weight, quantization_config
        from service.engine.quantized_export import scheme_carrier

        quantized = {sub: scheme_carrier(SimpleNamespace(
            quantization_args=QuantArgs(**entry["weights"]),
            input_quantization_args=QuantArgs(**entry["inputs"]) if entry.get("inputs") else None))
            for sub, entry in layout.get("quantized", {}).items()}
        out = dict(tensors)
        if quantized:
            schemes = compressed_modules(self.source.model, quantization_config(list(quantized.items())))
            for sub in quantized:
                packed = {k[len(sub) + 1:]: out.pop(k) for k in list(out) if k.startswith(sub + ".weight")}
                dtype = self.source.model.get_parameter(f"{sub}.weight").dtype
                out[f"{sub}.weight"] = decompress_weight(packed, schemes[sub]).to(dtype)
        self.quantized.update(quantized)
        self.unquantized.extend(layout.get("unquantized", []))
        return out

    def _online(self, name: str, block: nn.Module) -> dict:
        from service.engine.transform_export import transform_tensors
        from service.recipes.online_rotations import online_transforms_description

        description = online_transforms_description(block, prefix=name)
        for key, entries in description.items():
            self.online.setdefault(key, {}).update(entries)
        return transform_tensors(description)

    def _compressed(self, name: str, block: nn.Module, tensors: dict) -> dict:
        from service.engine.quantized_export import compress_quantized_tensors, is_quantized, scheme_carrier
        from service.recipes.targets import COMPRESSIBLE

        layout: dict = {"quantized": {}, "unquantized": []}
        for sub, module in block.named_modules(prefix=name):
            if is_quantized(module):
                for param in ("weight", "bias"):
                    tensors.pop(f"{sub}.{param}", None)
                tensors.update(compress_quantized_tensors(sub, module))
                self.quantized[sub] = scheme_carrier(module)
                inputs = getattr(module, "input_quantization_args", None)
                layout["quantized"][sub] = {"weights": dataclasses.asdict(module.quantization_args),
                                            "inputs": dataclasses.asdict(inputs) if inputs is not None else None}
            elif isinstance(module, COMPRESSIBLE):
                self.unquantized.append(sub)
                layout["unquantized"].append(sub)
        return tensors, layout


def _stream_stage(
    source_dir: Path, target_dir: Path, modifiers, tokens, device, *, mode, trust_remote_code, batch_size,
    report: ReportBuilder, on_shard: Callable[[Path, str], None] | None = None, quantized_format: bool = False,
    workers: WorkerPool | None = None, checkpoint=None, checkpoints: BlockCheckpoints | None = None,
    fingerprint: dict[str, str] | None = None, unsupported: str | None = None, calibrate_all_experts: bool = False,
) -> dict:
    """One recipe stage from the checkpoint in ``source_dir`` to shards in ``target_dir``; what config.json must
    change: ``quantization_config`` (with ``quantized_format``, when something was quantized),
    ``tie_word_embeddings`` (when a rotation untied the head).

    The blocks run over ``workers`` (service.engine.data_parallel; one worker in this process without them); this
    process is rank 0: it reads each block from the checkpoint (``checkpoint``: a reader of the source's tensors,
    e.g. ranged GETs on S3; default the safetensors files in ``source_dir``), shares it, and writes its shard.
    With ``checkpoints``, every finished block is recorded there and the leading blocks a run with the same
    ``fingerprint`` finished before are replayed from their shards instead of compressed again (``unsupported``
    says why this stage cannot resume, when it cannot)."""
    from service.engine.data_parallel import BlockWorker, Coordinator, LocalWorkers, StageSpec

    extra = {"checkpoint": checkpoint} if checkpoint is not None else {}
    source = StreamedModel(source_dir, trust_remote_code=trust_remote_code, **extra)
    model = source.model
    if calibrate_all_experts:
        from service.engine.moe import set_calibrate_all_experts

        set_calibrate_all_experts(model, True)
    blocks = stage_blocks(model, modifiers)
    block_names = [name for name, _ in blocks]
    for modifier in modifiers:
        modifier.check_layers(block_names)
    report.total_blocks = len(blocks)
    outside = [n for n in source.keys if not any(n.startswith(b + ".") for b in block_names)]
    writer = ShardWriter(target_dir, num_shards=len(block_names) + 1, on_written=on_shard)
    source.load(outside, "cpu")  # embeddings, final norm, head: needed to capture the first block's inputs
    size = workers.size if workers is not None else 1
    # The other workers rotate their own copy: they get the weights as stored.
    raw_outside = {n: model.get_parameter(n).detach().clone() for n in outside} if size > 1 else {}
    config_changes: dict = {}
    rotation = _streaming_rotation(model, modifiers)
    untied: list[str] = []
    if rotation is not None:
        from service.recipes.spinquant import rotate_outside

        if rotate_outside(model, rotation)["untied"]:
            untied, source.tied = list(source.tied), {}  # the head has its own weight now: never re-tie it
            config_changes["tie_word_embeddings"] = False

    batches = None
    if needs_data(modifiers):
        if tokens is None:
            raise ValueError(
                f"dataset: {', '.join(type(m).__name__ for m in modifiers)} needs calibration data; give a dataset"
            )
        batches = token_batches(tokens, batch_size)
        if len(batches) < size:
            # Every worker needs batches of its own: smaller ones (the same samples, so the same statistics up to
            # float rounding).
            if tokens.shape[0] < size:
                raise ValueError(f"resources.workers: {size} workers need at least {size} calibration samples; "
                                 f"dataset.num_samples is {tokens.shape[0]}")
            batches = token_batches(tokens, -(-tokens.shape[0] // size))
    local = BlockWorker(0, device, workers.exchange if workers is not None else None, model=model)
    group = workers.open(local) if workers is not None else LocalWorkers([local])
    coordinator = Coordinator(group, local, mode=mode)
    coordinator.begin_stage(StageSpec(source.config, list(modifiers), rotation, trust_remote_code), batches,
                            raw_outside)
    del raw_outside
    if batches is not None and not local.hidden:
        raise ValueError("dataset: the calibration data yielded no batches")
    names = [*outside, *untied]
    writer.write(0, {n: model.get_parameter(n) for n in names if n not in source.tied})
    source.release(names)  # not needed while the blocks stream

    def load(index: int, name: str) -> dict | None:
        params = source.parameter_names(name)
        source.load(params, device)
        return {n: model.get_parameter(n) for n in params} if size > 1 else None

    for k, modifier in enumerate(modifiers):
        if getattr(modifier, "sparsity_profile", None) == "owl":
            _owl_profile(coordinator, source, blocks, load, k, modifier)
    store = StreamedBlocks(source, writer, quantized_format=quantized_format, rotation=rotation)
    finished = []
    if checkpoints is not None:
        finished = checkpoints.resume(fingerprint or {}, len(blocks), target_dir, unsupported)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(blocks), desc="blocks", unit="block", disable=None)
    try:
        for index, (name, block) in enumerate(blocks):
            start = time.perf_counter()
            last = index == len(blocks) - 1
            layout: dict = {}
            if index < len(finished):
                _replay(coordinator, source, store, writer, finished[index], index, name, device, last=last)
                result = BlockResult(outputs=[], modules=dict(finished[index].report.get("modules", {})))
            else:
                result = coordinator.run_block(index, load(index, name), last=last)
                layout = store.store(index, name, block, changed=bool(result.modules))
            coordinator.release(index)
            bar.set_postfix_str(name)
            bar.update()
            seconds = time.perf_counter() - start
            if index < len(finished):
                seconds = finished[index].report.get("layer", {}).get("seconds", seconds)
            layer = report.layer_entry(index, name, result, seconds)
            if checkpoints is not None and index >= len(finished):
                # Before the progress callback, which may stop the run: a block written is a block kept.
                shard = shard_name(index + 1, writer.num_shards)
                checkpoints.finished(FinishedBlock(index, shard, target_dir / shard,
                                                   {"layer": layer, "modules": result.modules, "layout": layout}),
                                     fingerprint or {})
            report.on_block(index, name, result, seconds)
    finally:
        bar.close()
    coordinator.end_stage()
    writer.finish()
    if store.online:
        from service.engine.transform_export import DESCRIPTION_KEY, transform_config

        config_changes[DESCRIPTION_KEY] = store.online
        config_changes["transform_config"] = transform_config(store.online)
    if not store.quantized:
        return config_changes
    from service.engine.quantized_export import quantization_config
    from service.recipes.targets import COMPRESSIBLE

    heads = [n for n, m in model.named_modules()
             if isinstance(m, COMPRESSIBLE) and not any(n.startswith(b + ".") for b in block_names)]
    config = quantization_config(list(store.quantized.items()), ignore=[*heads, *store.unquantized])
    groups = config["config_groups"]
    if len(groups) == 1 and not store.unquantized:  # one scheme on every block Linear: say so, not 100 names
        next(iter(groups.values()))["targets"] = ["Linear"]
    if "transform_config" in config_changes:  # compressed-tensors keeps it inside the quantization config
        config["transform_config"] = config_changes.pop("transform_config")
    return {**config_changes, "quantization_config": config}


def _replay(coordinator, source: StreamedModel, store: StreamedBlocks, writer: ShardWriter, done: FinishedBlock,
            index: int, name: str, device, *, last: bool) -> None:
    """Block ``index`` from its checkpoint: its compressed weights, read from its shard (quantized ones
    decompressed), run forward on every worker (the next block's inputs); the shard itself is taken into the output
    as it is."""
    from safetensors.torch import load_file

    from service.engine.model_source import set_tensor

    tensors = store.restore(load_file(str(done.path)), done.report.get("layout", {}))
    params = source.parameter_names(name)
    missing = [n for n in params if n not in tensors]
    if missing:
        raise ValueError(f"the checkpoint of block {index} ({done.shard}) lacks {missing[:3]}")
    for n in params:
        set_tensor(source.model, n, tensors[n].to(device))
    source._retie()
    coordinator.replay_block(index, {n: tensors[n] for n in params} if coordinator.size > 1 else None, last=last)
    writer.adopt(index + 1, done.path)
    source.release(params)


def _owl_profile(coordinator, source: StreamedModel, blocks, load, index: int, modifier) -> None:
    """OWL: every block's outlier ratio on the dense model (a pass that writes nothing), turned into per-block
    sparsities for the stage's modifier ``index`` on every worker; the workers then start again from their
    captured inputs."""
    from service.algorithms.owl import owl_sparsities

    log.info("OWL: measuring outlier ratios of %d blocks on the dense model", len(blocks))
    ratios = []
    for i, (name, block) in enumerate(blocks):
        coordinator.run_block(i, load(i, name), last=i == len(blocks) - 1, probe=True)
        ratios.append(coordinator.local.probe_ratio())
        coordinator.release(i)
        if coordinator.local.rotation is not None:
            from service.recipes.online_rotations import detach_online

            detach_online(block)
        source.release(source.parameter_names(name))
    sparsities = owl_sparsities(ratios, modifier.target_sparsity, modifier.owl_lmbda)
    log.info("OWL: outlier ratios %s -> sparsities %s", [round(r, 4) for r in ratios], [round(s, 4) for s in sparsities])
    modifier.set_layer_sparsities(sparsities)
    for rank in range(1, coordinator.size):
        coordinator.workers.call({rank: ("set_layer_sparsities", (index, sparsities))})
    from service.engine.data_parallel import each

    each(coordinator.workers, "restart_from_capture")


def _streaming_rotation(model: nn.Module, modifiers):
    """The SpinQuantPlan of the stage's SpinQuantModifier, if any, for rotating block by block as they stream.

    R1 and R2 are fused into the weights; R3 and R4 run online, and each block's transform tensors go to its shard
    (see service.engine.transform_export). Learned rotations need the whole model at once: the library's ``oneshot``.
    """
    from service.recipes.spinquant import SpinQuantModifier, infer_mappings, spinquant_plan

    spin = [m for m in modifiers if isinstance(m, SpinQuantModifier)]
    if not spin:
        return None
    if len(spin) > 1:
        raise ValueError("recipe: one SpinQuantModifier per stage")
    modifier = spin[0]
    if modifier.learnable:
        raise ValueError("SpinQuantModifier.learnable: learning rotations needs the whole model in memory; the "
                         "streaming path (CLI, job service) takes fixed rotations: use service.engine.oneshot.oneshot")
    mapping, norms = infer_mappings(model)
    plan = spinquant_plan(model.config, modifier, modifier.mappings or mapping, modifier.norm_mappings or norms)
    if plan.r3 is not None:
        from service.recipes.online_rotations import enable_r3_attention

        enable_r3_attention(model)  # blocks are marked as they load (rotate_block)
    return plan


def compress_checkpoint(
    options: CompressionOptions | dict[str, Any],
    *,
    on_progress: Progress | None = None,
    on_shard: Callable[[Path, str], None] | None = None,
    workers: WorkerPool | None = None,
    checkpoint=None,
    checkpoints: BlockCheckpoints | None = None,
    after_checkpoint: Callable[[], Any] | None = None,
) -> dict:
    """Compress ``options.model`` with ``options.recipe`` into the directory ``options.output``; the report.

    ``options`` is a ``CompressionOptions`` or a mapping of its fields (checked first: a bad one raises an
    OptionsError naming it). The output directory appears complete or not at all: config.json (with a
    ``sparsity_config`` when the recipe prunes), sharded safetensors and their index, tokenizer and generation
    files, recipe.yaml and compression_report.json. ``on_progress(event)`` gets a dict after every block;
    ``on_shard(path, name)`` each weight shard of the output as soon as it is complete (``path`` is in a temporary
    folder that is renamed at the end: take the file at once, e.g. by a hard link). ``workers``: run each stage's
    blocks data-parallel over them (service.engine.data_parallel); default one worker, in this process.
    ``checkpoint``: a reader of the model's tensors (e.g. ranged GETs on S3), ``options.model`` then holding only
    its config and tokenizer. ``checkpoints``: record each finished block there, and reuse the ones a run with the
    same fingerprint finished before (service.engine.block_checkpoints). ``after_checkpoint()``: a reader of the
    output's weight shards for the evaluation (e.g. of their uploaded copies), for a caller whose ``on_shard``
    takes each shard away; called once every shard is written.
    """
    from service.engine.calibration_data import calibration_tokens
    from service.engine.text_data import load_tokenizer

    options = CompressionOptions.parse(options)
    started = time.perf_counter()
    progress = on_progress or (lambda event: None)
    progress({"stage": "loading", "fraction": 0.0})
    recipe = load_recipe(options.recipe)
    device = execution_device(options.device)
    trust = options.trust_remote_code
    model_dir = resolve_model_dir(options.model, revision=options.revision, allow_pickle=options.allow_pickle)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust)
    calibration = options.dataset
    tokens = None
    if needs_data(recipe.modifiers()):
        if calibration is None:
            raise ValueError("dataset: this recipe calibrates on data; give --dataset")
        tokens = calibration_tokens(calibration.source, tokenizer, calibration.num_samples, calibration.seq_len,
                                    seed=calibration.seed, sampling=calibration.sampling)

    for stage in recipe.stages[:-1]:
        # A later stage streams the checkpoint this one writes, which holds neither quantization nor online
        # rotations in a form it reads back: both belong to the output, so to the last stage.
        final_only = [type(m).__name__ for m in stage.modifiers
                      if quantizes(m) or set(getattr(m, "rotations", ())) & {"R3", "R4"}]
        if final_only:
            raise ValueError(f"recipe: {', '.join(final_only)} in stage {stage.name!r} must be in the last stage: "
                             "quantization and online rotations (R3, R4) are the final checkpoint's format")

    fingerprint = unsupported = None
    if checkpoints is not None:
        fingerprint = run_fingerprint(
            model=model_files_fingerprint(model_dir, checkpoint), recipe_yaml=recipe.to_yaml(), tokens=tokens,
            batch_size=calibration.batch_size if calibration else None,
            pipeline=options.pipeline + ("+moe_calibrate_all_experts"
                                         if calibration and calibration.moe_calibrate_all_experts else ""),
            workers=workers.size if workers is not None else 1)
        unsupported = _why_not_resumable(recipe)

    config_changes: dict = {}
    with AtomicDirectory(options.output, overwrite=options.overwrite) as out:
        source_dir = model_dir if checkpoint is not None else _safetensors_source(model_dir, out.tmp,
                                                                                   options.allow_pickle, trust)
        parts: list[ReportBuilder] = []
        for k, stage in enumerate(recipe.stages):
            last = k == len(recipe.stages) - 1
            target = out.tmp if last else out.tmp / f".stage-{k}"
            part = ReportBuilder(progress, stage="compressing")
            changes = _stream_stage(source_dir, target, stage.modifiers, tokens, device, mode=options.pipeline,
                                    trust_remote_code=trust,
                                    batch_size=calibration.batch_size if calibration else None,
                                    report=part, on_shard=on_shard if last else None, quantized_format=last,
                                    workers=workers, checkpoint=checkpoint if k == 0 else None,
                                    checkpoints=checkpoints if last else None, fingerprint=fingerprint,
                                    unsupported=unsupported,
                                    calibrate_all_experts=bool(calibration and calibration.moe_calibrate_all_experts))
            config_changes.update(changes)
            if source_dir.parent == out.tmp and source_dir.name.startswith(".stage-"):
                shutil.rmtree(source_dir)
            if not last:
                _finish_directory(model_dir, target, extra_config=config_changes)
            source_dir = target
            parts.append(part)
        report = merge_reports(parts)
        from service.engine.moe import moe_summary

        report.update(moe_summary(report["modules"]))  # nothing for a model without experts
        report.update(
            recipe=recipe_summary(recipe),
            source={"model": options.model, "directory": str(model_dir)},
            calibration=None if tokens is None else {
                "dataset": calibration.source, "num_samples": calibration.num_samples,
                "seq_len": calibration.seq_len, "seed": calibration.seed, "sampling": calibration.sampling,
                "moe_calibrate_all_experts": calibration.moe_calibrate_all_experts,
            },
            pipeline=options.pipeline, device=str(device),
        )
        if any(hasattr(m, "mask_structure") for m in recipe.modifiers()):  # only a recipe that prunes is sparse
            config_changes = {**config_changes, "sparsity_config": sparsity_config(report, recipe.modifiers())}
        _finish_directory(model_dir, out.tmp, config_changes)
        (out.tmp / "recipe.yaml").write_text(recipe.to_yaml())
        if options.evals:
            progress({"stage": "evaluating", "fraction": 1.0})
            report["perplexity"] = evaluate_pair(
                model_dir, out.tmp, tokenizer, options.evals, options.eval_seq_len, device, trust,
                before_checkpoint=checkpoint, after_checkpoint=after_checkpoint() if after_checkpoint else None)
        report["totals"]["wall_seconds"] = time.perf_counter() - started
        write_json(out.tmp / "compression_report.json", report)
        progress({"stage": "publishing", "fraction": 1.0})
        report["output"] = str(out.publish())
    return report


def _why_not_resumable(recipe) -> str | None:
    """Why a run of ``recipe`` cannot be taken up from per-block checkpoints (None: it can). A finished block is
    replayed from its shard, so the shard must give back exactly the weights the run propagated with: true of pruned
    and dense shards, of quantized ones (decompressed) and of fused rotations (R1, R2), not yet of blocks with
    online rotations (R3, R4) attached, whose hooks every worker would have to attach again."""
    if len(recipe.stages) > 1:
        return "a recipe of several stages"
    for modifier in recipe.modifiers():
        if set(getattr(modifier, "rotations", ())) & {"R3", "R4"}:
            return f"online rotations R3/R4 ({type(modifier).__name__})"
    return None


def _safetensors_source(model_dir: Path, workdir: Path, allow_pickle: bool, trust_remote_code: bool) -> Path:
    """model_dir itself, or (only when allowed) a safetensors copy of a pickle-only checkpoint."""
    from service.engine.model_source import CheckpointError, SafetensorsCheckpoint

    try:
        SafetensorsCheckpoint(model_dir)
        return model_dir
    except CheckpointError:
        if not allow_pickle or not list(model_dir.glob("pytorch_model*.bin")):
            raise
    from service.engine.model_source import load_config, model_class

    log.warning("loading pickle checkpoint %s because allow_pickle was given", model_dir)
    config = load_config(model_dir, trust_remote_code=trust_remote_code)
    dense = model_class(config).from_pretrained(str(model_dir), use_safetensors=False,
                                                trust_remote_code=trust_remote_code)
    converted = workdir / ".stage-source"
    dense.save_pretrained(str(converted), safe_serialization=True)
    return converted


def _finish_directory(model_dir: Path, target: Path, extra_config: dict) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config.update(extra_config)
    write_json(target / "config.json", config)
    copy_side_files(model_dir, target)


def evaluate_pair(before_dir: Path, after_dir: Path, tokenizer, evals: Sequence[Evaluation], seq_len: int,
                  device: torch.device, trust_remote_code: bool = False, before_checkpoint=None,
                  after_checkpoint=None) -> dict:
    """Perplexity of the dense and the compressed model on each evaluation text, each streamed block by block
    (evaluation needs no more memory than compression), quantized and online-rotated outputs included."""
    from service.engine.perplexity import perplexity_streamed
    from service.engine.text_data import read_texts, tokenize

    results: dict[str, dict] = {}
    for e in evals:
        ids = tokenize(tokenizer, read_texts(e.source), max_tokens=e.max_tokens)
        entry = results[e.name] = {"source": str(e.source), "tokens": int(len(ids))}
        for key, directory, checkpoint in (("before", before_dir, before_checkpoint), ("after", after_dir, after_checkpoint)):
            entry[key] = perplexity_streamed(directory, ids, seq_len=seq_len, device=device,
                                             trust_remote_code=trust_remote_code, checkpoint=checkpoint).ppl
        entry["ratio"] = entry["after"] / entry["before"]
    return results
