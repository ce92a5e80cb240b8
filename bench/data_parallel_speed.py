"""One compression job over 1 and 2 Ray workers of 1 CPU each: wall time, and where each block's time goes.

A local Ray of 2 CPUs on 127.0.0.1. For N in (1, 2), alternately, ``--rounds`` times: a placement group of N
bundles {"CPU": 1}; a Ray task in bundle 0 (rank 0, one torch thread) runs ``compress_checkpoint`` on a random
fp32 Llama (bench/make_random_llama.py: hidden 1024, intermediate 2816, 16 heads of 64; ``--layers`` blocks) with
``RayPool`` for N = 2 (rank 1 is a ``BlockWorkerActor`` in bundle 1) and no pool for N = 1. Both use the same
batches (``--batch-size`` samples each), so each of 2 workers gets half of them.

Per block it reports the coordinator's ``BlockTiming`` (load / calibrate / solve / share / propagate seconds; bytes
of weights, statistics and solved states moved), the time rank 0 spends outside the coordinator (reading the
block from the checkpoint, writing its shard), and each rank's own compute seconds per phase (rank 0: its
``BlockWorker`` methods timed in the task; rank 1: the same methods timed inside the actor, installed through
Ray's ``__ray_call__``, nothing in the engine changed). A phase's wall minus the busier rank's compute is what the
exchange and the coordination cost.

``--transfer`` also times what moving one block costs: reading it from the checkpoint (the engine's
``SafetensorsCheckpoint.read``; page cache warm, and "cold-ish" after ``posix_fadvise(DONTNEED)`` on the file)
against ``ray.put`` in one process plus ``ray.get`` and an own copy in another (an actor), as the exchange does.

    python3 bench/data_parallel_speed.py                                   # SparseGPT 2:4, two_pass, 3 rounds
    python3 bench/data_parallel_speed.py --recipe gptq --rounds 1
    python3 bench/data_parallel_speed.py --pipeline one_pass --rounds 1
    python3 bench/data_parallel_speed.py --transfer-only
"""

from __future__ import annotations

import os

# Ray pinned to loopback (see tests/conftest.py): read once when ray is imported.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for p in (str(REPO), str(BENCH)):
    if p not in sys.path:
        sys.path.insert(0, p)

import ray
from compare_sparsegpt import cpu_busy_fraction, cpu_pressure_s
from make_random_llama import write_model
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

WIKI_VALID = REPO / "tests/fixtures/data/wikitext-2/valid.txt"
GPTQ_W4 = """\
# GPTQ 4-bit weights, one scale per output channel, on every Linear of the decoder blocks; lm_head stays dense.
quantization_stage:
  quantization_modifiers:
    GPTQModifier:
      targets: [Linear]
      ignore: [lm_head]
      config_groups:
        group_0:
          targets: [Linear]
          weights: {num_bits: 4, type: int, symmetric: true, strategy: channel}
"""
# A run is disturbed when other processes used more than this many CPU seconds per second of it (the machine
# this was written on has 2 CPUs and is shared with other sessions' test runs).
DISTURBED = 0.10
RECIPES = {"sparsegpt": "sparsegpt_2of4.yaml", "gptq": None}
RECIPE_LABELS = {"sparsegpt": "SparseGPT 2:4", "gptq": "GPTQ W4 channel"}
METHODS = ("load", "calibrate", "solve", "apply", "propagate", "one_pass_start", "one_pass_step", "begin_stage")
PHASES = ("load", "calibrate", "solve", "share", "propagate")
# Which BlockWorker methods a coordinator phase runs (two_pass; one_pass's steps are counted under propagate).
PHASE_METHODS = {"load": ("load",), "calibrate": ("calibrate",), "solve": ("solve",), "share": ("apply",),
                 "propagate": ("propagate", "one_pass_start", "one_pass_step")}


def recipe_text(name: str) -> str:
    return GPTQ_W4 if name == "gptq" else (REPO / "service/recipes" / RECIPES[name]).read_text()


