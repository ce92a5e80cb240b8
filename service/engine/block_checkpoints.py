"""Per-block checkpoints of a streamed compression: what a run's result depends on (its fingerprint), and how the
caller records finished blocks and hands back the ones a run taken up again may reuse.

A block's checkpoint is its output shard (written, and in the service uploaded, as soon as the block is done) and
its report entries. A run taken up again with the same fingerprint reuses the leading finished blocks: it does not
calibrate or solve them again, it only replays the calibration samples forward through their compressed weights to
rebuild the next block's inputs, which gives the very same bits as the uninterrupted run (same batches on the same
workers, same kernels). Any change to what the result depends on changes the fingerprint, and the run starts over.

The engine knows nothing of where checkpoints are kept: ``BlockCheckpoints`` is implemented by the job runner
(service.jobs.checkpoints: records in the job store, shards in the output location).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

# How much of each safetensors file the model's fingerprint hashes: the header (every tensor's name, dtype, shape
# and offsets) lies at the front. Hashing every byte of a 600B model (over a terabyte) at each start would cost more
# than the blocks a resume saves; size, modification time and header catch a replaced or rewritten file.
HEADER_HASH_BYTES = 1 << 20


@dataclass
class FinishedBlock:
    """A block whose shard is written: ``index`` in the stage (0-based), the shard's file name, where it lies locally
    (``path``), and its report entries ({"layer": {...}, "modules": {...}})."""

    index: int
    shard: str
    path: Path | None = None
    report: dict = field(default_factory=dict)


class BlockCheckpoints(Protocol):
    def resume(self, fingerprint: dict[str, str], blocks: int, directory: Path,
               unsupported: str | None = None) -> list[FinishedBlock]:
        """The leading finished blocks a run with ``fingerprint`` may reuse, each shard placed in ``directory``
        (checked against what was recorded); [] to start over (the implementation says why, e.g. in the job's event
        log). ``unsupported``: why this run cannot resume at all (checkpoints made before are then dropped)."""
        ...

    def finished(self, block: FinishedBlock, fingerprint: dict[str, str]) -> None:
        """Block ``block.index``'s shard is written at ``block.path`` (already handed to ``on_shard``)."""
        ...


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:32]


def model_files_fingerprint(model_dir: Path, checkpoint=None) -> str:
    """A digest of the model's weight files: a remote reader's own (ETags), else each local safetensors file's size,
    modification time and header (``HEADER_HASH_BYTES``), plus config.json."""
    own = getattr(checkpoint, "fingerprint", None)
    if callable(own):
        files: dict[str, Any] = dict(own())
    else:
        files = {}
        for path in sorted(Path(model_dir).glob("*.safetensors")):
            stat = path.stat()
            with path.open("rb") as handle:
                head = hashlib.sha256(handle.read(HEADER_HASH_BYTES)).hexdigest()
            files[path.name] = [stat.st_size, stat.st_mtime_ns, head]
    config = Path(model_dir) / "config.json"
    if config.is_file():
        files["config.json"] = hashlib.sha256(config.read_bytes()).hexdigest()
    return _digest(files)


def run_fingerprint(*, model: str, recipe_yaml: str, tokens: torch.Tensor | None, batch_size: int | None,
                    pipeline: str, workers: int) -> dict[str, str]:
    """What a streamed run's bits depend on, one digest per part so a mismatch can say which part changed: the model
    files, the canonical recipe, the calibration tokens (dataset, sampling, seed, sequence length and tokenizer all
    end up in them) with their batching, the pipeline mode, the number of workers (their partial statistics are
    summed in rank order) and the versions of llmpress and torch."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("llmpress")
    except PackageNotFoundError:  # run from a source tree
        ours = "source"
    calibration = "none"
    if tokens is not None:
        calibration = hashlib.sha256(tokens.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:32]
    return {
        "model": model,
        "recipe": hashlib.sha256(recipe_yaml.encode()).hexdigest()[:32],
        "calibration": f"{calibration}/{batch_size}",
        "pipeline": pipeline,
        "workers": str(workers),
        "llmpress": ours,
        "torch": torch.__version__,
    }


# The parts of a fingerprint, as a person reads them in "started over: ... changed".
PART_NAMES = {
    "model": "the model files", "recipe": "the recipe", "calibration": "the calibration data",
    "pipeline": "the pipeline mode", "workers": "the number of workers", "llmpress": "the llmpress version",
    "torch": "the torch version",
}


def changed_parts(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """The readable names of the parts that differ (a part only one side has counts as changed)."""
    return [PART_NAMES.get(k, k) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
