"""A model folder on S3 read tensor by tensor with ranged GETs, so a worker fetches only the block it works on.

``S3Checkpoint`` has the interface of ``service.engine.model_source.SafetensorsCheckpoint`` (``keys``, ``in``,
``read``) and is handed to ``StreamedModel(side_files_dir, checkpoint=...)``. Opening it lists the folder once and
reads each safetensors file's header (a ranged GET of its first bytes); ``read`` then GETs the byte ranges of the
requested tensors, adjacent ones of a file in one request. ``fetch_side_files`` downloads the rest of the folder
(config, tokenizer, index), so a job needs local disk for one block of weights at most, not for the model.

Everything an object says about itself (header length, offsets, shapes, dtypes, the index) is checked before a byte
of it is trusted: a malformed or hostile file gives a CheckpointError that names the object, never an unbounded
read. Every ranged GET carries the ETag seen when the folder was listed (``If-Match``), so an object replaced
while a job runs fails loudly instead of mixing two checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from itertools import pairwise
from pathlib import Path

import torch

from service.engine.model_source import (
    INDEX_NAME,
    PICKLE_NAMES,
    SINGLE_NAME,
    CheckpointError,
)
from service.jobs.storage import (
    MAX_ATTEMPTS,
    S3Store,
    StorageError,
    check_key,
    parse_uri,
)

log = logging.getLogger(__name__)

FIELD = "model"
WEIGHTS_SUFFIX = ".safetensors"
# safetensors itself refuses headers over 100 MB (its MAX_HEADER_SIZE); a real one is a few KB to a few MB (about
# 200 bytes a tensor). The limit keeps a hostile length field from making us fetch and parse gigabytes.
MAX_HEADER_BYTES = 100 * 2**20
# An index is about 100 bytes a tensor: 100 MiB is a million tensors, far past any released checkpoint.
MAX_INDEX_BYTES = 100 * 2**20
# The first GET of a file asks for this much, so the header (8-byte length + JSON) nearly always arrives in one
# request; a longer header costs a second GET for the rest.
HEADER_PROBE_BYTES = 64 * 2**10
# Two requested tensors of one file whose byte ranges are at most this far apart are fetched in one GET, the gap
# read and dropped. A GET's first byte costs ~10-50 ms on S3, the time to stream ~1 MiB at 20-100 MB/s, so a
# smaller gap is cheaper to read than to skip. A block's tensors are usually contiguous (gap 0).
COALESCE_GAP_BYTES = 2**20
# Bytes are moved from the response into the tensors in pieces of at most this size (the only transient buffer).
READ_CHUNK_BYTES = 8 * 2**20

# safetensors dtype name -> (torch dtype name, bytes per element); a name the installed torch lacks is left out.
_DTYPE_NAMES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U64": ("uint64", 8), "U32": ("uint32", 4), "U16": ("uint16", 2), "U8": ("uint8", 1), "BOOL": ("bool", 1),
    "C64": ("complex64", 8),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E4M3FNUZ": ("float8_e4m3fnuz", 1), "F8_E5M2": ("float8_e5m2", 1),
    "F8_E5M2FNUZ": ("float8_e5m2fnuz", 1), "F8_E8M0": ("float8_e8m0fnu", 1),
}
DTYPES: dict[str, torch.dtype] = {st: getattr(torch, name) for st, (name, _) in _DTYPE_NAMES.items()
                                  if isinstance(getattr(torch, name, None), torch.dtype)}
ITEMSIZE: dict[str, int] = {st: _DTYPE_NAMES[st][1] for st in DTYPES}


# Weights in other formats a model folder may also hold (pickles: never read here, and often gigabytes).
OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".gguf", ".h5", ".msgpack", ".onnx")


def _is_weights(key: str) -> bool:
    """Whether fetch_side_files leaves ``key`` out (any case: better one file too few than gigabytes too many)."""
    return key.lower().endswith((WEIGHTS_SUFFIX, *OTHER_WEIGHTS))


class S3Checkpoint:
    """Lazy, read-only access to the tensors of the safetensors files in an ``s3://bucket/prefix/`` model folder.

    Picklable (it is sent to Ray workers on other nodes): the state is the URI, the parsed headers and each file's
    size and ETag; the S3 client is made on first use in each process. ``bytes_read`` and ``requests`` count what
    this process fetched from S3 (LIST pages and GETs; bytes of bodies received, coalescing gaps included); they
    start at 0 in every process.
    """

    def __init__(self, uri: str):
        scheme, bucket, prefix = parse_uri(uri, field=FIELD, folder=True)
        if scheme != "s3":
            raise StorageError(f"{FIELD}: '{uri}' is not an S3 location (s3://bucket/prefix/); a local folder is "
                               "read by SafetensorsCheckpoint")
        self.bucket = bucket
        self.prefix = prefix + "/"
        self.uri = f"s3://{bucket}/{self.prefix}"
        self._store: S3Store | None = None
        self.bytes_read = 0
        self.requests = 0
        # {object name relative to the folder: (size in bytes, ETag as S3 gives it, quotes included)}
        self._objects = self._list()
        # {tensor key: (file name, safetensors dtype, shape, first byte, end byte)}, bytes absolute in the object
        self._tensors: dict[str, tuple[str, str, tuple[int, ...], int, int]] = {}
        self._index = INDEX_NAME if INDEX_NAME in self._objects else None
        if self._index is not None:
            names = sorted(set(self._read_index().values()))
        elif SINGLE_NAME in self._objects:
            names = [SINGLE_NAME]
        else:  # like SafetensorsCheckpoint's glob: files at the top of the folder only
            names = sorted(n for n in self._objects if "/" not in n and n.endswith(WEIGHTS_SUFFIX))
            if not names:
                if any(name in self._objects for name in PICKLE_NAMES):
                    raise CheckpointError(
                        f"{FIELD}: '{self.uri}' holds only pickle (.bin) weights, which can run code when loaded; "
                        "convert it to safetensors")
                raise CheckpointError(f"{FIELD}: no safetensors weights in '{self.uri}'")
        self._files = names
        for name in names:
            for key, entry in self._read_header(name).items():
                self._tensors[key] = entry
        # Only what reads need travels with the pickle, however many other objects the folder holds.
        self._objects = {name: self._objects[name] for name in self._files + ([self._index] if self._index else [])}

    def __repr__(self) -> str:
        return f"S3Checkpoint({self.uri!r})"

    # ------------------------------------------------------------------------------------------ the interface

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The tensors for ``keys`` (KeyError for one not stored), on the CPU in their stored dtype and shape, in
        memory the caller owns: the bytes are written straight into tensors allocated here, one copy in all.

        Per file, the requested ranges are sorted and merged while the gap to the next is at most
        ``COALESCE_GAP_BYTES``: what is fetched is the tensors' own bytes plus those gaps, nothing else.
        """
        wanted = list(dict.fromkeys(keys))
        by_file: dict[str, list[str]] = {}
        for key in wanted:
            by_file.setdefault(self._tensors[key][0], []).append(key)
        out: dict[str, torch.Tensor] = {}
        for name, file_keys in by_file.items():
            runs: list[tuple[int, int, list[tuple[int, memoryview]]]] = []
            for key in sorted(file_keys, key=lambda k: self._tensors[k][3]):
                _, dtype, shape, start, end = self._tensors[key]
                tensor = torch.empty(shape, dtype=DTYPES[dtype])
                out[key] = tensor
                if end == start:
                    continue
                # A flat byte view of the new tensor: the body's bytes are copied into it as they arrive.
                target = (start, memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
                if runs and start - runs[-1][1] <= COALESCE_GAP_BYTES:
                    runs[-1] = (runs[-1][0], max(runs[-1][1], end), runs[-1][2] + [target])
                else:
                    runs.append((start, end, [target]))
            for start, end, targets in runs:
                self._read_run(name, start, end, targets)
        return {key: out[key] for key in wanted}

    def fingerprint(self) -> dict[str, str]:
        """{file name: ETag} of every safetensors file read and of the index when there is one: equal
        fingerprints mean the same bytes (for resuming a job)."""
        names = self._files + ([self._index] if self._index else [])
        return {name: self._objects[name][1].strip('"') for name in names}

    # --------------------------------------------------------------------------------------------- pickling

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_store=None, bytes_read=0, requests=0)  # a client is per process; so are the counters
        return state

    # ------------------------------------------------------------------------------------------------ S3

    def _s3(self) -> S3Store:
        if self._store is None:
            self._store = S3Store(self.bucket, self.prefix, field=FIELD)  # its client is storage._s3_client()
        return self._store

    def _where(self, name: str) -> str:
        return f"{self.uri}{name}"

    def _list(self) -> dict[str, tuple[int, str]]:
        store = self._s3()
        objects = {}
        with store._errors("listing", ""):
            for page in store.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                               Prefix=self.prefix):
                self.requests += 1
                for obj in page.get("Contents", []):
                    objects[obj["Key"][len(self.prefix):]] = (int(obj["Size"]), obj["ETag"])
        if not objects:
            raise StorageError(f"{FIELD}: nothing found at {self.uri}")
        return objects

    def _get(self, name: str, start: int, end: int):
        """The open body of bytes [start, end) of object ``name``, after checking that it is exactly that."""
        from botocore.exceptions import ClientError

        store = self._s3()
        with store._errors("reading", name):
            try:
                self.requests += 1
                response = store.client.get_object(Bucket=self.bucket, Key=self.prefix + name,
                                                   Range=f"bytes={start}-{end - 1}", IfMatch=self._objects[name][1])
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if code in ("PreconditionFailed", "412"):
                    raise CheckpointError(f"{FIELD}: {self._where(name)} changed since the checkpoint was opened "
                                          "(its ETag differs); start the job again") from None
                raise
        body = response["Body"]
        if int(response.get("ContentLength", -1)) != end - start:  # a server that ignored the Range
            body.close()
            raise CheckpointError(f"{FIELD}: {self._where(name)}: asked for bytes {start}-{end - 1}, the server "
                                  f"answered {response.get('ContentLength')} bytes")
        return body

    def _read_bytes(self, name: str, start: int, end: int) -> bytes:
        buffer = bytearray(end - start)
        self._read_run(name, start, end, [(start, memoryview(buffer))])
        return bytes(buffer)

    def _read_run(self, name: str, start: int, end: int, targets: list[tuple[int, memoryview]]) -> None:
        """Fetch bytes [start, end) of ``name`` in one GET, copying those at ``offset`` into each (offset, view)
        target (sorted, not overlapping) and dropping the rest. A connection lost mid-body is resumed from the
        first missing byte (botocore retries only until the headers arrive), MAX_ATTEMPTS requests in all."""
        from botocore.exceptions import (
            IncompleteReadError,
            ReadTimeoutError,
            ResponseStreamingError,
        )

        pos, index, attempt = start, 0, 1
        while pos < end:
            body = self._get(name, pos, end)
            try:
                while pos < end:
                    while index < len(targets) and pos >= targets[index][0] + len(targets[index][1]):
                        index += 1
                    if index < len(targets) and pos >= targets[index][0]:
                        offset, view = targets[index]
                        take = min(READ_CHUNK_BYTES, offset + len(view) - pos)
                    else:
                        offset, view = None, None
                        take = min(READ_CHUNK_BYTES, (targets[index][0] if index < len(targets) else end) - pos)
                    chunk = body.read(take)
                    if not chunk:
                        raise IncompleteReadError(actual_bytes=pos - start, expected_bytes=end - start)
                    if view is not None:
                        view[pos - offset:pos - offset + len(chunk)] = chunk
                    pos += len(chunk)
                    self.bytes_read += len(chunk)
            except (IncompleteReadError, ReadTimeoutError, ResponseStreamingError) as exc:
                if attempt >= MAX_ATTEMPTS:
                    raise StorageError(f"{FIELD}: reading {self._where(name)} failed {attempt} times, last at byte "
                                       f"{pos}: {type(exc).__name__}") from None
                attempt += 1
                log.warning("reading %s broke off at byte %d (%s); resuming", self._where(name), pos,
                            type(exc).__name__)
            finally:
                body.close()

    # ------------------------------------------------------------------------------------- index and headers

    def _read_index(self) -> dict[str, str]:
        where = self._where(INDEX_NAME)
        size = self._objects[INDEX_NAME][0]
        if size > MAX_INDEX_BYTES:
            raise CheckpointError(f"{FIELD}: {where} is {size} bytes, over the {MAX_INDEX_BYTES}-byte limit for "
                                  "an index")
        try:
            weight_map = json.loads(self._read_bytes(INDEX_NAME, 0, size).decode())["weight_map"]
        except (ValueError, KeyError, TypeError, RecursionError) as exc:  # RecursionError: nesting too deep
            raise CheckpointError(f"{FIELD}: {where} is not a valid index ({type(exc).__name__}: {exc})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in weight_map.items()):
            raise CheckpointError(f"{FIELD}: {where}: weight_map must map tensor names to file names (strings)")
        for name in sorted(set(weight_map.values())):
            try:
                check_key(name, FIELD)
            except StorageError:
                raise CheckpointError(f"{FIELD}: {where} names {name!r}, which is not a file inside the model "
                                      "folder") from None
            if name not in self._objects:
                raise CheckpointError(f"{FIELD}: {where} names '{name}', which is not in {self.uri}")
        return weight_map

    def _read_header(self, name: str) -> dict[str, tuple[str, str, tuple[int, ...], int, int]]:
        """{tensor key: (name, dtype, shape, first byte, end byte)} from the file's header, every field checked."""
        where = self._where(name)
        size = self._objects[name][0]
        if size < 8:
            raise CheckpointError(f"{FIELD}: {where} is {size} bytes, too short for a safetensors header")
        head = self._read_bytes(name, 0, min(size, HEADER_PROBE_BYTES))
        (length,) = struct.unpack("<Q", head[:8])
        if length > MAX_HEADER_BYTES:
            raise CheckpointError(f"{FIELD}: {where} declares a {length}-byte header, over the limit of "
                                  f"{MAX_HEADER_BYTES} bytes")
        if 8 + length > size:
            raise CheckpointError(f"{FIELD}: {where} declares a {length}-byte header, beyond the object's "
                                  f"{size} bytes")
        text = head[8:8 + length]
        if len(text) < length:
            text += self._read_bytes(name, len(head), 8 + length)
        try:
            header = json.loads(text.decode())  # UTF-8, as the format says; json.loads(bytes) would guess
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError included; RecursionError: nesting too deep
            raise CheckpointError(f"{FIELD}: {where} has a header that is not valid JSON ({exc})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{FIELD}: {where} has a header that is not a JSON object")
        data_start, data_size = 8 + length, size - 8 - length
        entries, spans = {}, []
        for key in sorted(header):
            if key == "__metadata__":
                continue
            entry = header[key]
            try:
                dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            except (TypeError, KeyError, ValueError):
                raise CheckpointError(f"{FIELD}: {where}: tensor '{key}' needs dtype, shape and two "
                                      "data_offsets") from None
            if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
                raise CheckpointError(f"{FIELD}: {where}: tensor '{key}' has shape {shape!r}, not a list of "
                                      "non-negative integers")
            if not (type(start) is int and type(end) is int):
                raise CheckpointError(f"{FIELD}: {where}: tensor '{key}' has data_offsets that are not integers")
            if not isinstance(dtype, str) or dtype not in DTYPES:
                raise CheckpointError(f"{FIELD}: {where}: tensor '{key}' has dtype {dtype!r}, which this reader "
                                      f"does not know (known: {', '.join(DTYPES)})")
            if not 0 <= start <= end <= data_size:
                what = "end before they start" if 0 <= end < start else "lie outside the object's data"
                raise CheckpointError(f"{FIELD}: {where}: tensor '{key}' has data_offsets [{start}, {end}] that "
                                      f"{what} ({data_size} bytes)")
            expected = math.prod(shape) * ITEMSIZE[dtype]
            if end - start != expected:
                raise CheckpointError(f"{FIELD}: {where}: tensor '{key}' spans {end - start} bytes, but {dtype} "
                                      f"of shape {shape} is {expected}")
            entries[key] = (name, dtype, tuple(shape), data_start + start, data_start + end)
            if end > start:
                spans.append((start, end, key))
        # Each request streams its bytes in order into one tensor at a time, so tensors may not share bytes (the
        # safetensors format forbids it too).
        spans.sort()
        for (_, end_a, key_a), (start_b, _, key_b) in pairwise(spans):
            if start_b < end_a:
                raise CheckpointError(f"{FIELD}: {where}: tensors '{key_a}' and '{key_b}' overlap")
        return entries


class _SideFiles(S3Store):
    """The model folder less its safetensors weights: download_prefix's key checks then apply to what is left."""

    def list(self, prefix: str = "") -> list[str]:
        return [key for key in super().list(prefix) if not _is_weights(key)]


def fetch_side_files(uri: str, dest: Path) -> Path:
    """Download every object of the ``s3://bucket/prefix/`` model folder except its weights (``*.safetensors``, and
    pickles and other formats never read: ``OTHER_WEIGHTS``) (config,
    generation config, tokenizer files, the index) into ``dest``, keeping the tree; ``dest``.

    The same rules as ``storage.fetch``: every key is checked before anything is written, and one that would land
    outside ``dest`` (a '..', absolute, empty or backslashed segment, a symlinked folder) refuses the download.
    """
    scheme, bucket, prefix = parse_uri(uri, field=FIELD, folder=True)
    if scheme != "s3":
        raise StorageError(f"{FIELD}: '{uri}' is not an S3 location (s3://bucket/prefix/)")
    return _SideFiles(bucket, prefix, field=FIELD).download_prefix("", dest)
