"""A job's per-block checkpoints: the engine's ``BlockCheckpoints`` kept in the job store and the output location.

A finished block's shard is uploaded to the job's output location as soon as it is written (the Publisher); once
the upload is done its record goes to the job store (``block_checkpoints``: shard name, sha256, size, report
entries, and the run's fingerprint). When the job is taken up again (a lost worker or node, an API restart, or a
retry of a failed job) the run asks for the blocks it may reuse: the records whose fingerprint equals its own, in
block order, each shard downloaded back and checked against its sha256. A changed fingerprint starts over and says
which part changed in the job's event log; so does a shard that is missing or no longer what was uploaded (the run
then resumes before it). Checkpointed shards outlive a failed attempt (the Publisher keeps them, no manifest
vouches for them); a cancel, a failed quality gate or a finished job drops them.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from service.engine.block_checkpoints import FinishedBlock, changed_parts
from service.jobs.job_store import JobStore
from service.jobs.storage import FileEntry, Publisher, StorageError

log = logging.getLogger(__name__)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class JobCheckpoints:
    """The checkpoints of one attempt of one job. ``progress`` gets ``{"resumed": {"layer": k, "layers": n}}`` when
    the run resumes (k: the first block computed again, counted from 1)."""

    def __init__(self, store: JobStore, job_id: str, attempt: int, publisher: Publisher):
        self.store = store
        self.job_id = job_id
        self.attempt = attempt
        self.publisher = publisher
        self.resumed: dict | None = None
        self.unsupported: str | None = None  # why this run records nothing (it could not resume from it)
        self.on_resumed = None  # called with ``resumed`` (the job's progress shows it from then on)

    def resume(self, fingerprint: dict[str, str], blocks: int, directory: Path,
               unsupported: str | None = None) -> list[FinishedBlock]:
        rows = self.store.checkpoints(self.job_id)
        if unsupported is not None:
            self.unsupported = unsupported
        if not rows:
            return []
        if unsupported is not None:
            return self._start_over(f"{unsupported} is not resumed from checkpoints yet")
        parts = changed_parts(rows[0]["fingerprint"], fingerprint)
        if parts or any(row["fingerprint"] != rows[0]["fingerprint"] for row in rows):
            return self._start_over(f"{', '.join(parts) or 'the run'} changed since the checkpoints were made")
        finished: list[FinishedBlock] = []
        for index, row in enumerate(rows):
            if row["block"] != index or index >= blocks:
                break
            dest = Path(directory) / row["shard"]
            try:
                self.publisher.store._download(row["shard"], dest)
                good = dest.stat().st_size == row["size"] and _sha256(dest) == row["sha256"]
            except (OSError, StorageError) as exc:
                log.warning("job %s: the checkpoint of block %d cannot be read back: %s", self.job_id, index, exc)
                good = False
            if not good:
                dest.unlink(missing_ok=True)
                self.store.add_event(self.job_id, "checkpoint", {
                    "block": index, "reason": f"{row['shard']} is missing or changed in the output; computed again"})
                break
            self.publisher.adopt(FileEntry(row["shard"], row["size"], row["sha256"]))
            finished.append(FinishedBlock(index, row["shard"], dest, row["report"]))
        if len(finished) < len(rows):
            self._drop_from(len(finished))
        if finished:
            self.resumed = {"layer": len(finished) + 1, "layers": blocks}
            self.store.add_event(self.job_id, "resumed", self.resumed)
            if self.on_resumed is not None:
                self.on_resumed(self.resumed)
            log.info("job %s: resumed at layer %d of %d", self.job_id, len(finished) + 1, blocks)
        return finished

    def finished(self, block: FinishedBlock, fingerprint: dict[str, str]) -> None:
        """Record the block once its shard is uploaded (not before: a record vouches for a file in the output)."""
        if self.unsupported is not None:
            return

        def record(entry: FileEntry) -> None:
            self.publisher.kept.add(entry.key)
            self.store.record_checkpoint(self.job_id, self.attempt, block.index, shard=entry.key,
                                         sha256=entry.sha256, size=entry.size, fingerprint=fingerprint,
                                         report=block.report)

        self.publisher.when_uploaded(block.shard, record)

    def discard(self) -> None:
        """Drop every checkpoint (a cancel, a failed quality gate, a finished job); the caller removes the files."""
        self.store.clear_checkpoints(self.job_id)

    def _start_over(self, reason: str) -> list[FinishedBlock]:
        self.store.add_event(self.job_id, "checkpoint", {"resumed": False, "reason": f"started over: {reason}"})
        log.info("job %s: started over: %s", self.job_id, reason)
        self.store.clear_checkpoints(self.job_id)
        return []

    def _drop_from(self, block: int) -> None:
        kept = [row for row in self.store.checkpoints(self.job_id) if row["block"] < block]
        self.store.clear_checkpoints(self.job_id)
        for row in kept:
            self.store.record_checkpoint(self.job_id, self.attempt, row["block"], shard=row["shard"],
                                         sha256=row["sha256"], size=row["size"], fingerprint=row["fingerprint"],
                                         report=row["report"])