def start_ray(cpus: int = 2) -> None:
    path = os.pathsep.join(p for p in (str(REPO), str(BENCH), os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=cpus, include_dashboard=False, namespace="llmpress", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false"}})


def vm_hwm_mib(pid: int | str = "self") -> float:
    """The peak resident set size of a process so far (VmHWM), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ------------------------------------------------------------------------------------------ instrumentation


def _timed_methods(target, record) -> None:
    """Wrap ``target``'s BlockWorker methods (a class or an instance) so that each call adds (block, method,
    seconds) to ``record``; the block is the one of the last ``load``."""
    current = {"block": None}
    bound = not isinstance(target, type)
    for method in METHODS:
        original = getattr(target, method)

        def wrapper(*args, _original=original, _method=method, _bound=bound):
            if _method == "load":
                current["block"] = args[0 if _bound else 1]
            start = time.perf_counter()
            try:
                return _original(*args)
            finally:
                record.append((current["block"], _method, time.perf_counter() - start))

        setattr(target, method, wrapper)


def _install_actor_timers(actor_self) -> int:
    """Runs inside a BlockWorkerActor (via __ray_call__): time its worker's methods; returns the actor's pid."""
    actor_self._bench_record = []
    _timed_methods(actor_self.worker, actor_self._bench_record)
    return os.getpid()


def _actor_report(actor_self) -> dict:
    return {"record": list(actor_self._bench_record), "peak_rss_mib": vm_hwm_mib()}


def per_block(record, blocks: int) -> list[dict]:
    """[(block, method, seconds)] -> per block {method: seconds}; the last entry: calls outside any block."""
    out = [dict.fromkeys(METHODS, 0.0) for _ in range(blocks + 1)]
    for block, method, seconds in record:
        out[block if block is not None and block < blocks else blocks][method] += seconds
    return out


def machine_cpu() -> dict:
    """Cumulative CPU seconds of the whole machine (/proc/stat): busy (user, nice, system, irq, softirq) and
    steal (taken by the hypervisor)."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    return {"busy": (v[0] + v[1] + v[2] + v[5] + v[6]) / tick, "steal": v[7] / tick}


def own_cpu(_actor_self=None) -> float:
    """CPU seconds of this process so far (all its threads)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------------------------- one job


def run_job(model_dir: str, recipe: str, out_dir: str, n: int, samples: int, seq_len: int, batch_size: int,
            pipeline: str) -> dict:
    """Rank 0 of one job (runs as a Ray task in bundle 0 of the job's placement group)."""
    import torch

    torch.set_num_threads(1)
    import service.engine.compress as compress_module
    import service.engine.data_parallel as dp
    from service.engine.model_source import SafetensorsCheckpoint
    from workers.ray_workers import RayPool

    coordinators: list = []
    original_init = dp.Coordinator.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        coordinators.append(self)

    dp.Coordinator.__init__ = init
    rank0: list = []
    _timed_methods(dp.BlockWorker, rank0)
    reads: list = []  # rank 0's checkpoint reads (seconds, bytes), in order: outside weights first, then per block
    original_read = SafetensorsCheckpoint.read

    def read(self, keys):
        start = time.perf_counter()
        tensors = original_read(self, keys)
        reads.append((time.perf_counter() - start, sum(t.numel() * t.element_size() for t in tensors.values())))
        return tensors

    SafetensorsCheckpoint.read = read
    stores: dict = {}
    original_store = compress_module.StreamedBlocks.store

    def store(self, index, name, block, *, changed):
        start = time.perf_counter()
        original_store(self, index, name, block, changed=changed)
        stores[index] = time.perf_counter() - start

    compress_module.StreamedBlocks.store = store
    blocks_seen: list = []
    events: list = []

    def on_progress(event):
        events.append((time.perf_counter() - start, event.get("stage"), event.get("layer")))
        if "block" in event:
            blocks_seen.append(event["block"].get("seconds"))

    pool, start_s, where, pids = None, 0.0, None, []
    if n > 1:
        group = ray.util.get_current_placement_group()
        start = time.perf_counter()
        pool = RayPool(group, list(group.bundle_specs), start_timeout=120)
        where = pool.describe()
        start_s = time.perf_counter() - start
        pids = ray.get([a.__ray_call__.remote(_install_actor_timers) for a in pool.actors])
    actors0 = ray.get([a.__ray_call__.remote(own_cpu) for a in pool.actors]) if pool is not None else []
    machine0, self0, stall0 = machine_cpu(), own_cpu(), cpu_pressure_s()
    start = time.perf_counter()
    try:
        report = compress_module.compress_checkpoint({
            "model": model_dir, "recipe": recipe, "output": out_dir, "overwrite": True, "device": "cpu",
            "pipeline": pipeline,
            "dataset": {"source": str(WIKI_VALID), "num_samples": samples, "seq_len": seq_len,
                        "batch_size": batch_size},
        }, workers=pool, on_progress=on_progress)
        wall = time.perf_counter() - start
        machine1, self1, stall1 = machine_cpu(), own_cpu(), cpu_pressure_s()
        actors1 = ray.get([a.__ray_call__.remote(own_cpu) for a in pool.actors]) if pool is not None else []
        actors = ray.get([a.__ray_call__.remote(_actor_report) for a in pool.actors]) if pool is not None else []
    finally:
        if pool is not None:
            pool.close()
    coordinator = coordinators[-1]
    from dataclasses import asdict

    nblocks = len(coordinator.timings)
    ours = [self1 - self0, *(b - a for a, b in zip(actors0, actors1))]
    busy = machine1["busy"] - machine0["busy"]
    return {
        # CPU seconds in the run: ours per rank, and everything else on the machine (other processes, Ray's own)
        "cpu_s": ours, "foreign_cpu_s": busy - sum(ours), "steal_s": machine1["steal"] - machine0["steal"],
        "cpu_stall_s": None if stall0 is None else stall1 - stall0,
        "events": events,
        "n": n, "wall_s": wall, "start_s": start_s, "where": where, "actor_pids": pids,
        "timings": [asdict(t) for t in coordinator.timings],
        "block_s": blocks_seen,
        "reads": reads, "stores": [stores.get(i, 0.0) for i in range(nblocks)],
        "rank0": per_block(rank0, nblocks),
        "ranks": [per_block(a["record"], nblocks) for a in actors],
        "peak_rss_mib": [vm_hwm_mib(), *(a["peak_rss_mib"] for a in actors)],
        "modules": {k: v.get("seconds") for k, v in report.get("modules", {}).items()},
        "report_wall_s": report.get("totals", {}).get("wall_seconds"),
    }


def run_in_group(n: int, fn, *args, strategy: str = "PACK") -> dict:
    """``fn(*args)`` as a task in bundle 0 of a fresh placement group of ``n`` 1-CPU bundles (a fresh process:
    max_calls=1, so every run starts from the same imports and memory)."""
    group = placement_group([{"CPU": 1.0} for _ in range(n)], strategy=strategy)
    ray.get(group.ready(), timeout=120)
    try:
        task = ray.remote(num_cpus=1, max_calls=1, max_retries=0)(fn).options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0))
        return ray.get(task.remote(*args))
    finally:
        remove_placement_group(group)


