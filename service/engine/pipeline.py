"""Sequential calibration: blocks are compressed one at a time, each calibrated on the outputs of the compressed
blocks before it.

Data flows forward through four steps, each with tensors in and out:
  capture   the model's own forward is run up to the first block; it records every block's keyword arguments
            (masks, rotary embeddings) and the first block's hidden states, per calibration batch;
  calibrate forward pre-hooks on the target modules accumulate statistics (a Hessian, or input norms); modules
            that read the very same input tensor (q/k/v, gate/up) share one accumulator;
  solve     a modifier turns (weight, statistic) into a pruned weight with a pure function;
  propagate the block's output, computed with the pruned weights, becomes the next block's input.

Two modes. "two_pass" (the default) is the SparseGPT paper's and llm-compressor's: every module of a block is
calibrated on the dense block, then the block runs again with the pruned weights to propagate. "one_pass" does
calibrate, solve and propagate in a single forward per block ("true sequential"): every calibration batch runs
in its own greenlet, and each pauses at a target module's pre-hook until all batches have contributed to its
statistic; the module is then solved and all batches continue through the pruned module. So o_proj is
calibrated on the output of the pruned q/k/v, down_proj on the pruned gate/up, and the block's compressed
output falls out of the same pass: half the forward work, lower layer losses, and perplexity within a few
percent of two-pass either way (bench/RESULTS.md). Its memory: what each batch holds at a pause (the residual
and one module's input), for all batches at once; transient intermediates exist for one batch at a time.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from service.algorithms.hessian import HessianAccumulator, InputNormAccumulator
from service.engine.options import PIPELINES
from service.recipes.layerwise_modifier import memory_mb
from service.recipes.targets import compressible_modules

log = logging.getLogger(__name__)



class PipelineError(RuntimeError):
    pass


@dataclass
class BlockCall:
    """How the model called a block for one batch, minus the hidden states (which change block to block)."""

    args: tuple
    kwargs: dict
    hidden_as_kwarg: bool

    def __call__(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if self.hidden_as_kwarg:
            out = block(*self.args, hidden_states=hidden, **self.kwargs)
        else:
            out = block(hidden, *self.args, **self.kwargs)
        # transformers >= 5 blocks return the hidden states; older and remote-code blocks return a tuple.
        return out[0] if isinstance(out, (tuple, list)) else out


class _StopForward(Exception):
    pass


def execution_device(device: str | torch.device | None = None) -> torch.device:
    """The device a run executes on: ``auto`` (or None) is CUDA when torch sees one, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"device must be auto or a torch device such as cpu, cuda or cuda:1, got {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for but torch sees no CUDA device; use --device cpu")
    return device


