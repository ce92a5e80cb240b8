"""Data-parallel calibration: one recipe stage over N workers, each holding its own share of the calibration samples.

The calibration batches are cut into N contiguous runs, one per worker (rank order is batch order). Activations
never travel: every worker captures its own batches' inputs to the first block and keeps its hidden states from
block to block. Per block, in order:

  load       rank 0 (the coordinator's own worker, in its process) reads the block's weights from the checkpoint and
             shares them once through the exchange (Ray's object store); every worker sets them (and rotates the
             block, when the stage rotates) on its own device
  calibrate  each worker runs its batches through the block with the calibration hooks: partial statistics, one per
             module group (q/k/v share one input, so one Hessian), shared through the exchange
  solve      each group is owned by one worker (groups balanced by solve cost, columns^3 + rows * columns^2); the
             owner merges the group's partials in rank order (the same bits on every re-run) and solves its modules;
             owners solve in parallel
  share      every owner's compressed modules (weights, quantization buffers and attributes) go to every worker
  propagate  each worker runs its batches through the compressed block: the next block's inputs, kept where they are
  store      rank 0 writes the block's shard

``two_pass`` does one reduction per block (all groups after one calibration forward); ``one_pass`` one per module
group, at the pause where every batch of every worker reached the module (service.engine.pipeline.OnePassRun).
With one worker this is the same computation as ``service.engine.pipeline.run_blocks``.

Nothing here knows Ray: the workers are reached through a ``Workers`` group (``LocalWorkers`` runs them in this
process; ``workers.ray_workers`` as Ray actors in a placement group) and tensors through an ``Exchange``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from service.engine.pipeline import (
    BlockResult,
    BlockStatistics,
    OnePassRun,
    PipelineError,
    Task,
    _compress,
    _two_pass_calibrate,
    capture,
    execution_device,
    module_tasks,
)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------- plumbing


class Exchange(Protocol):
    """How workers hand each other values: ``put`` returns a handle any worker can ``get``."""

    def put(self, value: Any) -> Any: ...

    def get(self, handles: list) -> list: ...


class LocalExchange:
    """All workers in one process: a handle is the value itself, or (``copy``, for several workers in one
    process) a deep copy, so no two workers ever share a tensor, as with a real transfer."""

    def __init__(self, copy: bool = False):
        self.copy = copy

    def put(self, value):
        if self.copy:
            import copy

            return copy.deepcopy(value)
        return value

    def get(self, handles):
        if self.copy:  # every reader its own copy: workers change what they receive (rotations, solves)
            import copy

            return [copy.deepcopy(h) for h in handles]
        return list(handles)


class Workers(Protocol):
    """N workers, rank 0 in this process. ``call({rank: (method, args)})`` runs those calls concurrently and returns
    their results by rank; a lost worker raises ``WorkerLost``."""

    size: int

    def call(self, calls: dict[int, tuple[str, tuple]]) -> dict[int, Any]: ...


class WorkerPool(Protocol):
    """Where a run's workers come from: ``size`` of them, rank 0 being the caller's own ``local`` worker (built
    with ``exchange``). ``workers.ray_workers`` places them with Ray; ``LocalPool`` keeps them in this process."""

    size: int
    exchange: Exchange

    def open(self, local: BlockWorker) -> Workers: ...

    def describe(self) -> list[dict]:
        """Where each rank runs ({"rank", "device", ...}), for the job record."""
        ...

    def close(self) -> None: ...


class WorkerLost(RuntimeError):
    """A worker (or its node) died mid-stage: the run cannot go on with its activations gone. The job is taken up
    again from its last per-block checkpoint."""


class LocalWorkers:
    """Workers in this process, called one after another (the single-worker path, and tests of the reduction)."""

    def __init__(self, workers: Sequence[BlockWorker]):
        self.workers = list(workers)
        if len(self.workers) > 1 and not all(getattr(w.exchange, "copy", True) for w in self.workers):
            raise ValueError("several workers in one process need LocalExchange(copy=True)")
        self.size = len(self.workers)

    def call(self, calls):
        return {rank: getattr(self.workers[rank], method)(*args) for rank, (method, args) in calls.items()}


class LocalPool:
    """``size`` workers in this process (for tests and measurements of the data-parallel path on one machine)."""

    def __init__(self, size: int, device: str | torch.device | None = None):
        self.size = size
        self.device = device
        self.exchange = LocalExchange(copy=size > 1)

    def open(self, local: BlockWorker) -> LocalWorkers:
        return LocalWorkers([local, *(BlockWorker(r, self.device or local.device, self.exchange)
                                      for r in range(1, self.size))])

    def describe(self) -> list[dict]:
        return [{"rank": rank, "device": str(execution_device(self.device))} for rank in range(self.size)]

    def close(self) -> None:
        pass


def each(workers: Workers, method: str, *args) -> list:
    """The same call on every worker; results in rank order."""
    out = workers.call({rank: (method, args) for rank in range(workers.size)})
    return [out[rank] for rank in range(workers.size)]


def split_batches(batches: list, n: int) -> list[list]:
    """``batches`` cut into ``n`` contiguous runs whose lengths differ by at most one (rank order = batch order)."""
    q, r = divmod(len(batches), n)
    out, start = [], 0
    for rank in range(n):
        stop = start + q + (1 if rank < r else 0)
        out.append(batches[start:stop])
        start = stop
    return out


def module_state(module: nn.Module) -> dict:
    """What a solve changed on a target module, CPU tensors: its own parameters and buffers (weight, and the
    quantization's weight_scale / weight_zero_point / weight_g_idx) and its public attributes (quantization_args)."""
    return {
        "params": {k: v.detach().cpu() for k, v in module._parameters.items() if v is not None},
        "buffers": {k: v.detach().cpu() for k, v in module._buffers.items() if v is not None},
        "attrs": {k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training"},
    }


def apply_module_state(module: nn.Module, state: dict, device: torch.device) -> None:
    for key, value in state["params"].items():
        module._parameters[key] = nn.Parameter(value.to(device), requires_grad=False)
    for key, value in state["buffers"].items():
        module._buffers[key] = value.to(device)
    for key, value in state["attrs"].items():
        setattr(module, key, value)


def solve_cost(task: Task) -> float:
    """Relative cost of one module's solve: the Cholesky and inverse of its Hessian (columns^3) and the row updates
    (rows * columns^2). Data-free methods count rows * columns."""
    weight = getattr(task.module, "weight", None)
    if weight is None or weight.dim() != 2:
        return 1.0
    rows, columns = weight.shape
    if task.compressor.statistic == "hessian":
        return float(columns) ** 3 + float(rows) * columns**2
    return float(rows) * columns


def assign_owners(groups: dict[str, list[Task]], size: int, load: list[float] | None = None) -> dict[str, int]:
    """{group: rank}: longest solve first, each to the least loaded rank (ties: the lowest rank), so the same
    block always gets the same owners."""
    load = load if load is not None else [0.0] * size
    owners = {}
    for group in sorted(groups, key=lambda g: (-sum(solve_cost(t) for t in groups[g]), g)):
        rank = min(range(size), key=lambda r: (load[r], r))
        owners[group] = rank
        load[rank] += sum(solve_cost(t) for t in groups[group])
    return owners


# ---------------------------------------------------------------------------------------------------- a worker


@dataclass
class StageSpec:
    """What every worker needs for one stage, sent once: the model's config, the stage's modifiers (with OWL's
    layer sparsities set), the rotation plan (or None)."""

    config: Any
    modifiers: list
    rotation: Any = None
    trust_remote_code: bool = False


class BlockWorker:
    """One worker's share of a stage: its batches' hidden states and a copy of the block being worked on.

    Rank 0 lives in the coordinator's process and shares the coordinator's model (``model`` given: its weights are
    loaded and rotated by the coordinator, and its shard is written from it); other ranks build the model from the
    stage's config, with every parameter on the meta device until a block's weights arrive.
    """

    def __init__(self, rank: int, device: str | torch.device | None = None, exchange: Exchange | None = None,
                 model: nn.Module | None = None):
        self.rank = rank
        self.device = execution_device(device)
        self.exchange = exchange or LocalExchange()
        self.model = model
        self.own_model = model is None
        self.modifiers: list = []
        self.rotation = None
        self.blocks: list[tuple[str, nn.Module]] = []
        self.captured: list[torch.Tensor] = []
        self.hidden: list[torch.Tensor] = []
        self.calls: list[list] = []
        self.tasks: dict[str, Task] = {}
        self.stats: BlockStatistics | None = None
        self.merged: BlockStatistics | None = None  # the statistics of the groups this rank owns in this block
        self.run: OnePassRun | None = None
        self.sent: set = set()
        self.probes: list = []
        # Statistics travel as CPU tensors, except within one worker (nothing travels: no copy to the CPU and back).
        self._to_cpu = not (isinstance(self.exchange, LocalExchange) and not self.exchange.copy)

    def _share(self, acc):
        return self.exchange.put(acc.to("cpu") if self._to_cpu else acc)

    def describe(self) -> dict:
        """Where this worker runs (filled in by the host: Ray adds the node)."""
        return {"rank": self.rank, "device": str(self.device)}

    # --- a stage ---------------------------------------------------------------------------------------------

    def begin_stage(self, spec: StageSpec, batches: list[dict], outside=None) -> int:
        """Take the stage's modifiers and capture this worker's batches' inputs to the first block. ``outside``: a
        handle to the non-block weights (embeddings, norms, head) for a rank that has no model of its own yet.
        Returns the number of batches held."""
        from service.engine.oneshot import stage_blocks

        self.modifiers = list(spec.modifiers)
        self.rotation = spec.rotation
        if self.own_model:
            from service.engine.model_source import empty_model

            self.model = empty_model(spec.config, trust_remote_code=spec.trust_remote_code)
            names = self._set(self.exchange.get([outside])[0], "cpu")
            if self.rotation is not None:
                from service.recipes.spinquant import rotate_outside

                if self.rotation.r3 is not None:
                    from service.recipes.online_rotations import enable_r3_attention

                    enable_r3_attention(self.model)
                rotate_outside(self.model, self.rotation)
        self.blocks = stage_blocks(self.model, self.modifiers)
        self.hidden, self.calls = [], [[] for _ in self.blocks]
        if batches:
            self.hidden, self.calls = capture(self.model, self.blocks, batches, self.device)
        # The first block's inputs again after OWL's dense probe pass; kept only for a stage that has one, since they
        # are as large as all of this worker's hidden states (17 GB over the workers for Llama-3-70B at 512 x 2048).
        self.captured = list(self.hidden) if any(hasattr(m, "set_layer_sparsities") for m in self.modifiers) else []
        if self.own_model:
            self._release(names)
        return len(self.hidden)

    def set_layer_sparsities(self, index: int, values: list[float]) -> None:
        """OWL's per-block sparsities, measured by the coordinator, for the stage's modifier ``index``."""
        self.modifiers[index].set_layer_sparsities(values)

    def restart_from_capture(self) -> None:
        """Hidden states back to the captured inputs of the first block (after OWL's dense probe pass)."""
        if self.hidden and not self.captured:
            raise RuntimeError("restart_from_capture: this stage has no OWL modifier, so its inputs were not kept")
        self.hidden = list(self.captured)

    def end_stage(self) -> None:
        self.captured, self.hidden, self.calls, self.tasks = [], [], [], {}
        self.stats = self.merged = self.run = None

    # --- a block ---------------------------------------------------------------------------------------------

    def load(self, index: int, weights=None, probe: bool = False, rotate: bool = True,
             plan: bool = True) -> list[tuple[str, str | None]]:
        """Set block ``index``'s weights (a handle; rank 0 has them already), rotate it, plan its tasks (none with
        ``plan=False``: a finished block replayed from its checkpoint). Returns the tasks as (name, statistic kind)."""
        name, block = self.blocks[index]
        if self.own_model:
            self._set(self.exchange.get([weights])[0], self.device)
        if self.rotation is not None and rotate:  # each worker rotates its own copy (rank 0: the coordinator's)
            from service.recipes.spinquant import rotate_block

            rotate_block(block, name, index, self.rotation)
        compressors = self.modifiers if plan else []
        if probe:
            from service.recipes.pruning_modifiers import OutlierProbe

            compressors = [OutlierProbe(m) for m in self.modifiers if getattr(m, "sparsity_profile", None) == "owl"]
            self.probes = compressors
        self.tasks = {t.name: t for t in module_tasks(block, name, index, compressors)}
        self.stats = BlockStatistics(self.device)
        self.merged = BlockStatistics(self.device)
        self.sent = set()
        return [(t.name, t.compressor.statistic) for t in self.tasks.values()]

    def calibrate(self, index: int) -> tuple[dict, dict]:
        """two_pass: this worker's batches through the dense block with the hooks. Returns ({module: group},
        {(group, kind): handle of this worker's partial statistic})."""
        _, block = self.blocks[index]
        data = [t for t in self.tasks.values() if t.compressor.statistic is not None]
        if data and self.hidden:
            _two_pass_calibrate(block, self.hidden, self.calls[index], data, self.stats)
        return dict(self.stats.group_of), {key: self._share(acc) for key, acc in self.stats.accumulators.items()}

    def solve(self, index: int, names: list[str], group_of: dict[str, str], partials: dict) -> tuple[dict, Any]:
        """Merge the partials of the groups this rank owns (handles in rank order), solve ``names``. Returns
        ({module: report}, handle of their new states)."""
        for key, handles in partials.items():
            parts = self.exchange.get(list(handles))
            merged = parts[0].to(self.device)
            for part in parts[1:]:
                merged.merge(part)
            self.merged.accumulators[tuple(key)] = merged
        self.merged.group_of.update(group_of)
        reports = {name: _compress(self.tasks[name], self.merged) for name in names}
        states = {name: module_state(self.tasks[name].module) for name in names}
        return reports, self.exchange.put(states)

    def apply(self, handles: list) -> None:
        """Take other owners' solved modules (handles to {module: state})."""
        for states in self.exchange.get(list(handles)):
            for name, state in states.items():
                apply_module_state(self.tasks[name].module, state, self.device)

    def propagate(self, index: int, last: bool) -> int:
        """two_pass: this worker's batches through the compressed block become the next block's inputs."""
        _, block = self.blocks[index]
        if not last and self.hidden:
            with torch.no_grad():
                self.hidden[:] = [call(block, h) for h, call in zip(self.hidden, self.calls[index])]
        return len(self.hidden)

    def release(self, index: int) -> None:
        """Free the block's weights (a rank with its own model); rank 0's are stored by the coordinator."""
        name, block = self.blocks[index]
        if self.rotation is not None:
            from service.recipes.online_rotations import detach_online

            detach_online(block)
        if self.own_model:
            self._release([n for n, _ in block.named_parameters(prefix=name)])
        self.tasks, self.stats, self.merged = {}, None, None

    def probe_ratio(self) -> float:
        """OWL: the outlier ratio of the block just probed (rank 0 owns every probe solve)."""
        return self.probes[0].take_block_ratio() if self.probes else 0.0

    # --- one_pass --------------------------------------------------------------------------------------------

    def one_pass_start(self, index: int) -> tuple[str | None, dict, dict]:
        _, block = self.blocks[index]
        data = [t for t in self.tasks.values() if t.compressor.statistic is not None]
        self.run = OnePassRun(block, self.hidden, self.calls[index], data, self.stats)
        return self._pause()

    def one_pass_step(self, handles: list) -> tuple[str | None, dict, dict]:
        """Apply the solved module (from its owner) and run every batch to its next pause."""
        self.apply(handles)
        return self._pause()

    def _pause(self) -> tuple[str | None, dict, dict]:
        """(the module every batch paused at, or None when done; {module: group}; partials not sent before)."""
        name = self.run.advance()
        if name is None:
            self.hidden[:] = self.run.outputs
            return None, {}, {}
        new = {key: self._share(acc) for key, acc in self.stats.accumulators.items() if key not in self.sent}
        self.sent.update(new)
        return name, dict(self.stats.group_of), new

    def one_pass_unreached(self) -> list[str]:
        return [t.name for t in self.run.unreached()] if self.run is not None else []

    # --- weights ---------------------------------------------------------------------------------------------

    def _set(self, tensors: dict[str, torch.Tensor], device) -> list[str]:
        from service.engine.model_source import set_tensor, tied_parameters

        for name, tensor in tensors.items():
            # An own copy: what arrives may be backed by the exchange's shared, read-only memory (Ray's object
            # store), and rotations change weights in place.
            set_tensor(self.model, name, tensor.to(device, copy=True))
        for target, source in tied_parameters(self.model).items():
            if source in tensors:
                owner_name, _, leaf = target.rpartition(".")
                owner = self.model.get_submodule(owner_name) if owner_name else self.model
                owner._parameters[leaf] = self.model.get_parameter(source)
        return list(tensors)

    def _release(self, names: list[str]) -> None:
        from service.engine.model_source import set_tensor, trim_heap

        for name in names:
            param = self.model.get_parameter(name)
            set_tensor(self.model, name, torch.empty_like(param, device="meta"))
        trim_heap()


# ---------------------------------------------------------------------------------------------- the coordinator


@dataclass
class BlockTiming:
    """Where one block's time went in the coordinator (seconds) and what moved through the exchange (bytes)."""

    load: float = 0.0
    calibrate: float = 0.0
    solve: float = 0.0
    share: float = 0.0
    propagate: float = 0.0
    weights_bytes: int = 0
    statistics_bytes: int = 0
    states_bytes: int = 0
    extra: dict = field(default_factory=dict)


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


class Coordinator:
    """Drives a stage over ``workers`` block by block (see the module docstring). Rank 0's worker must share
    ``model``, and ``load_block(index)`` / ``store_block(index, changed)`` read and write rank 0's copy (the
    streaming path's StreamedBlocks)."""

    def __init__(self, workers: Workers, local: BlockWorker, *, mode: str = "two_pass"):
        self.workers = workers
        self.local = local
        self.mode = mode
        self.size = workers.size
        self.timings: list[BlockTiming] = []

    def begin_stage(self, spec: StageSpec, batches: list[dict] | None, outside: dict[str, torch.Tensor]) -> None:
        shares = split_batches(list(batches or []), self.size)
        if batches and any(not share for share in shares):
            raise PipelineError(f"{len(batches)} calibration batches cannot be shared by {self.size} workers; "
                                "use fewer workers or more samples")
        handle = self.local.exchange.put({k: v.detach().cpu() for k, v in outside.items()}) if self.size > 1 else None
        self.workers.call({r: ("begin_stage", (spec, shares[r], handle if r else None)) for r in range(self.size)})

    def run_block(self, index: int, weights: dict[str, torch.Tensor] | None, *, last: bool, probe: bool = False,
                  rotate: bool = True) -> BlockResult:
        """Block ``index`` on every worker: rank 0 already holds its weights (``weights`` are the same, raw, for
        the others). Returns the per-module reports (outputs stay on the workers)."""
        timing = BlockTiming()
        start = time.perf_counter()
        handle = None
        if self.size > 1:
            raw = {k: v.detach().cpu() for k, v in (weights or {}).items()}
            timing.weights_bytes = _nbytes(raw) * (self.size - 1)
            handle = self.local.exchange.put(raw)
        plans = each_args(self.workers, "load", lambda r: (index, handle if r else None, probe, rotate))
        tasks = plans[0]
        if any(p != tasks for p in plans[1:]):
            raise PipelineError(f"block {index}: the workers planned different modules; they must run the same code")
        timing.load = time.perf_counter() - start
        result = BlockResult(outputs=[])
        data = [name for name, kind in tasks if kind is not None]
        free = [name for name, kind in tasks if kind is None]
        if self.mode == "one_pass" and data and not probe:
            self._one_pass(index, free, result, timing)
        else:
            self._two_pass(index, data, free, result, timing, probe=probe, last=last)
        self.timings.append(timing)
        return result

    def replay_block(self, index: int, weights: dict[str, torch.Tensor] | None, *, last: bool) -> None:
        """A block finished before (its compressed weights from its checkpoint, already in rank 0's model): every
        worker only runs its batches through it, to rebuild the next block's inputs. No statistics, no solves."""
        handle = self.local.exchange.put({k: v.detach().cpu() for k, v in (weights or {}).items()}) \
            if self.size > 1 else None
        each_args(self.workers, "load", lambda r: (index, handle if r else None, False, False, False))
        each(self.workers, "propagate", index, last)

    def _two_pass(self, index, data, free, result, timing, *, probe, last) -> None:
        if free:  # data-free methods prune before the calibration forward, as in one process
            start = time.perf_counter()
            owners = assign_owners({n: [self.local.tasks[n]] for n in free}, self.size)
            self._solve_and_share(index, {r: [n for n in free if owners[n] == r] for r in range(self.size)}, {}, {},
                                  result, timing)
            timing.solve += time.perf_counter() - start
        if data:
            start = time.perf_counter()
            calibrated = each(self.workers, "calibrate", index)
            group_of = calibrated[0][0]
            if any(c[0] != group_of for c in calibrated[1:]) or any(c[1].keys() != calibrated[0][1].keys()
                                                                    for c in calibrated[1:]):
                raise PipelineError(f"block {index}: the workers' batches grouped the modules' inputs differently")
            timing.calibrate = time.perf_counter() - start
            groups: dict[str, list[str]] = {}
            for name in data:
                groups.setdefault(group_of.get(name, name), []).append(name)
            if probe:  # OWL's probe: rank 0 sees every module, to rank the block as a whole
                owners = {g: 0 for g in groups}
            else:
                owners = assign_owners({g: [self.local.tasks[n] for n in names] for g, names in groups.items()},
                                       self.size)
            names_by_rank = {r: [n for g, names in groups.items() if owners[g] == r for n in names]
                             for r in range(self.size)}
            partials_by_rank: dict[int, dict] = {r: {} for r in range(self.size)}
            for key in calibrated[0][1]:
                if key[0] in owners:
                    partials_by_rank[owners[key[0]]][key] = [c[1][key] for c in calibrated]
            timing.statistics_bytes = self._statistics_bytes()
            start = time.perf_counter()
            self._solve_and_share(index, names_by_rank, group_of, partials_by_rank, result, timing, share=not probe)
            timing.solve += time.perf_counter() - start
        start = time.perf_counter()
        each(self.workers, "propagate", index, last)
        timing.propagate = time.perf_counter() - start

    def _one_pass(self, index, free, result, timing) -> None:
        if free:  # data-free modules first, as in one process (their solve needs no forward)
            owners = assign_owners({n: [self.local.tasks[n]] for n in free}, self.size)
            self._solve_and_share(index, {r: [n for n in free if owners[n] == r] for r in range(self.size)}, {}, {},
                                  result, timing)
        load = [0.0] * self.size
        owner_of: dict[str, int] = {}
        start = time.perf_counter()
        pauses = each(self.workers, "one_pass_start", index)  # the forward up to the first module's input
        timing.calibrate += time.perf_counter() - start
        while True:
            name = pauses[0][0]
            if any(p[0] != name for p in pauses[1:]):
                raise PipelineError(f"block {index}: the workers' batches paused at different modules "
                                    f"({sorted({str(p[0]) for p in pauses})}); use pipeline: two_pass")
            if name is None:
                break
            group_of = pauses[0][1]
            group = group_of.get(name, name)
            if group not in owner_of:  # one reduction per module group: q/k/v reuse q's merged Hessian
                owner_of[group] = assign_owners({group: [self.local.tasks[name]]}, self.size, load)[group]
            owner = owner_of[group]
            partials = {key: [p[2][key] for p in pauses] for key in pauses[0][2] if key[0] == group}
            if self.size > 1:  # each other rank's partial travels to the owner, the solved module to each other rank
                timing.statistics_bytes += sum(_accumulator_bytes(self.local.stats.accumulators[key])
                                               for key in partials) * (self.size - 1)
                timing.states_bytes += _state_bytes(self.local, [name]) * (self.size - 1)
            start = time.perf_counter()
            reports, handle = self.workers.call({owner: ("solve", (index, [name], group_of, partials))})[owner]
            timing.solve += time.perf_counter() - start
            result.modules[name] = reports[name]
            start = time.perf_counter()
            pauses = each_args(self.workers, "one_pass_step", lambda r, h=handle, o=owner: ([h] if r != o else [],))
            timing.propagate += time.perf_counter() - start
        for name in self.local.one_pass_unreached():  # never called: left dense, with the pipeline's warning
            result.modules[name] = _compress(self.local.tasks[name], self.local.stats)

    def _solve_and_share(self, index, names_by_rank, group_of, partials_by_rank, result, timing, *,
                         share: bool = True) -> None:
        """Owners solve their modules in parallel; then every worker takes the others' solved modules."""
        solved = self.workers.call({r: ("solve", (index, names, group_of, partials_by_rank.get(r, {})))
                                    for r, names in names_by_rank.items() if names})
        reports = {}
        for rank in sorted(solved):
            reports.update(solved[rank][0])
        order = [n for t in self.local.tasks for n in [t] if n in reports]
        result.modules.update({name: reports[name] for name in order})
        if share and self.size > 1:
            start = time.perf_counter()
            self.workers.call({r: ("apply", ([solved[o][1] for o in sorted(solved) if o != r],))
                               for r in range(self.size)})
            timing.share += time.perf_counter() - start
            timing.states_bytes += sum(_state_bytes(self.local, names) for names in names_by_rank.values()) \
                * (self.size - 1)

    def _statistics_bytes(self) -> int:
        """Bytes of partial statistics that travel to their owners: every group's partial from each other rank."""
        return sum(_accumulator_bytes(acc) for acc in self.local.stats.accumulators.values()) * (self.size - 1)

    def release(self, index: int) -> None:
        each(self.workers, "release", index)

    def end_stage(self) -> None:
        each(self.workers, "end_stage")


def _accumulator_bytes(acc) -> int:
    return acc.nbytes() if hasattr(acc, "nbytes") else _nbytes(acc.squared_norm)


def each_args(workers: Workers, method: str, args_of: Callable[[int], tuple]) -> list:
    out = workers.call({rank: (method, args_of(rank)) for rank in range(workers.size)})
    return [out[rank] for rank in range(workers.size)]


def _state_bytes(local: BlockWorker, names: list[str]) -> int:
    total = 0
    for name in names:
        module = local.tasks.get(name)
        if module is not None:
            total += sum(_nbytes(t) for t in module.module._parameters.values() if t is not None)
            total += sum(_nbytes(t) for t in module.module._buffers.values() if t is not None)
    return total