def make_model(work: Path, layers: int, hidden: int = 1024, intermediate: int = 2816) -> Path:
    model = work / f"random-llama-{layers}l-{hidden}h"
    if not (model / "config.json").exists():
        write_model(model, layers=layers, hidden=hidden, intermediate=intermediate)
    return model


# ------------------------------------------------------------------------------------------- transfer


@ray.remote(num_cpus=1, max_restarts=0)
class Receiver:
    """Another process that takes a block from the object store as a rank > 0 does (ray.get, then an own copy)."""

    def take(self, refs) -> dict:
        import torch

        torch.set_num_threads(1)
        start = time.perf_counter()
        tensors = ray.get(refs[0])
        got = time.perf_counter() - start
        copies = {k: v.to("cpu", copy=True) for k, v in tensors.items()}
        total = time.perf_counter() - start
        del copies, tensors
        return {"get_s": got, "get_copy_s": total}


def measure_transfer(model_dir: str, repeats: int) -> dict:
    """Per block: checkpoint read (warm, cold-ish) vs ray.put here + ray.get and copy in an actor (runs as a task
    in bundle 0 of a 2-bundle group; the actor goes in bundle 1)."""
    import torch

    torch.set_num_threads(1)
    from service.engine.model_source import SafetensorsCheckpoint

    checkpoint = SafetensorsCheckpoint(Path(model_dir))
    keys = [k for k in checkpoint.keys() if k.startswith("model.layers.1.")]  # noqa: SIM118
    files = sorted(Path(model_dir).glob("*.safetensors"))

    def drop_cache():
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    def read_once(cold: bool) -> tuple[float, int]:
        if cold:
            drop_cache()
        start = time.perf_counter()
        tensors = checkpoint.read(keys)
        seconds = time.perf_counter() - start
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
        return seconds, size

    read_once(False)
    warm = [read_once(False)[0] for _ in range(repeats)]
    cold = [read_once(True)[0] for _ in range(repeats)]
    size = read_once(False)[1]
    tensors = checkpoint.read(keys)
    group = ray.util.get_current_placement_group()
    actor = Receiver.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
        group, placement_group_bundle_index=1)).remote()
    ray.get(actor.take.remote([ray.put({"x": torch.zeros(1)})]))  # started and warm
    puts, gets, gets_copy, round_trips = [], [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        ref = ray.put(tensors)
        put = time.perf_counter() - start
        answer = ray.get(actor.take.remote([ref]))
        round_trips.append(time.perf_counter() - start)
        puts.append(put)
        gets.append(answer["get_s"])
        gets_copy.append(answer["get_copy_s"])
        del ref
    ray.kill(actor)
    med = statistics.median
    return {"block_bytes": size, "tensors": len(keys), "read_warm_s": med(warm), "read_cold_s": med(cold),
            "put_s": med(puts), "get_s": med(gets), "get_copy_s": med(gets_copy), "round_trip_s": med(round_trips),
            "read_warm_all": warm, "read_cold_all": cold, "round_trip_all": round_trips}


# ---------------------------------------------------------------------------------------- the machine


def gemm_rate(seconds: float = 4.0, size: int = 1024, start_at: float = 0.0) -> float:
    """fp32 GEMM GFLOP/s of one torch thread over about ``seconds``, from wall clock ``start_at`` on."""
    import torch

    torch.set_num_threads(1)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    time.sleep(max(0.0, start_at - time.time()))
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * size**3 * count / (time.perf_counter() - start) / 1e9


def hessian_rates(tokens: int = 4096, widths=(1024, 2816), repeats: int = 3) -> dict:
    """Seconds of one ``HessianAccumulator.add`` of ``tokens`` x width inputs (one calibration batch of 8 x 512),
    one torch thread; GFLOP/s counted as the full product 2 * tokens * width^2 (the accumulator computes an upper
    block-triangle, 10/16 of it, at widths >= 512)."""
    import torch

    torch.set_num_threads(1)
    from service.algorithms.hessian import HessianAccumulator

    out = {}
    for width in widths:
        x = torch.randn(tokens, width)
        acc = HessianAccumulator(width)
        acc.add(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            acc.add(x)
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        out[width] = {"seconds": seconds, "gflops_full": 2 * tokens * width**2 / seconds / 1e9}
    return out


def gemm_scaling() -> dict:
    """One 1-CPU task alone, then two at once: does the machine run two single-threaded GEMMs side by side?"""
    task = ray.remote(num_cpus=1)(gemm_rate)
    ray.get([task.remote(0.1), task.remote(0.1)])  # both workers started
    alone = ray.get(task.remote())
    at = time.time() + 3.0
    pair = ray.get([task.remote(start_at=at), task.remote(start_at=at)])
    return {"alone_gflops": alone, "pair_gflops": pair, "scaling": sum(pair) / alone}


def wait_for_quiet(timeout_s: float, busy_max: float = 0.10) -> float:
    """Wait (up to ``timeout_s``) until the CPUs are idle; returns the last busy fraction seen."""
    deadline = time.monotonic() + timeout_s
    while True:
        busy = cpu_busy_fraction(2.0)
        if busy <= busy_max or time.monotonic() >= deadline:
            return busy
        print(f"  waiting for other load to finish (CPUs {busy:.0%} busy)", flush=True)
        time.sleep(5)


def disturbed(run: dict) -> bool:
    """Other load took CPU time the run needed: some task waited for a CPU (Linux PSI "some") more than
    DISTURBED of the wall time, or, with both CPUs ours (N=2), other processes used more than DISTURBED of a CPU.
    With N=1 the second CPU is free for them."""
    stalled = run["cpu_stall_s"] is not None and run["cpu_stall_s"] > DISTURBED * run["wall_s"]
    return stalled or (run["n"] > 1 and run["foreign_cpu_s"] > DISTURBED * run["wall_s"])


# ------------------------------------------------------------------------------------------ paper model

PAPER_MODELS = {  # real shapes (config.json of meta-llama/Meta-Llama-3-8B / -70B)
    "Llama-3-8B": {"hidden": 4096, "intermediate": 14336, "layers": 32, "heads": 32, "kv_heads": 8, "head_dim": 128},
    "Llama-3-70B": {"hidden": 8192, "intermediate": 28672, "layers": 80, "heads": 64, "kv_heads": 8, "head_dim": 128},
}
GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
          "down": ("down_proj",)}


def block_figures(cfg: dict, samples: int, seq_len: int, weight_bytes: int, stat_bytes: int) -> dict:
    """FLOPs and bytes of one decoder block under the engine's two_pass schedule (MODELLED, not measured)."""
    h, f = cfg["hidden"], cfg["intermediate"]
    q, kv = cfg["heads"] * cfg["head_dim"], cfg["kv_heads"] * cfg["head_dim"]
    tokens = samples * seq_len
    shapes = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q), "gate_proj": (f, h),
              "up_proj": (f, h), "down_proj": (h, f)}
    params = sum(r * c for r, c in shapes.values())
    attention = 2 * samples * seq_len**2 * q  # QK^T and PV (2 * 2 S^2 q), causal: half of the square
    forward = 2 * tokens * params + attention
    calibrate = forward - 2 * tokens * h * f  # the calibration pass stops at down_proj's input
    columns = {g: shapes[names[0]][1] for g, names in GROUPS.items()}
    hessian = sum(2 * tokens * c * c * (10 / 16 if c >= 512 else 1.0) for c in columns.values())
    return {
        "shapes": shapes, "params": params, "forward": forward, "calibrate": calibrate, "hessian": hessian,
        "weights_bytes": params * weight_bytes,
        "group_stat_bytes": {g: stat_bytes * c * c for g, c in columns.items()},
        "group_weight_bytes": {g: weight_bytes * sum(shapes[n][0] * shapes[n][1] for n in names)
                               for g, names in GROUPS.items()},
        "group_cost": {g: sum(float(shapes[n][1]) ** 3 + float(shapes[n][0]) * shapes[n][1] ** 2 for n in names)
                       for g, names in GROUPS.items()},  # service.engine.data_parallel.solve_cost
        "solve_flops": {g: sum(solve_flops(*shapes[n]) for n in names) for g, names in GROUPS.items()},
        "group_columns": {g: sum(shapes[n][1] for n in names) for g, names in GROUPS.items()},
    }