def to_device(obj: Any, device: torch.device, memo: dict[int, Any] | None = None) -> Any:
    """`obj` with every tensor inside (tuples, lists, dicts) moved to device; shared tensors stay shared."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = (obj, obj.to(device))  # holding obj keeps its id from being reused by another tensor
        return memo[id(obj)][1]
    if isinstance(obj, tuple):
        return tuple(to_device(o, device, memo) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device, memo) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture(
    model: nn.Module, blocks: Sequence[tuple[str, nn.Module]], batches: Iterable[dict], device: torch.device
) -> tuple[list[torch.Tensor], list[list[BlockCall]]]:
    """Run the model's own forward up to the blocks for every batch.

    Returns the first block's hidden states per batch and, per block, the call (masks, position embeddings...)
    the model makes for each batch. Blocks are replaced by recorders that pass hidden states through unchanged,
    so blocks can stay on the meta device; the forward stops after the last block (no lm_head work).
    """
    hidden: list[torch.Tensor] = []
    calls: list[list[BlockCall]] = [[] for _ in blocks]
    memo: dict[int, Any] = {}

    def recorder(index: int):
        def forward(*args, **kwargs):
            as_kwarg = not args
            h = kwargs.pop("hidden_states") if as_kwarg else args[0]
            rest = args if as_kwarg else args[1:]
            calls[index].append(BlockCall(to_device(rest, device, memo), to_device(kwargs, device, memo), as_kwarg))
            if index == 0:
                hidden.append(h.to(device))
            if index == len(blocks) - 1:
                raise _StopForward
            return h

        return forward

    for i, (_, block) in enumerate(blocks):
        block.forward = recorder(i)
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embedding, "weight", None)
    input_device = weight.device if weight is not None and weight.device.type != "meta" else torch.device("cpu")
    try:
        for batch in batches:
            memo.clear()  # share tensors across the blocks of one batch only
            kwargs = to_device(dict(batch), input_device)
            if getattr(model.config, "use_cache", None) is not None:
                kwargs.setdefault("use_cache", False)
            try:
                model(**kwargs)
            except _StopForward:
                pass
            else:
                raise PipelineError("the model's forward did not reach its last block; check sequential_targets")
    finally:
        for _, block in blocks:
            del block.forward  # back to the class's forward
    return hidden, calls


# ----------------------------------------------------------------------------------------------------- statistics


class Compressor(Protocol):
    """What the pipeline asks of a pruning modifier for one module."""

    statistic: str | None  # "hessian", "input_norm", or None for data-free methods

    def compress_module(self, name: str, module: nn.Module, statistic: Any, sparsity: float) -> dict: ...


@dataclass
class Task:
    name: str
    module: nn.Module
    compressor: Compressor
    sparsity: float
    offload: bool = False  # keep the statistic on CPU between uses


def _new_accumulator(kind: str, columns: int, device: torch.device):
    if kind == "input_range":
        from service.algorithms.float_quantization import ActivationRange

        return ActivationRange()
    return HessianAccumulator(columns, device) if kind == "hessian" else InputNormAccumulator(columns, device)


def statistic_kinds(compressor) -> tuple[str, ...]:
    """The statistics a module's calibration inputs feed: the compressor's own (a Hessian, input norms), and the
    running input range when it calibrates static activation scales (FP8's input scale, NVFP4's global one). Being
    statistics like the others, ranges are shared by q/k/v, travel to a module's owner under data parallel and merge
    there in rank order."""
    kinds = [] if compressor.statistic is None else [compressor.statistic]
    if getattr(compressor, "observes_inputs", False) and "input_range" not in kinds:
        kinds.append("input_range")
    return tuple(kinds)


class BlockStatistics:
    """Calibration statistics of one block: one accumulator per (distinct module input, kind).

    A module's input is recognised as shared when, within one batch's forward, it is the very same tensor object
    another target module already read (q/k/v read the normed hidden states, gate/up the same): one Hessian
    serves them all, computed once.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.accumulators: dict[tuple[str, str], Any] = {}
        self.group_of: dict[str, str] = {}
        self._seen: dict[Any, dict[int, tuple[weakref.ref, str, set]]] = {}

    def observe(self, batch_key: Any, task: Task, x: torch.Tensor) -> None:
        kinds = statistic_kinds(task.compressor)
        if not kinds:
            return
        seen = self._seen.setdefault(batch_key, {})
        entry = seen.get(id(x))
        if entry is None or entry[0]() is not x:
            entry = (weakref.ref(x), task.name, set())
            seen[id(x)] = entry
        group = entry[1]
        previous = self.group_of.setdefault(task.name, group)
        if previous != group:
            raise PipelineError(
                f"{task.name} shares its input with {group} in one calibration batch but with {previous} in another"
            )
        for kind in kinds:
            if kind in entry[2]:
                continue
            entry[2].add(kind)
            acc = self.accumulators.get((group, kind))
            if acc is None:
                acc = self.accumulators[(group, kind)] = _new_accumulator(kind, x.shape[-1], self.device)
            acc.to(self.device).add(x)
            if task.offload:  # offload_hessians: device memory holds a Hessian only while it is being updated
                acc.to("cpu")

    def end_batch(self, batch_key: Any) -> None:
        self._seen.pop(batch_key, None)

    def statistic(self, task: Task, kind: str | None = None):
        """The task's statistic of ``kind`` (default: its compressor's own); None before any input was seen."""
        kind = kind or task.compressor.statistic
        if kind is None:
            return None
        group = self.group_of.get(task.name)
        return None if group is None else self.accumulators[(group, kind)]


# ---------------------------------------------------------------------------------------------------- block runner


@dataclass
class BlockResult:
    outputs: list[torch.Tensor]
    modules: dict[str, dict] = field(default_factory=dict)


def _compress(task: Task, stats: BlockStatistics) -> dict:
    statistic = stats.statistic(task)
    if task.compressor.statistic is not None and statistic is None:
        log.warning("%s received no calibration input (never called); left dense", task.name)
        return {"skipped": "no calibration input"}
    if task.offload and statistic is not None:
        statistic.to(stats.device)
    if "input_range" in statistic_kinds(task.compressor) and statistic is not None:
        task.compressor.set_input_range(task.name, stats.statistic(task, "input_range"))
    start = time.perf_counter()
    if statistic is not None and getattr(statistic, "num_tokens", None) == 0:
        from service.engine.moe import compress_without_tokens  # an expert its router sent no token

        report = compress_without_tokens(task, statistic)
    else:
        report = task.compressor.compress_module(task.name, task.module, statistic, task.sparsity)
    report["seconds"] = time.perf_counter() - start
    if statistic is not None:
        report["samples"] = statistic.num_samples if hasattr(statistic, "num_samples") else statistic.num_tokens
        report["tokens"] = statistic.num_tokens
        if task.offload:
            statistic.to("cpu")
    report["memory_mb"] = memory_mb(stats.device)
    return report


