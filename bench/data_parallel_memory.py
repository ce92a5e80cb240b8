"""Peak memory of each rank of a 2-worker job does not grow with the model's depth: one block plus its share.

Random fp32 Llamas that differ only in depth (bench/make_random_llama.py: hidden 1024, intermediate 2816, one
block = 49 MiB; 2 and 16 blocks), each compressed with SparseGPT 2:4 (two_pass) by a job of 2 Ray workers of 1 CPU
each on a local Ray of 2 CPUs (127.0.0.1): rank 0 is a Ray task in bundle 0 of a placement group, rank 1 the
``BlockWorkerActor`` that ``RayPool`` starts in bundle 1. Nothing in the engine is changed.

Per rank it reports:
- the peak RSS over the whole run (VmHWM of the process, read just before the pool closes; rank 1's through Ray's
  ``__ray_call__`` on the actor);
- the RSS once the process has imported everything and before the stage starts ("imports");
- the peak RSS within each block: VmHWM read and reset (``/proc/self/clear_refs`` 5) after every block, on both
  ranks, so the per-block peaks show whether anything piles up from block to block.

    python3 bench/data_parallel_memory.py                    # --layers 2 16 --samples 32 --seq-len 512
"""

from __future__ import annotations

import os

# Ray pinned to loopback (see tests/conftest.py): read once when ray is imported.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import ray
from data_parallel_speed import (
    WIKI_VALID,
    make_model,
    recipe_text,
    run_in_group,
    start_ray,
    vm_hwm_mib,
)