def owners_of(costs: dict, n: int) -> dict:
    """service.engine.data_parallel.assign_owners: longest first, each to the least loaded rank."""
    load, owners = [0.0] * n, {}
    for g in sorted(costs, key=lambda g: (-costs[g], g)):
        r = min(range(n), key=lambda r: (load[r], r))
        owners[g] = r
        load[r] += costs[g]
    return owners


def block_time(b: dict, n: int, link_bytes_s: float, fwd_rate: float, hess_rate: float, solve_rate: float,
               column_s: float) -> dict:
    """One block's phases in seconds on ``n`` workers, phases one after another as the coordinator runs them."""
    owners = owners_of(b["group_cost"], n)
    solve = {g: b["solve_flops"][g] / solve_rate + b["group_columns"][g] * column_s for g in GROUPS}
    t = {"calibrate": b["calibrate"] / n / fwd_rate + b["hessian"] / n / hess_rate,
         "solve": max(sum(solve[g] for g in GROUPS if owners[g] == r) for r in range(n)),
         "propagate": b["forward"] / n / fwd_rate, "load": 0.0, "reduce": 0.0, "share": 0.0}
    if n > 1:
        t["load"] = (n - 1) * b["weights_bytes"] / link_bytes_s  # rank 0 sends the block to each other rank
        inbound = [sum((n - 1) * b["group_stat_bytes"][g] for g in GROUPS if owners[g] == r) for r in range(n)]
        outbound = [sum(b["group_stat_bytes"][g] for g in GROUPS if owners[g] != r) for r in range(n)]
        t["reduce"] = max(max(inbound), max(outbound)) / link_bytes_s
        owned = [sum(b["group_weight_bytes"][g] for g in GROUPS if owners[g] == r) for r in range(n)]
        t["share"] = max(max((n - 1) * w for w in owned), max(b["weights_bytes"] - w for w in owned)) / link_bytes_s
    t["comm"] = t["load"] + t["reduce"] + t["share"]
    t["compute"] = t["calibrate"] + t["solve"] + t["propagate"]
    t["total"] = t["comm"] + t["compute"]
    return t