@torch.no_grad()
def run_block(
    block: nn.Module,
    hidden: list[torch.Tensor],
    calls: list[BlockCall],
    tasks: list[Task],
    *,
    mode: str = "two_pass",
    propagate: bool = True,
) -> BlockResult:
    """Calibrate, compress and propagate one block (already on its execution device).

    hidden[b] is the block's input for batch b, calls[b] how the model calls it. Returns the outputs per batch
    (computed with the compressed weights) and a report per compressed module. With propagate=False (the last
    block) the outputs are not computed in two-pass mode.
    """
    if mode not in PIPELINES:
        raise ValueError(f"pipeline must be one of {PIPELINES}; got {mode!r}")
    device = hidden[0].device if hidden else torch.device("cpu")
    stats = BlockStatistics(device)
    result = BlockResult(outputs=[])
    data_tasks = [t for t in tasks if t.compressor.statistic is not None]
    free_tasks = [t for t in tasks if t.compressor.statistic is None]
    for task in free_tasks:  # data-free methods need no forward before they prune
        result.modules[task.name] = _compress(task, stats)
    if not data_tasks:
        if propagate:
            result.outputs = [call(block, h) for h, call in zip(hidden, calls)]
        return result
    if mode == "one_pass":
        result.outputs = _one_pass(block, hidden, calls, data_tasks, stats, result.modules)
    else:
        _two_pass_calibrate(block, hidden, calls, data_tasks, stats)
        order = sorted(data_tasks, key=lambda t: list(stats.group_of).index(t.name) if t.name in stats.group_of else 1 << 30)
        for task in order:
            result.modules[task.name] = _compress(task, stats)
        if propagate:
            result.outputs = [call(block, h) for h, call in zip(hidden, calls)]
    return result


def _two_pass_calibrate(block, hidden, calls, tasks, stats) -> None:
    """Run the (dense) block on every batch with pre-hooks feeding the statistics.

    The first batch runs to the end and shows which target module is reached last; later batches stop right
    after that module's input is recorded, because nothing after it is needed (for a Llama block that skips the
    down_proj matmul: about a fifth of the calibration forward).
    """
    current = {"batch": None, "last": None}
    order: list[str] = []

    def hook_for(task: Task):
        def pre_hook(module, args):
            stats.observe(current["batch"], task, args[0])
            if current["batch"] == 0:
                order.append(task.name)
            elif task.name == current["last"]:
                raise _StopForward

        return pre_hook

    handles = [t.module.register_forward_pre_hook(hook_for(t)) for t in tasks]
    try:
        for b, (h, call) in enumerate(zip(hidden, calls)):
            current["batch"] = b
            try:
                call(block, h)
            except _StopForward:
                pass
            stats.end_batch(b)
            if b == 0 and order:
                current["last"] = order[-1]
    finally:
        for handle in handles:
            handle.remove()


class OnePassRun:
    """One block's single forward, paused at each target module: every calibration batch runs in its own greenlet
    and stops at a target module's pre-hook until the caller has solved that module, then all batches go on.

    ``advance()`` runs every batch to its next pause and returns the module they all reached (None once every batch
    is through the block; ``outputs`` then holds the block's output per batch). Used by ``run_block`` in one
    process and by each worker of a data-parallel run (service.engine.data_parallel) on its share of the batches.
    """

    def __init__(self, block: nn.Module, hidden: list[torch.Tensor], calls: list[BlockCall], tasks: list[Task],
                 stats: BlockStatistics):
        from greenlet import getcurrent, greenlet

        self.tasks = {t.name: t for t in tasks}
        by_module = {id(t.module): t for t in tasks}
        self.outputs: list[torch.Tensor] = []

        def pre_hook(module, args):
            task = by_module[id(module)]
            me = getcurrent()
            stats.observe(me, task, args[0])
            # Pause this batch until every batch has contributed to the module's statistic and it has been solved.
            me.parent.switch(("module", task.name))

        def forward(h, call):
            out = call(block, h)
            stats.end_batch(getcurrent())
            return ("done", out)

        self._handles = [t.module.register_forward_pre_hook(pre_hook) for t in tasks]
        self._batches = [greenlet(lambda h=h, call=call: forward(h, call)) for h, call in zip(hidden, calls)]
        self._reached: set[str] = set()

    def advance(self) -> str | None:
        messages = [g.switch() for g in self._batches]
        kinds = {m[0] for m in messages}
        if kinds == {"done"}:
            self.outputs = [m[1] for m in messages]
            self.close()
            return None
        names = {m[1] for m in messages if m[0] == "module"}
        if kinds != {"module"} or len(names) != 1:
            self.close()
            raise PipelineError(
                "calibration batches took different paths through the block "
                f"({sorted(map(str, messages))[:4]}); use pipeline: two_pass for this model"
            )
        name = names.pop()
        if name in self._reached:
            self.close()
            raise PipelineError(f"{name} is called twice per forward; use pipeline: two_pass for this model")
        self._reached.add(name)
        return name

    def unreached(self) -> list[Task]:
        """Targets the forward never reached (solved without a statistic, i.e. left dense with a warning)."""
        return [t for name, t in self.tasks.items() if name not in self._reached]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _one_pass(block, hidden, calls, tasks, stats, reports) -> list[torch.Tensor]:
    run = OnePassRun(block, hidden, calls, tasks, stats)
    try:
        while (name := run.advance()) is not None:
            reports[name] = _compress(run.tasks[name], stats)
    finally:
        run.close()
    for task in run.unreached():
        reports[task.name] = _compress(task, stats)
    return run.outputs


