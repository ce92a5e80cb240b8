"""Run jobs on Ray: one piece of Ray work per job, placed and queued by Ray's own scheduler.

One job, followed forward::

    api: store.create_job -> dispatcher.submit(job_id)
      local Ray (no RAY_ADDRESS):  a Ray task      worker_ref "ray-task:<task id>"
      a Ray cluster (RAY_ADDRESS): a detached actor "llmpress-job-<job id>" in namespace "llmpress" (its worker_ref)
      each asks for {"num_gpus": 1} when the cluster has GPUs, else {"num_cpus": 1}: with the slots taken, Ray holds
      the work back until one frees; there is no queue of ours
    in the worker: JobStore(settings.database_url) -> service.jobs.job_runner.run_job -> progress per layer in the store

Exactly once comes from the store: ``run_job`` takes a job with a queued->running compare-and-set, so work that is
handed a job twice runs it once. Ray retries work whose worker process died (a task's ``max_retries``; an actor's
``max_restarts``, after which the restarted actor runs its job again by itself); the retry finds the job still
``running`` under its own worker_ref and puts it back in the queue before running it.

Cancel is a flag in the store that the worker reads between layers; work that has not started is also taken off
Ray's queue (``ray.cancel`` / ``ray.kill``) so it frees its place at once.

After an API restart, :meth:`RayDispatcher.recover` submits queued jobs again and looks for the work of running
ones: a detached actor outlives the API and is re-attached by name; a local Ray dies with the API that started it,
so its tasks are gone and their jobs are re-queued (attempt + 1). That holds for a job lost while ``uploading``
too: the manifest is written last, so it had published nothing, and the new attempt writes the same files again.
Every store change a worker makes is fenced by the attempt it took the job as, so a worker wrongly presumed lost
can no longer change a job that was re-queued and taken again.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import ray
from sqlalchemy.engine import make_url

from service.jobs.job_runner import run_job
from service.jobs.job_store import ACTIVE, TERMINAL, Job, JobStore
from service.jobs.request import cluster_fits, stored_resources
from service.jobs.settings import Settings

log = logging.getLogger(__name__)

NAMESPACE = "llmpress"
ACTOR_PREFIX = "llmpress-job-"  # + job id: the detached actor's name and its worker_ref
TASK_PREFIX = "ray-task:"  # + Ray task id: the worker_ref of a job run by a task
# Ray re-runs work whose worker process died (killed, out of memory, node lost) this many times; an error inside
# the job is not retried: run_job turns it into a failed job.
MAX_RETRIES = 2
# The folder that holds the `service` package: workers put it on their path so they import the same code.
PROJECT_ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------- in the worker


def worker_runtime_env() -> dict:
    """Ray's runtime_env for our workers: the project on their PYTHONPATH, so they import `service`."""
    path = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p)
    return {"env_vars": {"PYTHONPATH": path}}


def _take_back(store: JobStore, job: Job) -> bool:
    """A running or uploading job whose worker is gone: queue it again (True), or cancel it (False) when a cancel
    was requested. Both only if the job is still in the attempt that was seen lost."""
    if job.cancel_requested:
        store.transition(job.id, sorted(ACTIVE), "cancelled", attempt=job.attempt)
        return False
    return store.transition(job.id, sorted(ACTIVE), "queued", attempt=job.attempt)


def connect_ray(settings: Settings) -> None:
    """Join the cluster at settings.ray_address, or start a local Ray, as our workers need it. Call it from the
    main thread where possible: Ray installs signal handlers there."""
    ray.init(address=settings.ray_address or None, namespace=NAMESPACE, include_dashboard=False,
             log_to_driver=False, ignore_reinit_error=True, runtime_env=worker_runtime_env())


def _pools(settings: Settings):
    """The job runner's ``workers``: a job that asked for more than one worker gets the rest of its placement group
    (this process is in its bundle 0); one worker runs in this process alone."""
    from workers.ray_workers import RayPool

    def make(resources):
        if resources is None or resources.workers <= 1:
            return None
        group = ray.util.get_current_placement_group()
        if group is None:
            raise RuntimeError("a job with several workers runs in its placement group; this one runs outside it")
        return RayPool(group, list(group.bundle_specs), start_timeout=settings.worker_start_timeout)

    return make