def paper_model(samples: int = 512, seq_len: int = 2048, fwd_rate: float = 400e12, solve_rate: float = 50e12,
                column_s: float = 60e-6, links_gbit=(25, 100, 400), workers=(1, 2, 4, 8)) -> list[str]:
    """MODELLED (not measured) run times of the engine's data-parallel two_pass on H100-class GPUs."""
    out = []
    hess_rates = {"TF32 400 TFLOP/s": 400e12, "strict fp32 50 TFLOP/s": 50e12}
    out.append(f"MODELLED: {samples} x {seq_len} calibration tokens; bf16 weights (2 B), statistics as the engine "
               f"sends them (fp64 Hessian sums, 8 B); forward GEMMs (bf16) at {fwd_rate / 1e12:.0f} TFLOP/s; "
               f"solves {solve_rate / 1e12:.0f} TFLOP/s plus {column_s * 1e6:.0f} us per column; phases one after "
               "another, no overlap; a worker's link is full duplex.")
    for name, cfg in PAPER_MODELS.items():
        b = block_figures(cfg, samples, seq_len, 2, 8)
        stat = sum(b["group_stat_bytes"].values())
        out.append("")
        out.append(f"**{name}** per block: forward {b['forward'] / 1e12:.0f} TFLOP (propagate), calibration forward "
                   f"{b['calibrate'] / 1e12:.0f} TFLOP, Hessians {b['hessian'] / 1e12:.0f} TFLOP (4 shared "
                   f"inputs, upper triangle), solves {sum(b['solve_flops'].values()) / 1e12:.1f} TFLOP; block "
                   f"weights {b['weights_bytes'] / 1e9:.2f} GB, partial statistics per rank {stat / 1e9:.2f} GB "
                   f"(down_proj's {b['group_stat_bytes']['down'] / 1e9:.2f} GB), solved weights "
                   f"{b['weights_bytes'] / 1e9:.2f} GB.")
        for hess_label, hess_rate in hess_rates.items():
            out.append("")
            out.append(f"{name}, Hessians at {hess_label}: whole model s (speedup over 1 worker; communication "
                       "share of the time)")
            out.append("")
            out.append("| workers | " + " | ".join(f"{g:g} Gb/s" for g in links_gbit) + " | per block at 100 Gb/s: "
                       "load / calibrate / reduce / solve / share / propagate s |")
            out.append("|---|" + "---:|" * len(links_gbit) + "---|")
            base = None
            for n in workers:
                cells = []
                for g in links_gbit:
                    t = block_time(b, n, g * 1e9 / 8, fwd_rate, hess_rate, solve_rate, column_s)
                    last = block_time(b, n, g * 1e9 / 8, fwd_rate, hess_rate, solve_rate, column_s)["propagate"]
                    total = cfg["layers"] * t["total"] - last
                    if n == 1:
                        base = total
                    cells.append(f"{total:.0f} ({base / total:.2f}x; {t['comm'] / t['total']:.0%})")
                t = block_time(b, n, 100e9 / 8, fwd_rate, hess_rate, solve_rate, column_s)
                out.append(f"| {n} | " + " | ".join(cells) + " | " + " / ".join(
                    f"{t[p]:.2f}" for p in ("load", "calibrate", "reduce", "solve", "share", "propagate")) + " |")
    return out