# ------------------------------------------------------------------------------------------------------- the model


class BlockStore(Protocol):
    """Where block weights live between uses: in memory (moved to the device and back) or in files."""

    def load(self, index: int, name: str, block: nn.Module, device: torch.device) -> None: ...

    def store(self, index: int, name: str, block: nn.Module, *, changed: bool) -> None: ...


class InMemoryBlocks:
    """Blocks of a model already in memory: each visits the execution device and goes back where it was."""

    def __init__(self):
        self._home: dict[int, torch.device] = {}

    def load(self, index, name, block, device):
        self._home[index] = next(block.parameters()).device
        block.to(device)

    def store(self, index, name, block, *, changed):
        block.to(self._home.pop(index))


TaskPlanner = Callable[[int, str, nn.Module], list[Task]]


def run_blocks(
    blocks: Sequence[tuple[str, nn.Module]],
    hidden: list[torch.Tensor],
    calls: list[list[BlockCall]],
    plan: TaskPlanner,
    store: BlockStore,
    device: torch.device,
    *,
    mode: str = "two_pass",
    on_block: Callable[[int, str, BlockResult, float], None] | None = None,
    progress: bool | None = None,
) -> list[torch.Tensor]:
    """Stream every block through the execution device once: load, calibrate, compress, propagate, store.

    `plan(i, name, block)` says which modules of block i to compress and how; `on_block` receives each block's
    result (for reports and job progress). `hidden` is replaced in place by each block's outputs, so the
    caller's list lets go of earlier activations too; the last block's are returned.
    """
    from tqdm.auto import tqdm

    # disable=None: a bar on a terminal, nothing in logs and CI.
    bar = tqdm(total=len(blocks), desc="blocks", unit="block", disable=None if progress is None else not progress)
    try:
        for i, (name, block) in enumerate(blocks):
            start = time.perf_counter()
            store.load(i, name, block, device)
            tasks = plan(i, name, block)
            needs_data = any(t.compressor.statistic is not None for t in tasks)
            last = i == len(blocks) - 1
            if hidden and (needs_data or not last):
                result = run_block(block, hidden, calls[i], tasks, mode=mode, propagate=not last)
            else:
                result = run_block(block, [], [], tasks, mode=mode, propagate=False)
            store.store(i, name, block, changed=bool(tasks))
            if result.outputs:
                # In place, so the caller's list lets go of the previous activations too (no second copy).
                hidden[:] = result.outputs
            bar.set_postfix_str(name)
            bar.update()
            if on_block is not None:
                on_block(i, name, result, time.perf_counter() - start)
    finally:
        bar.close()
    return hidden


def module_tasks(
    block: nn.Module,
    block_name: str,
    index: int,
    modifiers: Sequence[Any],
) -> list[Task]:
    """The (module, modifier, sparsity) tasks of one block; a module claimed by two modifiers is an error."""
    tasks: dict[str, Task] = {}
    for modifier in modifiers:
        for name, module in compressible_modules(block, block_name, modifier.target_patterns, modifier.ignore_patterns):
            if name in tasks:
                raise PipelineError(
                    f"{name} is targeted by both {type(tasks[name].compressor).__name__} and "
                    f"{type(modifier).__name__} in one stage; narrow their targets/ignore"
                )
            tasks[name] = Task(
                name, module, modifier, modifier.layer_sparsity(index, block_name),
                offload=getattr(modifier, "offload_hessians", False),
            )
    for modifier in modifiers:  # e.g. NVFP4's global scales shared by the modules vLLM fuses (q/k/v, gate/up)
        begin_block = getattr(modifier, "begin_block", None)
        if begin_block is not None:
            begin_block(block_name, [(t.name, t.module) for t in tasks.values() if t.compressor is modifier])
    return list(tasks.values())
