"""Writing a Hugging Face model directory: shard by shard, into a temporary folder, published by one rename.

Nothing half-written is ever visible at the output path: shards go to a hidden sibling folder as blocks finish,
the index, config, tokenizer, recipe and report follow, and only then is the folder renamed into place. A failed
run removes its temporary folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

INDEX_NAME = "model.safetensors.index.json"
# Files of the source directory that travel with the weights (tokenizer, generation settings, chat template).
COPIED_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "spiece.model", "sentencepiece.bpe.model",
)


class OutputExistsError(FileExistsError):
    pass


_OS_ERROR = re.compile(r"os error (\d+)")


def save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' ``save_file``, with a failed write raised as the OSError it is, naming ``path``.

    safetensors reports a full disk as ``SafetensorError('... No space left on device (os error 28)')``, not an
    OSError: a caller could not tell it from a bad tensor, nor say which file it was.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except SafetensorError as exc:
        match = _OS_ERROR.search(str(exc))
        if match is None:
            raise
        code = int(match.group(1))
        raise OSError(code, os.strerror(code), str(path)) from exc
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


def shard_name(index: int, total: int) -> str:
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


# Bytes per element of the safetensors dtypes a shard may hold (from its header, without reading the data).
_ITEM_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
               "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class ShardWriter:
    """Writes numbered safetensors shards and, at the end, the index that maps every tensor to its shard."""

    def __init__(self, directory: Path, num_shards: int, on_written: Callable[[Path, str], None] | None = None):
        """``on_written(path, name)`` is called with each shard once it is complete (the job service uploads it
        then, while the next block is compressed)."""
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.num_shards = num_shards
        self.on_written = on_written
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        # Indices written or adopted: the caller may move a shard away once it has it (the job service deletes an
        # uploaded shard so that a node's disk holds about one block of output), so the folder cannot tell.
        self.written: set[int] = set()

    def write(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        name = shard_name(index, self.num_shards)
        # safetensors refuses views and shared storage: give it one contiguous CPU copy per tensor.
        plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        save_shard(plain, self.dir / name)
        self.written.add(index)
        for key, tensor in plain.items():
            self.weight_map[key] = name
            self.total_bytes += tensor.numel() * tensor.element_size()
        if self.on_written is not None:
            self.on_written(self.dir / name, name)

    def adopt(self, index: int, path: Path) -> None:
        """Take shard ``index``, already written (a finished block's checkpoint, put in place as ``path``), into the
        index as it is: not written again and not handed to ``on_written``."""
        from safetensors import safe_open

        name = shard_name(index, self.num_shards)
        if Path(path) != self.dir / name:
            raise ValueError(f"shard {index} must lie at {self.dir / name}, not {path}")
        self.written.add(index)
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                tensor = handle.get_slice(key)
                self.weight_map[key] = name
                numel = 1
                for dim in tensor.get_shape():
                    numel *= dim
                self.total_bytes += numel * _ITEM_BYTES[tensor.get_dtype()]

    def finish(self) -> None:
        """Write the index; shards that received no tensors are written empty so the numbering has no holes."""
        for index in range(self.num_shards):
            path = self.dir / shard_name(index, self.num_shards)
            if index not in self.written:
                save_shard({}, path)
                self.written.add(index)
                if self.on_written is not None:
                    self.on_written(path, path.name)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(self.weight_map.items()))}
        write_json(self.dir / INDEX_NAME, index)


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".part")
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")
    except OSError as exc:  # a full disk fails in write(), whose error names no file
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    os.replace(tmp, path)


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def copy_side_files(source: Path, target: Path) -> list[str]:
    copied = []
    for name in COPIED_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
            copied.append(name)
    return copied


class AtomicDirectory:
    """A temporary sibling of `output` that becomes `output` on publish(), or disappears on abort()."""

    def __init__(self, output: str | Path, *, overwrite: bool = False):
        self.output = Path(output).expanduser().resolve()
        if self.output.exists() and not overwrite:
            raise OutputExistsError(f"output: '{self.output}' already exists; choose another path or pass --overwrite")
        if self.output.exists() and not self.output.is_dir():
            raise OutputExistsError(f"output: '{self.output}' is a file, not a directory")
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.overwrite = overwrite
        self.tmp = self.output.parent / f".{self.output.name}.tmp-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()

    def publish(self) -> Path:
        if self.output.exists():
            # Move the old directory aside first so the new one appears in one rename, then delete the old.
            old = self.output.parent / f".{self.output.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.output, old)
            os.replace(self.tmp, self.output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.output)
        return self.output

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "AtomicDirectory":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def sparsity_config(report: dict, modifiers) -> dict:
    """What config.json records about the sparsity, in compressed-tensors' field names plus per-layer figures.

    Kept under its own key (not `quantization_config`) so transformers loads the dense weights as they are,
    without requiring the compressed-tensors package.
    """
    structures = sorted({m.mask_structure for m in modifiers if hasattr(m, "mask_structure")})
    targets = sorted({t for m in modifiers for t in getattr(m, "target_patterns", [])})
    ignore = sorted({t for m in modifiers for t in getattr(m, "ignore_patterns", [])})
    structure = structures[0] if len(structures) == 1 else ",".join(structures)
    return {
        "format": "dense",
        "sparsity_structure": "unstructured" if structure == "0:0" else structure,
        "global_sparsity": report["totals"]["sparsity"],
        "per_layer_sparsity": {layer["name"]: layer["sparsity"] for layer in report["layers"]},
        "targets": targets,
        "ignore": ignore,
        "modifiers": [type(m).__name__ for m in modifiers],
        "producer": "llmpress",
    }
