"""Load on the job service: N jobs submitted at once, and GET /v1/jobs/{id} latency while they run.

The real service in this process (uvicorn, the SQLite job store, a local Ray with the machine's CPUs, the local
artifacts folder), driven over HTTP: N stories260K SparseGPT 2:4 jobs are POSTed concurrently; while they run, an
open-loop client issues GET /v1/jobs/{id} at a fixed rate (default 50 requests/s, round-robin over the jobs, each
request on its own schedule so a slow answer does not lower the offered rate) and records each latency.

    python3 bench/load_jobs.py [--jobs 20] [--rate 50] [--samples 32] [--seq-len 128]

Prints the submit latencies, the GET latency percentiles, how many jobs succeeded and the wall time.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from api.app import build_app  # noqa: E402
from api.embedded import EmbeddedServer  # noqa: E402
from service.jobs.settings import Settings  # noqa: E402
from workers.dispatch import connect_ray  # noqa: E402

FIXTURES = REPO / "tests" / "fixtures"
RECIPE = (REPO / "service" / "recipes" / "sparsegpt_2of4.yaml").read_text()
KEY = "load-secret"
AUTH = {"Authorization": f"Bearer {KEY}"}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--rate", type=float, default=50.0, help="GET requests per second while the jobs run")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="llmpress-load-"))
    settings = Settings(database_url=f"sqlite:///{root / 'jobs.db'}", artifacts_root=str(root / "artifacts"),
                        api_keys=f"load:{KEY}", input_roots=(str(FIXTURES),), hub_offline=True)
    Path(settings.artifacts_root).mkdir()
    import ray

    connect_ray(settings)
    cpus = int(ray.cluster_resources().get("CPU", 0))
    try:
        with EmbeddedServer(build_app(settings)) as url, httpx.Client(base_url=url, headers=AUTH, timeout=60,
                                                                      limits=httpx.Limits(max_connections=64)) as http:
            def submit(i: int) -> tuple[str, float]:
                body = {"model": str(FIXTURES / "models" / "stories260K"), "recipe": RECIPE, "output": f"load/{i}",
                        "dataset": {"source": str(FIXTURES / "data" / "wikitext-2" / "valid.txt"),
                                    "num_samples": args.samples, "seq_len": args.seq_len, "seed": i}}
                start = time.perf_counter()
                response = http.post("/v1/jobs", json=body)
                elapsed = time.perf_counter() - start
                response.raise_for_status()
                return response.json()["id"], elapsed

            started = time.perf_counter()
            with cf.ThreadPoolExecutor(args.jobs) as pool:
                submitted = list(pool.map(submit, range(args.jobs)))
            ids = [job_id for job_id, _ in submitted]
            submit_latencies = [s for _, s in submitted]

            latencies: list[float] = []
            errors = 0
            lock = threading.Lock()
            done = threading.Event()

            def get(job_id: str) -> None:
                nonlocal errors
                start = time.perf_counter()
                try:
                    ok = http.get(f"/v1/jobs/{job_id}").status_code == 200
                except httpx.HTTPError:
                    ok = False
                elapsed = time.perf_counter() - start
                with lock:
                    latencies.append(elapsed)
                    errors += not ok

            def terminal() -> dict[str, str]:
                statuses = {}
                for job_id in ids:
                    statuses[job_id] = http.get(f"/v1/jobs/{job_id}").json()["status"]
                return statuses

            def watch() -> None:
                while not done.is_set():
                    if all(s in ("succeeded", "failed", "cancelled") for s in terminal().values()):
                        done.set()
                    done.wait(1.0)

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            interval = 1.0 / args.rate
            with cf.ThreadPoolExecutor(32) as pool:
                k = 0
                next_at = time.perf_counter()
                while not done.is_set():
                    pool.submit(get, ids[k % len(ids)])
                    k += 1
                    next_at += interval
                    time.sleep(max(0.0, next_at - time.perf_counter()))
            offered_seconds = time.perf_counter() - started
            final = terminal()
    finally:
        ray.shutdown()

    wall = time.perf_counter() - started
    succeeded = sum(s == "succeeded" for s in final.values())
    ms = [x * 1000 for x in latencies]
    print(f"machine: {os.cpu_count()} CPUs, Ray CPUs {cpus} (jobs run {cpus} at a time)")
    print(f"jobs: {args.jobs} submitted at once, {succeeded} succeeded, "
          f"{', '.join(f'{s}' for s in sorted(set(final.values())))}; wall {wall:.1f} s")
    print(f"POST /v1/jobs: p50 {percentile(submit_latencies, 50) * 1000:.1f} ms, "
          f"max {max(submit_latencies) * 1000:.1f} ms")
    print(f"GET /v1/jobs/{{id}} at {args.rate:g}/s for {offered_seconds:.1f} s: {len(ms)} requests "
          f"({len(ms) / offered_seconds:.1f}/s achieved), {errors} errors; p50 {percentile(ms, 50):.1f} ms, "
          f"p90 {percentile(ms, 90):.1f} ms, p99 {percentile(ms, 99):.1f} ms, max {max(ms):.1f} ms, "
          f"mean {statistics.fmean(ms):.1f} ms")
    return 0 if succeeded == args.jobs and errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