def vm_rss_mib(pid="self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_split(_actor_self=None) -> dict:
    """This process's resident memory now, MiB, by kind: anonymous (heap, tensors), file-backed (libraries,
    mapped checkpoint pages), shared memory (Ray's object store pages it has mapped and touched)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        for key, name in (("RssAnon:", "anon"), ("RssFile:", "file"), ("RssShmem:", "shmem")):
            if line.startswith(key):
                out[name] = int(line.split()[1]) / 1024
    return out


def take_peak(_actor_self=None) -> float:
    """This process's peak RSS since the last reset (VmHWM), MiB; then reset it to the current RSS."""
    peak = vm_hwm_mib()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return peak


def actor_rss(_actor_self=None) -> dict:
    return {"pid": os.getpid(), "rss_mib": vm_rss_mib(), "hwm_mib": vm_hwm_mib()}


def memory_job(model_dir: str, recipe: str, out_dir: str, samples: int, seq_len: int, batch_size: int,
               pipeline: str) -> dict:
    """Rank 0 of a 2-worker job (a Ray task in bundle 0)."""
    import torch

    torch.set_num_threads(1)
    from service.engine.compress import compress_checkpoint
    from workers.ray_workers import RayPool

    group = ray.util.get_current_placement_group()
    pool = RayPool(group, list(group.bundle_specs), start_timeout=120)
    pool.describe()
    actor = pool.actors[0]
    imports = {"rank0": vm_rss_mib(), "rank1": ray.get(actor.__ray_call__.remote(actor_rss))["rss_mib"]}
    whole_before = {"rank0": vm_hwm_mib(), "rank1": ray.get(actor.__ray_call__.remote(actor_rss))["hwm_mib"]}
    per_block: list[dict] = []
    start = time.perf_counter()
    stage_peak = {}

    def on_progress(event):
        if "block" in event:
            per_block.append({"block": event["layer"] - 1, "t": time.perf_counter() - start,
                              "rank0": take_peak(), "rank1": ray.get(actor.__ray_call__.remote(take_peak)),
                              "split0": rss_split(), "split1": ray.get(actor.__ray_call__.remote(rss_split))})

    # Whole-run peaks are kept apart from the per-block resets: read both ranks' VmHWM before the first reset
    # (the stage's start: capture of the first block's inputs) and fold each block's peak in.
    try:
        report = compress_checkpoint({
            "model": model_dir, "recipe": recipe, "output": out_dir, "overwrite": True, "device": "cpu",
            "pipeline": pipeline,
            "dataset": {"source": str(WIKI_VALID), "num_samples": samples, "seq_len": seq_len,
                        "batch_size": batch_size},
        }, workers=pool, on_progress=on_progress)
        wall = time.perf_counter() - start
        end = {"rank0": take_peak(), "rank1": ray.get(actor.__ray_call__.remote(take_peak))}
        pid = ray.get(actor.__ray_call__.remote(actor_rss))["pid"]
    finally:
        pool.close()
    # The peak over the run: the largest of the per-block peaks and of what came before the first block (the
    # first block's peak window starts at the process start, so it includes the stage's start).
    for rank in ("rank0", "rank1"):
        stage_peak[rank] = max([whole_before[rank], end[rank], *(b[rank] for b in per_block)])
    return {"wall_s": wall, "imports_mib": imports, "peak_mib": stage_peak, "per_block": per_block,
            "after_last_mib": end, "actor_pid": pid, "blocks": len(per_block),
            "report_wall_s": report.get("totals", {}).get("wall_seconds")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 16])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--pipeline", default="two_pass", choices=["two_pass", "one_pass"])
    ap.add_argument("--work", type=Path, default=BENCH / "work")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    models = {n: make_model(a.work, n, a.hidden, a.intermediate) for n in a.layers}
    start_ray(2)
    out_root = Path(tempfile.mkdtemp(prefix="dp-memory-", dir=a.work))
    rows = []
    try:
        for layers, model in models.items():
            run = run_in_group(2, memory_job, str(model), recipe_text("sparsegpt"), str(out_root / f"out-{layers}"),
                               a.samples, a.seq_len, a.batch_size, a.pipeline)
            run["layers"] = layers
            run["model_mib"] = sum(p.stat().st_size for p in model.glob("*.safetensors")) / 2**20
            rows.append(run)
            print(f"{layers} blocks: {run['wall_s']:.1f} s, peak MiB rank 0 {run['peak_mib']['rank0']:.0f}, "
                  f"rank 1 {run['peak_mib']['rank1']:.0f}", flush=True)
    finally:
        shutil.rmtree(out_root, ignore_errors=True)
        ray.shutdown()
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))

    h, f = a.hidden, a.intermediate
    block_mib = 4 * (4 * h * h + 3 * h * f + 2 * h) / 2**20
    share = a.samples // 2
    hidden_mib = share * a.seq_len * h * 4 / 2**20
    batch_mlp_mib = a.batch_size * a.seq_len * f * 4 / 2**20
    print(f"\nSparseGPT 2:4, {a.pipeline}, {a.samples} x {a.seq_len} tokens in batches of {a.batch_size}; 2 workers of "
          f"1 CPU (one torch thread each). One block: {block_mib:.1f} MiB fp32. Each worker's share: {share} samples, "
          f"hidden states {hidden_mib:.1f} MiB (held twice: the current block's inputs and the first block's "
          f"captured ones); one batch's MLP intermediate {batch_mlp_mib:.1f} MiB per tensor.\n")
    print("| blocks | model MiB | rank | after imports MiB | peak over the run MiB | per-block peak MiB "
          "(min / median / max) | peak - imports MiB |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for run in rows:
        for rank in ("rank0", "rank1"):
            peaks = [b[rank] for b in run["per_block"]]
            print(f"| {run['layers']} | {run['model_mib']:.0f} | {rank[-1]} | {run['imports_mib'][rank]:.0f} | "
                  f"{run['peak_mib'][rank]:.0f} | {min(peaks):.0f} / {statistics.median(peaks):.0f} / "
                  f"{max(peaks):.0f} | {run['peak_mib'][rank] - run['imports_mib'][rank]:.0f} |")
    if len(rows) >= 2:
        first, last = rows[0], rows[-1]
        grow = last["model_mib"] - first["model_mib"]
        for rank in ("rank0", "rank1"):
            print(f"\nrank {rank[-1]}: the model grows by {grow:.0f} MiB from {first['layers']} to {last['layers']} "
                  f"blocks; the peak by {last['peak_mib'][rank] - first['peak_mib'][rank]:+.0f} MiB "
                  f"({last['peak_mib'][rank] / first['peak_mib'][rank]:.2f}x)", end="")
        print()
        print("\nThe deepest model, block by block (MiB): the peak within the block, then the resident memory once the "
              "block is released, by kind (anonymous / Ray object-store shared memory / file-backed):\n")
        print("| block | rank 0 peak | rank 0 after: anon / shmem / file | rank 1 peak | rank 1 after: anon / shmem / "
              "file |")
        print("|---:|---:|---|---:|---|")
        for b in last["per_block"]:
            print(f"| {b['block']} | {b['rank0']:.0f} | " + " / ".join(f"{b['split0'][k]:.0f}" for k in
                                                                     ("anon", "shmem", "file"))
                  + f" | {b['rank1']:.0f} | " + " / ".join(f"{b['split1'][k]:.0f}" for k in ("anon", "shmem", "file"))
                  + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