# ----------------------------------------------------------------------------------------------- tables


def block_table(run: dict) -> list[str]:
    n = run["n"]
    lines = ["| block | wall s | read s | store s | " + " | ".join(f"{p} s" for p in PHASES)
             + " | weights MB | statistics MB | states MB |",
             "|---|" + "---:|" * (3 + len(PHASES) + 3)]
    for i, t in enumerate(run["timings"]):
        read = run["reads"][i + 1][0] if i + 1 < len(run["reads"]) else 0.0
        lines.append(f"| {i} | {run['block_s'][i]:.2f} | {read:.3f} | {run['stores'][i]:.3f} | "
                     + " | ".join(f"{t[p]:.2f}" for p in PHASES)
                     + f" | {t['weights_bytes'] / 1e6:.1f} | {t['statistics_bytes'] / 1e6:.1f}"
                     f" | {t['states_bytes'] / 1e6:.1f} |")
    if n > 1:
        lines.append("")
        lines.append("Each rank's own compute per phase (s; rank 0 | rank 1), against the phase's wall:")
        lines.append("")
        lines.append("| block | " + " | ".join(f"{p}: wall / r0 / r1" for p in PHASES) + " |")
        lines.append("|---|" + "---|" * len(PHASES))
        for i, t in enumerate(run["timings"]):
            cells = []
            for p in PHASES:
                own = [sum(r[i][m] for m in PHASE_METHODS[p]) for r in [run["rank0"], *run["ranks"]]]
                cells.append(f"{t[p]:.2f} / " + " / ".join(f"{s:.2f}" for s in own))
            lines.append(f"| {i} | " + " | ".join(cells) + " |")
    return lines


SHAPES = {"q_proj": (1024, 1024), "k_proj": (1024, 1024), "v_proj": (1024, 1024), "o_proj": (1024, 1024),
          "gate_proj": (2816, 1024), "up_proj": (2816, 1024), "down_proj": (1024, 2816)}  # (rows, columns)


def solve_flops(rows: int, columns: int, block: int = 128) -> float:
    """bench/compare_sparsegpt.py's count of one SparseGPT/GPTQ solve: Cholesky, inverse, Cholesky (4/3 c^3) and
    the OBS updates (r c^2 lazy block updates, r * block * c inside the blocks)."""
    return 4 * columns**3 / 3 + rows * columns**2 + rows * block * columns


def solve_table(run: dict) -> list[str]:
    """Per module kind: solve seconds (mean over the blocks) and the rate of solve_flops."""
    lines = ["| module | rows x columns | solve s (mean of blocks) | GFLOP | GFLOP/s |", "|---|---|---:|---:|---:|"]
    for kind, (rows, columns) in SHAPES.items():
        seconds = [v for k, v in run["modules"].items() if k.endswith(kind) and v is not None]
        if not seconds:
            continue
        mean = statistics.mean(seconds)
        flops = solve_flops(rows, columns)
        lines.append(f"| {kind} | {rows} x {columns} | {mean:.3f} | {flops / 1e9:.1f} | {flops / mean / 1e9:.1f} |")
    return lines