def _run(job_id: str, settings: Settings, input_roots: Sequence[Path], worker_ref: str) -> str | None:
    """Run the job in this worker process; its final status (None: no such job). A job put back in the queue
    because one of its workers was lost is taken up again here, in the same placement group (Ray re-places a lost
    node's bundles), up to MAX_RETRIES times: it resumes from its per-block checkpoints."""
    store = JobStore(settings.database_url)
    try:
        job = store.get(job_id)
        if job is not None and job.status in ACTIVE and job.worker_ref == worker_ref:
            # Ray is retrying this very work after its worker died mid-job: the job is still marked as ours.
            log.warning("job %s: retrying after its worker was lost (attempt %d)", job_id, job.attempt)
            _take_back(store, job)
        for _ in range(MAX_RETRIES + 1):
            job = run_job(store, job_id, settings, worker_ref=worker_ref, input_roots=input_roots,
                          workers=_pools(settings))
            if job is None or job.status != "queued" or job.cancel_requested:
                break
        return job.status if job is not None else None
    finally:
        store.close()


@ray.remote(max_retries=MAX_RETRIES)
def run_job_task(job_id: str, settings: Settings, input_roots: Sequence[Path]) -> str | None:
    """A job as a Ray task (local Ray): worker_ref is the task's id, the same for Ray's retries of it."""
    return _run(job_id, settings, input_roots, TASK_PREFIX + ray.get_runtime_context().get_task_id())


# No method retries: the caller's retries of ``run`` are spent in the second or two before the cluster sees a lost
# node dead (each attempt fails at once: "actor unavailable"), and the actor Ray then restarts would sit idle with
# its job still ``running``. A restarted actor takes its job up itself instead (``__init__``).
@ray.remote(max_restarts=MAX_RETRIES, max_task_retries=0)
class JobActor:
    """A job as a detached named actor (a Ray cluster): it outlives the API, which re-attaches to it by name. Ray
    restarts it where its placement group's bundle is placed again when its process or node is lost; the restarted
    actor runs the job again, which resumes from its per-block checkpoints."""

    def __init__(self, job_id: str, settings: Settings, input_roots: Sequence[Path]):
        self.args = (job_id, settings, input_roots)
        if ray.get_runtime_context().was_current_actor_reconstructed:
            log.warning("job %s: its actor was restarted after its process or node was lost; taking the job up "
                        "again", job_id)
            ray.get_runtime_context().current_actor.run.remote()

    def run(self) -> str | None:
        job_id = self.args[0]
        try:
            return _run(*self.args, ACTOR_PREFIX + job_id)
        finally:
            # One job per actor: end it, to give its GPU or CPU back (a detached actor never ends alone), and with
            # it the job's placement group (detached too, so nothing else would). Removing the group ends the
            # actors in it, this one included. Not with exit_actor(): that fails the method it is called in, and
            # Ray retries a failed method of an actor that may restart, running the job's method again on a fresh
            # actor; a kill without restart ends it.
            group = ray.util.get_current_placement_group()
            if group is not None:
                ray.util.remove_placement_group(group)
            ray.kill(ray.get_runtime_context().current_actor, no_restart=True)


def placement_group_of(job_id: str):
    """The job's placement group, or None."""
    from ray.util import get_placement_group

    from workers.ray_workers import PG_PREFIX

    try:
        return get_placement_group(PG_PREFIX + job_id)
    except ValueError:
        return None


def remove_group(job_id: str) -> None:
    group = placement_group_of(job_id)
    if group is not None:
        ray.util.remove_placement_group(group)


# ------------------------------------------------------------------------------------------------- in the API


def _portable(settings: Settings) -> Settings:
    """The settings with relative paths made absolute: workers do not share the API's working directory."""
    url = make_url(settings.database_url)
    update = {"artifacts_root": str(Path(settings.artifacts_root).resolve()),
              "input_roots": tuple(str(Path(root).resolve()) for root in settings.input_roots)}
    if url.get_backend_name() == "sqlite":
        database = url.database or ""
        if database in ("", ":memory:") or database.startswith("file:"):
            raise ValueError("database_url: an in-memory SQLite database cannot be shared with Ray workers; "
                             "use a SQLite file or PostgreSQL")
        if not os.path.isabs(database):
            update["database_url"] = url.set(database=os.path.abspath(database)).render_as_string(hide_password=False)
    return settings.model_copy(update=update)


def _resources() -> dict[str, float]:
    """One GPU per job on a cluster that has GPUs, one CPU otherwise."""
    return {"num_gpus": 1} if ray.cluster_resources().get("GPU", 0) >= 1 else {"num_cpus": 1}


