"""One job's workers on Ray: a placement group of N bundles, gang-scheduled (all of them or none).

The job's own process (the Ray task or detached actor that runs ``run_job``) sits in bundle 0 and is rank 0: it
reads the checkpoint, writes the shards and coordinates (service.engine.data_parallel). Ranks 1..N-1 are
``BlockWorkerActor`` actors, one in each other bundle, each holding its share of the calibration samples. Tensors
travel through Ray's object store (``RayExchange``): block weights from rank 0 once per block, partial statistics
from every rank to the group's owner, solved modules from owners to everyone. Actors are owned by the job's
process, so they die with it; a rank lost mid-run (its process or node) raises ``WorkerLost`` and the job resumes
from its last per-block checkpoint with fresh actors in the same bundles (Ray re-places a lost node's bundles).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ray
from ray.exceptions import (
    ActorDiedError, ActorUnavailableError, GetTimeoutError, NodeDiedError, ObjectLostError, OwnerDiedError,
    RayActorError, WorkerCrashedError,
)
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from service.engine.data_parallel import BlockWorker, WorkerLost

log = logging.getLogger(__name__)

PG_PREFIX = "llmpress-pg-"  # + job id: the job's placement group
# Ray's errors that mean a rank (its process, or its node) is gone, not a bug in what it ran.
LOST = (RayActorError, ActorDiedError, ActorUnavailableError, NodeDiedError, ObjectLostError, OwnerDiedError,
        WorkerCrashedError)


def bundle(cpus: int, gpus: int) -> dict[str, float]:
    return {"CPU": float(cpus), **({"GPU": float(gpus)} if gpus else {})}


def job_bundles(resources, cluster_has_gpu: bool) -> list[dict[str, float]]:
    """The placement group's bundles for a job's ``resources`` (service.jobs.request.Resources, or None: one
    worker, a GPU when the cluster has one)."""
    workers = resources.workers if resources is not None else 1
    cpus = resources.cpus_per_worker if resources is not None else 1
    gpus = resources.gpus_per_worker if resources is not None and resources.gpus_per_worker is not None \
        else int(cluster_has_gpu)
    return [bundle(cpus, gpus) for _ in range(workers)]


def where() -> dict[str, Any]:
    """The node this process runs on, as the job record shows it."""
    context = ray.get_runtime_context()
    return {"node_id": context.get_node_id(), "node_ip": ray.util.get_node_ip_address()}


class RayExchange:
    """Handles are ObjectRefs in Ray's object store: ``put`` once, ``get`` from any worker on any node."""

    def put(self, value):
        return ray.put(value)

    def get(self, handles):
        # Ray resolves an ObjectRef passed as a call's own argument before the call: such a handle arrives as its
        # value already. Refs nested in lists and dicts arrive as refs.
        handles = list(handles)
        refs = [i for i, h in enumerate(handles) if isinstance(h, ray.ObjectRef)]
        for i, value in zip(refs, ray.get([handles[i] for i in refs])):
            handles[i] = value
        return handles


@ray.remote(max_restarts=0, max_task_retries=0)
class BlockWorkerActor:
    """A rank > 0 of one job: a BlockWorker in its own process, on its own device (a GPU when its bundle has one)."""

    def __init__(self, rank: int, device: str | None = None):
        import torch

        threads = int(float(os.environ.get("OMP_NUM_THREADS") or 0))  # Ray sets it to the bundle's CPUs
        if threads > 0:
            torch.set_num_threads(threads)
        self.worker = BlockWorker(rank, device, RayExchange())

    def describe(self) -> dict:
        resources = ray.get_runtime_context().get_assigned_resources()
        return {**self.worker.describe(), **where(), "cpus": resources.get("CPU", 0), "gpus": resources.get("GPU", 0)}

    def call(self, method: str, *args):
        return getattr(self.worker, method)(*args)


class RayWorkers:
    """The service.engine.data_parallel ``Workers`` of one job: rank 0 in this process, the others actors."""

    def __init__(self, local: BlockWorker, actors: list):
        self.local = local
        self.actors = actors
        self.size = 1 + len(actors)

    def call(self, calls: dict[int, tuple[str, tuple]]) -> dict[int, Any]:
        refs = {rank: self.actors[rank - 1].call.remote(method, *args)
                for rank, (method, args) in calls.items() if rank != 0}
        out: dict[int, Any] = {}
        if 0 in calls:  # rank 0 works while the others do
            method, args = calls[0]
            out[0] = getattr(self.local, method)(*args)
        try:
            values = ray.get(list(refs.values()))
        except LOST as exc:
            raise WorkerLost(f"a worker of this job was lost ({type(exc).__name__}): {str(exc)[:300]}") from exc
        out.update(zip(refs, values))
        return out


class RayPool:
    """A job's ranks 1..N-1 in its placement group (this process, in bundle 0, is rank 0). They are started at once,
    without waiting: a worker process takes seconds to start and import the engine, which then overlaps with this
    process's own setup (tokenizing, the model skeleton, capturing the first inputs). ``describe()`` waits for them
    (at most ``start_timeout`` s for Ray to place them) and says where every rank runs."""

    def __init__(self, group: PlacementGroup, bundles: list[dict[str, float]], *, device: str | None = None,
                 start_timeout: float = 600.0):
        self.group = group
        self.bundles = bundles
        self.size = len(bundles)
        self.device = device
        self.start_timeout = start_timeout
        self.exchange = RayExchange()
        self.actors: list = []
        self._where: list[dict] | None = None
        self._launch()

    def describe(self) -> list[dict]:
        if self._where is None:
            self._start()
        return self._where

    def _launch(self) -> None:
        self.actors = [
            BlockWorkerActor.options(
                num_cpus=self.bundles[rank].get("CPU", 0), num_gpus=self.bundles[rank].get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=rank),
            ).remote(rank, self.device)
            for rank in range(1, self.size)
        ]

    def _start(self) -> None:
        import time

        deadline = time.monotonic() + self.start_timeout
        while True:
            left = max(1.0, deadline - time.monotonic())
            if not self.group.wait(timeout_seconds=left):
                raise WorkerLost(f"the job's {self.size} workers could not all be placed within "
                                 f"{self.start_timeout:.0f} s (a node was lost and the cluster has no room for its "
                                 "bundle)")
            if not self.actors:
                self._launch()
            try:
                remote = ray.get([actor.describe.remote() for actor in self.actors], timeout=left)
                break
            except (GetTimeoutError, *LOST) as exc:
                self.close()
                # Just after a node is lost its bundles may still look placed there: actors sent to them die at
                # once. Ray re-places the bundles within seconds; try again until the deadline.
                if time.monotonic() + 1.0 >= deadline:
                    raise WorkerLost(f"the job's workers did not start ({type(exc).__name__})") from exc
                log.warning("the job's workers did not start (%s); trying again", type(exc).__name__)
                time.sleep(1.0)
        from service.engine.pipeline import execution_device

        first = {"rank": 0, "device": str(execution_device(self.device)), **where(),
                 "cpus": self.bundles[0].get("CPU", 0), "gpus": self.bundles[0].get("GPU", 0)}
        self._where = [first, *remote]
        log.info("workers: %s", ", ".join(f"rank {w['rank']} on {w['node_ip']} ({w['node_id'][:8]})"
                                          for w in self._where))

    def open(self, local: BlockWorker) -> RayWorkers:
        self.describe()
        return RayWorkers(local, self.actors)

    def close(self) -> None:
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone with its node
                pass
        self.actors = []