def phase_sums(run: dict) -> dict:
    sums = {p: sum(t[p] for t in run["timings"]) for p in PHASES}
    sums["read"] = sum(s for s, _ in run["reads"][1:])
    sums["store"] = sum(run["stores"])
    sums["blocks"] = sum(run["block_s"])
    block_events = [t for t, _, layer in run["events"] if layer is not None]
    sums["before blocks"] = block_events[0] - run["block_s"][0]
    sums["after blocks"] = run["wall_s"] - block_events[-1]
    sums["begin_stage r0"] = run["rank0"][-1]["begin_stage"]
    sums["begin_stage r1"] = run["ranks"][0][-1]["begin_stage"] if run["ranks"] else 0.0
    return sums


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="sparsegpt")
    ap.add_argument("--pipeline", choices=["two_pass", "one_pass"], default="two_pass")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--strategy", default="PACK", choices=["PACK", "SPREAD"])
    ap.add_argument("--transfer", action="store_true", help="also time one block's read vs put/get")
    ap.add_argument("--transfer-only", action="store_true")
    ap.add_argument("--transfer-repeats", type=int, default=5)
    ap.add_argument("--wait-quiet", type=float, default=120, metavar="S",
                    help="before each run, wait up to S seconds for the CPUs to be idle")
    ap.add_argument("--retry-disturbed", type=int, default=2, metavar="K",
                    help="rerun a run that other load disturbed up to K times")
    ap.add_argument("--work", type=Path, default=BENCH / "work")
    ap.add_argument("--json", type=Path, default=None, help="write every run's figures here")
    ap.add_argument("--paper-model", action="store_true", help="only print the modelled Llama-3 8B/70B table")
    ap.add_argument("--links", type=float, nargs="+", default=[25, 100, 400], help="paper model: Gb/s per worker")
    ap.add_argument("--column-us", type=float, default=60.0, help="paper model: solve latency per column, us")
    a = ap.parse_args(argv)
    if a.paper_model:
        print("\n".join(paper_model(links_gbit=a.links, column_s=a.column_us * 1e-6)))
        return 0
    a.work.mkdir(parents=True, exist_ok=True)
    model = make_model(a.work, a.layers)
    start_ray(2)
    out_root = Path(tempfile.mkdtemp(prefix="dp-speed-", dir=a.work))
    results: dict = {"args": {k: str(v) for k, v in vars(a).items()}, "runs": []}
    try:
        wait_for_quiet(a.wait_quiet)
        results["gemm"] = gemm_scaling()
        results["hessian"] = ray.get(ray.remote(num_cpus=1)(hessian_rates).remote())
        g = results["gemm"]
        print(f"1-thread fp32 GEMM: {g['alone_gflops']:.1f} GFLOP/s alone, "
              f"{' + '.join(f'{x:.1f}' for x in g['pair_gflops'])} side by side ({g['scaling']:.2f}x)", flush=True)
        if not a.transfer_only:
            recipe = recipe_text(a.recipe)
            for r in range(a.rounds):
                order = (1, 2) if r % 2 == 0 else (2, 1)
                for n in order:
                    for attempt in range(1 + a.retry_disturbed):
                        busy = wait_for_quiet(a.wait_quiet)
                        run = run_in_group(n, run_job, str(model), recipe, str(out_root / f"out-{n}"), n,
                                           a.samples, a.seq_len, a.batch_size, a.pipeline, strategy=a.strategy)
                        run.update(round=r, attempt=attempt, busy_before=busy, disturbed=disturbed(run))
                        print(f"round {r} N={n}: {run['wall_s']:.2f} s (workers started in {run['start_s']:.2f} s;"
                              f" CPU s per rank {[round(x, 1) for x in run['cpu_s']]}, others "
                              f"{run['foreign_cpu_s']:.1f}, CPU stall {run['cpu_stall_s'] or 0:.1f}, steal "
                              f"{run['steal_s']:.1f}; peak RSS MiB "
                              f"{[round(x) for x in run['peak_rss_mib']]})"
                              f"{' DISTURBED' if run['disturbed'] else ''}", flush=True)
                        if not run["disturbed"]:
                            break
                    results["runs"].append(run)
        if a.transfer or a.transfer_only:
            results["transfer"] = run_in_group(2, measure_transfer, str(model), a.transfer_repeats)
    finally:
        shutil.rmtree(out_root, ignore_errors=True)
        ray.shutdown()
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    report(a, results)
    return 0