class RayDispatcher:
    """Submits jobs to Ray, cancels them, and takes them up again after a restart (see the module docstring).

    Without ``settings.ray_address`` a local Ray is started (or the one this process already joined is used) and
    jobs run as tasks; with it, the cluster is joined and jobs run as detached named actors.
    """

    def __init__(self, store: JobStore, settings: Settings, *, input_roots: Sequence[str | Path] = ()):
        self.store = store
        self.settings = _portable(settings)
        self.input_roots = tuple(Path(root).resolve() for root in input_roots)
        self.detached = bool(settings.ray_address)
        self._owns_ray = False
        self._lock = threading.Lock()
        # job id -> the result of the task running it, for the tasks this dispatcher submitted and that have not
        # finished: what recover() knows to be alive and what cancel() can take off Ray's queue.
        self._tasks: dict[str, ray.ObjectRef] = {}

    # --- lifecycle -----------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Join Ray (RAY_ADDRESS) or start a local one, then recover the jobs a previous run left behind."""
        if not ray.is_initialized():
            connect_ray(self.settings)
            self._owns_ray = True
        self.recover()

    def stop(self) -> None:
        """Shut Ray down if start() started or joined it (a local Ray ends its running tasks with it)."""
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False
        with self._lock:
            self._tasks.clear()

    def ready(self) -> bool:
        """Whether Ray answers (for /readyz)."""
        if not ray.is_initialized():
            return False
        try:
            ray.cluster_resources()
        except Exception:  # noqa: BLE001 - any failure to reach the cluster means not ready
            return False
        return True

    # --- jobs ----------------------------------------------------------------------------------------------------

    def check_resources(self, resources) -> None:
        """Refuse (FieldError naming the field) workers the cluster's alive nodes could never hold at once. The
        default request (one worker) is not checked: it waits for a free slot, as on a cluster that grows."""
        if resources is None:
            return
        cluster_fits(resources, [node["Resources"] for node in ray.nodes() if node.get("Alive")])

    def _placement(self, job_id: str) -> dict:
        """Ray options that put a job's own process in bundle 0 of its placement group (a job with several workers:
        created here, all bundles or none, so half-placed jobs never hold a busy cluster), or one GPU or CPU."""
        job = self.store.get(job_id)
        resources = stored_resources(job.request) if job is not None else None
        if resources is None or resources.workers <= 1:
            options = _resources()
            if resources is not None:
                gpus = resources.gpus_per_worker if resources.gpus_per_worker is not None else options.get("num_gpus", 0)
                options = {"num_cpus": resources.cpus_per_worker, **({"num_gpus": gpus} if gpus else {})}
            self._say_waiting(job_id, [{"CPU": options.get("num_cpus", 1), "GPU": options.get("num_gpus", 0)}])
            return options
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from workers.ray_workers import PG_PREFIX, job_bundles

        bundles = job_bundles(resources, ray.cluster_resources().get("GPU", 0) >= 1)
        group = placement_group_of(job_id)
        if group is None:
            # SPREAD: one worker per node where the nodes allow it (each brings its own memory and device);
            # lifetime detached: it must outlive an API restart, as the job's detached actor does.
            group = placement_group(bundles, strategy="SPREAD", name=PG_PREFIX + job_id,
                                    lifetime="detached" if self.detached else None)
        if not group.wait(timeout_seconds=0.5):
            self._say_waiting(job_id, bundles)
        first = bundles[0]
        return {"num_cpus": first.get("CPU", 0), "num_gpus": first.get("GPU", 0),
                "scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0)}

    def _say_waiting(self, job_id: str, bundles: list[dict]) -> None:
        """Record in the queued job why it has not started, when the cluster has no room for it right now."""
        free = ray.available_resources()
        need_cpu = sum(b.get("CPU", 0) for b in bundles)
        need_gpu = sum(b.get("GPU", 0) for b in bundles)
        if free.get("CPU", 0) >= need_cpu and free.get("GPU", 0) >= need_gpu and len(bundles) == 1:
            return
        what = f"{len(bundles)} worker{'s' if len(bundles) > 1 else ''} of {bundles[0].get('CPU', 0):g} CPU" + (
            f" and {bundles[0].get('GPU', 0):g} GPU" if bundles[0].get("GPU") else "")
        self.store.set_waiting(job_id, f"waiting for {what} to be free at once (the cluster has "
                                       f"{free.get('CPU', 0):g} CPU and {free.get('GPU', 0):g} GPU free now)")

    def submit(self, job_id: str) -> None:
        """Hand the queued job to Ray and return at once; Ray starts it when its GPUs (or CPUs) are free."""
        self._let_previous_end(job_id)
        resources = self._placement(job_id)
        args = (job_id, self.settings, self.input_roots)
        if self.detached:
            name = ACTOR_PREFIX + job_id
            if self._actor(name) is not None:
                return  # already handed to Ray (waiting for resources or running)
            actor = JobActor.options(name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
                                     **resources).remote(*args)
            actor.run.remote()
            return
        with self._lock:
            self._forget_finished()
            if job_id in self._tasks:
                return
            ref = self._tasks[job_id] = run_job_task.options(name=f"llmpress-job-{job_id}", **resources).remote(*args)
        if "scheduling_strategy" in resources:
            # Its placement group goes as soon as the job's task ends, so jobs waiting for room get it at once.
            # Not from the callback itself: it runs on Ray's own thread, where a blocking Ray call deadlocks.
            ref.future().add_done_callback(
                lambda _: threading.Thread(target=remove_group, args=(job_id,), daemon=True).start())

    def _let_previous_end(self, job_id: str, seconds: float = 10.0) -> None:
        """A retried job's earlier work returns moments after the job ended: give it that moment, so the retry is
        not taken for work already handed to Ray."""
        import time

        job = self.store.get(job_id)
        if job is None or job.status != "queued" or job.attempt <= 1:
            return
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.detached:
                if self._actor(ACTOR_PREFIX + job_id) is None:
                    return
            else:
                with self._lock:
                    ref = self._tasks.get(job_id)
                if ref is None or ray.wait([ref], timeout=0, fetch_local=False)[0]:
                    return
            time.sleep(0.1)

    def cancel(self, job_id: str) -> None:
        """Request the cancel in the store (a running job stops between layers); work that has not started yet
        is also taken off Ray's queue."""
        job = self.store.request_cancel(job_id)
        if job is None or job.started_at is not None or job.status != "cancelled":
            return  # running: its worker sees the flag; finished: nothing to do
        if self.detached:
            actor = self._actor(ACTOR_PREFIX + job_id)
            if actor is not None:
                ray.kill(actor, no_restart=True)
            return
        with self._lock:
            ref = self._tasks.pop(job_id, None)
        if ref is not None:
            # Not started, or started after the cancel and returning at once: run_job found the job not queued.
            ray.cancel(ref, force=False)

    def handed_to_ray(self, job_id: str) -> bool:
        """Whether this dispatcher handed the job to Ray and that work has not ended (waiting or running)."""
        if self.detached:
            return self._actor(ACTOR_PREFIX + job_id) is not None
        with self._lock:
            self._forget_finished()
            return job_id in self._tasks

    def recover(self) -> None:
        """Take up what a previous run left: submit queued jobs again; re-attach running jobs whose Ray work is
        still there, re-queue (and submit) those whose work is gone."""
        self.remove_stale_groups()
        for job in self.store.recoverable():
            if job.status == "queued":
                self.submit(job.id)
            elif self._alive(job):
                log.info("job %s: re-attached to %s", job.id, job.worker_ref)
            elif _take_back(self.store, job):
                log.warning("job %s: its worker %s is gone; queued again (attempt %d)", job.id, job.worker_ref,
                            job.attempt + 1)
                self.submit(job.id)
            else:
                log.warning("job %s: its worker %s is gone; ended as %s", job.id, job.worker_ref,
                            self.store.get(job.id).status)

    # --- Ray work ------------------------------------------------------------------------------------------------

    def _alive(self, job: Job) -> bool:
        """Whether the Ray work named by the job's worker_ref is still there."""
        ref = job.worker_ref or ""
        if ref.startswith(ACTOR_PREFIX):
            return self._actor(ref) is not None
        if ref.startswith(TASK_PREFIX):
            with self._lock:
                self._forget_finished()
                task = self._tasks.get(job.id)
            return task is not None and task.task_id().hex() == ref[len(TASK_PREFIX):]
        return False  # no worker recorded, or one this dispatcher cannot look up

    @staticmethod
    def _actor(name: str):
        try:
            return ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return None

    def _forget_finished(self) -> None:
        """Drop the tasks that have ended, and their placement groups (caller holds the lock)."""
        if self._tasks:
            refs = list(self._tasks.values())
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
            finished = set(done)
            for job_id, ref in self._tasks.items():
                if ref in finished:
                    remove_group(job_id)
            self._tasks = {job_id: ref for job_id, ref in self._tasks.items() if ref not in finished}

    def remove_stale_groups(self) -> None:
        """Remove the placement groups of jobs that have ended (their work could not remove them: a lost node, an
        API restart in between)."""
        from ray.util import placement_group_table

        from workers.ray_workers import PG_PREFIX

        for entry in placement_group_table().values():
            name = entry.get("name") or ""
            if not name.startswith(PG_PREFIX) or entry.get("state") == "REMOVED":
                continue
            job = self.store.get(name[len(PG_PREFIX):])
            if job is None or job.status in TERMINAL:
                remove_group(name[len(PG_PREFIX):])
