"""What the worst recipe within the default recipe limits costs the API, and what refusing one past them costs.

Each recipe goes through the API's real request path twice: ``JobRequest.parse`` (what ``POST /v1/jobs`` runs
on a body; the wall time is the median of ``--repeat`` runs, then one more under tracemalloc for the peak of
Python allocations), and a ``POST /v1/jobs`` to the live app (uvicorn on 127.0.0.1, a SQLite store in a
temporary folder, a dispatcher that keeps job ids and runs nothing; median wall time, client side). The RSS
column is how much the process's peak RSS grew over all of a recipe's requests. The acceptance target is at
most 50 ms and 50 MB per request.

    python3 bench/recipe_limits.py [--repeat 7] [--no-http]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from api.app import create_app  # noqa: E402
from api.embedded import EmbeddedServer  # noqa: E402
from service.engine.options import OptionsError  # noqa: E402
from service.jobs.job_store import JobStore  # noqa: E402
from service.jobs.request import JobRequest  # noqa: E402
from service.jobs.settings import Settings  # noqa: E402
from service.recipes.recipe_limits import DEFAULT_LIMITS as L  # noqa: E402
from tests.api_server import NoWorkers  # noqa: E402

KEY = "bench-secret"
HEAD = "s_stage:\n  g_modifiers:\n    SparseGPTModifier:\n      sparsity: 0.5\n"
AROUND = 9 + 2  # nodes besides the ignore list's items: the mappings and keys above, sparsity and its value


def names(count: int) -> list[str]:
    return ["a"] * count  # short: as many as the node limit allows fit in the size limit


def flow(items: list[str]) -> str:
    return "[" + ", ".join(items) + "]"


def worst_within() -> dict[str, object]:
    """The largest recipe of each kind the default limits let through (each checked to load, or to fail only
    the modifier's own validation)."""
    deep = "[" * (L.max_depth - 4) + "]" * (L.max_depth - 4)
    anchored = flow(["x"] * 99)
    aliases = L.max_nodes // 100 - 2
    filler = L.max_nodes - AROUND - 100 - aliases * 100 - 1
    block = HEAD + "      ignore:\n"
    line = "        - re:model.layers.{}.self_attn.q_proj_and_some_more\n"
    count = 0
    while len((block + line.format(count)).encode()) <= L.max_bytes:
        block += line.format(count)
        count += 1
    return {
        f"{L.max_nodes} nodes, flow list (valid)": HEAD + f"      ignore: {flow(names(L.max_nodes - AROUND))}\n",
        f"{L.max_nodes} nodes through {aliases} aliases (invalid)":
            HEAD + f"      ignore: [&x {anchored}, {', '.join(['*x'] * aliases)}, {flow(['y'] * filler)}]\n",
        f"depth {L.max_depth} (invalid)": HEAD + f"      ignore: {deep}\n",
        f"{L.max_bytes // 1024} KB of block YAML (valid)": block,
        f"{L.max_nodes} nodes, JSON list body (valid)":
            [{"SparseGPTModifier": {"sparsity": 0.5, "ignore": names(L.max_nodes - 8)}}],
        f"{L.max_modifiers} modifiers (valid)": "".join(
            f"s{i}_stage:\n  g_modifiers:\n    MagnitudePruningModifier: {{sparsity: 0.5, mask_structure: '2:4'}}\n"
            for i in range(L.max_modifiers)),
        "100 aliases of one 60 KB string (valid)":
            HEAD + f"      ignore: [&s '{'x' * 60_000}', {', '.join(['*s'] * 99)}]\n",
    }


def past() -> dict[str, object]:
    """Hostile recipes, each refused at a limit."""
    laughs = [f"      l0: &l0 [{', '.join(['lol'] * 9)}]"]
    laughs += [f"      l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    return {
        "billion laughs, 9 x 9 (~650 bytes)": HEAD + "\n".join(laughs) + "\n      ignore: *l8\n",
        "[ x 60 K, YAML": HEAD + "      ignore: " + "[" * 60_000 + "\n",
        "[ x 60 K, JSON text": "[" * 60_000,
        "{a: x 1000": HEAD + "      ignore: " + "{a: " * 1000 + "}" * 1000 + "\n",
        f"{L.max_nodes + 1} nodes, flow list": HEAD + f"      ignore: {flow(names(L.max_nodes - AROUND + 1))}\n",
        "64 KB + 1 byte": HEAD + "#" * (L.max_bytes - len(HEAD)) + "\n",
    }


def body(recipe) -> dict:
    return {"model": "s3://models/stories260K", "recipe": recipe, "output": f"s3://out/{uuid.uuid4().hex}/",
            "dataset": {"source": "s3://data/calib.txt", "num_samples": 8, "seq_len": 64}}


def parse(recipe, settings) -> str:
    try:
        JobRequest.parse(body(recipe), settings)
        return "accepted"
    except OptionsError as exc:
        return "422 " + str(exc)[:70]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(name: str, recipe, settings, http: httpx.Client | None, repeat: int) -> dict:
    rss_before = peak_rss_mb()
    outcome = parse(recipe, settings)  # warm (and the answer)
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        parse(recipe, settings)
        times.append(time.perf_counter() - started)
    tracemalloc.start()
    parse(recipe, settings)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    row = {"recipe": name, "size_bytes": len(json.dumps(body(recipe)).encode()), "outcome": outcome,
           "parse_ms": statistics.median(times) * 1000, "tracemalloc_peak_mb": peak / 1e6}
    if http is not None:
        times, statuses = [], set()
        for _ in range(repeat):
            started = time.perf_counter()
            response = http.post("/v1/jobs", json=body(recipe))
            times.append(time.perf_counter() - started)
            statuses.add(response.status_code)
            assert len(response.content) < 2048 or response.status_code == 201, len(response.content)
        row |= {"http_ms": statistics.median(times) * 1000, "http_status": sorted(statuses)}
    row["rss_growth_mb"] = peak_rss_mb() - rss_before
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--no-http", action="store_true", help="JobRequest.parse only, no live app")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llmpress-recipe-limits-") as tmp:
        root = Path(tmp)
        (root / "artifacts").mkdir()
        settings = Settings(api_keys=f"bench:{KEY}", admin_keys="", database_url=f"sqlite:///{root / 'jobs.db'}",
                            artifacts_root=str(root / "artifacts"), hub_offline=True)
        parse(worst_within()[f"{L.max_modifiers} modifiers (valid)"], settings)  # the modifiers' imports
        rows = []
        store = JobStore(settings.database_url)
        try:
            with EmbeddedServer(create_app(settings, store, NoWorkers())) as url, \
                    httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as http:
                for group, recipes in (("within", worst_within()), ("past", past())):
                    for name, recipe in recipes.items():
                        row = measure(name, recipe, settings, None if args.no_http else http, args.repeat)
                        rows.append({"limits": group, **row})
                        print(json.dumps(rows[-1]), flush=True)
        finally:
            store.close()
    print()
    print("| limits | recipe | body bytes | outcome | parse ms | tracemalloc peak MB | POST ms | RSS growth MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        outcome = r["outcome"] if r["outcome"] == "accepted" else r["outcome"].split(":")[0] + ": " + \
            r["outcome"].split(":", 1)[1].strip()[:45]
        print(f"| {r['limits']} | {r['recipe']} | {r['size_bytes']:,} | {outcome} | {r['parse_ms']:.1f} | "
              f"{r['tracemalloc_peak_mb']:.1f} | {r.get('http_ms', float('nan')):.1f} | {r['rss_growth_mb']:.1f} |")
    worst = max(rows, key=lambda r: max(r["parse_ms"], r.get("http_ms", 0)))
    print(f"\nslowest: {worst['recipe']}: parse {worst['parse_ms']:.1f} ms, POST {worst.get('http_ms', 0):.1f} ms; "
          f"largest peak {max(r['tracemalloc_peak_mb'] for r in rows):.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