def report(a, results: dict) -> None:
    runs = results["runs"]
    print()
    g = results.get("gemm")
    if g:
        print(f"Machine: one torch thread's fp32 GEMM (1024^3) {g['alone_gflops']:.1f} GFLOP/s alone; two 1-CPU "
              f"tasks side by side {' + '.join(f'{x:.1f}' for x in g['pair_gflops'])} GFLOP/s "
              f"= {g['scaling']:.2f}x one.\n")
    if results.get("hessian"):
        print("HessianAccumulator.add of 4096 tokens, one thread: " + "; ".join(
            f"width {w}: {v['seconds']:.3f} s = {v['gflops_full']:.1f} GFLOP/s (full-product count)"
            for w, v in results["hessian"].items()) + "\n")
    bad = sum(r["disturbed"] for r in runs)
    if bad:
        print(f"WARNING: {bad} run(s) disturbed by other load (others used > {DISTURBED:.0%} of a CPU): "
              "their times are not comparable\n")
    if runs:
        by = {n: [r for r in runs if r["n"] == n] for n in (1, 2)}
        ratios = [one["wall_s"] / two["wall_s"] for one, two in zip(by[1], by[2])]
        ratio = statistics.median(ratios)
        print(f"{RECIPE_LABELS[a.recipe]}, {a.pipeline}, {a.layers} blocks of hidden 1024, {a.samples} x {a.seq_len} "
              f"tokens, batches of {a.batch_size}; 1 torch thread per worker, Ray of 2 CPUs ({a.strategy})")
        print()
        print("| round | 1 worker: wall s | 2 workers: wall s | speedup | 2 workers: actor start s "
              "| others' CPU s (N=1 / N=2) | CPU s per rank, N=2 |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for k, (one, two) in enumerate(zip(by[1], by[2])):
            print(f"| {k} | {one['wall_s']:.2f} | {two['wall_s']:.2f} | {one['wall_s'] / two['wall_s']:.3f} | "
                  f"{two['start_s']:.2f} | {one['foreign_cpu_s']:.1f} / {two['foreign_cpu_s']:.1f} | "
                  f"{' / '.join(f'{x:.1f}' for x in two['cpu_s'])} |")
        with_start = statistics.median(one["wall_s"] / (two["wall_s"] + two["start_s"])
                                       for one, two in zip(by[1], by[2]))
        print(f"\n**median speedup {ratio:.3f}** (counting the actor's start: {with_start:.3f})")
        # The median round's runs, per block.
        k = sorted(range(len(ratios)), key=lambda i: ratios[i])[len(ratios) // 2]
        for n in (1, 2):
            run = by[n][k]
            print(f"\nN={n}, round {k}: per block (peak RSS per rank MiB: "
                  f"{', '.join(f'{x:.0f}' for x in run['peak_rss_mib'])})\n")
            print("\n".join(block_table(run)))
        print(f"\nSolves, N=1, round {k} (one thread; each module's own seconds from the report):\n")
        print("\n".join(solve_table(by[1][k])))
        print("\nSums over the blocks (s; median round):\n")
        sums = {n: phase_sums(by[n][k]) for n in (1, 2)}
        keys = ["read", *PHASES, "store", "blocks", "before blocks", "begin_stage r0", "begin_stage r1",
                "after blocks"]
        print("| | " + " | ".join(keys) + " | wall |")
        print("|---|" + "---:|" * (len(keys) + 1))
        for n in (1, 2):
            print(f"| N={n} | " + " | ".join(f"{sums[n][x]:.2f}" for x in keys) + f" | {by[n][k]['wall_s']:.2f} |")
        print("| N=1 / N=2 | " + " | ".join(f"{sums[1][x] / sums[2][x]:.2f}" if sums[2][x] > 1e-9 else "-"
                                             for x in keys) + f" | {by[1][k]['wall_s'] / by[2][k]['wall_s']:.2f} |")
    t = results.get("transfer")
    if t:
        mb = t["block_bytes"] / 1e6
        print(f"\nMoving one block ({t['tensors']} tensors, {mb:.1f} MB), median of {a.transfer_repeats}:\n")
        print("| way | s | MB/s |")
        print("|---|---:|---:|")
        for label, key in (("checkpoint read, page cache warm", "read_warm_s"),
                           ("checkpoint read, cold-ish (fadvise DONTNEED)", "read_cold_s"),
                           ("ray.put (rank 0)", "put_s"), ("ray.get in the actor", "get_s"),
                           ("ray.get + own copy in the actor", "get_copy_s"),
                           ("put, then the actor's get + copy, round trip", "round_trip_s")):
            print(f"| {label} | {t[key]:.4f} | {mb / t[key]:.0f} |")


if __name__ == "__main__":
    sys.exit(main())
